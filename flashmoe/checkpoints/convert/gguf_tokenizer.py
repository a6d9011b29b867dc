"""Rebuild a Hugging Face fast tokenizer from the vocabulary a GGUF file carries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flashmoe.errors import CheckpointError

# llama.cpp's token types: 3 = control, 4 = user defined; both are whole-string specials.
SPECIAL_TYPES = (3, 4)


def _pre_tokenizer(pre: str) -> Any:
    """The HF pre-tokenizer that matches llama.cpp's regexes for `tokenizer.ggml.pre`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # StarCoder style: every digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    raise CheckpointError(
        f"GGUF tokenizer.ggml.pre={pre!r} is not supported: this converter rebuilds "
        "byte-level BPE tokenizers whose pre-tokenizer is 'smollm', 'gpt2' or 'default'."
    )


def _token_id(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if value is None else int(value.item())


def write_gguf_tokenizer(meta: dict[str, Any], out_dir: Path) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; returns the bos/eos/pad ids found."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer.ggml.model={model!r} is not supported: only byte-level "
            "BPE vocabularies ('gpt2') can be rebuilt as a tokenizer.json."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, kind in zip(tokens, types) if kind in SPECIAL_TYPES]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out_dir / "tokenizer.json"))

    ids = {k: i for k in ("bos", "eos", "padding", "unknown")
           if (i := _token_id(meta, k)) is not None}
    arch = meta.get("general.architecture", "llama")
    context = meta.get(f"{arch}.context_length")
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": 8192 if context is None else int(context.item()),
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in specials if vocab[t] not in ids.values()],
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                      ("unknown", "unk_token")):
        if key in ids:
            cfg[name] = tokens[ids[key]]
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return ids
