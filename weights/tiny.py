"""A tiny random-weight Llama model and tokenizer, built offline and deterministically.

No model can be downloaded in tests, CI or on a laptop without a hub token, yet the engines
need a real model folder that vLLM and transformers both load. This module builds one: a
two-layer ``LlamaForCausalLM`` (under a million parameters, a few MB) with random weights and
a byte-level BPE tokenizer trained on generated catalogue-like text, saved together with
``save_pretrained``. Its outputs are gibberish; its shapes, tokenizer, chat template and
special tokens are real, which is what the queue, batching and structured-output code needs.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions, so
importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MODEL_NAME = "tiny-llama"
# Bump when the recipe changes, so folders built by an older recipe are rebuilt.
RECIPE_VERSION = 1
MARKER_FILE = "inferq-tiny-model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

VOCAB_SIZE = 2048
MAX_POSITIONS = 1024
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, *ROLE_TOKENS)

# Each message is "<|role|>\ncontent</s>\n"; the prompt opens with <s> and, when asked,
# ends with "<|assistant|>\n" so the model answers as the assistant.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_tiny_model(models_dir: Path) -> Path:
    """Return the tiny model's folder under ``models_dir``, building it first if needed.

    The build goes to a temporary sibling folder that is renamed into place at the end, so
    a crash never leaves a half-written model. An exclusive lock file serialises concurrent
    builders (several workers starting at once); whoever gets the lock second finds the
    model already built and returns.
    """
    models_dir = Path(models_dir)
    target = models_dir / MODEL_NAME
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models_dir / f".{MODEL_NAME}.lock"):
        if _is_complete(target):
            return target
        # We hold the lock, so any temporary folder left here is from a crashed build.
        for stale in models_dir.glob(f".{MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
            build_tiny_model(tmp)
            if target.exists():  # incomplete or from an older recipe
                old = tmp.with_name(tmp.name + "-old")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(target: Path, *, seed: int = 0) -> None:
    """Train the tokenizer, create the random model and save both into ``target``.

    The same ``seed`` gives the same tokenizer and weights. The marker file is written last:
    its presence is what :func:`ensure_tiny_model` takes as "complete".
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = fit_tokenizer(_corpus(random.Random(seed)))
    tokenizer.save_pretrained(str(target))
    model = new_model(tokenizer, seed=seed).eval()
    model.save_pretrained(str(target), safe_serialization=True)

    marker = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (target / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a model built by the current recipe."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe_version") != RECIPE_VERSION:
        return False
    return all((folder / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocking) for the duration of the block."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fit_tokenizer(lines: Iterable[str], *, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE to ``lines`` and wrap it for transformers, chat template on.

    Byte-level pre-tokenisation and decoding mean every string (any unicode, any bytes)
    round-trips, and there is never an unknown token. The same lines in the same order give
    the same merges. :mod:`inferq.training.train` fits one to its product texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def new_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int, hidden: int = 128, layers: int = 2
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer``, in float32."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **special_ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[no-untyped-call,arg-type]
    model.generation_config = GenerationConfig(**special_ids)  # type: ignore[no-untyped-call]
    return model


# --- the training corpus -------------------------------------------------------------------
# Varied enough that BPE finds ~2,000 merges: catalogue phrases, queries, JSON, labels,
# numbers, punctuation and non-ASCII letters, plus made-up words for breadth.

# fmt: off
_BRANDS = ("Northwind", "Alder & Co", "Kestrel", "Maison Brûlé", "Urban Fjord", "Tidewater",
    "Stridewell", "Ironpeak", "Hjem", "Oakhaven", "Casa Lumo", "Nordlys", "Cucina Vera",
    "Hearthstone", "Kōbō", "Voltix", "Cablecraft", "Lumen Labs", "Wanderloom", "Fjellpack")
_COLOURS = ("navy", "heather grey", "olive green", "off-white", "burgundy", "black", "white",
    "sand", "sky blue", "tan", "charcoal", "forest green", "coral", "cognac", "walnut", "sage",
    "terracotta", "cream", "cherry red", "graphite", "teal", "copper", "mint", "lilac", "mustard",
    "rust", "camel", "stone grey", "space grey", "midnight blue")
_MATERIALS = ("organic cotton", "merino wool", "recycled polyester", "linen", "nylon",
    "full-grain leather", "suede", "canvas", "recycled mesh", "vegan leather", "solid oak",
    "walnut veneer", "powder-coated steel", "bamboo", "rattan", "velvet", "cast iron",
    "stainless steel", "beech wood", "borosilicate glass", "ceramic", "braided nylon", "silicone",
    "aluminium", "neoprene", "waxed canvas", "cork")
_NOUNS = ("T-shirt", "hoodie", "jacket", "trousers", "sweater", "shirt", "vest", "skirt",
    "running shoes", "boots", "sneakers", "loafers", "sandals", "bookshelf", "table", "chair",
    "stool", "sofa", "desk", "nightstand", "frying pan", "saucepan", "knife", "bowl", "kettle",
    "cutting board", "mug", "cable", "phone case", "laptop sleeve", "charger", "power bank",
    "adapter", "backpack", "tote bag", "duffel", "belt bag")
_SIZES = ("XS", "S", "M", "L", "XL", "XXL", "EU 38", "EU 42", "US 9", "UK 8", "24 cm", "1.7 L",
    "500 ml", "13-inch", "2 m", "20 L", "one size", "80 x 40 cm")
_ADJECTIVES = ("lightweight", "durable", "soft", "breathable", "waterproof", "compact", "classic",
    "modern", "slim", "relaxed", "sturdy", "elegant", "versatile", "cosy", "minimal", "premium",
    "everyday", "handmade", "vintage", "sustainable")
_LABELS = ("positive", "negative", "neutral", "spam", "not_spam", "apparel", "shoes", "furniture",
    "kitchenware", "electronics", "bags", "other", "yes", "no", "unknown", "urgent", "billing",
    "shipping", "returns", "complaint", "praise", "question")
_KEYS = ("brand", "colour", "color", "size", "material", "category", "label", "price", "currency",
    "id", "name", "title", "score", "in_stock", "tags", "sku", "rating", "answer", "reason",
    "confidence", "items", "text", "summary")
_QUERIES = ("Extract the brand, colour, size and material as JSON.", "What colour is this product?",
    "Classify the review as positive or negative.", "Summarise the description in one sentence.",
    "Is this message spam?", "Which category does this item belong to?", "Answer with yes or no.",
    "Return only valid JSON that matches the schema.",
    "Translate to French: the blue jacket is waterproof.")
_FOREIGN = ("crème", "façade", "naïve", "Größe", "Farbe", "größer", "señor", "años", "café",
    "déjà vu", "smörgåsbord", "Ærø", "Łódź", "東京", "価格", "色", "Привет", "цвет", "€", "£",
    "°C", "\u2013", "—", "…", "✓", "★", "😀", "👍")
_SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tor", "vel", "an", "qu", "is", "bra", "ne", "dor",
    "fi", "gla", "hu", "jo", "zen", "pra", "wi", "ox", "ul", "ce", "ty", "str", "ing", "ment",
    "tion", "er", "es", "ly", "ed", "th", "ch", "sh", "pl")
# fmt: on


def _corpus(rng: random.Random, lines: int = 6000) -> Iterator[str]:
    """Yield ``lines`` deterministic training lines of mixed kinds."""
    makers = (_description, _query, _json_snippet, _label_line, _numbers_line, _made_up_line)
    weights = (30, 15, 25, 10, 10, 10)
    for _ in range(lines):
        yield rng.choices(makers, weights)[0](rng)


def _description(rng: random.Random) -> str:
    brand, colour, material = rng.choice(_BRANDS), rng.choice(_COLOURS), rng.choice(_MATERIALS)
    noun, size, adj = rng.choice(_NOUNS), rng.choice(_SIZES), rng.choice(_ADJECTIVES)
    forms = (
        f"The {brand} {noun} comes in {colour} and is made from {material}. Size: {size}.",
        f"{brand} {noun}, {colour}, {material}, size {size}. A {adj} choice.",
        f"Colour: {colour} | Material: {material} | Size: {size} | Brand: {brand}",
        f"{adj.capitalize()} {colour} {noun} in {material} by {brand} ({size}).",
        f"Crafted from {material}, this {adj} {noun} is available in {size} and {colour}.",
    )
    return rng.choice(forms)


def _query(rng: random.Random) -> str:
    text = rng.choice(_QUERIES)
    if rng.random() < 0.5:
        text = f"{rng.choice(ROLE_TOKENS)}\n{text}{EOS}\n{ROLE_TOKENS[2]}\n"
    return text


def _json_snippet(rng: random.Random) -> str:
    obj: dict[str, object] = {}
    for key in rng.sample(_KEYS, k=rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.45:
            obj[key] = rng.choice(_COLOURS + _MATERIALS + _LABELS + _BRANDS + _SIZES)
        elif kind < 0.65:
            obj[key] = rng.randint(0, 99999)
        elif kind < 0.8:
            obj[key] = round(rng.uniform(0, 500), 2)
        elif kind < 0.9:
            obj[key] = rng.choice((True, False, None))
        else:
            obj[key] = rng.sample(_LABELS, k=rng.randint(0, 3))
    style = rng.random()
    if style < 0.4:
        return json.dumps(obj)
    if style < 0.7:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(obj, indent=2, ensure_ascii=False)


def _label_line(rng: random.Random) -> str:
    label = rng.choice(_LABELS)
    return rng.choice(
        (
            f"Label: {label}",
            f'{{"label": "{label}"}}',
            f"answer={label}",
            f"The answer is {label}.",
            label,
        )
    )


def _numbers_line(rng: random.Random) -> str:
    parts = (
        f"{rng.randint(0, 9999)}",
        f"{rng.uniform(0, 999):.2f}",
        f"€{rng.randint(5, 900)}",
        f"${rng.randint(5, 900)}.99",
        f"{rng.randint(1, 99)}%",
        f"p{rng.randint(1, 9999):04d}",
        f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/20{rng.randint(10, 30)}",
        rng.choice(_FOREIGN),
    )
    return " ".join(rng.sample(parts, k=rng.randint(2, len(parts))))


def _made_up_line(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(3, 12)):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        words.append(word.capitalize() if rng.random() < 0.2 else word)
    return " ".join(words) + rng.choice((".", "!", "?", ",", ";", ":", " -", ""))
