#!/usr/bin/env bash
# The service's GPU path on the lent GPU machine (the device tool; see docs/BENCHMARKS.md "GPU").
#
# That machine has PyTorch and NVIDIA's CUDA 13 / cuDNN 9 wheels but onnxruntime's CPU build and
# no FastAPI, and nothing can be fetched there. What it needs travels under .whl/ (ignored by git),
# built here by bench/device_wheels.sh, which prints the calls that send it:
#   .whl/c1/*.whl            fastapi, starlette, pydantic(-core), uvicorn, httptools, ...
#   .whl/c1/lite0.folded.onnx  a trained network for gpu_serving.py's fp16 accuracy
#   .whl/c*/ort.tar.xz.part* onnxruntime-gpu's wheel, unpacked and xz-compressed, in parts small
#                            enough for one call each (the parts stay there between calls while
#                            the machine is warm); .whl/c1/ort.manifest: their number, sha256
# and is installed into the machine's Python the way `pip install onnxruntime-gpu` would put it,
# beside the nvidia-* wheels, so onnxruntime.preload_dlls (called by the service) finds CUDA.
#
#   bench/device_gpu.sh have      # which parts have arrived (the calls that only send a part)
#   bench/device_gpu.sh install   # once per machine, after the last part arrived
#   bench/device_gpu.sh check     # what onnxruntime offers; the service's provider probe
#   bench/device_gpu.sh tests     # tests/service/test_gpu.py, then the service suite
#   bench/device_gpu.sh bench     # serving_bench.py --gpu, serving_overhead.py --gpu
#   bench/device_gpu.sh exhaustive  # bench's targets again with exhaustive cuDNN search
#   bench/device_gpu.sh diag      # service_split.py --gpu, gpu_batch_shapes.py
#   bench/device_gpu.sh issue16   # gpu_serving.py: ResNet-50 unbatched vs batch buckets at c64
#                                 # and c1, fp16 vs fp32 at batch 32 (and its accuracy on a
#                                 # trained network), TensorRT, IO binding / CUDA graph;
#                                 # builds ResNet-50 with torchvision, or MODEL=path.onnx
set -uo pipefail
OUT=${OUT:-/tmp/bnfold-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

have() {
    local want
    want=$(sed -n 's/^parts //p' .whl/c1/ort.manifest 2>/dev/null)
    echo "parts here: $(ls .whl/c*/ort.tar.xz.part* 2>/dev/null | wc -l) of ${want:-? (no .whl/c1)}"
    du -sh .whl/c* 2>/dev/null
}

install() {
    if $PY -m pip show -q onnxruntime-gpu 2>/dev/null; then
        echo "onnxruntime-gpu already installed"
        return
    fi
    local want have digest
    want=$(sed -n 's/^parts //p' .whl/c1/ort.manifest 2>/dev/null)
    have=$(ls .whl/c*/ort.tar.xz.part* 2>/dev/null | wc -l)
    if [ -z "$want" ] || [ "$have" -ne "$want" ]; then
        # a machine given back between calls loses the parts sent before
        echo "onnxruntime-gpu: $have of ${want:-?} parts here; send the missing .whl/c* again"
        return 1
    fi
    digest=$(cat .whl/c*/ort.tar.xz.part* | sha256sum | cut -d' ' -f1)
    if [ "$digest" != "$(sed -n 's/^sha256 //p' .whl/c1/ort.manifest)" ]; then
        echo "onnxruntime-gpu: the parts do not match .whl/c1/ort.manifest; build them again"
        return 1
    fi
    $PY -m pip uninstall -q -y onnxruntime
    cat .whl/c*/ort.tar.xz.part* | xz -d -T0 | tar x -C "$SITE" || return 1
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/c1/*.whl || return 1
    $PY -m pip show onnxruntime-gpu fastapi uvicorn | grep -E '^(Name|Version)'
}

check() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY - <<'EOF'
import logging, onnxruntime as ort
logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())
from service.runtime.sessions import SessionFactory
print("service provider probe:", SessionFactory(require_gpu=True).probe())
EOF
}

tests() {
    $PY -m pytest -q -p no:cacheprovider tests/service/test_gpu.py -rA 2>&1 | tee "$OUT/test_gpu.log"
    # the rest of the service suite on the GPU machine (tests that need tritonclient, timm or
    # schemathesis cannot import there and are left out)
    timeout 400 $PY -m pytest -q -p no:cacheprovider tests/service --timeout 120 \
        --ignore tests/service/test_inference_triton.py \
        --ignore tests/service/test_inference_batching.py \
        --ignore tests/service/test_schema_fuzz.py \
        --ignore tests/service/test_container.py \
        --ignore tests/service/test_deploy_manifests.py 2>&1 | tail -40 | tee "$OUT/test_service_gpu.log"
}

bench() {
    mkdir -p .whl/work
    cp -n .whl/models/*.onnx .whl/work/ 2>/dev/null
    $PY bench/serving_bench.py --gpu --work .whl/work --duration "${DURATION:-3}" --soak 0 \
        --target-rounds 3 --out "$OUT/serving_gpu.json" 2>&1 | tee "$OUT/serving_gpu.log" | tail -5
    cp "$OUT/serving_gpu.json" .whl/work/
    $PY bench/serving_overhead.py --gpu --work .whl/work --pairs 400 --floor \
        | tee "$OUT/overhead_gpu.json"
}

# the interleaved targets again, the service with onnxruntime's default exhaustive cuDNN search
exhaustive() {
    cp .whl/work/serving_gpu.json "$OUT/targets_exhaustive.json"
    $PY bench/serving_bench.py --gpu --work .whl/work --duration "${DURATION:-3}" --redo-targets \
        --env BNFOLD_CUDNN_CONV_ALGO_SEARCH=EXHAUSTIVE --out "$OUT/targets_exhaustive.json"
}

# where a batched ResNet-18 request's time goes on the GPU, and what changing batch sizes cost
diag() {
    mkdir -p .whl/work && cp -n .whl/models/*.onnx .whl/work/ 2>/dev/null
    $PY bench/service_split.py --gpu --work .whl/work | tee "$OUT/service_split.jsonl"
    $PY bench/gpu_batch_shapes.py .whl/work/resnet18.folded.onnx --sizes 1-8 --runs 200 \
        | tee "$OUT/batch_shapes.jsonl"
}

# issue 16 end to end (LIMIT s, 480 by default, so that the call that installs and runs it ends
# inside the device's 10 minutes): $OUT/issue16.json, its targets judged on CUDA; gpu_serving.py
# writes it after every step, so a run cut off keeps what it measured
issue16() {
    local trained=${TRAINED:-.whl/c1/lite0.folded.onnx}
    [ -s "$trained" ] || trained=
    timeout "${LIMIT:-480}" $PY bench/gpu_serving.py --out "$OUT/issue16.json" \
        ${MODEL:+--model "$MODEL"} ${trained:+--trained-model "$trained"} \
        2>&1 | tee "$OUT/issue16.log" | tail -30
    test -s "$OUT/issue16.json"
}

for step in "$@"; do
    echo "== $step"
    "$step" || { echo "step $step failed"; exit 1; }
done
