"""The measurement harness around the engine: raw-disk probe, the mlx-lm baseline in a
memory-limited child process (cgroup), page-cache dropping. task=bench uses it."""
