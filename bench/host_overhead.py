"""Host overhead per layer on the cached decode path, against resident mlx-lm (issue 12).

    PYTHONPATH=. python bench/host_overhead.py [--tokens 32] [--repeats 3] [--profile 25] \
        [hydra overrides, e.g. hardware=h200 model.path=/root/s model.experts_per_token=4]

With no model override it builds (once, in the synth cache) a Qwen3.5-MoE-layout checkpoint of
16 layers with tiny compute (hidden 256, 16 experts of 128): the per-layer cost is then
almost all host work. A warm-up pass decodes the same token stream, so every expert the timed
passes route to is already in the slots (the summary says how many were read: 0 expected).

Per layer (decode, ms per token / MoE layers; the median of the repeats):
  wall_ms          flashmoe's wall time
  eval_ms          wall time inside mx.eval and mx.async_eval: handing the graph to MLX and
                   waiting for the device (async_eval waits too once MLX's queue is full)
  dispatch_cpu_ms  the CPU time of those calls (MLX encoding the graph's kernels)
  host_cpu_ms      CPU time of the event-loop and MLX threads outside those calls: graph
                   building in Python (mlx-lm's modules and flashmoe's), bookkeeping, hops;
                   thread CPU time, so a CPU backend computing beside it does not inflate it
  mlx_lm_ms        resident mlx-lm on the same checkpoint, same prompt and K (a child
                   process; --no-baseline skips it)
The breakdown splits both clocks by what was called (exclusive of nested spans). --profile N
prints cProfile's top N functions (by own time) of the event-loop thread and of the MLX
thread over one more pass.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import io
import json
import pstats
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from flashmoe.bench.baseline import run_baseline
from flashmoe.config import compose_config
from flashmoe.config_validate import validate
from flashmoe.engine import Engine
from flashmoe.hardware import resolve_hardware
from flashmoe.synth.demo import DEMO_BITS, DEMO_DIMS, build_demo
from flashmoe.tasks.common import checkpoint_path, engine_options

PROMPT = "Write a short story about a lighthouse keeper who collects maps of the sea."
TINY = replace(DEMO_DIMS, layers=16, hidden=256, num_heads=2, num_kv_heads=1, linear_k_heads=1,
               linear_v_heads=2, num_experts=16, moe_intermediate=128, shared_intermediate=128)


class Spans:
    """Exclusive wall time per named call (a call's time minus the spans nested in it), any
    thread, while installed: attributes of modules or objects are wrapped, then restored."""

    def __init__(self, targets: list[tuple[object, str, str]]) -> None:
        self.targets, self.ms = targets, {name: 0.0 for _, _, name in targets}
        self.cpu_ms = dict(self.ms)  # the calling thread's CPU time (time.thread_time)
        self._saved: list[tuple[object, str, object, bool]] = []
        self._local = threading.local()

    def _wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kw):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append([0.0, 0.0])  # wall and CPU time of nested spans
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                nested = stack.pop()
                self.ms[name] += (dt - nested[0]) * 1e3
                self.cpu_ms[name] += (dc - nested[1]) * 1e3
                if stack:
                    stack[-1][0] += dt
                    stack[-1][1] += dc
        return timed

    def __enter__(self) -> "Spans":
        for obj, attr, name in self.targets:
            own = attr in getattr(obj, "__dict__", {})
            self._saved.append((obj, attr, getattr(obj, attr), own))
            setattr(obj, attr, self._wrap(getattr(obj, attr), name))
        return self

    def __exit__(self, *exc) -> None:
        for obj, attr, fn, own in reversed(self._saved):
            if own or isinstance(obj, types.ModuleType):
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)  # back to the class's method
        self._saved.clear()

    @property
    def seconds(self) -> float:
        return self.ms["mx.eval"] / 1e3


def span_targets(engine: Engine) -> list[tuple[object, str, str]]:
    """What the per-layer breakdown times: MLX evaluation, graph building, cache bookkeeping."""
    fam, p = engine.resident.family, engine.pipeline
    out = [(mx, "eval", "mx.eval"), (mx, "async_eval", "mx.async_eval"),
           (fam, "attention", "build attention"), (fam, "mlp_input", "build attention"),
           (fam, "route", "build router"), (fam, "shared", "build shared expert"),
           (p.compute, "output" if hasattr(p.compute, "output") else "_whole",
            "build routed experts"),
           (fam, "combine", "build routed experts"), (fam, "head", "build head")]
    module = importlib.import_module("flashmoe.stages.expert_compute")
    out.append((module, "gather_experts", "build routed experts"))
    for pool in engine.unique_pools():
        out += [(pool, "grant", "slot grant+release"), (pool, "release", "slot grant+release")]
    return out


def tiny_checkpoint() -> Path:
    from dataclasses import asdict

    from flashmoe.synth.cache import cached_checkpoint

    params = {"dims": asdict(TINY), "bits": DEMO_BITS, "seed": 0}
    return cached_checkpoint("host_overhead", params,
                             lambda p: build_demo(p, dims=TINY, progress=False))


async def decode(engine: Engine, prompt: list[int], n: int,
                 spans: Spans | None = None) -> tuple[list[int], float, dict, dict]:
    """n greedy tokens; (tokens, decode seconds after the first token, the spans' ms and the
    Python threads' CPU ms over those, summed decode stats)."""
    toks, stamps = [], []
    sums = {"experts_fetched": 0, "experts_hit": 0, "built_ahead": 0}
    snap = lambda: {**({k: v for k, v in spans.ms.items()} if spans else {}),  # noqa: E731
                    **({f"cpu:{k}": v for k, v in spans.cpu_ms.items()} if spans else {}),
                    "cpu:threads": (time.thread_time() + engine.worker.call(time.thread_time))
                    * 1e3}
    async for ev in engine.generate(prompt, n):
        toks.append(ev.token_id)
        if len(toks) == 1:  # between steps the MLX thread is idle: its clock can be read
            first = snap()
        else:  # decode steps only (the first carries the prompt)
            for key in sums:
                sums[key] += ev.stats.get(key, 0)
        stamps.append(time.perf_counter())
    last = snap()
    ms = {k: v - first[k] for k, v in last.items()}
    return toks, stamps[-1] - stamps[0], ms, sums


async def measure(engine: Engine, prompt: list[int], tokens: int, repeats: int,
                  layers: int) -> tuple[list[int], dict]:
    stream, *_ = await decode(engine, prompt, tokens)  # warm-up: fills the slots
    runs, sums = [], {}
    per = 1 / (tokens - 1) / layers
    for _ in range(repeats):
        with Spans(span_targets(engine)) as spans:
            toks, seconds, ms, sums = await decode(engine, prompt, tokens, spans)
        runs.append((seconds * 1e3 * per, {k: v * per for k, v in ms.items()}))
        assert toks == stream, "the timed stream differs from the warm-up's"
    wall, parts = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    mlx = ("mx.eval", "mx.async_eval")  # dispatch to MLX, and waiting for the device
    ev = sum(parts[k] for k in mlx)
    dispatch_cpu = sum(parts[f"cpu:{k}"] for k in mlx)
    host_cpu = parts.pop("cpu:threads") - dispatch_cpu
    cpu = {k[4:]: round(parts.pop(k), 4) for k in list(parts) if k.startswith("cpu:")}
    parts["other host (glue, hops, stats)"] = wall - sum(parts.values())
    cpu["other host (glue, hops, stats)"] = round(host_cpu - sum(
        v for k, v in cpu.items() if k not in mlx), 4)
    return stream, {"wall_ms": wall, "eval_ms": ev, "outside_eval_ms": wall - ev,
                    "host_cpu_ms": host_cpu, "dispatch_cpu_ms": dispatch_cpu, **sums,
                    "wall_ms_runs": [round(w, 3) for w, _ in runs],
                    "breakdown_ms": {k: round(v, 4) for k, v in parts.items()},
                    "breakdown_cpu_ms": cpu}


async def profile(engine: Engine, prompt: list[int], tokens: int, top: int) -> str:
    """cProfile of one more pass, in the event-loop thread and in the MLX thread (Python
    3.12's cProfile sees every thread at once: one profile there)."""
    loop_prof, mlx_prof = cProfile.Profile(), cProfile.Profile()
    threads = sys.version_info < (3, 12)
    if threads:
        engine.worker.call(lambda: mlx_prof.enable())
    loop_prof.enable()
    await decode(engine, prompt, tokens)
    loop_prof.disable()
    if threads:
        engine.worker.call(lambda: mlx_prof.disable())
    out = io.StringIO()
    profs = (("event-loop thread", loop_prof), ("MLX thread", mlx_prof)) if threads \
        else (("all threads", loop_prof),)
    for name, prof in profs:
        out.write(f"\n=== {name} (top {top} by own time, {tokens} tokens) ===\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


async def main_async(args: argparse.Namespace, overrides: list[str]) -> dict:
    cfg = resolve_hardware(compose_config(["task=bench", *overrides]))
    validate(cfg)
    own_model = any(o.startswith(("model=", "model.path=")) for o in overrides)
    path = checkpoint_path(cfg) if own_model else tiny_checkpoint()
    opts = engine_options(cfg)
    engine = await Engine.open(path, opts)
    try:
        layers, k, device = len(engine.pipeline.layers), engine.k, engine.device
        if args.layer_by_layer:  # bench-only switch: the product has no such option
            engine.pipeline.speculator = None
        elif engine.pipeline.speculator is not None:  # bench-only switches, as above
            if args.eval_every is not None:
                engine.pipeline.speculator.eval_every = args.eval_every
            engine.pipeline.speculator.lookahead = args.lookahead
        prompt = engine.encode(PROMPT)
        stream, out = await measure(engine, prompt, args.tokens, args.repeats, layers)
        text = await profile(engine, prompt, args.tokens, args.profile) if args.profile else ""
    finally:
        await engine.aclose()
    del engine  # its slots and resident weights, before mlx-lm loads the checkpoint
    gc.collect()
    mx.clear_cache()
    base = run_baseline(path, prompt, args.tokens, opts.dtype, k) if args.baseline \
        else {"status": "skipped"}
    if base.get("status") == "ok":
        out["mlx_lm_ms"] = 1e3 / base["tok_s"] / layers
        out["ratio_vs_mlx_lm"] = out["wall_ms"] / out["mlx_lm_ms"]
        out["tokens_match_mlx_lm"] = base["token_ids"] == stream
    else:
        out["mlx_lm"] = base
    out.update(layers=layers, k=k, tokens=args.tokens, repeats=args.repeats, device=device,
               path=str(path), layer_by_layer=args.layer_by_layer,
               eval_every=args.eval_every, lookahead=args.lookahead)
    return {"summary": out, "profile": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip resident mlx-lm (it loads the whole checkpoint)")
    ap.add_argument("--layer-by-layer", action="store_true",
                    help="never try a token as one trip (stages/speculate.py): measures the "
                         "per-layer path (stages/cached_run.py) on the same cache")
    ap.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="whole-token step: async_eval every N-th MoE layer (0: once per "
                         "token); default: speculate.EVAL_EVERY")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="whole-token step: do not build and start the next token before "
                         "this one's routing is checked (measures what the lookahead gains)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print cProfile's top N functions per thread")
    args, overrides = ap.parse_known_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (the first token carries the prompt)")
    res = asyncio.run(main_async(args, overrides))
    s = res["summary"]
    print(res["profile"], end="")
    print(f"per layer ({s['layers']} layers, K={s['k']}, {s['device']}): "
          f"wall {s['wall_ms']:.3f} ms (in mx.eval/async_eval {s['eval_ms']:.3f}, of it CPU "
          f"{s['dispatch_cpu_ms']:.3f}); host Python CPU {s['host_cpu_ms']:.3f} ms; "
          f"mlx-lm {s.get('mlx_lm_ms', float('nan')):.3f} ms "
          f"(x{s.get('ratio_vs_mlx_lm', float('nan')):.2f}); "
          f"experts read while timed: {s['experts_fetched']}; steps built ahead: "
          f"{s['built_ahead']} of {s['tokens'] - 1}")
    print(f"  {'':32s} {'wall':>7s} {'cpu':>7s}  (ms per layer)")
    for name, ms in s["breakdown_ms"].items():
        print(f"  {name:32s} {ms:7.3f} {s['breakdown_cpu_ms'].get(name, 0.0):7.3f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}))


if __name__ == "__main__":
    sys.exit(main())
