#!/usr/bin/env bash
# GPU numbers on the lent H200 (see BENCHMARKS.md). Run through the device tool in two
# calls: `bench/h200.sh fetch` carrying .whlA (first half of the mlx-cuda wheel), then
# `bench/h200.sh all` carrying .whl2 and .whl (second half + the small wheels); a fresh
# checkout makes those three folders with `bash bench/h200_wheels.sh`.
# Kernel caches: a fresh machine's first flashmoe process has run 200-280 s (later ones ~100 s),
# likely compiling MLX-CUDA's kernels (NVRTC, then the driver's PTX -> SASS). Both caches are
# kept under /root/kc and, when $OUT is set, come back as $OUT/kernel_cache.tgz (under 16 MiB);
# copy that file to .kcache/ (ignored) here and carry .kcache with the next machine's call.
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
export MLX_PTX_CACHE_DIR=/root/kc/ptx CUDA_CACHE_PATH=/root/kc/nv CUDA_CACHE_MAXSIZE=4294967296
if [ ! -d /root/kc ] && [ -f .kcache/kernel_cache.tgz ]; then
  mkdir -p /root/kc && tar -xzf .kcache/kernel_cache.tgz -C /root/kc && echo "kernel cache: carried in"
fi
save_kc() {  # the caches for the next machine (the device tool returns files of <= 16 MiB)
  [ -n "${OUT:-}" ] && [ -d /root/kc ] || return 0
  tar -czf "$OUT/kernel_cache.tgz" -C /root/kc . 2>/dev/null || return 0
  [ "$(stat -c %s "$OUT/kernel_cache.tgz")" -le 16000000 ] || rm -f "$OUT/kernel_cache.tgz"
}
trap save_kc EXIT
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'gpu', mx.is_available(mx.gpu))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /root | tail -1; nproc; free -g | head -2
shift || true
"$@"
