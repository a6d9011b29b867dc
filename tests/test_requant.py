"""requant: re-quantized experts are exactly quantize(dequantize(src)); the rest is untouched."""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from flashmoe.errors import CheckpointError, ConfigError
from tests.fixtures.tiny import build_tiny
from flashmoe.checkpoints.requant import requant

EXPERT = re.compile(r"^(.*layers\.(\d+)\..*switch_mlp\.(?:gate|up|down)_proj)\."
                    r"(weight|scales|biases)$")
PARTS = ("weight", "scales", "biases")
CASES = {  # name → requant kwargs
    "2bit": {"bits": 2},
    "3bit": {"bits": 3, "chunk_experts": 5},  # 16 experts: uneven chunks
    "override": {"bits": 2, "layer_bits": {0: 4, 1: 3}},  # layer 0 keeps the source's 4 bits
}
BitsOf = Callable[[int], int]  # layer → bits


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    built = {f: build_tiny(root / f, f) for f in ("qwen3_5_moe", "qwen3_moe")}
    built["bf16"] = build_tiny(root / "bf16", "qwen3_5_moe", dtype=mx.bfloat16)  # real scale dtype
    return built


def _weights(path: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor's dtype, shape and bytes, straight from the file (works for bf16)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as st:  # also validates the header we wrote
            assert st.metadata() == {"format": "mlx"}
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        for name, e in json.loads(data[8:8 + n]).items():
            if name != "__metadata__":
                a, b = e["data_offsets"]
                out[name] = (e["dtype"], e["shape"], data[8 + n + a:8 + n + b])
    return out


def _layer_bits(kw: dict) -> BitsOf:
    return lambda layer: kw.get("layer_bits", {}).get(layer, kw["bits"])


def _check_experts(src: Path, dst: Path, old_bits: BitsOf, new_bits: BitsOf) -> int:
    """Every expert tensor equals quantize(dequantize(source)) computed here; returns how many
    projections changed (unchanged ones must be byte-identical)."""
    before, after, raw_b, raw_a = _weights(src), _weights(dst), _raw(src), _raw(dst)
    assert before.keys() == after.keys() == raw_b.keys() == raw_a.keys()
    changed = 0
    for path, layer in {(m[1], int(m[2])) for n in before if (m := EXPERT.match(n))}:
        b0, b1 = old_bits(layer), new_bits(layer)
        names = [f"{path}.{p}" for p in PARTS]
        if b0 == b1:
            assert all(raw_a[n] == raw_b[n] for n in names), path
            continue
        changed += 1
        deq = mx.dequantize(*(before[n] for n in names), group_size=64, bits=b0)
        for n, want in zip(names, mx.quantize(deq, group_size=64, bits=b1)):
            assert after[n].dtype == want.dtype and after[n].shape == want.shape, n
            assert mx.array_equal(after[n], want), n
    for name in raw_b:
        if not EXPERT.match(name):
            assert raw_a[name] == raw_b[name], name  # dtype, shape and bytes
    return changed


def _check_files(src: Path, dst: Path) -> None:
    i_src, i_dst = (json.loads((p / "model.safetensors.index.json").read_text())
                    for p in (src, dst))
    assert i_src["weight_map"] == i_dst["weight_map"]
    assert i_dst["metadata"]["total_size"] == sum(len(r[2]) for r in _raw(dst).values())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (src / name).read_bytes() == (dst / name).read_bytes()
    assert not list(dst.parent.glob(f".{dst.name}.*"))  # the work directory was renamed


def _check_config(dst: Path, bits_of: BitsOf) -> None:
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization"]
    assert q == config["quantization_config"] and (q["bits"], q["group_size"]) == (4, 64)
    for path, layer in {(m[1], int(m[2])) for n in _raw(dst) if (m := EXPERT.match(n))}:
        bits = bits_of(layer)
        assert q.get(path) == (None if bits == 4 else {"group_size": 64, "bits": bits}), path


def _logits(path: Path) -> mx.array:
    import mlx_lm

    model, _ = mlx_lm.load(str(path))
    return model(mx.array([[1, 5, 9, 42, 7, 3]]))[0].astype(mx.float32)  # [L, V]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])
def test_requant(sources: dict[str, Path], tmp_path: Path, family: str, case: str,
                 capsys: pytest.CaptureFixture) -> None:
    src, kw = sources[family], CASES[case]
    dst = requant(src, tmp_path / "dst", progress=True, **kw)
    assert capsys.readouterr().out == ""  # progress goes to stderr only
    assert _check_experts(src, dst, lambda _: 4, _layer_bits(kw)) > 0
    _check_files(src, dst)
    _check_config(dst, _layer_bits(kw))
    logits = _logits(dst)
    assert logits.shape == _logits(src).shape and mx.all(mx.isfinite(logits)).item()


def test_bf16_scales(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["bf16"]
    dst = requant(src, tmp_path / "dst", bits=2, progress=False)
    assert _check_experts(src, dst, lambda _: 4, lambda _: 2) == 4 * 3
    assert mx.all(mx.isfinite(_logits(dst))).item()


def test_source_overrides_are_read(sources: dict[str, Path], tmp_path: Path) -> None:
    """A mixed-width source (per-path overrides in config.json) re-quantizes from its own widths."""
    mixed = requant(sources["qwen3_moe"], tmp_path / "mixed", bits=2, layer_bits={0: 8},
                    progress=False)
    mixed_bits, new_bits = {0: 8, 1: 2, 2: 2}, {0: 3, 1: 2, 2: 3}
    dst = requant(mixed, tmp_path / "dst", bits=3, layer_bits={1: 2}, progress=False)
    assert _check_experts(mixed, dst, mixed_bits.get, new_bits.get) == 2 * 3
    _check_config(dst, new_bits.get)
    back = requant(dst, tmp_path / "back", bits=4, progress=False)
    assert "switch_mlp" not in json.dumps(json.loads((back / "config.json").read_text()))
    assert mx.all(mx.isfinite(_logits(back))).item()


def test_same_bits_is_identity(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["qwen3_moe"]
    (tmp_path / "dst").mkdir()  # an empty destination is fine
    dst = requant(src, tmp_path / "dst", bits=4, progress=False)
    for f in src.iterdir():
        assert f.read_bytes() == (dst / f.name).read_bytes(), f.name


def test_sharded_source(sources: dict[str, Path], tmp_path: Path) -> None:
    """Shards keep their names and contents, even when a projection straddles two files."""
    src = sources["qwen3_moe"]
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    cut = names.index("model.layers.1.mlp.switch_mlp.down_proj.scales") + 1  # weight → shard 2
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:cut], names[cut:]), 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname), metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(part, fname)
    for f in src.glob("*.json"):
        (sharded / f.name).write_bytes(f.read_bytes())
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dst = requant(sharded, tmp_path / "dst", bits=2, progress=False, chunk_experts=3)
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(set(weight_map.values()))
    for fname in set(weight_map.values()):
        with safe_open(str(dst / fname), "numpy") as st:
            assert set(st.keys()) == {n for n, f in weight_map.items() if f == fname}
    assert _check_experts(sharded, dst, lambda _: 4, lambda _: 2) == 3 * 3
    ref = requant(src, tmp_path / "ref", bits=2, progress=False)
    assert _raw(dst) == _raw(ref)
    assert mx.array_equal(_logits(dst), _logits(ref))


def test_chunks_bound_the_work(sources: dict[str, Path], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = mx.dequantize

    def spy(w: mx.array, *args: object, **kwargs: object) -> mx.array:
        seen.append(w.shape[0])
        return real(w, *args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", spy)
    requant(sources["qwen3_moe"], tmp_path / "dst", bits=2, progress=False, chunk_experts=6)
    assert seen == [6, 6, 4] * 3 * 3  # 16 experts, 3 projections, 3 layers


def test_refuses_to_overwrite(sources: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"out.*not empty.*out-2bit"):
        requant(sources["qwen3_moe"], dst, bits=2, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="not empty"):
        requant(sources["qwen3_moe"], sources["qwen3_moe"], bits=2, progress=False)


@pytest.mark.parametrize("kw, pattern", [
    ({"bits": 5}, r"bits=5 .*\{2, 3, 4, 8\}"),
    ({"bits": 2, "layer_bits": {0: 6}}, r"layer_bits\[0\]=6 .*\{2, 3, 4, 8\}"),
    ({"bits": 2, "layer_bits": {7: 4}}, r"layers \[7\].*0\.\.2"),
    ({"bits": 2, "group_size": 48}, r"group_size=48"),
    ({"bits": 2, "chunk_experts": 0}, r"chunk_experts=0"),
])
def test_bad_arguments(sources: dict[str, Path], tmp_path: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        requant(sources["qwen3_moe"], tmp_path / "dst", progress=False, **kw)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_source_without_quantized_experts(tmp_path: Path) -> None:
    src = tmp_path / "dense"
    src.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": np.zeros((4, 4), np.float32)},
              str(src / "model.safetensors"), metadata={"format": "mlx"})
    (src / "config.json").write_text(json.dumps({"quantization": {"group_size": 64, "bits": 4}}))
    with pytest.raises(CheckpointError, match="no quantized routed experts"):
        requant(src, tmp_path / "dst", bits=2, progress=False)
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(CheckpointError, match="not MLX-quantized"):
        requant(src, tmp_path / "dst", bits=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
