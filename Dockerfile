# bnfold service: folds, verifies and serves models over KServe v2 with onnxruntime.
#
#   docker build -t bnfold .
#   docker run --gpus all -p 8000:8000 -v bnfold-store:/store bnfold   # CUDA execution provider
#   docker run -p 8000:8000 -v bnfold-store:/store bnfold              # CPU, and the log says so
#
# Base: the project resolves onnxruntime-gpu 1.31, whose CUDA provider is built for CUDA 13.x and
# cuDNN 9.x (libonnxruntime_providers_cuda.so links libcudart.so.13 and libcublas.so.13, and asks
# for "cuDNN 9.* and CUDA 13.*" when they are missing; onnxruntime's CUDA EP requirements table).
# nvidia/cuda 13.0 with the cuDNN 9 runtime matches both majors; the host needs a driver for CUDA 13.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The CUDA base pins the distribution; its python3 is the one the venv is built on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bnfold ./bnfold
COPY models ./models
COPY service ./service
# torch only folds uploads in the ingest worker, which runs on the CPU by design (verification is
# certified there): the CPU wheel keeps gigabytes of CUDA libraries out of the image.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    && groupadd --system --gid 10001 bnfold \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/bnfold bnfold \
    && mkdir -p /store \
    && chown 10001:10001 /store

# Every setting is an environment variable (service/settings.py); these are the image's own.
# BNFOLD_API_TOKEN unset: a token is generated on the first start, printed once to the log and
# kept in the store.
ENV BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_STORE=/store \
    BNFOLD_LOG_FORMAT=json

# numeric, so that Kubernetes runAsNonRoot can check it
USER 10001:10001
VOLUME ["/store"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["python", "-m", "service"]
