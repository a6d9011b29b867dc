"""Synthetic qwen3_5_moe checkpoints: names, sizes, values, mlx-lm loading, the cache."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from flashmoe.errors import ConfigError
from flashmoe.synth import demo as demo_mod
from flashmoe.synth.cache import MARKER, cache_key, cached_checkpoint
from flashmoe.synth.shaped import Qwen35Dims, build_shaped, qwen35_specs, shaped_dims
from flashmoe.synth.writer import RandomSource

EXPERT_BYTES = {2: 3_932_160, 3: 5_505_024, 4: 7_077_888, 8: 13_369_344}
SWITCH = ".mlp.switch_mlp."


def read_headers(path: Path) -> dict[str, dict]:
    """name -> header entry (+ "file"), checking each shard's data exactly fills the file."""
    out = {}
    for file in sorted(path.glob("model*.safetensors")):
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        assert (8 + n) % 8 == 0
        header.pop("__metadata__")
        ends = sorted(tuple(h["data_offsets"]) for h in header.values())
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        assert file.stat().st_size == 8 + n + ends[-1][1]
        out.update({k: {**v, "file": file.name} for k, v in header.items()})
    return out


def expert_bytes(headers: dict[str, dict], layer: int, num_experts: int) -> int:
    prefix = f"language_model.model.layers.{layer}{SWITCH}"
    sizes = [h["data_offsets"][1] - h["data_offsets"][0]
             for k, h in headers.items() if k.startswith(prefix)]
    assert len(sizes) == 9  # {gate,up,down} x {weight,scales,biases}
    return sum(sizes) // num_experts


def load_f32(path: Path):
    """mlx_lm.load, then float32 activations (bf16 ones are ~20x slower on the CPU)."""
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    cast = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
            if v.dtype == mx.bfloat16
            and (not k.endswith(("scales", "biases")) or "embed_tokens" in k)]
    model.update(tree_unflatten(cast))
    return model, tok


@pytest.fixture(scope="module")
def shaped4(tmp_path_factory):
    path = build_shaped(tmp_path_factory.mktemp("shaped") / "l4", layers=4, num_experts=4,
                        experts_per_token=2, vocab_size=1024, progress=False)
    yield path
    shutil.rmtree(path)  # ~390 MB


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_layer_pattern(layers):
    names = [s.name for s in qwen35_specs(shaped_dims(layers, 4, 2, 1024))]
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        full = any(n.startswith(p + "self_attn.") for n in names)
        linear = any(n.startswith(p + "linear_attn.") for n in names)
        assert (full, linear) == ((i + 1) % 4 == 0, (i + 1) % 4 != 0)
    assert not any(n.startswith(f"language_model.model.layers.{layers}.") for n in names)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_expert_bytes_from_specs(bits):
    specs = qwen35_specs(shaped_dims(1, 4, 2, 1024), bits)
    total = sum(s.nbytes for s in specs if SWITCH in s.name)
    assert total // 4 == EXPERT_BYTES[bits]


def test_bad_sizes_raise_config_error():
    with pytest.raises(ConfigError, match="bits=5"):
        qwen35_specs(Qwen35Dims(), bits=5)
    with pytest.raises(ConfigError, match="experts_per_token=10"):
        qwen35_specs(shaped_dims(1, 4, 10, 1024))


def test_shaped_header_names_and_sizes(shaped4):
    headers = read_headers(shaped4)
    assert all(expert_bytes(headers, i, 4) == EXPERT_BYTES[4] for i in range(4))
    w = headers["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"]
    assert (w["dtype"], w["shape"]) == ("U32", [4, 1024, 512])
    s = headers["language_model.model.layers.3.mlp.switch_mlp.down_proj.scales"]
    assert (s["dtype"], s["shape"]) == ("BF16", [4, 4096, 16])
    gate = headers["language_model.model.layers.0.mlp.gate.weight"]
    assert gate["shape"] == [4, 4096 * 8 // 32]  # router at 8 bits
    assert headers["language_model.model.layers.0.linear_attn.A_log"]["dtype"] == "F32"
    assert headers["language_model.model.layers.0.linear_attn.conv1d.weight"]["shape"] == [
        8192 + 4096, 4, 1]
    index = json.loads((shaped4 / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: h["file"] for k, h in headers.items()}
    config = json.loads((shaped4 / "config.json").read_text())
    quant = config["quantization"]
    assert quant["language_model.model.layers.3.mlp.shared_expert_gate"]["bits"] == 8
    assert config["text_config"]["layer_types"][3] == "full_attention"


def test_shaped_dequantized_values_are_sane(shaped4):
    weights = mx.load(str(shaped4 / "model.safetensors"))
    p = "language_model.model.layers.0.mlp.shared_expert.gate_proj"
    w = mx.dequantize(weights[f"{p}.weight"], weights[f"{p}.scales"], weights[f"{p}.biases"],
                      group_size=64, bits=4).astype(mx.float32)
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(4096**-0.5, rel=0.1)
    norm = weights["language_model.model.layers.0.input_layernorm.weight"]
    assert 0.85 < norm.astype(mx.float32).min().item() <= norm.max().item() < 1.15


def test_shaped_loads_in_mlx_lm(shaped4):
    model, tok = load_f32(shaped4)
    logits = model(mx.array([[5]]))
    assert logits.shape == (1, 1, 1024) and mx.isfinite(logits).all().item()
    assert 0.3 < logits.std().item() < 5
    assert len(tok.vocab) == 1024  # padded to the model's vocab
    assert tok.decode([1023]) and tok.decode(tok.encode("hello world")) == "hello world"


def test_two_bit_experts_load(tmp_path):
    path = build_shaped(tmp_path / "l1", layers=1, num_experts=4, experts_per_token=2,
                        bits=2, vocab_size=1024, progress=False)
    assert expert_bytes(read_headers(path), 0, 4) == EXPERT_BYTES[2]
    model, _ = load_f32(path)
    # mlx-lm 0.32.2 assumes a full-attention layer exists (fa_idx = 3) for its mask
    model.language_model.model.fa_idx = None
    assert mx.isfinite(model(mx.array([[7]]))).all().item()


def test_random_source_is_deterministic_and_varied():
    a, b = RandomSource(3, 1 << 20), RandomSource(3, 1 << 20)
    x = b"".join(bytes(c) for c in a.random_bytes("t", 1 << 19))
    assert x == b"".join(bytes(c) for c in b.random_bytes("t", 1 << 19))
    assert x != b"".join(bytes(c) for c in a.random_bytes("u", 1 << 19))
    scales = np.frombuffer(b"".join(a.affine("t", 100, 0.01, 4, "scales")), np.uint16)
    assert np.isfinite((scales.astype(np.uint32) << 16).view(np.float32)).all()


def test_cache_reuses_and_ignores_half_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    calls = []

    def builder(p: Path) -> None:
        calls.append(p)
        p.mkdir(exist_ok=True)
        (p / "model.safetensors").write_bytes(b"x")

    key = cache_key("toy", {"n": 1})
    stale = tmp_path / f".{key}.tmp-1-dead"  # an interrupted build
    stale.mkdir()
    (tmp_path / key).mkdir()  # a final dir without the marker: never trusted
    first = cached_checkpoint("toy", {"n": 1}, builder)
    assert first == tmp_path / key and (first / MARKER).is_file() and len(calls) == 1
    assert not stale.exists()
    assert cached_checkpoint("toy", {"n": 1}, builder) == first and len(calls) == 1
    assert cached_checkpoint("toy", {"n": 2}, builder) != first and len(calls) == 2


def test_cache_failed_build_leaves_nothing(tmp_path):
    def builder(p: Path) -> None:
        p.mkdir(exist_ok=True)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cached_checkpoint("toy", {}, builder, cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_demo_expert_size():
    specs = qwen35_specs(demo_mod.DEMO_DIMS)
    per_expert = sum(s.nbytes for s in specs if SWITCH in s.name) // 4 // 64
    assert per_expert == 884_736  # ~0.84 MB, still a real read


def test_demo_checkpoint_builds_and_loads(tmp_path, monkeypatch, capfd):
    small = replace(demo_mod.DEMO_DIMS, num_experts=8)  # the real demo writes ~250 MB
    monkeypatch.setattr(demo_mod, "DEMO_DIMS", small)
    path = demo_mod.demo_checkpoint(cache_dir=tmp_path, progress=True)
    assert capfd.readouterr().out == ""  # stdout is for generated text only
    assert demo_mod.demo_checkpoint(cache_dir=tmp_path) == path
    model, tok = load_f32(path)
    logits = model(mx.array([tok.encode("Hello there")]))
    assert mx.isfinite(logits).all().item() and logits.shape[-1] == len(tok.vocab) == 4096


def test_shaped_checkpoint_goes_through_cache(tmp_path):
    from flashmoe.synth.shaped import shaped_checkpoint

    path = shaped_checkpoint(1, 2, 4, 1024, num_experts=4, cache_dir=tmp_path, progress=False)
    assert path.parent == tmp_path and path.name.startswith("shaped-")
    assert json.loads((path / MARKER).read_text())["params"]["layers"] == 1
    assert shaped_checkpoint(1, 2, 4, 1024, num_experts=4, cache_dir=tmp_path) == path


def test_cache_concurrent_builders_build_once(tmp_path):
    import threading
    import time

    calls = []

    def builder(p: Path) -> None:
        calls.append(p)
        time.sleep(0.2)  # long enough for the other thread to queue on the lock
        p.mkdir(exist_ok=True)

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cached_checkpoint("toy", {"c": 1}, builder, cache_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
