"""Train the tiny Llama to extract product attributes, so quality checks have signal.

The random tiny model answers gibberish, which makes every quality comparison a tie. A few
minutes of CPU training on generated catalogue copy, in exactly the chat format the worker
sends for the ``extract`` kind, gives a model that fills most fields correctly under the
JSON-schema constraint; an early snapshot of the same run is the "degraded" model a regression
check must catch.

Training examples come from :mod:`inferq.training.products` (the generator of the demo's
catalogue) with seeds other than the demo's. Heavy libraries are imported inside functions.

The tokenizer is fitted to the very texts and answers the model will see (the stock tiny
tokenizer splits a value at the start of a JSON string, ``"cotton``, unlike the word in the
description, `` cotton``, so the model would have to learn to copy across two spellings);
most values become one or two tokens in both places and every sequence gets shorter, which is
what lets a few CPU minutes suffice.

``make demo`` runs the trained model without training it: the default run's result ships in
the package as one file (:data:`SHIPPED_PATH`), the tensors with the folder's small files
(config, tokenizer, chat template) in the safetensors header. ``python -m
inferq.training.train`` reproduces that file; :func:`ensure_shipped_model` unpacks it into the
model cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.enums import TaskKind
from inferq.training.products import make_product
from tasks.templates import SamplingIn, render

TRAINED_NAME = "tiny-llama-extract"
DEGRADED_NAME = "tiny-llama-extract-degraded"
DATA = Path(__file__).resolve().parents[1] / "data"
SCHEMA_PATH = DATA / "product_schema.json"
# The demo's catalogue is the held-out set: no training text equals one of its texts.
HELD_OUT_PATH = DATA / "products.jsonl"
TRAIN_SEED = 1
TRAINED_MARKER = ".inferq-trained.json"
# The default run's trained model, packed into one file (see pack_model), and the folder in
# the model cache it unpacks to; the folder's marker holds the file's digest.
SHIPPED_PATH = DATA / "tiny-llama-extract.safetensors"
SHIPPED_NAME = "tiny-llama-extract-shipped"
SHIPPED_MARKER = ".inferq-shipped"
# The one header key of a packed file: a JSON object of the folder's small files, name -> text
# (one key, because safetensors writes several in no fixed order).
FILES_KEY = "inferq.files"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Knobs of one training run; the defaults take a few CPU minutes on 2 cores."""

    steps: int = 900
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    hidden: int = 128
    layers: int = 2
    # Distinct generated products to draw batches from (encoded once, up front).
    examples: int = 6000
    # The degraded copy is the same run snapshotted after this share of the steps.
    degraded_share: float = 0.3
    seed: int = 0


# A short run (about a minute and a half on 2 busy cores) that still separates the two copies
# clearly: tests and the evaluation benchmark use it, cached by :func:`ensure_trained`.
QUICK = TrainConfig(steps=200, examples=1500, warmup=10, degraded_share=0.25)


@dataclass(frozen=True, slots=True)
class TrainResult:
    trained: Path
    degraded: Path
    seconds: float
    # CPU seconds of this process (all threads): comparable on a shared, busy machine.
    cpu_seconds: float
    first_loss: float
    last_loss: float
    steps: int


def products(seed: int, count: int, *, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``count`` generated products (text + ground-truth attributes), skipping ``exclude`` texts."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    index = 0
    while len(out) < count:
        index += 1
        item = make_product(rng, index)
        if exclude is None or item["text"] not in exclude:
            out.append(item)
    return out


def held_out_products(limit: int | None = None) -> list[dict[str, Any]]:
    """The demo catalogue's products (text + attributes), the first ``limit`` of them."""
    lines = HELD_OUT_PATH.read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return items[:limit] if limit is not None else items


def extract_target(attributes: dict[str, str]) -> str:
    """The answer as the constrained decoder emits it: compact JSON, schema key order."""
    return json.dumps(attributes, ensure_ascii=False, separators=(",", ":"))


def encode_example(
    tokenizer: Any, schema: dict[str, Any], item: dict[str, Any]
) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and where the answer starts (loss is on the answer)."""
    request = render(TaskKind.EXTRACT, {"text": item["text"], "schema": schema}, SamplingIn())
    messages = [m.model_dump() for m in request.messages or []]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(extract_target(item["attributes"]), add_special_tokens=False)[
        "input_ids"
    ]
    return [*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids)


def train_tiny(
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Build a fresh tiny model, train it and save the trained and degraded copies.

    Both copies are written to temporary siblings and renamed into place, so an interrupted
    run never leaves a half-saved model where an engine would load it.
    """
    import torch

    from weights.tiny import fit_tokenizer, new_model

    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = json.loads(SCHEMA_PATH.read_text())
    held_out = {item["text"] for item in held_out_products()}
    pool = products(TRAIN_SEED + config.seed, config.examples, exclude=held_out)
    tokenizer = fit_tokenizer(_tokenizer_lines(pool, schema))
    model = new_model(tokenizer, seed=config.seed, hidden=config.hidden, layers=config.layers)
    encoded = [encode_example(tokenizer, schema, item) for item in pool]
    batches = _batches(encoded, tokenizer.pad_token_id, config)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(config))
    degraded_step = max(1, int(config.steps * config.degraded_share))
    degraded: Path | None = None
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    model.train()
    for step in range(1, config.steps + 1):
        loss = _answer_loss(model, *next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == 1):
            log(f"step {step}/{config.steps} loss {losses[-1]:.4f}")
        if step == degraded_step:
            degraded = _save(model, tokenizer, out_dir / DEGRADED_NAME)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    trained = _save(model, tokenizer, out_dir / TRAINED_NAME)
    assert degraded is not None
    window = max(1, min(10, len(losses) // 4))
    return TrainResult(
        trained=trained,
        degraded=degraded,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        steps=config.steps,
    )


def ensure_trained(
    models_dir: Path, config: TrainConfig, *, log: Callable[[str], None] | None = None
) -> tuple[Path, Path]:
    """The trained and degraded models for ``config`` under ``models_dir``, trained once.

    A marker file records the config both were trained with; it is removed before training
    and written after both are saved, so a changed config or an interrupted run trains
    again. A lock file serialises concurrent callers (test sessions side by side).
    """
    from weights.tiny import exclusive_lock

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    marker = models_dir / TRAINED_MARKER
    paths = (models_dir / TRAINED_NAME, models_dir / DEGRADED_NAME)
    wanted = json.dumps(dataclasses.asdict(config), sort_keys=True)
    with exclusive_lock(models_dir / ".train.lock"):
        done = marker.is_file() and marker.read_text() == wanted
        if done and all((p / "model.safetensors").is_file() for p in paths):
            return paths
        marker.unlink(missing_ok=True)
        train_tiny(models_dir, config, log=log)
        marker.write_text(wanted)
    return paths


def _answer_loss(model: Any, ids: Any, labels: Any, mask: Any) -> Any:
    """Next-token loss on the answer only; the LM head runs on those positions alone.

    The head (vocab x hidden) is about half of the tiny model's compute, and answers are a
    fifth of each sequence, so skipping the prompt positions nearly halves a step's cost.
    """
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the peak."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _tokenizer_lines(pool: list[dict[str, Any]], schema: dict[str, Any]) -> Iterator[str]:
    """What the model will read and write: the system prompt, descriptions and answers."""
    request = render(TaskKind.EXTRACT, {"text": "-", "schema": schema}, SamplingIn())
    system = (request.messages or [])[0].content
    for item in pool:
        yield system
        yield item["text"]
        yield extract_target(item["attributes"])


def _batches(
    encoded: list[tuple[list[int], int]], pad_id: int, config: TrainConfig
) -> Iterator[Any]:
    """Endless right-padded batches drawn from ``encoded``; labels are -100 outside the answer."""
    import torch

    rng = random.Random(config.seed)
    while True:
        chosen = rng.sample(encoded, config.batch_size)
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (tokens, start) in enumerate(chosen):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
            mask[row, : len(tokens)] = 1
        yield ids, labels, mask


def _save(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save model + tokenizer to ``target`` atomically (temporary sibling, then rename)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def train_and_measure(
    out_dir: Path,
    config: TrainConfig,
    *,
    random_model: Path | None,
    measure: int,
    echo: Callable[[str], None],
) -> TrainResult:
    """What ``inferq train-tiny`` does: train, then score trained, degraded and random models
    on ``measure`` held-out products with the real engine (0 skips the measurement)."""
    from inferq.training.extract_eval import describe, measure_extraction

    result = train_tiny(out_dir, config, log=echo)
    echo(
        f"trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.cpu_seconds:.0f} CPU-s); loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}; saved {result.trained} and {result.degraded}"
    )
    if measure <= 0:
        return result
    items = held_out_products(measure)
    schema = json.loads(SCHEMA_PATH.read_text())
    models = {"trained": result.trained, "degraded": result.degraded}
    if random_model is not None:
        models["random"] = random_model
    for name, path in models.items():
        echo(describe(name, measure_extraction(path, items, schema=schema)))
    return result


def pack_model(folder: Path, target: Path) -> Path:
    """Write ``folder`` (a saved model) as one safetensors file at ``target``.

    The tensors are stored as they are; every other file of the folder (config, generation
    config, tokenizer, chat template: about 120 kB of text) rides in the header. The same
    folder gives the same bytes.
    """
    from safetensors.torch import load_file, save_file

    folder, target = Path(folder), Path(target)
    tensors = load_file(str(folder / "model.safetensors"))
    files = {
        path.name: path.read_text(encoding="utf-8")
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != "model.safetensors" and not path.name.startswith(".")
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={FILES_KEY: json.dumps(files, sort_keys=True)})
    return target


def unpack_model(packed: Path, folder: Path) -> Path:
    """Write the model folder that :func:`pack_model` packed into ``packed``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with safe_open(str(packed), framework="pt") as handle:
        files: dict[str, str] = json.loads((handle.metadata() or {}).get(FILES_KEY, "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if "config.json" not in files:
        raise ValueError(f"{packed}: not a packed model folder (no config.json in its header)")
    for name, text in files.items():
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{packed}: bad file name in the header: {name!r}")
        (folder / name).write_text(text, encoding="utf-8")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def ensure_shipped_model(models_dir: Path, packed: Path = SHIPPED_PATH) -> Path:
    """The shipped trained extractor as a model folder under ``models_dir``, unpacked once.

    The folder is written beside its place and renamed into it, under a lock, like the other
    model builds; a packed file with another digest (a newer release) unpacks again.
    """
    from weights.tiny import exclusive_lock

    models_dir = Path(models_dir)
    target = models_dir / SHIPPED_NAME
    digest = hashlib.sha256(Path(packed).read_bytes()).hexdigest()
    if _unpacked(target, digest):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models_dir / f".{SHIPPED_NAME}.lock"):
        if _unpacked(target, digest):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SHIPPED_NAME}.tmp-", dir=models_dir))
        try:
            tmp.chmod(0o755)
            unpack_model(packed, tmp)
            (tmp / SHIPPED_MARKER).write_text(digest)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpacked(folder: Path, digest: str) -> bool:
    marker = folder / SHIPPED_MARKER
    return marker.is_file() and marker.read_text() == digest


def ship(target: Path = SHIPPED_PATH, config: TrainConfig | None = None) -> Path:
    """Train as ``inferq train-tiny`` does by default and pack the trained model to ``target``."""
    with tempfile.TemporaryDirectory(prefix="inferq-train-") as tmp:
        result = train_tiny(Path(tmp), config or TrainConfig(), log=print)
        return pack_model(result.trained, target)


if __name__ == "__main__":
    # python -m inferq.training.train [FILE]: reproduce the shipped model (about 2.5 minutes
    # on 2 cores; the same torch on the same CPU gives the same bytes).
    written = ship(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_PATH)
    digest = hashlib.sha256(written.read_bytes()).hexdigest()
    print(f"{written}: {written.stat().st_size} bytes, sha256 {digest}")
