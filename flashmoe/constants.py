"""Values the config, the engine and the checkpoint tools share; defined here only."""
from __future__ import annotations

GIB = 2**30  # *_gb keys are GiB (as RAM is reported); *_gbps keys are decimal GB/s
DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "bfloat16", "float16")  # activation dtypes
CACHE_POLICIES = ("none", "lru", "lfu")
LAYOUTS = ("auto", "original", "packed")
BATCH_COMPUTE = ("auto", "joint", "per_sequence")  # task.batch_compute (serve/runner.py)
BITS = (2, 3, 4, 8)  # quantization bit widths mlx supports for experts
GROUP_SIZES = (32, 64, 128)
# inclusive limits of the I/O options: (low, high)
IO_SPLIT = (1, 64)
IO_THREADS = (1, 256)
IO_RETRIES = (0, 100)
