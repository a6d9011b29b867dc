#!/usr/bin/env bash
# GPU numbers on the lent H200 (see BENCHMARKS.md). Run through the device tool in two
# calls: `bench/h200.sh fetch` carrying .whlA (first half of the mlx-cuda wheel), then
# `bench/h200.sh all` carrying .whl2 and .whl (second half + the small wheels); a fresh
# checkout makes those three folders with `bash bench/h200_wheels.sh`.
set -euo pipefail
export PYTHONUNBUFFERED=1
W=/root/w; mkdir -p $W
if [ "${1:-}" = fetch ]; then cp .whlA/cudapart_aa $W/; ls -la $W; exit 0; fi
if [ ! -d /tmp/site/mlx ]; then
  cat $W/cudapart_aa .whl2/cudapart_ab > $W/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  (cd $W && md5sum -c "$OLDPWD/.whl/cuda.md5")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
    --target /tmp/site .whl/*.whl .whl/*.tar.gz $W/mlx_cuda_13-*.whl
fi
export PYTHONPATH=/tmp/site:$PWD FLASHMOE_CACHE_DIR=/root/cache
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'gpu', mx.is_available(mx.gpu))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /root | tail -1; nproc; free -g | head -2
shift || true
"$@"
