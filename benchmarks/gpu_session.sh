#!/usr/bin/env bash
# The GPU figures of issues 18 and 28 as one script for the workplace's device machine (the default
# steps: at most 9.5 minutes): correctness of the GPU extraction path, extraction against the model and the disk,
# each pipeline stage alone against the whole (extract_pipeline.py, with its stage profile),
# a STEGO step from the cache against one with the backbone, kNN of 250k descriptors, the PCA
# stream with ViT-B shapes, the store's write / read throughput against the raw disk by threads, and
# one Fig. 4 sweep of a Cityscapes-sized synthetic store (a measured fraction, scaled: see
# gpu_sweep.py), and each successor head's step from the cache against the backbone in the loop
# (successor_step.py; not in the default STEPS), and two `extract --rank` processes writing one
# store against one process (gpu_ranks.py; not in the default STEPS). Results go to $OUT (default ./gpu-results): summary.txt and one log per benchmark
# — 8 files, the most the device tool brings back.
#
# That machine has torch, torchvision, timm and cupy but not zarr or dask and reaches no
# registry: bring cp312 wheels in a folder and pass it as WHEELS (they are installed into
# /tmp/site without an index). From the repository root, once:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     zarr==3.1.6 numcodecs==0.16.6 dask==2026.8.0 donfig==0.8.1.post1 google-crc32c==1.9.0 partd==1.4.2 locket==1.0.0
# then run it with `WHEELS=.whl bash benchmarks/gpu_session.sh`, carrying .whl.
# pydensecrf2 has no wheel (it builds from source), so the sweep's dense CRF is not timed there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
echo "cpus $(nproc); $(free -g | awk '/Mem/ {print $2}') GB memory; python $(python3 -V 2>&1); torch $(python3 -c 'import torch; print(torch.__version__)')" | tee -a "$OUT/summary.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    echo "exit $? after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt" >> "$OUT/summary.txt"
    grep -v -i -e "warn" -e "^  " "$OUT/$name.txt" | tail -14 >> "$OUT/summary.txt"
}

# STEPS picks the benchmarks of a rerun (e.g. after a fix); EXTRACT_ARGS adds gpu_extract options.
# The default: issue 28's extraction and PCA goals (at most 560 s of limits); runs 1-3 measured the others
# (STEPS="gpu_stego gpu_knn gpu_sweep", + gpu_sweep_alone: the sweep without groups).
STEPS=${STEPS:-"gpu_check gpu_extract extract_pipeline store_throughput pca_stream"}
for step in $STEPS; do
    case $step in
        gpu_check) run gpu_check 50 python3 benchmarks/gpu_check.py --images 96 ;;
        gpu_extract) run gpu_extract 120 python3 benchmarks/gpu_extract.py --images 3000 --batch 128 --workers 14 ${EXTRACT_ARGS:-} ;;
        gpu_stego) run gpu_stego 45 python3 benchmarks/gpu_stego.py --arch vit_base_patch8 --batch 32 --steps 10 --profile ;;
        gpu_knn) run gpu_knn 40 python3 benchmarks/gpu_knn.py --n 250000 --dim 768 --k 30 ;;
        pca_stream) run pca_stream 90 python3 benchmarks/pca_stream.py --gb 2 --channels 768 --device cuda ;;
        # run 3's 2-8 thread runs did not hang: its 40 s held only the 1-thread run of both codecs (≈ 20 s of
        # writes and reads each); the numpy writer alone over 8 shards fits every thread count
        store_throughput) run store_throughput 60 python3 benchmarks/store_throughput.py --shards 8 --codecs numpy --threads 1 2 4 8 ;;
        extract_pipeline) for arch in vit_small_patch8 vit_base_patch8; do
            run "extract_pipeline_$arch" 120 python3 benchmarks/extract_pipeline.py --model real --arch "$arch" --images 3000 \
                --batch 128 --shard 128 --workers 14 --writers 4 --device cuda; done ;;
        gpu_sweep) run gpu_sweep 200 python3 benchmarks/gpu_sweep.py --fraction 14 ;;
        gpu_sweep_alone) run gpu_sweep_alone 200 python3 benchmarks/gpu_sweep.py --fraction 14 --no-group ;;
        successor_step) run successor_step 150 python3 benchmarks/successor_step.py --batch 32 --steps 5 ;;
        gpu_ranks) run gpu_ranks 180 python3 benchmarks/gpu_ranks.py --images 3000 --batch 128 --workers 6 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
cat "$OUT/summary.txt"
