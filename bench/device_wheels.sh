#!/usr/bin/env bash
# Builds .whl/ (git-ignored), what bench/device_gpu.sh needs on the GPU machine, in parts that
# each travel with one device call (64 MiB a call, the working tree included):
#   .whl/c1/*.whl                  fastapi, starlette, pydantic(-core), uvicorn, httptools, ...
#                                  for Python 3.12 (the GPU machine's), this venv's versions
#   .whl/c1/lite0.folded.onnx      EfficientNet-Lite0 as trained on ImageNet, folded, fixed
#                                  224x224 (gpu_serving.py --trained-model; needs '.[bench]')
#   .whl/c*/ort.tar.xz.part*       onnxruntime-gpu's wheel, unpacked, tar'd and xz-compressed,
#                                  cut to fill each call; .whl/c1/ort.manifest: parts, sha256
# and prints the device calls that send them. Takes about 3 minutes (xz on 2 cores).
#
#   bench/device_wheels.sh                 # onnxruntime-gpu at this venv's version
#   ORT_VERSION=1.31.1 bench/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ORT_VERSION=${ORT_VERSION:-$($PY -c 'import onnxruntime; print(onnxruntime.__version__)')}
SMALL="fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
uvicorn httptools python-multipart opentelemetry-api typing-extensions"
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))  # files that appear in the tree before the call (logs, notes)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf .whl/c* .whl/tmp
mkdir -p .whl/c1 .whl/tmp
download() {
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$1" "${@:2}"
}
pins=()
for name in $SMALL; do
    version=$($PY -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    pins+=("$name${version:+==$version}")
done
download .whl/c1 "${pins[@]}"
download .whl/tmp "onnxruntime-gpu==$ORT_VERSION"

# the trained network, folded, 224x224 fixed like ResNet-50 (a CUDA graph needs it)
$PY - <<'PY'
import sys

import torch

sys.path.insert(0, "bench")
import imagenet_trained

import bnfold

net = imagenet_trained.build()
with torch.no_grad():
    graph = bnfold.export_onnx(
        net, (torch.randn(2, 3, 224, 224),), dynamic_batch=True, dynamic_spatial=False
    )
folded = bnfold.fold_onnx(graph).model
import onnx

onnx.save(folded, ".whl/c1/lite0.folded.onnx")
PY

mkdir .whl/tmp/site
unzip -q .whl/tmp/onnxruntime_gpu-*.whl -d .whl/tmp/site
tar c -C .whl/tmp/site . | xz -9 -T0 >.whl/tmp/ort.tar.xz

# what travels with every call besides .whl: tracked and untracked files git does not ignore
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) |
    (du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)  # a deleted file: skipped
room=$((LIMIT - tree - MARGIN))
first=$((room - $(du -cb .whl/c1 | tail -1 | cut -f1)))
total=$(stat -c %s .whl/tmp/ort.tar.xz)
$PY - "$first" "$room" "$total" <<'PY'
import hashlib
import sys
from pathlib import Path

first, room, total = map(int, sys.argv[1:])
if first <= 0:
    sys.exit(f"no room left in the first call: the tree and .whl/c1 fill {room - first} bytes")
data = Path(".whl/tmp/ort.tar.xz").read_bytes()
sizes = [first]
while sum(sizes) < total:
    sizes.append(room)
start = 0
for i, size in enumerate(sizes, 1):
    part = Path(f".whl/c{i}/ort.tar.xz.part{i:02d}")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data[start : start + size])
    start += size
digest = hashlib.sha256(data).hexdigest()
joined = b"".join(p.read_bytes() for p in sorted(Path(".whl").glob("c*/ort.tar.xz.part*")))
if hashlib.sha256(joined).hexdigest() != digest:  # what install will cat, in its glob's order
    sys.exit("the parts do not join back into the archive")
Path(".whl/c1/ort.manifest").write_text(f"parts {len(sizes)}\nsha256 {digest}\n")
PY
rm -rf .whl/tmp
parts=$(sed -n 's/^parts //p' .whl/c1/ort.manifest)
echo "tree $((tree / 1024)) KiB; onnxruntime-gpu $ORT_VERSION in $parts parts:"
du -sh .whl/c*
echo
echo "device calls, one right after the other (a machine idle 30 s is given back, parts and all):"
for i in $(seq 1 "$parts"); do
    if [ "$i" -lt "$parts" ]; then
        echo "  run(carry=[\".whl/c$i\"], command=\"bench/device_gpu.sh have\")"
    else
        echo "  run(carry=[\".whl/c$i\"], command=\"bench/device_gpu.sh install check issue16\")"
    fi
done
