"""Rewrite a tiny checkpoint into the other layouts mlx-lm's sanitize accepts (renamed
prefixes, one tensor per expert), as older or other-tool conversions store them."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx

MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def rewrite(src: Path, dst: Path, rename: Callable[[str, mx.array], dict[str, mx.array]]) -> Path:
    """Copy src to dst with every tensor passed through rename(name, array) -> {name: array}."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map = {}
    for f in sorted(src.glob("model*.safetensors")):
        out: dict[str, mx.array] = {}
        for name, arr in mx.load(str(f)).items():
            out.update(rename(name, arr))
        mx.save_safetensors(str(dst / f.name), out, metadata={"format": "mlx"})
        weight_map.update({n: f.name for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def prefix(old: str, new: str) -> Callable[[str, mx.array], dict[str, mx.array]]:
    return lambda n, a: {(new + n[len(old):]) if n.startswith(old) else n: a}


def unstack(names: dict[str, str] | None = None) -> Callable[[str, mx.array], dict[str, mx.array]]:
    """`…switch_mlp.gate_proj.weight` [E, …] → `…experts.{e}.{gate_proj|w1}.weight` per expert."""
    pattern = re.compile(r"^(.*)\.switch_mlp\.(\w+)\.(\w+)$")

    def rename(n: str, a: mx.array) -> dict[str, mx.array]:
        m = pattern.match(n)
        if m is None:
            return {n: a}
        block, proj, field = m.groups()
        proj = (names or {}).get(proj, proj)
        return {f"{block}.experts.{e}.{proj}.{field}": a[e] for e in range(a.shape[0])}

    return rename
