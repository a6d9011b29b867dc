"""Re-quantize a checkpoint's routed experts (e.g. 4 → 2 or 3 bits) into a new directory.

Only the stacked `...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` tensors change
(mx.dequantize at the source's bits → mx.quantize at the new ones); every other tensor is copied
byte for byte into a shard of the same name. The output layout is planned from the headers up
front and filled with pwrite, `chunk_experts` experts at a time, so peak memory is one chunk.

    python -m flashmoe.checkpoints.requant SRC DST --bits 2 [--group-size 64] [--layer-bits 0=4,3=8]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from flashmoe.errors import CheckpointError, ConfigError, FlashMoeError
from flashmoe.runtime.fileio import pwrite_all
from flashmoe.checkpoints.safetensors_index import read_file_header
from flashmoe.constants import BITS, GROUP_SIZES
from flashmoe.runtime.staging import staged
from flashmoe.checkpoints.shards import Advance, ShardTensor, copy, layout, read_rows, write_rows

PARTS = ("weight", "scales", "biases")
_INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(?P<path>(?:.*\.)?layers\.(?P<layer>\d+)\..*switch_mlp\."
                     r"(?:gate|up|down)_proj)\.(?P<part>weight|scales|biases)$")


@dataclass(frozen=True, slots=True)
class Projection:
    """One stacked expert projection: its (bits, group_size) now (`src`) and after (`dst`)."""
    path: str
    layer: int
    src: tuple[int, int]
    dst: tuple[int, int]
    weight: ShardTensor
    scales: ShardTensor
    biases: ShardTensor

    def out_shapes(self) -> dict[str, tuple[int, ...]]:
        E, O, packed = self.weight.shape
        inp, (bits, group) = packed * 32 // self.src[0], self.dst
        return {"weight": (E, O, inp * bits // 32), "scales": (E, O, inp // group),
                "biases": (E, O, inp // group)}


def requant(src: Path, dst: Path, *, bits: int, group_size: int = 64,
            layer_bits: dict[int, int] | None = None, progress: bool = True,
            chunk_experts: int = 32, log: Any = None,
            hint: str = "choose another output folder") -> Path:
    """Write a copy of checkpoint `src` to `dst` whose routed experts use `bits` (per layer:
    `layer_bits`) and `group_size`; the rest is byte-identical. Returns `dst`.

    Free space is checked before the first byte; the copy is staged in a temp folder beside
    `dst` (runtime/staging.py) that is renamed into place only when complete."""
    src, dst, layer_bits = Path(src), Path(dst), dict(layer_bits or {})
    _check_args(bits, group_size, layer_bits, chunk_experts)
    config = _read_json(src / "config.json")
    weight_map = _weight_map(src)
    tensors: dict[str, ShardTensor] = {}
    metas: dict[str, dict] = {}
    for fname in dict.fromkeys(weight_map.values()):  # source shard order, once each
        tensors_f, metas[fname] = read_header(src / fname)
        tensors.update(tensors_f)
    projections = _plan(tensors, _quantization(config, src), bits, group_size, layer_bits)
    changed, new = _changes(projections)
    layouts = {fname: layout(fname, {k: t for k, t in tensors.items() if t.file == fname}, new,
                             metas[fname]) for fname in metas}
    needed = sum(max([len(h), *(t.end for t in placed.values())]) for h, placed in
                 layouts.values()) + sum(f.stat().st_size for f in _side_files(src))
    with staged(dst, needed=needed, hint=hint, log=log,  # renamed to dst at the end
                check=lambda: _check_dst(dst, bits)) as work:
        with _progress_bar(progress) as bar:
            total = sum(t.end - t.start for t in tensors.values())
            task = bar.add_task(f"requant → {dst.name}", total=total)
            out = _write_shards(src, work, tensors, layouts, changed, new,
                                lambda n: bar.advance(task, n), chunk_experts)
        _write_index(src, work, weight_map, out)
        (work / "config.json").write_text(json.dumps(_new_config(config, projections), indent=4))
        for f in _side_files(src):
            shutil.copyfile(f, work / f.name)
    return dst


def read_header(file: Path) -> tuple[dict[str, ShardTensor], dict]:
    """Tensors of one safetensors file (absolute offsets) and its __metadata__."""
    infos, meta = read_file_header(file)
    return {k: ShardTensor(file.name, t.dtype, t.shape, t.start, t.end) for k, t in infos.items()}, meta


def _check_args(bits: int, group_size: int, layer_bits: dict[int, int], chunk: int) -> None:
    for key, value in [("bits", bits), *((f"layer_bits[{k}]", v) for k, v in layer_bits.items())]:
        if isinstance(value, bool) or value not in BITS:
            raise ConfigError(f"{key}={value!r} is not a supported expert width; "
                              f"use one of {{2, 3, 4, 8}} bits")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size={group_size!r} is not supported by MLX affine "
                          f"quantization; use one of {{32, 64, 128}}")
    if chunk < 1:
        raise ConfigError(f"chunk_experts={chunk!r} must be at least 1 (32 is a good default)")


def _check_dst(dst: Path, bits: int) -> None:
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return
    alt = next(c for i in range(1, 1000)
               if not (c := dst.with_name(f"{dst.name}-{bits}bit" + (f"-{i}" if i > 1 else "")))
               .exists())
    raise ConfigError(f"output directory {dst} already exists and is not empty; requant never "
                      f"overwrites a checkpoint. Choose another path, e.g. {alt}, or remove it.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; a checkpoint directory needs a valid "
                              "config.json next to its safetensors shards") from e


def _weight_map(src: Path) -> dict[str, str]:
    if (src / _INDEX).exists():
        return _read_json(src / _INDEX)["weight_map"]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} has neither {_INDEX} nor *.safetensors shards; "
                              "point requant at an mlx-community checkpoint directory")
    return {name: f.name for f in files for name in read_header(f)[0]}


def _quantization(config: dict, src: Path) -> dict:
    for holder in (config, config.get("text_config", {})):
        for key in ("quantization", "quantization_config"):
            if isinstance(q := holder.get(key), dict) and "quant_method" not in q:
                return q
    raise CheckpointError(f"{src}/config.json has no \"quantization\" entry: the checkpoint is not "
                          "MLX-quantized; convert it with mlx_lm.convert -q first")


def _source_settings(quant: dict, path: str) -> tuple[int, int]:
    entry = quant.get(path, quant)
    if not isinstance(entry, dict):
        raise CheckpointError(f"config.json quantization marks {path} as {entry!r} (not "
                              "quantized); requant only reads affine-quantized experts")
    mode = entry.get("mode", quant.get("mode", "affine"))
    if mode != "affine":
        raise CheckpointError(f"{path} is quantized with mode={mode!r}; requant handles only "
                              "mode='affine' (mlx-community's default)")
    return int(entry.get("bits", 4)), int(entry.get("group_size", 64))


def _plan(tensors: dict[str, ShardTensor], quant: dict, bits: int, group_size: int,
          layer_bits: dict[int, int]) -> list[Projection]:
    groups: dict[str, dict[str, ShardTensor]] = {}
    for name, t in tensors.items():
        if m := _EXPERT.match(name):
            groups.setdefault(m["path"], {})[m["part"]] = t
    plans = [_projection(path, parts, quant, bits, group_size, layer_bits)
             for path, parts in groups.items() if set(parts) == set(PARTS)]
    if not plans:
        raise CheckpointError("the checkpoint has no quantized routed experts (tensors named "
                              "...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}); "
                              "requant only applies to MLX-quantized MoE checkpoints")
    layers = sorted({p.layer for p in plans})
    if unknown := sorted(set(layer_bits) - set(layers)):
        raise ConfigError(f"layer_bits names layers {unknown} that have no routed experts; "
                          f"valid layers are {layers[0]}..{layers[-1]}")
    return plans


def _projection(path: str, parts: dict[str, ShardTensor], quant: dict, bits: int, group_size: int,
                layer_bits: dict[int, int]) -> Projection:
    w, s = parts["weight"], parts["scales"]
    b0, g0 = _source_settings(quant, path)
    inp = w.shape[-1] * 32 // b0
    if w.dtype != "U32" or len(w.shape) != 3 or s.shape[:2] != w.shape[:2] \
            or s.shape[-1] * g0 != inp:
        raise CheckpointError(f"{path}: weight {w.dtype}{list(w.shape)} and scales "
                              f"{list(s.shape)} do not match bits={b0}, group_size={g0} from "
                              "config.json; the config and the shards disagree")
    layer = int(_EXPERT.match(f"{path}.weight")["layer"])
    if inp % group_size:
        raise ConfigError(f"group_size={group_size} does not divide {path}'s input size {inp}; "
                          f"use one of {[g for g in GROUP_SIZES if inp % g == 0]}")
    return Projection(path, layer, (b0, g0), (layer_bits.get(layer, bits), group_size),
                      w, s, parts["biases"])


def _changes(projections: list[Projection]) -> tuple[dict[str, Projection], dict[str, tuple]]:
    """Projections whose settings change (same settings: plain copy) and their new tensors."""
    changed = {p.path: p for p in projections if p.src != p.dst}
    new = {f"{p.path}.{part}": (getattr(p, part).dtype, shape)
           for p in changed.values() for part, shape in p.out_shapes().items()}
    return changed, new


def _write_shards(src: Path, work: Path, tensors: dict[str, ShardTensor],
                  layouts: dict[str, tuple[bytes, dict[str, ShardTensor]]],
                  changed: dict[str, Projection], new: dict[str, tuple], advance: Advance,
                  chunk: int) -> dict[str, ShardTensor]:
    out: dict[str, ShardTensor] = {}
    with ExitStack() as stack:
        fds_in: dict[str, int] = {}
        fds_out: dict[str, int] = {}
        for fname, (header, placed) in layouts.items():
            fds_in[fname] = os.open(src / fname, os.O_RDONLY)
            stack.callback(os.close, fds_in[fname])
            fds_out[fname] = os.open(work / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, fds_out[fname])
            pwrite_all(fds_out[fname], memoryview(header), 0)
            os.ftruncate(fds_out[fname], max([len(header), *(t.end for t in placed.values())]))
            out.update(placed)
        for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].file, kv[1].start)):
            if name not in new:
                o = out[name]
                copy(fds_in[t.file], t.start, fds_out[o.file], o.start, t.end - t.start, advance)
            elif name.endswith(".weight"):
                _requant_projection(changed[name[:-len(".weight")]], out, fds_in, fds_out,
                                    chunk, advance)
    return out


def _requant_projection(p: Projection, out: dict[str, ShardTensor], fds_in: dict[str, int],
                        fds_out: dict[str, int], chunk: int, advance: Advance) -> None:
    (b0, g0), (b1, g1) = p.src, p.dst
    E = p.weight.shape[0]
    for e0 in range(0, E, chunk):
        e1 = min(e0 + chunk, E)
        w, s, b = (read_rows(fds_in[t.file], t, e0, e1) for t in (p.weight, p.scales, p.biases))
        deq = mx.dequantize(w, s, b, group_size=g0, bits=b0)  # [n, out, in], scales' dtype
        new = mx.quantize(deq, group_size=g1, bits=b1)
        mx.eval(new)
        for part, arr in zip(PARTS, new):
            write_rows(fds_out, out[f"{p.path}.{part}"], e0, arr)
        advance(sum((t.end - t.start) // E * (e1 - e0) for t in (p.weight, p.scales, p.biases)))


def _write_index(src: Path, work: Path, weight_map: dict[str, str], out: dict[str, ShardTensor]) -> None:
    old = _read_json(src / _INDEX) if (src / _INDEX).exists() else {}
    meta = {**old.get("metadata", {}), "total_size": sum(t.end - t.start for t in out.values())}
    (work / _INDEX).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=4))


def _new_config(config: dict, projections: list[Projection]) -> dict:
    """Per-path overrides for every expert projection whose width differs from the default."""
    config = json.loads(json.dumps(config))
    for holder in (config, config.get("text_config", {})):
        for key in ("quantization", "quantization_config"):
            if isinstance(q := holder.get(key), dict) and "quant_method" not in q:
                default = (q.get("bits", 4), q.get("group_size", 64))
                for p in projections:
                    q.pop(p.path, None)
                    if p.dst != default:
                        q[p.path] = {"group_size": p.dst[1], "bits": p.dst[0]}
    return config


def _side_files(src: Path) -> list[Path]:
    """Tokenizer, templates, generation config, README…: every other top-level file."""
    return [f for f in sorted(src.iterdir()) if f.is_file() and f.suffix != ".safetensors"
            and f.name not in ("config.json", _INDEX)]


def _progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe.checkpoints.requant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--layer-bits", default="", help="per-layer widths, e.g. 0=4,59=4")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        layer_bits = {int(k): int(v) for k, v in
                      (item.split("=") for item in args.layer_bits.split(",") if item)}
    except ValueError:
        ap.error(f"--layer-bits={args.layer_bits!r} must look like 0=4,3=2")
    try:
        requant(args.src, args.dst, bits=args.bits, group_size=args.group_size,
                layer_bits=layer_bits, progress=not args.no_progress)
    except FlashMoeError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
