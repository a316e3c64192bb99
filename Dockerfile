# syntax=docker/dockerfile:1
# vlkd GPU image: the environment the tests ran in (requirements.lock, installed by
# scripts/install.sh exactly as `make install` does) on a CUDA 13.0 base, plus Java for
# pycocoevalcap. No data and no weights inside: mount them (docs/CLUSTER.md).
#
#   docker build -t vlkd:0.1.0 \
#       --build-arg VCS_REF="$(git rev-parse HEAD)" \
#       --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#   docker build --build-arg DETECTRON2=git -t vlkd:0.1.0-d2git .   # official detectron2 with its
#                                                                    # compiled CUDA ops
#   scripts/docker-smoke.sh          # build, then the quick demo's extraction + a training step
#
# Stages: `builder` (CUDA devel image: nvcc for DETECTRON2=git) makes /opt/vlkd/venv with
# scripts/install.sh; `runtime` (CUDA runtime image) gets that venv, Python, Java and tini.
#
# Base images are pinned by digest: the multi-arch index digests published for these tags
# (docs/CLUSTER.md, "The image", says where they came from and how to refresh them).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04@sha256:c3fde347d52d578c84fd644bc177bc7ec333feaf11550d990da4084d7612e4c7
ARG BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04@sha256:7d2f6a8c2071d911524f95061a0db363e24d27aa51ec831fcccf9e76eb72bc92
# The lock was made on this Python (its header says so; a test checks they agree).
ARG PYTHON_VERSION=3.11

# ------------------------------------------------------------------------------------ builder
FROM ${BUILD_IMAGE} AS builder
ARG PYTHON_VERSION
# detectron2: "pypi" installs the sal-detectron2 snapshot as `make install` and CI do
# (torchvision ops, no compiler); "git" builds the official source at DETECTRON2_COMMIT with
# its CUDA kernels. Both are scripts/install.sh's VLKD_DETECTRON2 modes.
ARG DETECTRON2=pypi
ARG DETECTRON2_COMMIT=2dde706855d87baa9760fbcd0bdb6004a3937204
ENV DEBIAN_FRONTEND=noninteractive
# Python from the deadsnakes archive: Ubuntu 24.04 ships 3.12 only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
        ca-certificates git build-essential \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" \
        "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
 && rm -rf /var/lib/apt/lists/*
# CUDA 13 and torch's cu130 wheels (sm_75 ... sm_120) start at Turing: T4 (7.5), A100 (8.0),
# A10/A40 (8.6), H100/H200 (9.0), B200 (10.0), RTX Blackwell (12.0). V100 (7.0) is not
# supported by this image; build from an older vlkd image for it.
ENV TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;9.0;10.0;12.0+PTX" \
    FORCE_CUDA=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLKD_VENV=/opt/vlkd/venv \
    VLKD_PYTHON=python${PYTHON_VERSION} \
    VLKD_EXTRAS="" \
    VLKD_EDITABLE=0 \
    VLKD_DETECTRON2=${DETECTRON2} \
    VLKD_DETECTRON2_COMMIT=${DETECTRON2_COMMIT}
WORKDIR /opt/vlkd/src
# Dependencies first (torch, detectron2, vlkd's requirements at the lock's versions): this
# layer is rebuilt only when the lock, setup.cfg or install.sh change, not with the code.
COPY setup.cfg pyproject.toml README.md requirements.lock ./
COPY scripts/install.sh scripts/install.sh
RUN VLKD_DEPS_ONLY=1 bash scripts/install.sh
COPY vlkd_pkg ./vlkd_pkg
COPY common ./common
COPY data ./data
COPY extract ./extract
COPY train ./train
COPY demo ./demo
RUN bash scripts/install.sh \
 && "$VLKD_VENV/bin/python" -c "import vlkd.extract, vlkd.train, vlkd.demo, detectron2.modeling" \
 && "$VLKD_VENV/bin/python" -c "import json, torch, torchvision, detectron2; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'torchvision': torchvision.__version__, 'detectron2': detectron2.__version__, 'detectron2_source': '${DETECTRON2}'}))" \
        > /opt/vlkd/versions.json

# ------------------------------------------------------------------------------------ runtime
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ARG PYTHON_VERSION
ARG DETECTRON2=pypi
ARG DETECTRON2_COMMIT=2dde706855d87baa9760fbcd0bdb6004a3937204
# Labels: what the image is (OCI) and what it holds (vlkd.*). VCS_REF and BUILD_DATE come from
# the build command (docker-smoke.sh passes them); the version pins are scripts/install.sh's
# (tests/test_image.py fails when they disagree), the installed truth is /opt/vlkd/versions.json.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=unknown
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CUDA_VERSION_TORCH=13.0
ARG DETECTRON2_PYPI=sal-detectron2==0.7.2
LABEL org.opencontainers.image.title="vlkd" \
      org.opencontainers.image.description="Knowledge distillation of vision-language models (DistillVLM): vlkd-extract, vlkd-train, vlkd-demo" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      vlkd.python="${PYTHON_VERSION}" \
      vlkd.torch="${TORCH_VERSION}" \
      vlkd.torchvision="${TORCHVISION_VERSION}" \
      vlkd.cuda="${CUDA_VERSION_TORCH}" \
      vlkd.detectron2="${DETECTRON2}" \
      vlkd.detectron2.pypi="${DETECTRON2_PYPI}" \
      vlkd.detectron2.commit="${DETECTRON2_COMMIT}"
ENV DEBIAN_FRONTEND=noninteractive
# The same Python at the same path as in the builder (the venv's interpreter); Java 17 as in the
# tested environment (pycocoevalcap's PTB tokenizer and METEOR); tini: a real PID 1 so SIGTERM
# from the batch system reaches vlkd (shards resume cleanly).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" openjdk-17-jre-headless tini \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/vlkd/venv /opt/vlkd/venv
COPY --from=builder /opt/vlkd/versions.json /opt/vlkd/versions.json
COPY configs /opt/vlkd/configs
COPY scripts/docker-entrypoint.sh /usr/local/bin/vlkd-entrypoint

# Caches live under VLKD_CACHE (default /tmp/vlkd-cache): writable for any UID (docker run
# --user 12345) and under Apptainer/Singularity, whose image is read-only but whose /tmp is the
# host's. The entrypoint creates them, and moves them all when VLKD_CACHE is set to another
# place (a node-local scratch disk, say). Nothing is downloaded at run time (HF_HUB_OFFLINE).
ENV PATH=/opt/vlkd/venv/bin:${PATH} \
    VLKD_CONFIGS=/opt/vlkd/configs \
    VLKD_CACHE=/tmp/vlkd-cache \
    HF_HOME=/tmp/vlkd-cache/huggingface \
    TORCH_HOME=/tmp/vlkd-cache/torch \
    MPLCONFIGDIR=/tmp/vlkd-cache/matplotlib \
    FVCORE_CACHE=/tmp/vlkd-cache/fvcore \
    XDG_CACHE_HOME=/tmp/vlkd-cache/xdg \
    TRITON_CACHE_DIR=/tmp/vlkd-cache/triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Non-root user vlkd (uid 1000; Ubuntu's own uid-1000 user goes). Any other UID works too:
# /out is writable for all (sticky), caches are under /tmp. pycocoevalcap's PTB tokenizer
# writes its temporary file beside its jar, so that folder is writable for all as well (under
# Apptainer, whose image is read-only, `vlkd-train evaluate` needs --writable-tmpfs).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 vlkd \
 && mkdir -p /data /weights /out \
 && chown vlkd:vlkd /out && chmod 1777 /out \
 && chmod 1777 "$(python -c 'import os, pycocoevalcap.tokenizer as t; print(os.path.dirname(t.__file__))')" \
 && vlkd-extract --help > /dev/null && vlkd-train --help > /dev/null \
 && rm -rf /tmp/vlkd-cache
USER vlkd
WORKDIR /out

ENTRYPOINT ["tini", "-s", "--", "vlkd-entrypoint"]
CMD ["--help"]
