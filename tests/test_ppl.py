"""task=ppl: window planning, perplexity against mlx-lm's own logits, KL at full and lowered K."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog

from flashmoe.config import compose_config
from flashmoe.errors import ConfigError
from flashmoe.quality import Window, kl_divergence, nll, plan_windows, top1_agreement
from flashmoe.synth.tokenizer import english_text
from tests.conftest import with_k
from tests.parity import budget_for

CONTEXT, STRIDE = 64, 32


def hf_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Hugging Face's perplexity loop, written out: (begin, end, first scored target)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        first = max(end - trg_len, begin + 1)  # labels[:, :-trg_len] = -100, then the shift
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 2), (10, 4, 4), (10, 4, 3),
                                              (100, 64, 32), (100, 512, 512), (513, 512, 512),
                                              (1000, 64, 1), (7, 3, 3)])
def test_windows_match_the_hugging_face_loop(n, context, stride):
    windows = plan_windows(n, context, stride)
    assert [(w.begin, w.end, w.score_from) for w in windows] == hf_windows(n, context, stride)
    assert all(w.end - w.begin <= context and w.scored >= 1 for w in windows)
    targets = [t for w in windows for t in range(w.score_from, w.end)]
    assert targets == sorted(set(targets))  # each target once, in order
    if stride < context:
        assert targets == list(range(1, n))  # overlapping windows score every token but the first


def test_window_planning_by_hand():
    assert plan_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6),
                                      Window(6, 10, 8)]
    # no overlap: each window's first token has no context and is not scored
    assert plan_windows(9, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5)]
    assert plan_windows(10, 4, 2, max_windows=2) == [Window(0, 4, 1), Window(2, 6, 4)]
    assert Window(2, 6, 4).rows == slice(1, 3)  # rows 1, 2 of the window predict tokens 4, 5


@pytest.mark.parametrize("args", [(1, 4, 2), (10, 1, 1), (10, 4, 0), (10, 4, 5), (10, 4, 2, 0)])
def test_window_planning_rejects(args):
    with pytest.raises(ConfigError):
        plan_windows(*args)


def test_nll_kl_top1_by_hand():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert np.allclose(nll(logits, [0, 2]), [math.log(2), -math.log(0.8)])
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    assert np.allclose(kl_divergence(logits, q), [0.25 * math.log(2), 0.0])
    assert top1_agreement(logits, q).tolist() == [False, True]
    assert np.allclose(kl_divergence(logits + 7.0, logits), 0.0)  # shift-invariant


def mlx_lm_ppl(path: Path, ids: list[int], context: int, stride: int) -> float:
    """exp(mean NLL) from resident mlx-lm's own logits, computed here without flashmoe.quality."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    total, count = 0.0, 0
    for begin, end, first in hf_windows(len(ids), context, stride):
        x = np.array(model(mx.array([ids[begin:end]]))[0].astype(mx.float32), dtype=np.float64)
        x = x[first - 1 - begin:end - 1 - begin]
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        total += float((lse - x[np.arange(len(x)), ids[first:end]]).sum())
        count += end - first
    return math.exp(total / count)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(english_text(1200), encoding="utf-8")
    return path


async def run_ppl(path: Path, data: Path, *overrides: str) -> dict:
    from flashmoe.tasks import ppl

    cfg = compose_config(["task=ppl", f"model.path={path}", "hardware=linux_cpu", f"data={data}",
                          f"task.context={CONTEXT}", f"task.stride={STRIDE}", *overrides])
    state: dict = {}
    try:
        return await ppl.run(cfg, structlog.get_logger(), state)
    finally:
        if state.get("engine") is not None:
            await state["engine"].aclose()


async def test_ppl_matches_mlx_lm_and_kl_is_zero_at_full_k(tiny, text_file):
    from mlx_lm.utils import load_tokenizer

    path = tiny("qwen3_5_moe")  # 4 slots for 16 experts x 4 layers: every window evicts
    got = await run_ppl(path, text_file, "task.reference=mlx_lm",
                        f"cache.budget_gb={budget_for(path, 4)}")
    ids = list(load_tokenizer(path).encode(text_file.read_text()))
    assert got["tokens_scored"] == len(ids) - 1 and got["data_tokens"] == len(ids)
    # the NLL sum here is float64 numpy in another order than flashmoe.quality's: 1e-5
    assert got["ppl"] == pytest.approx(mlx_lm_ppl(path, ids, CONTEXT, STRIDE), rel=1e-5)
    assert got["ref_ppl"] == got["ppl"]  # same logits, same code: bit-identical
    assert got["kl_mean"] == 0.0 and got["kl_max"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["reference_k"] == got["experts_per_token"] == 4
    assert got["expert_gb_total"] > 0 and got["status"] == "ok"


async def test_lowered_k_costs_kl_against_full_k(tiny, text_file):
    path = tiny("qwen3_5_moe")
    full = await run_ppl(path, text_file, "task.reference=mlx_lm", "model.experts_per_token=2",
                         "task.max_windows=3")
    assert full["reference_k"] == 4 and full["experts_per_token"] == 2
    assert full["kl_mean"] > 1e-3 and full["top1_agreement"] < 1.0
    same = await run_ppl(path, text_file, "task.reference=mlx_lm", "model.experts_per_token=2",
                         "task.max_windows=3", "task.k_reference=same",
                         f"cache.budget_gb={budget_for(path, 2)}")
    assert same["reference_k"] == 2 and same["kl_mean"] == 0.0
    assert same["ppl"] == full["ppl"] and same["windows"] == 3


async def test_reference_path_scores_against_another_model(tiny, tmp_path, text_file):
    path = tiny("qwen3_5_moe")
    other = with_k(path, tmp_path / "k2", 2)  # a model whose own K is 2
    got = await run_ppl(path, text_file, "task.reference=mlx_lm", f"task.reference_path={other}",
                        "task.max_windows=1")
    assert got["reference_path"] == str(other) and got["reference_k"] == 2
    assert got["kl_mean"] > 1e-3
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="k_reference=same needs"):
        await run_ppl(path, text_file, "task.reference=mlx_lm", f"task.reference_path={tmp_path}",
                      "task.k_reference=same")


async def test_reference_follows_the_engine_dtype(tmp_path, text_file):
    """bf16 weights, f32 activations (linux_cpu): mlx-lm must widen them as the engine does."""
    import mlx.core as mx

    from tests.fixtures.tiny import build_tiny

    path = build_tiny(tmp_path / "bf16", "qwen3_5_moe", dtype=mx.bfloat16)
    got = await run_ppl(path, text_file, "task.reference=mlx_lm", "task.max_windows=2")
    assert got["kl_mean"] < 1e-6 and got["top1_agreement"] == 1.0


@pytest.mark.parametrize("content,match", [(None, "is not a file"), ("  \n", "is empty"),
                                           ("a", "at least 2 tokens"),
                                           (b"\xff\xfe\x00", "not UTF-8")])
async def test_bad_data_is_a_clear_error(tiny, tmp_path, content, match):
    data = tmp_path / "data.txt"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    with pytest.raises(ConfigError, match=match):
        await run_ppl(tiny("qwen3_5_moe"), data)


def test_cli_writes_ppl_summary(tiny, tmp_path, text_file):
    path = tiny("qwen3_5_moe")
    out = subprocess.run([sys.executable, "-m", "flashmoe", "task=ppl", f"model.path={path}",
                          "hardware=linux_cpu", f"data={text_file}", f"task.context={CONTEXT}",
                          f"task.stride={STRIDE}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # stdout stays clean; the bar and the summary line go to stderr
    (log,) = (tmp_path / "runs").rglob("flashmoe.jsonl")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    (summary,) = [e for e in events if e["event"] == "run_summary"]
    assert summary["status"] == "ok" and summary["ppl"] > 1 and summary["tokens_scored"] > 0
    assert len([e for e in events if e["event"] == "window_scored"]) == summary["windows"]
    assert f"ppl {summary['ppl']}" in out.stderr
