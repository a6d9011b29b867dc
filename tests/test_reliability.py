"""Nothing wrong gets out: bad checkpoints and bad values end in one clear line, never a token.

Each broken checkpoint is a copy of a tiny one with one thing wrong. Every case is checked twice:
through the API (Engine.open raises the right flashmoe error) and through the CLI (non-zero exit,
exactly one `flashmoe: ...` line on stderr, empty stdout, no traceback). The CLI runs are forked
from one warm interpreter (`serve_cli`) so ~30 of them cost seconds, not a minute of imports.
I/O faults and long runs are in tests/test_io_faults.py. RELIABILITY.md lists every row.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import error_lines
from flashmoe.engine import Engine, EngineOptions
from flashmoe.errors import CheckpointError
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.checkpoints.validate import validate_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARD = "model.safetensors"
NORM = "model.layers.0.post_attention_layernorm.weight"  # F32 [64]
Q_PROJ = "model.layers.0.self_attn.q_proj"  # U32 weight [64, 8] + F32 scales/biases [64, 1]


# ---- making broken copies -------------------------------------------------------------------
def edit_header(file: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place; data offsets are relative, so data stays valid."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    obj = json.loads(file.read_text())
    edit(obj)
    file.write_text(json.dumps(obj))


def drop(names: tuple[str, ...], from_index: bool) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        edit_header(d / SHARD, lambda h: [h.pop(n) for n in names])
        if from_index:
            edit_json(d / "model.safetensors.index.json",
                      lambda o: [o["weight_map"].pop(n) for n in names])
    return apply


def set_meta(name: str, **meta) -> Callable[[Path], None]:
    return lambda d: edit_header(d / SHARD, lambda h: h[name].update(meta))


def set_config(**values) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "config.json", lambda c: c.update(values))


def truncate(d: Path) -> None:
    f = d / SHARD
    os.truncate(f, f.stat().st_size * 6 // 10)


def overlap(d: Path) -> None:
    def edit(h: dict) -> None:
        h[f"{Q_PROJ}.scales"]["data_offsets"] = list(h[f"{Q_PROJ}.biases"]["data_offsets"])
    edit_header(d / SHARD, edit)


def extra_tensor(d: Path) -> None:
    def edit(h: dict) -> None:
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h["model.layers.0.mlp.extra.weight"] = {"dtype": "F32", "shape": [0],
                                                "data_offsets": [end, end]}
    edit_header(d / SHARD, edit)


def duplicate_shard(d: Path) -> None:
    (d / "model.safetensors.index.json").unlink()  # mlx-lm and flashmoe then glob model*.
    header = json.dumps({NORM: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "model-extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def corrupt_bytes(at: int, data: bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        with open(d / SHARD, "r+b") as f:
            f.seek(at)
            f.write(data)
    return apply


# name -> (what is done to a copy of tiny qwen3_moe, words the one error line must contain)
BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "shard_truncated": (truncate, (SHARD, "file is truncated", "re-download")),
    "header_length_beyond_file": (corrupt_bytes(0, struct.pack("<Q", 10**9)),
                                  (SHARD, "header length 1000000000 does not fit")),
    "header_not_json": (corrupt_bytes(8, b"\xff\xfe{["), (SHARD, "header is not valid JSON")),
    "offsets_overlap": (overlap, (SHARD, f"{Q_PROJ}.scales", "overlaps")),
    "unknown_dtype": (set_meta(NORM, dtype="F12"), (SHARD, NORM, "dtype 'F12'", "expected one of")),
    "offsets_disagree_with_shape": (set_meta(NORM, shape=[65]),
                                    (SHARD, NORM, "spans 256 bytes", "F32[65] needs 260")),
    "config_missing": (lambda d: (d / "config.json").unlink(), ("config.json is missing",)),
    "model_type_unsupported": (set_config(model_type="llama"),
                               ("model_type='llama'", "supported: qwen3_5_moe")),
    "expert_count_missing": (lambda d: edit_json(d / "config.json", lambda c: c.pop("num_experts")),
                             ("config.json", "'num_experts' missing")),
    "experts_per_token_above_experts": (set_config(num_experts_per_tok=99),
                                        ("config.json", "99 experts per token out of 16")),
    "tensor_in_index_not_in_file": (drop((NORM,), from_index=False),
                                    (SHARD, NORM, "its header does not have it")),
    "tensor_missing": (drop((NORM,), from_index=True),
                       (NORM, "is in none of model.safetensors", "float32[64]")),
    "layers_mismatch_config": (set_config(num_hidden_layers=4),
                               ("model.layers.3.", "is in none of", "more)")),
    "shape_mismatch_config": (set_config(head_dim=8),
                              (SHARD, "k_norm.weight has shape [16]", "needs [8]")),
    "dtype_not_float": (set_meta(NORM, dtype="I32"), (SHARD, NORM, "dtype int32", "float dtype")),
    "quantized_weight_not_packed": (set_meta(f"{Q_PROJ}.weight", dtype="F32"),
                                    (SHARD, f"{Q_PROJ}.weight is F32[64, 8]", "U32")),
    "scales_missing": (drop((f"{Q_PROJ}.scales",), from_index=True),
                       (f"{Q_PROJ}.weight is packed", "scales is in no file")),
    "extra_tensor": (extra_tensor, (SHARD, "model.layers.0.mlp.extra.weight",
                                    "is not a parameter of qwen3_moe")),
    "shard_missing": (lambda d: edit_json(d / "model.safetensors.index.json", lambda o: o[
        "weight_map"].update({NORM: "model-00002-of-00002.safetensors"})),
        ("model-00002-of-00002.safetensors", "missing")),
    "weight_map_malformed": (lambda d: edit_json(d / "model.safetensors.index.json",
                                                 lambda o: o.update(weight_map=[1])),
                             ("model.safetensors.index.json", "'weight_map' is [1]")),
    "tensor_in_two_files": (duplicate_shard, ("model-extra.safetensors", NORM, "also in")),
    "path_is_a_file": (lambda d: (shutil.rmtree(d), d.write_text("x")), ("is not a directory",)),
}


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory) -> Callable[[str], Path]:
    """broken(case) -> a copy of tiny qwen3_moe with that one thing wrong."""
    src, root, made = tiny("qwen3_moe"), tmp_path_factory.mktemp("broken"), {}

    def make(case: str) -> Path:
        if case not in made:
            dst = root / case
            shutil.copytree(src, dst)
            BROKEN[case][0](dst)
            made[case] = dst
        return made[case]
    return make


# ---- the API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_checkpoint_refused_at_open(broken, case):
    with pytest.raises(CheckpointError) as err:
        engine = await Engine.open(broken(case), EngineOptions(), tokenizer=False)
        await engine.aclose()
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for needle in BROKEN[case][1]:
        assert needle in msg, msg


def _bytes_read() -> int:
    return int(dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_validation_reads_headers_only(broken):
    """Indexing and validating read the headers, not the tensors (cost: no full read)."""
    from flashmoe.models.loader import load_resident

    path = broken("layers_mismatch_config")
    before = _bytes_read()
    with pytest.raises(CheckpointError, match="model.layers.3"):
        load_resident(path, CheckpointIndex.open(path))
    read = _bytes_read() - before
    assert read < (path / SHARD).stat().st_size // 4, read


def test_validate_checkpoint_names_file_tensor_and_expectation(tiny):
    from flashmoe.checkpoints.validate import ParamSpec, index_params

    index = CheckpointIndex.open(tiny("qwen3_moe"))
    have = index_params(index)
    validate_checkpoint(index, have)  # the files agree with themselves
    with pytest.raises(CheckpointError, match=r"tensor model.mtp.weight is in none of .* "
                                              r"needs it as bfloat16\[4, 2\]"):
        validate_checkpoint(index, {**have, "model.mtp.weight": ParamSpec((4, 2), "bfloat16")})
    with pytest.raises(CheckpointError, match=rf"/{SHARD}: tensor {NORM} has shape \[64\] "
                                              r"but .* needs \[32\]"):
        validate_checkpoint(index, {**have, NORM: ParamSpec((32,), "float32")})
    with pytest.raises(CheckpointError, match=rf"/{SHARD}: tensor {Q_PROJ}.weight has dtype "
                                              r"uint32; .* needs int8 \(config.json quantization"):
        validate_checkpoint(index, {**have, f"{Q_PROJ}.weight": ParamSpec((64, 8), "int8")})
    # a name mlx-lm's sanitize made up is in no file: the message names the directory
    with pytest.raises(CheckpointError, match=rf"{index.root}: tensor x.{NORM} is not a parameter"):
        validate_checkpoint(index, have, {**have, f"x.{NORM}": have[NORM]})


# ---- the CLI ---------------------------------------------------------------------------------
def serve_cli() -> None:
    """Run `python -m flashmoe ARGS` for each case on stdin, each in a child forked from here.

    The child is the real entry point (runpy of flashmoe/__main__.py, real argv, real fds 1/2);
    only the imports were done once, before the fork.
    """
    import hydra, flashmoe.app, flashmoe.cli, flashmoe.tasks.generate  # noqa: E401, F401 (warm up)

    cases, running, codes = json.load(sys.stdin), {}, {}
    for i, case in enumerate(cases + [None] * 2):  # two at a time: the machine has two cores
        if len(running) == 2 or (case is None and running):
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        if case is not None:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(case)
            running[pid] = i
    print(json.dumps([codes[i] for i in range(len(cases))]))


def _run_child(case: dict) -> None:
    os.chdir(case["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(case.get("stdin", os.devnull), os.O_RDONLY), 0)  # `< file`, or no input
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    sys.argv, code = ["flashmoe", *case["args"]], 0
    try:
        runpy.run_module("flashmoe", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli_cases(jobs: list[dict]) -> list[int]:
    """Exit codes of `python -m flashmoe` per job; stdout/stderr land in each job's cwd."""
    if sys.platform != "linux":  # fork after importing MLX is only known safe on Linux
        codes = []
        for job in jobs:
            with open(Path(job["cwd"]) / "stdout", "w") as out, \
                 open(Path(job["cwd"]) / "stderr", "w") as err, \
                 open(job.get("stdin", os.devnull)) as inp:
                codes.append(subprocess.run([sys.executable, "-m", "flashmoe", *job["args"]],
                                            cwd=job["cwd"], stdout=out, stderr=err,
                                            stdin=inp).returncode)
        return codes
    server = "import tests.test_reliability as t; t.serve_cli()"
    out = subprocess.run([sys.executable, "-c", server], cwd=REPO, input=json.dumps(jobs),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def short_context(d: Path) -> None:
    edit_json(d / "config.json", lambda c: c.update(max_position_embeddings=8))


# bad values: (args, words the one line must contain), run on tiny qwen3_moe or, with "@short",
# on a copy whose config.json allows an 8-token context
BAD_VALUES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "io_split_zero": (["io.split=0"], ("io.split=0", "between 1 and 64")),
    "io_split_65": (["io.split=65"], ("io.split=65", "between 1 and 64")),
    "io_threads_zero": (["io.threads=0"], ("io.threads=0", "between 1 and 256")),
    "io_retries_negative": (["io.retries=-1"], ("io.retries=-1", "between 0 and 100")),
    "k_zero": (["model.experts_per_token=0"], ("model.experts_per_token=0", "at least 1")),
    "k_above_experts": (["model.experts_per_token=17"],
                        ("model.experts_per_token=17", "between 1 and 16")),
    "budget_negative": (["cache.budget_gb=-1"], ("cache.budget_gb=-1.0", "at least 0")),
    "budget_below_one_layer": (["cache.budget_gb=0.00001"],
                               ("cache.budget_gb=1e-05", "one layer needs 4")),
    "max_tokens_zero": (["max_tokens=0"], ("max_tokens=0", "at least 1")),
    "max_tokens_beyond_context": (["max_tokens=5000"],
                                  ("max_tokens=5000", "context of 4096 tokens")),
    "prompt_beyond_context": (["prompt=" + "the sea is wide and " * 4, "max_tokens=1", "@short"],
                              ("prompt (", "context of 8 tokens")),
    "hardware_unknown": (["hardware=nope"], ("hardware=nope", "available: auto, h200, linux_cpu")),
    "model_unknown": (["model=nope"], ("model=nope", "available: demo, path, synth")),
    "task_unknown": (["task=nope"], ("task=nope", "available: bench")),
}


@pytest.fixture(scope="module")
def cli_results(tiny, broken, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Every bad CLI input of this file, run once: case -> (exit code, stdout, stderr)."""
    root, ckpt = tmp_path_factory.mktemp("cli"), tiny("qwen3_moe")
    short = root / "short-context"
    shutil.copytree(ckpt, short)
    short_context(short)
    cases = {}
    for name, (args, _) in BAD_VALUES.items():
        path = short if "@short" in args else ckpt
        hw = [] if any(a.startswith("hardware=") for a in args) else ["hardware=linux_cpu"]
        cases[name] = [a for a in args if a != "@short"] + [f"model.path={path}", *hw]
    for name in BROKEN:
        cases[name] = [f"model.path={broken(name)}", "hardware=linux_cpu", "max_tokens=2"]
    jobs = []
    for name, args in cases.items():
        (root / name).mkdir()
        jobs.append({"cwd": str(root / name), "args": args})
    codes = run_cli_cases(jobs)
    return {name: (code, (root / name / "stdout").read_text(), (root / name / "stderr").read_text())
            for name, code in zip(cases, codes)}


def assert_one_clear_line(result: tuple[int, str, str], needles: tuple[str, ...]) -> None:
    code, stdout, stderr = result
    assert code not in (0, 99), (code, stderr)
    assert "Traceback" not in stdout + stderr and stdout == "", stdout + stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("flashmoe: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_cli_bad_value_one_line(cli_results, case):
    assert_one_clear_line(cli_results[case], BAD_VALUES[case][1])


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_cli_broken_checkpoint_one_line(cli_results, case):
    assert_one_clear_line(cli_results[case], BROKEN[case][1])


def test_cli_truly_subprocess_truncated_shard(broken, tmp_path):
    """The same contract without the fork server: a plain `python -m flashmoe`."""
    path = broken("shard_truncated")
    out = subprocess.run([sys.executable, "-m", "flashmoe", f"model.path={path}",
                          "hardware=linux_cpu"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert_one_clear_line((out.returncode, out.stdout, out.stderr), BROKEN["shard_truncated"][1])
    (log,) = (tmp_path / "runs").rglob("flashmoe.jsonl")
    summary = [json.loads(l) for l in log.read_text().splitlines() if '"run_summary"' in l]
    assert summary[-1]["status"] == "error"

