"""The starting point of training: a tokenizer fitted to the product vocabulary and a fresh
tiny Llama of the same shape, special tokens and chat template as :mod:`inferq.tiny_model`.

The stock tiny tokenizer was fitted to general catalogue-like text: it splits a value at the
start of a JSON string (``"cotton`` has no leading space) into pieces unlike the word in the
description (`` cotton``), so the model has to learn to copy across two spellings. Fitting the
byte-level BPE to the very texts and answers it will see makes most values one or two tokens
in both places and shortens every sequence, which is what lets a few CPU minutes suffice.
Training is deterministic: same lines in the same order, same merges.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from inferq.tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    MAX_POSITIONS,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    UNK,
    VOCAB_SIZE,
)


def train_tokenizer(lines: Iterable[str], *, vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE (every string round-trips) wrapped for transformers, chat template on."""
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


def new_model(tokenizer: Any, *, seed: int, hidden: int = 128, layers: int = 2) -> Any:
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
