# bnfold service: folds, verifies and serves models over KServe v2 with onnxruntime.
#
#   docker build -t bnfold:0.1.0 .                           # full: serves, and folds uploads
#   docker build --target slim -t bnfold:0.1.0-slim .        # slim: serves, no torch
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v bnfold-store:/store bnfold:0.1.0   # CUDA
#   docker run -p 8000:8000 -p 8001:8001 -v bnfold-store:/store bnfold:0.1.0   # CPU, and says so
# 8000 is HTTP (KServe v2 REST and the management API), 8001 the v2 gRPC service.
#
# Two variants of one build (README "Deploy"):
# - full (the default target, bnfold:VERSION): torch 2.14.1 folds uploads in the ingest worker.
#   Every upload needs it, ONNX ones too: the fold numerics (bnfold/numerics.py) are torch.
# - slim (--target slim, bnfold:VERSION-slim): the same service without torch, about half the
#   size, for replicas that serve a store a full writer deploys into (deploy/kserve/bnfold.yaml).
#   It sets BNFOLD_IMAGE_VARIANT=slim, and uploads are refused there.
#
# CUDA 13 and cuDNN 9, which onnxruntime-gpu 1.31's CUDA provider is built for, come from NVIDIA's
# Python wheels (onnxruntime-gpu[cuda,cudnn], the same wheels torch 2.14.1 depends on); the
# service loads them with onnxruntime.preload_dlls(), and `docker run --gpus all` brings the
# driver. The base is plain Debian, so no CUDA base image is needed.

# --- build: a virtual environment in /opt/venv, on Debian's python3 (3.11, as the images') ---
FROM debian:bookworm-slim AS build-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A machine behind a TLS-inspecting proxy mounts its CA certificates at
# /usr/local/share/ca-certificates/host for the build (-v ...:ro); a local wheel folder goes in
# the same way, named by these pip settings. Neither reaches the images.
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml ./
# The project's own dependencies, read from pyproject.toml, plus onnxruntime-gpu's CUDA and cuDNN
# wheels, resolved once with torch so that both variants get the same versions (torch 2.14.1
# pins the NVIDIA wheels it shares with onnxruntime); slim installs them less torch and
# torchvision. The source comes later, so that a code change reinstalls no wheel.
RUN --mount=type=cache,target=/root/.cache/pip \
    update-ca-certificates \
    && python3 -m venv /opt/venv \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
    && echo 'onnxruntime-gpu[cuda,cudnn]' >> requirements.txt \
    && grep -v '^torch' requirements.txt > requirements-slim.txt \
    && /opt/venv/bin/pip install --dry-run --ignore-installed --quiet --report report.json -r requirements.txt \
    && python3 -c 'import json; print("\n".join("%s==%s" % (i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open("report.json"))["install"]))' > constraints.txt \
    && /opt/venv/bin/pip install -r requirements-slim.txt -c constraints.txt

FROM build-slim AS build-full
# Triton is torch.compile's GPU code generator: folding never compiles, and the worker folds on
# the CPU, so its 0.9 GB stays out.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install -r requirements.txt -c constraints.txt \
    && /opt/venv/bin/pip uninstall -y triton

# the service's source, readable by the image's user whatever the checkout's umask, and compiled:
# the images' root filesystem may be read-only, so no __pycache__ is written at run time
FROM build-slim AS source
COPY pyproject.toml README.md /app/
COPY bnfold /app/bnfold
COPY models /app/models
COPY service /app/service
RUN chmod -R a+rX,go-w /app \
    && /opt/venv/bin/python -m compileall -q /app/bnfold /app/models /app/service

# --- the images: Debian's python3, the venv, the source; no compiler, no pip cache, no CA ---
# (.ci/image builds these stages without the build's host mounts, which would leave their
# mount points behind)
FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupadd --system --gid 10001 bnfold \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bnfold \
    && mkdir -p /store \
    && chown 10001:10001 /store
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
WORKDIR /app
# Every setting is an environment variable (service/settings.py); these are the image's own.
# BNFOLD_API_TOKEN unset: a token is generated on the first start, printed once to the log and
# kept in the store.
ENV BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_GRPC_PORT=8001 \
    BNFOLD_STORE=/store \
    BNFOLD_LOG_FORMAT=json
# numeric, so that Kubernetes runAsNonRoot can check it
USER 10001:10001
VOLUME ["/store"]
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
# SIGTERM (docker stop, Kubernetes): stop accepting, answer what is in flight, exit 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

FROM runtime AS slim
COPY --from=build-slim /opt/venv /opt/venv
COPY --from=source /app /app
# without torch no upload can be folded, and a fresh store cannot deploy the zoo's defaults
ENV BNFOLD_IMAGE_VARIANT=slim \
    BNFOLD_DEPLOY_DEFAULTS=0

FROM runtime AS full
COPY --from=build-full /opt/venv /opt/venv
COPY --from=source /app /app
ENV BNFOLD_IMAGE_VARIANT=full
