#!/usr/bin/env bash
# What is left to run on the H200 (issues 16, 12, 11, 17), one device call per stage, each well
# inside the 10-minute limit. Run through bench/h200.sh after its two install calls:
#   bench/h200.sh all bash bench/gpu_checklist.sh exact     # issue 16: shaped parity + CUDA copy
#   bench/h200.sh all bash bench/gpu_checklist.sh tiny      # issue 16: five families; batching
#   bench/h200.sh all bash bench/gpu_checklist.sh build scale  # 13 shaped layers (47.6 GB), the
#                                                           # issue's own runs (one call)
#   bench/h200.sh all bash bench/gpu_checklist.sh speed     # issue 12: default vs io.cuda_copy, 2 tiers
#   bench/h200.sh all bash bench/gpu_checklist.sh batch     # issue 11: task.concurrency sweep
# Serve needs starlette, uvicorn and sse-starlette among the carried wheels (.whl/).
# Every stage writes its log under $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 FLASHMOE_TEST_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=/root/s  # the 13-layer checkpoint (bench/h200.sh keeps /root between calls of one machine)
run() { echo "+ $*"; "$@" 2>&1 | grep -v '^\[INFO\]'; }

for stage in "${@:-usage}"; do
case "$stage" in
exact)  # 4 shaped layers (K=4, 10), every cache policy; the staged CUDA copy path
  run timeout 400 python3 -m pytest -p no:cacheprovider -rA --durations=5 \
    tests/test_gpu_parity.py -k shaped tests/test_cuda_copy.py | tee "$OUT/exact.log" ;;
tiny)  # tiny fixtures of all five families, every cache policy; batched decode on the GPU
  run timeout 560 python3 -m pytest -p no:cacheprovider -rA --durations=5 \
    tests/test_gpu_parity.py -k tiny tests/test_batch.py | tee "$OUT/tiny.log" ;;
build)
  [ -f $S/config.json ] || run timeout 300 python3 -c "from flashmoe.synth.shaped import build_shaped; \
build_shaped('$S', layers=13, progress=False)" | tee "$OUT/build.log" ;;
scale)  # the table: K=4/10 x (LRU 20.8 GiB, none); the bench refuses a speed if the
  # timed tokens are not resident mlx-lm's (task.check=mlx_lm writes tokens_match)
  run timeout 530 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
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
batch)
  run timeout 560 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S cache=none \
    model.experts_per_token=10 task.concurrency=1,2,4,8,16 task.tokens=16 task.repeats=1 \
    hydra.sweep.dir="$OUT/batch" | tee "$OUT/batch.log" ;;
*) echo "usage: $0 exact|tiny|build|scale|speed|batch ..." >&2; exit 2 ;;
esac
done
