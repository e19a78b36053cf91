#!/usr/bin/env bash
# The GPU checks and the GPU benchmark tables of vlweak in one command, for a CUDA machine.
#
#   bash benchmarks/device_check.sh [OUT]    # logs and tables into OUT (default: runs/device_check)
#   bash benchmarks/device_check.sh --wheels # where PyPI is reachable: fetch the wheels of the
#                                            # dependencies a bare CUDA image lacks into .whl/
#
# A CUDA machine without internet whose Python already holds torch, torchvision, lightning,
# transformers, torchmetrics, safetensors, scipy and matplotlib gets the rest (open_clip and its
# text cleaner, jsonargparse with its signature readers, faiss-cpu) from .whl/, installed into a
# private folder; with vlweak installed normally (`pip install -e ".[dev]"`) nothing is installed.
#
# Stages, each under its own time limit so that one slow stage leaves the others their time, each
# log in OUT and a summary of exit codes at the end:
#   1. pytest tests/gpu (gpu_tests)    CUDA correctness (recipes GPU vs CPU, fp32 and bf16; ZLaP's
#                                      GPU solve; GPU JPEG decoding; DualCoOp, GRIP, pretraining
#                                      under bf16 on the GPU reaching their CPU tests' targets)
#   2. benchmarks/run.py (benchmarks)  the benchmark table at full sizes (issue targets)
#   3. benchmarks/zlap.py (zlap_1m)    ZLaP at N = 1,000,000, C = 1,000 (time, peak memory)
#   4. benchmarks/zlap.py (zlap_growth) how time grows with N (100,000 and 300,000), and the
#                                      bfloat16-screened exact kNN (--engine torch-bf16) against
#                                      the fp32 one at N = 300,000
#   5. benchmarks/dualcoop.py --files (dualcoop_files, only when named in STAGES) whole DualCoOp fits over JPEG
#                                      files: first and later epochs, kept region features
# STAGES="gpu_tests benchmarks" runs some of them (default: the first three, which fit one
# 10-minute command: 570 s at most; STAGES="zlap_growth dualcoop_files" the other two, 390 s at
# most); a stage's limit is an environment variable (GPU_TESTS_S, BENCHMARKS_S, ZLAP_1M_S,
# ZLAP_GROWTH_S, DUALCOOP_FILES_S). The benchmark table prints each suite's rows as it ends, so a
# stage cut at its limit keeps what it measured; every suite's full output is in OUT/benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# not TorchCodec: PyPI's wheels decode on the CPU only (its CUDA builds come from PyTorch's own
# index), so on such a machine the GPU path uses torchvision's nvJPEG decoder, which the image's
# torchvision has
WHEELS=(open_clip_torch ftfy wcwidth jsonargparse docstring_parser typeshed_client faiss-cpu)

if [[ "${1:-}" == "--wheels" ]]; then
    # the versions this environment runs (the ones the test suite passed with), else the newest
    specs=()
    for w in "${WHEELS[@]}"; do
        v=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$w" 2>/dev/null)
        specs+=("$w${v:+==$v}")
    done
    mkdir -p .whl
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
    exit $?
fi

OUT=${1:-${OUT:-runs/device_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if ! "$PYTHON" -c "import open_clip, jsonargparse, faiss" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "open_clip, jsonargparse or faiss missing and no .whl/ (see --wheels)"; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/vlweak-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/vlweak-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PYTHON" -c "import torch, lightning, open_clip; print('torch', torch.__version__, 'lightning', lightning.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/device.txt"

STAGES=${STAGES:-gpu_tests benchmarks zlap_1m}
declare -A codes
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    codes[$name]="exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

stage gpu_tests "${GPU_TESTS_S:-210}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu -rs
stage benchmarks "${BENCHMARKS_S:-270}" "$PYTHON" benchmarks/run.py --device cuda --out "$OUT/benchmarks"
stage zlap_1m "${ZLAP_1M_S:-90}" "$PYTHON" benchmarks/zlap.py --device cuda --n 1000000 --classes 1000 --skip-reference
stage zlap_growth "${ZLAP_GROWTH_S:-150}" bash -c "for n in 100000 300000; do $PYTHON benchmarks/zlap.py --device cuda --n \$n --classes 100 1000 --skip-reference; done; $PYTHON benchmarks/zlap.py --device cuda --n 300000 --classes 1000 --skip-reference --engine torch-bf16"
stage dualcoop_files "${DUALCOOP_FILES_S:-240}" "$PYTHON" benchmarks/dualcoop.py --device cuda --files

echo "=== summary ==="
for name in $STAGES; do
    echo "$name: ${codes[$name]:-not run}"
done | tee "$OUT/summary.txt"
