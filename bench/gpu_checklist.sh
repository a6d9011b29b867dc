#!/usr/bin/env bash
# What is left to run on the H200 (issues 16, 12, 11, 17), one device call per stage, each well
# inside the 10-minute limit. Run through bench/h200.sh after its two install calls:
#   bench/h200.sh all bash bench/gpu_checklist.sh exact     # issue 16: parity tests on the GPU
#   bench/h200.sh all bash bench/gpu_checklist.sh build     # 13 shape-faithful layers (47.6 GB)
#   bench/h200.sh all bash bench/gpu_checklist.sh scale     # issue 16: the issue's own runs
#   bench/h200.sh all bash bench/gpu_checklist.sh speed     # issue 12: default vs io.cuda_copy, 2 tiers
#   bench/h200.sh all bash bench/gpu_checklist.sh overhead  # issue 12: per-layer host overhead, cached
#   bench/h200.sh all bash bench/gpu_checklist.sh batch     # issue 11: task.concurrency sweep
# Serve needs starlette, uvicorn and sse-starlette among the carried wheels (.whl/).
# Every stage writes its log under $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 FLASHMOE_TEST_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=/root/s  # the 13-layer checkpoint (bench/h200.sh keeps /root between calls of one machine)
run() { echo "+ $*"; "$@" 2>&1 | grep -v '^\[INFO\]'; }

case "${1:-}" in
exact)  # tiny fixtures of all families + 4 shaped layers, every cache policy; slot copies
  run timeout 540 python3 -m pytest -p no:cacheprovider -rA tests/test_gpu_parity.py \
    tests/test_cuda_copy.py tests/test_batch.py tests/test_cached_run.py -x | tee "$OUT/exact.log" ;;
build)
  run timeout 540 python3 -c "from flashmoe.synth.shaped import build_shaped; \
build_shaped('$S', layers=13, progress=False)" | tee "$OUT/build.log" ;;
scale)  # the table: K=4/10 x (LRU 20.8 GiB, none); the bench refuses a speed if the
  # timed tokens are not resident mlx-lm's (task.check=mlx_lm writes tokens_match)
  run timeout 560 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4,10 cache=default,none cache.budget_gb=20.8 task.check=mlx_lm \
    task.tokens=32 task.repeats=1 hydra.sweep.dir="$OUT/scale" | tee "$OUT/scale.log" ;;
speed)  # 60-layer equivalents from wall time per token (issue 12): today's path, the staged
  # CUDA copy, and the two tiers at 13/60 of a real box's split
  run timeout 560 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 io.cuda_copy=false,true cache=default cache.budget_gb=20.8 \
    task.check=mlx_lm task.tokens=32 task.repeats=2 hydra.sweep.dir="$OUT/speed" \
    | tee "$OUT/speed.log"
  run timeout 300 python3 -m flashmoe task=bench hardware=h200 model.path=$S \
    model.experts_per_token=10 cache.budget_gb=26 cache.host_budget_gb=19.5 task.check=mlx_lm \
    task.tokens=32 task.repeats=2 hydra.run.dir="$OUT/tiers" | tee -a "$OUT/speed.log" ;;
overhead)  # issue 12 item 1: per-layer wall / mx.eval / host ms with every expert cached, K=4,
  # against resident mlx-lm (BENCHMARKS.md (k)); then the per-layer path alone, with a profile
  run timeout 380 python3 bench/host_overhead.py --tokens 32 --repeats 3 hardware=h200 \
    model.path=$S model.experts_per_token=4 cache.budget_gb=20.8 | tee "$OUT/overhead.log"
  run timeout 170 python3 bench/host_overhead.py --tokens 32 --repeats 2 --no-baseline \
    --layer-by-layer --profile 30 hardware=h200 model.path=$S model.experts_per_token=4 \
    cache.budget_gb=20.8 | tee -a "$OUT/overhead.log" ;;
batch)
  run timeout 560 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S cache=none \
    model.experts_per_token=10 task.concurrency=1,2,4,8,16 task.tokens=16 task.repeats=1 \
    hydra.sweep.dir="$OUT/batch" | tee "$OUT/batch.log" ;;
*) echo "usage: $0 exact|build|scale|speed|overhead|batch" >&2; exit 2 ;;
esac
