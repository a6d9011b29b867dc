"""The mutation score: sample single faults (tests/faults.py) over kinds, families, layers and
steps, run the parity check (tests/parity.py, the suite's own assertion) under each, and count
the faults it catches. `make mutate` runs 500; the normal suite runs a small sample.

Each fault is tried against the CHECKS in turn, stopping at the first that departs from
mlx-lm: the suite's configurations with the most hostile slot pools (tests/hostile.py).
A fault that fires in no check (its layer/step never read or computed anything it can touch)
is not a fault of this run: it is resampled and counted apart.

Where faults go: every (layer, forward) but one cell, the DEAD ZONE: the last layer during
generate's prefill (forward 1). Its experts are fetched but their output is never evaluated
(the prefill, like mlx-lm's, evaluates only the caches, and the last layer's output feeds no
cache): nothing any API returns depends on it, so a fault there shows only if it outlives the
step (bytes left in a cached slot). That cell is sampled on its own (`dead_zone=True`) and
reported apart, not hidden.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tests.faults import DECODE_ONLY, KINDS, Fault, inject
from tests.hostile import SlowReader, poison_on_release
from tests.parity import Trace, budget_for, first_difference, flashmoe_trace

FAMILIES = ("qwen3_5_moe", "qwen3_moe", "qwen3_next", "mixtral", "qwen2_moe")
PROMPT = [5, 99, 310, 42, 7, 256, 11, 300]
STEPS = 8  # tokens. Forwards: 0 engine.logits(prompt); generate's 1 prefill (all prompt tokens
FORWARDS = STEPS + 2  # but the last), 2 the last prompt token, 3..9 one per decoded token

# (name, options, slots as a multiple of K or None, hostile setup); tried in this order
CHECKS: list[tuple[str, dict, int | None, Callable | None]] = [
    ("none+poison", {"cache_policy": "none", "io_split": 2}, None, poison_on_release),
    ("lru-K", {"io_split": 3}, 1, None),
    ("prefetch+slow", {"prefetch": True, "io_split": 2}, 2, poison_on_release),
    # every expert fits: decode steps run as whole-token trips (stages/speculate.py)
    ("lru-all", {"cache_budget_gb": 1.0}, None, None),
    # the same with greedy sampling: each whole-token step also builds the next one ahead
    ("lru-all+ahead", {"cache_budget_gb": 1.0, "greedy": True}, None, None),
]


@dataclass(frozen=True)
class Outcome:
    family: str
    fault: Fault
    fired: bool
    caught_by: str | None  # the check that departed from mlx-lm
    where: str | None  # first_difference's words
    tokens_changed: bool  # would a tokens-only check have seen it (first check's run)


def _text_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config", config)


def layers_of(path: Path) -> int:
    return int(_text_config(path)["num_hidden_layers"])


def k_of(path: Path) -> int:
    return int(_text_config(path)["num_experts_per_tok"])


def sample(n: int, seed: int, layers: dict[str, int],
           dead_zone: bool = False) -> list[tuple[str, Fault]]:
    """Stratified: kinds × families round robin; (layer, forward) uniform over the live cells
    (or over the dead zone only)."""
    rng = random.Random(seed)
    cells = [(kind, fam) for kind in KINDS for fam in layers  # the dead zone is a prefill
             if not (dead_zone and kind in DECODE_ONLY)]
    out = []
    for i in range(n):
        kind, fam = cells[i % len(cells)]
        where = [(layer, step) for layer in range(layers[fam]) for step in range(FORWARDS)
                 if ((layer, step) == (layers[fam] - 1, 1)) == dead_zone]
        layer, step = rng.choice(where)
        out.append((fam, Fault(kind, layer, step, rng.randrange(2**31))))
    return out


async def run_check(path: Path, k: int, check: tuple, fault: Fault | None
                    ) -> tuple[Trace | None, str | None, int]:
    """One parity run under `fault`: (trace, error, times it fired)."""
    name, opts, slots, setup = check
    opts = dict(opts)
    if slots is not None:
        opts["cache_budget_gb"] = budget_for(path, slots * k)
    if name.endswith("slow"):
        opts["reader"] = SlowReader(seed=fault.seed if fault else 0, max_ms=0.5)
    with inject(fault or Fault("none")) as inj:
        def hook(engine: Any) -> None:
            inj.attach(engine)
            if setup is not None:
                setup(engine)
        try:
            got, _ = await flashmoe_trace(path, PROMPT, STEPS, setup=hook, **opts)
            return got, None, inj.fired
        except Exception as e:  # noqa: BLE001 - an error is a caught fault too
            return None, f"{type(e).__name__}: {e}", inj.fired


async def run_fault(family: str, path: Path, k: int, ref: Trace, fault: Fault) -> Outcome:
    fired, changed = False, False
    for check in CHECKS:
        got, error, times = await run_check(path, k, check, fault)
        where = error or first_difference(ref, got)
        if check is CHECKS[0]:
            changed = got is None or got.tokens != ref.tokens
        if where and not times:
            raise AssertionError(f"{check[0]} departs from mlx-lm with no fault fired: {where}")
        fired |= times > 0
        if where:
            return Outcome(family, fault, True, check[0], where, changed)
    return Outcome(family, fault, fired, None, None, changed)


async def mutation_score(paths: dict[str, Path], refs: dict[str, Trace], ks: dict[str, int],
                         n: int, seed: int = 0, log: Callable[[str], Any] | None = None,
                         dead_zone: bool = False) -> list[Outcome]:
    """`n` fired faults (resampling those that never fire), each run against CHECKS;
    `log` gets a progress line every 25 faults."""
    for fam, path in paths.items():  # the checks themselves must be exact without faults
        for check in CHECKS:
            got, error, _ = await run_check(path, ks[fam], check, None)
            assert error is None and first_difference(refs[fam], got) is None, (fam, check[0])
    layers = {fam: layers_of(path) for fam, path in paths.items()}
    outcomes, attempt = [], 0
    while len([o for o in outcomes if o.fired]) < n:
        need = n - len([o for o in outcomes if o.fired])
        for fam, fault in sample(need, seed + attempt, layers, dead_zone):
            outcomes.append(await run_fault(fam, paths[fam], ks[fam], refs[fam], fault))
            if log is not None and len(outcomes) % 25 == 0:
                log(f"{len(outcomes)} faults run, {sum(bool(o.caught_by) for o in outcomes)} "
                    f"caught, {sum(not o.fired for o in outcomes)} did not fire")
        attempt += 1
    return outcomes


def report(outcomes: list[Outcome]) -> dict:
    """Caught fraction overall, per kind, per family, per check; tokens-only for contrast."""
    fired = [o for o in outcomes if o.fired]
    caught = [o for o in fired if o.caught_by]

    def frac(group: Callable[[Outcome], str]) -> dict[str, str]:
        tot, hit = Counter(group(o) for o in fired), Counter(group(o) for o in caught)
        return {key: f"{hit[key]}/{tot[key]}" for key in sorted(tot)}

    return {
        "faults": len(fired), "caught": len(caught),
        "score": len(caught) / max(1, len(fired)),
        "not_fired": len(outcomes) - len(fired),
        "tokens_only_would_catch": sum(o.tokens_changed for o in fired),
        "by_kind": frac(lambda o: o.fault.kind), "by_family": frac(lambda o: o.family),
        "caught_by_check": dict(Counter(o.caught_by for o in caught)),
        "escaped": [dict(family=o.family, **asdict(o.fault)) for o in fired if not o.caught_by],
    }
