#!/usr/bin/env bash
# Fetch the wheels bench/h200.sh installs on the GPU machine (it reaches no registry), into the
# ignored folders the device tool carries: .whlA (first half of mlx-cuda-13, call 1), .whl2
# (second half) and .whl (mlx, mlx-lm and the CLI's small wheels, the md5 of the whole).
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
pip download -q --no-deps --python-version 3.12 --platform manylinux_2_35_x86_64 \
  --only-binary=:all: -d "$T" mlx-cuda-13==0.32.4 mlx==0.32.4
pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$T/small" \
  mlx-lm==0.32.2 hydra-core==1.3.8 omegaconf==2.3.0 structlog platformdirs pytest-asyncio
pip download -q --no-deps --no-binary=:all: -d "$T/small" antlr4-python3-runtime==4.9.3
rm -rf .whlA .whl2 .whl; mkdir -p .whlA .whl2 .whl
W=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
(cd "$T" && md5sum $W && split -b 46000000 $W cudapart_) > .whl/cuda.md5
mv "$T/cudapart_aa" .whlA/; mv "$T/cudapart_ab" .whl2/
cp "$T"/mlx-0.32.4-*.whl "$T"/small/* .whl/
ls -la .whlA .whl2 .whl
