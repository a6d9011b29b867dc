#!/usr/bin/env bash
# What is left to run on the H200 (issues 16, 12, 11, 13), several stages per device call, each
# call well inside the 10-minute limit. Run through bench/h200.sh after its fetch call:
#   bench/h200.sh all bash bench/gpu_checklist.sh exact     # issue 16: shaped parity + CUDA copy
#   bench/h200.sh all bash bench/gpu_checklist.sh build both  # 13 shaped layers (47.6 GB); the
#                                        # issue's own runs and the five tiny families side by side
#   bench/h200.sh all bash bench/gpu_checklist.sh speed     # issue 12 (timed: nothing else runs)
#   bench/h200.sh all bash bench/gpu_checklist.sh overhead  # issue 12: host ms per layer
#   bench/h200.sh all bash bench/gpu_checklist.sh batch     # issue 11: task.concurrency
#   bench/h200.sh all bash bench/gpu_checklist.sh nccl      # issue 13, on nvidia-h200-x2
# Session 7 changed the CUDA copy interface (integer addresses) and ran it only through the
# token-checked K=10 bench: the next device session runs `exact` first.
# Serve needs starlette, uvicorn and sse-starlette among the carried wheels (.whl/).
# Every stage writes its log under $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 FLASHMOE_TEST_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=/root/s  # the 13-layer checkpoint (bench/h200.sh keeps /root between calls of one machine)
run() { echo "+ $*"; "$@" 2>&1 | grep -v '^\[INFO\]'; }
# seconds left before $DEADLINE (seconds since this script began; default: no deadline)
left() { local l=$(( ${DEADLINE:-100000} - SECONDS )); [ $l -gt 10 ] && echo $l || echo 10; }

for stage in "${@:-usage}"; do
case "$stage" in
exact)  # 4 shaped layers (K=4, 10), every cache policy; the staged CUDA copy path
  run timeout 400 python3 -m pytest -p no:cacheprovider -rA --durations=5 \
    tests/test_gpu_parity.py -k shaped tests/test_cuda_copy.py tests/test_cached_run.py \
    tests/test_speculate.py | tee "$OUT/exact.log" ;;
dims)  # which model dims give mlx-lm itself garbage logits on mlx-cuda (issue 16's finding)
  run timeout 300 python3 bench/gpu_tiny_dims.py | tee "$OUT/dims.log" ;;
tiny)  # tiny fixtures of all five families, every cache policy; batched decode on the GPU
  run timeout 560 python3 -m pytest -p no:cacheprovider -rA --durations=5 \
    tests/test_gpu_parity.py -k tiny tests/test_batch.py | tee "$OUT/tiny.log" ;;
build)
  [ -f $S/config.json ] || { run timeout 300 python3 -c "from flashmoe.synth.shaped import build_shaped; \
build_shaped('$S', layers=13, progress=False)" | tee "$OUT/build.log"
    # the first run after a build ran past its limit twice (k10, 2026-12-01), likely while
    # the 47.6 GB just written were flushed from dirty pages: flush them here
    sync; } ;;
scale)  # the issue's own setting: 13 shaped layers, K=4/10 x (LRU 20.8 GiB, none): every
  # prompt logit, 32 greedy tokens and a warm second pass against resident mlx-lm
  FLASHMOE_GPU_SHAPED=$S run timeout 540 python3 -m pytest -p no:cacheprovider -rA \
    --durations=5 tests/test_gpu_parity.py -k at_scale | tee "$OUT/scale.log" ;;
second)  # build beside tiny, then evals, in DEADLINE (default 430 s)
  DEADLINE=${DEADLINE:-430}; bash "$0" build > "$OUT/build.out" 2>&1 &
  bash "$0" tiny; wait; tail -3 "$OUT/build.out"
  DEADLINE=$(( DEADLINE - SECONDS )) bash "$0" evals ;;
evals)  # the whole-token step on the GPU: the lookahead (default) with evaluations every MoE
  # layer (default), once per token and every third, then without the lookahead; host_overhead.py
  # each (32 tokens x 2), resident mlx-lm once
  for a in "--eval-every 1" "--eval-every 0" "--eval-every 3" "--eval-every 1 --no-lookahead"; do
    B=--no-baseline; [ "$a" = "--eval-every 1" ] && B=
    run timeout $(left) python3 bench/host_overhead.py --tokens 32 --repeats 2 $B $a \
      hardware=h200 model.path=$S model.experts_per_token=4 cache.budget_gb=20.8 \
      | grep -v '^{' | tee -a "$OUT/evals.log"
  done ;;
graphs)  # MLX-CUDA's graph batching (device.cpp: a commit per 100 ops or per 1000 MB of inputs,
  # and each gather over a slot stack is > 1000 MB) vs plain launches: host_overhead.py with
  # each setting, then resident mlx-lm's own loop (bench/dispatch_probe.py) with the same
  for e in "" MLX_USE_CUDA_GRAPHS=0 MLX_MAX_MB_PER_BUFFER=1000000 \
      "MLX_MAX_MB_PER_BUFFER=1000000 MLX_MAX_OPS_PER_BUFFER=1000"; do
    echo "== env: ${e:-default}" | tee -a "$OUT/graphs.log"
    run timeout $(left) env $e python3 bench/host_overhead.py --tokens 32 --repeats 2 \
      --no-baseline hardware=h200 model.path=$S model.experts_per_token=4 cache.budget_gb=20.8 \
      | grep -v '^{' | tee -a "$OUT/graphs.log"
  done
  for e in "" MLX_USE_CUDA_GRAPHS=0 "MLX_MAX_MB_PER_BUFFER=1000000 MLX_MAX_OPS_PER_BUFFER=1000"; do
    echo "== env: ${e:-default}" | tee -a "$OUT/graphs.log"
    run timeout $(left) env $e python3 bench/dispatch_probe.py $S --tokens 32 --k 4 \
      | tee -a "$OUT/graphs.log"
  done ;;
threads)  # is MLX-CUDA's dispatch dearer from a worker thread (where flashmoe's MLX thread
  # runs) than from the main thread (mlx-lm's)? The 'graphs' stage's single runs said so
  run timeout $(left) python3 bench/dispatch_probe.py $S --tokens 32 --k 4 --rounds 5 \
    | tee "$OUT/threads.log" ;;
final)  # issue 12 and 11 in one call: cached K=4 beside resident mlx-lm, the page cache through
  # the copy path, cold, then 1 vs 8 streams (two tiers at K=10: the k10 stage). Runs under /root/runs; one
  # digest line per run comes back in $OUT/final.log (the device tool returns few files).
  R=/root/runs; C="task=bench hardware=h200 model.path=$S task.check=mlx_lm task.tokens=32"
  run timeout 180 python3 -m flashmoe $C model.experts_per_token=4 cache.budget_gb=20.8 \
    task.baseline=mlx_lm task.repeats=2 hydra.run.dir=$R/k4_cached | tail -1
  run timeout 150 python3 -m flashmoe $C model.experts_per_token=4 cache=none \
    task.repeats=2 hydra.run.dir=$R/k4_none | tail -1
  run timeout 60 python3 -m flashmoe task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 cache=none task.cold=true task.tokens=16 task.repeats=1 \
    hydra.run.dir=$R/cold | tail -1
  python3 bench/jsonl_digest.py $R/k4_cached $R/k4_none $R/cold | tee "$OUT/final.log"
  run timeout $(left) python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 cache.budget_gb=20.8 task.concurrency=1,8 \
    task.batch_compute=per_sequence,joint task.tokens=16 task.repeats=1 task.warmup=2 \
    hydra.sweep.dir=$R/batch | grep -c status=ok
  python3 bench/jsonl_digest.py $R/batch/[0-9]* | tee -a "$OUT/final.log" ;;
k10)  # K=10 (the model's own), the two tiers at 13/60 of a box (26 GiB device + 19.5 GiB pinned
  # host): victims copied out ahead (cache.clean_ahead, default 32) vs not (0), alternating,
  # then with the next layer's experts guessed and promoted while a layer computes
  # (cache.prefetch). The first run also pins 19.5 GiB and loads mlx-lm: 240 s. Digests.
  R=/root/runs; C="task=bench hardware=h200 model.path=$S model.experts_per_token=10 \
task.check=mlx_lm task.tokens=32 task.repeats=2 cache.budget_gb=26 cache.host_budget_gb=19.5"
  run timeout 240 python3 -m flashmoe $C hydra.run.dir=$R/k10_ahead | tail -1
  run timeout 150 python3 -m flashmoe $C cache.clean_ahead=0 hydra.run.dir=$R/k10_noahead | tail -1
  run timeout 150 python3 -m flashmoe $C hydra.run.dir=$R/k10_ahead2 | tail -1
  run timeout $(left) python3 -m flashmoe $C cache.prefetch=true \
    hydra.run.dir=$R/k10_prefetch | tail -1
  python3 bench/jsonl_digest.py $R/k10_ahead $R/k10_noahead $R/k10_ahead2 $R/k10_prefetch \
    | tee "$OUT/k10.log" ;;
k10now)  # K=10 two tiers (13/60 of a box): where a layer's time goes (host_overhead.py: the
  # same tiers, nothing read from disk), then the bench run, token-checked against mlx-lm
  # (the first run after a build has run past 240 s twice: timestamps show where)
  run timeout 200 python3 bench/host_overhead.py --tokens 32 --repeats 2 --no-baseline \
    --profile 25 hardware=h200 model.path=$S model.experts_per_token=10 cache.budget_gb=26 \
    cache.host_budget_gb=19.5 | grep -v '^{' | tee "$OUT/k10now.log"
  R=/root/runs; C="task=bench hardware=h200 model.path=$S model.experts_per_token=10 \
task.check=mlx_lm task.tokens=32 task.repeats=2 cache.budget_gb=26 cache.host_budget_gb=19.5"
  date; run timeout $(left) python3 -m flashmoe $C hydra.run.dir=$R/k10_now | tail -1; date
  python3 bench/jsonl_digest.py $R/k10_now | tee -a "$OUT/k10now.log" ;;
tiers_k4)  # one fresh machine's device time: K=10 two tiers (13/60 of a box), token-checked,
  # with a generous limit (a fresh machine's first flashmoe process has run past 200-240 s
  # three times: MLX-CUDA compiling its kernels, it seems), then K=4 every expert cached
  # beside resident mlx-lm. Digests in $OUT/tiers_k4.log
  R=/root/runs; C="task=bench hardware=h200 model.path=$S task.check=mlx_lm task.tokens=32 \
task.repeats=2"
  date; run timeout 330 python3 -m flashmoe $C model.experts_per_token=10 cache.budget_gb=26 \
    cache.host_budget_gb=19.5 hydra.run.dir=$R/k10 | tail -1; date
  run timeout $(left) python3 -m flashmoe $C model.experts_per_token=4 cache.budget_gb=20.8 \
    task.baseline=mlx_lm hydra.run.dir=$R/k4_cached | tail -1; date
  [ "$(left)" -gt 75 ] && run timeout 65 python3 -m flashmoe task=bench hardware=h200 \
    model.path=$S model.experts_per_token=4 cache=none task.cold=true task.tokens=16 \
    task.repeats=1 hydra.run.dir=$R/cold | tail -1
  python3 bench/jsonl_digest.py $R/k10 $R/k4_cached $R/cold | tee "$OUT/tiers_k4.log" ;;
both)  # scale and tiny side by side (correctness only: nothing here is timed)
  CUDA_VISIBLE_DEVICES=${GPU_B:-0} bash "$0" tiny > "$OUT/tiny.out" 2>&1 &
  bash "$0" scale; wait; tail -15 "$OUT/tiny.out" ;;
speed)  # issue 12, 60-layer equivalents from wall time per token: every expert cached (the
  # whole-token step), the page cache through the staged CUDA copy (cache=none without it:
  # the `scale` bench of 2026-12-01), the two tiers at 13/60 of a real box's split, and cold
  # reads vs the raw probe
  run timeout 240 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 cache=default,none cache.budget_gb=20.8 io.cuda_copy=true \
    task.check=mlx_lm task.tokens=32 task.repeats=2 hydra.sweep.dir="$OUT/speed" \
    | tee "$OUT/speed.log"
  run timeout 150 python3 -m flashmoe task=bench hardware=h200 model.path=$S \
    model.experts_per_token=10 cache.budget_gb=26 cache.host_budget_gb=19.5 task.check=mlx_lm \
    task.tokens=32 task.repeats=2 hydra.run.dir="$OUT/tiers" | tee -a "$OUT/speed.log"
  run timeout 90 python3 -m flashmoe task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 cache=none task.cold=true io.cuda_copy=true task.tokens=16 \
    task.repeats=1 hydra.run.dir="$OUT/cold" | tee -a "$OUT/speed.log" ;;
overhead)  # issue 12 item 1: per-layer wall / mx.eval / host ms with every expert cached, K=4,
  # against resident mlx-lm (BENCHMARKS.md (k)); then the per-layer path alone, with a profile
  run timeout 300 python3 bench/host_overhead.py --tokens 32 --repeats 3 hardware=h200 \
    model.path=$S model.experts_per_token=4 cache.budget_gb=20.8 | tee "$OUT/overhead.log"
  run timeout 170 python3 bench/host_overhead.py --tokens 32 --repeats 2 --no-baseline \
    --layer-by-layer --profile 30 hardware=h200 model.path=$S model.experts_per_token=4 \
    cache.budget_gb=20.8 | tee -a "$OUT/overhead.log" ;;
batch)  # issue 11: 1 vs 8 streams, every expert cached; joint gather vs per-sequence rows
  # (tokens_match_solo says which is exact on the GPU)
  run timeout 300 python3 -m flashmoe -m task=bench hardware=h200 model.path=$S \
    model.experts_per_token=4 cache.budget_gb=20.8 task.concurrency=1,8 \
    task.batch_compute=joint,per_sequence task.tokens=16 task.repeats=1 \
    hydra.sweep.dir="$OUT/batch" | tee "$OUT/batch.log" ;;
nccl)  # issue 13 on nvidia-h200-x2: 1 rank at B and 2B vs 2 ranks at B each (NCCL, NVLS off)
  C="task=bench hardware=h200 model.path=$S model.experts_per_token=10 task.tokens=16 \
task.repeats=1"
  run timeout 120 python3 -m flashmoe $C cache.budget_gb=5 hydra.run.dir="$OUT/r1_B" \
    | tee "$OUT/nccl.log"
  run timeout 120 python3 -m flashmoe $C cache.budget_gb=10 hydra.run.dir="$OUT/r1_2B" \
    | tee -a "$OUT/nccl.log"
  NCCL_NVLS_ENABLE=0 run timeout 240 python3 -c "import sys; from mlx._distributed_utils.launch \
import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())" -n 2 --backend nccl -- \
    python3 -m flashmoe $C cache.budget_gb=5 dist.backend=nccl hydra.run.dir="$OUT/r2_B" \
    | tee -a "$OUT/nccl.log" ;;
*) echo "usage: $0 exact|dims|tiny|build|scale|both|speed|overhead|batch|nccl|second|evals|graphs|threads|final|k10|k10now|tiers_k4 ..." >&2; exit 2 ;;
esac
done
