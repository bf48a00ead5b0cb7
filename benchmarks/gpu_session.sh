#!/usr/bin/env bash
# The GPU checks of issue 9 as one script for the workplace's device machine (about 6 minutes
# on one H200): correctness of the GPU extraction path, then the two benchmarks, then the PCA
# stream with ViT-B shapes. Results go to $OUT (default ./gpu-results).
#
# That machine has torch, torchvision, timm and cupy but not zarr or dask: bring cp312 wheels
# (zarr, numcodecs, dask, donfig, google-crc32c, partd, locket, ...) in a folder and pass it
# as WHEELS; they are installed without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1
if [ -n "${WHEELS:-}" ]; then pip install -q --no-deps --no-index "$WHEELS"/*.whl; fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?" >> "$OUT/$name.txt"
    grep -v -i "warn" "$OUT/$name.txt" | tail -8 | tee -a "$OUT/summary.txt"
}

run gpu_check 90 python benchmarks/gpu_check.py
run gpu_extract 240 python benchmarks/gpu_extract.py --images 5000 --batch 128 --workers 14
run gpu_stego 90 python benchmarks/gpu_stego.py --arch vit_base_patch8 --batch 32 --steps 10
run pca_stream_vitb 120 python benchmarks/pca_stream.py --gb 4 --channels 768 --device cuda
