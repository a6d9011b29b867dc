#!/usr/bin/env bash
# The runs behind BENCHMARKS.md on a CPU machine (this project's 2-core Linux box).
# Each run's run_summary lands in runs/bench/<name>/; tables: python -m flashmoe.analyze.
set -uo pipefail
export PYTHONUNBUFFERED=1
FM="python -m flashmoe"
R=runs/bench
$FM task=bench hydra.run.dir=$R/demo_lru
$FM task=bench cache=none task.tokens=64 task.baseline=mlx_lm hydra.run.dir=$R/demo_vs_mlx_lm
for k in 4 10; do
  for cold in false true; do
    $FM task=bench model=synth model.experts_per_token=$k cache=none task.cold=$cold \
      task.tokens=16 task.repeats=2 hydra.run.dir=$R/synth4_k${k}_cold_$cold
  done
done
$FM -m task=bench model=synth model.experts_per_token=4 cache=none task.cold=true \
  io.split=1,2,3,4,5,8 task.tokens=8 task.repeats=2 task.warmup=2 hydra.sweep.dir=$R/split_sweep
# P4: a 16 GB checkpoint under an 8 GiB memory cgroup, for flashmoe and for mlx-lm
python -m flashmoe.bench.cgroup 8 -- $FM task=bench model=synth model.experts_per_token=4 \
  cache=none hardware.memory_gb=8 hardware.cache_budget_gb=1 task.tokens=8 task.repeats=1 \
  task.baseline=mlx_lm hydra.run.dir=$R/over_memory
