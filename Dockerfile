# vlkd GPU image: CUDA PyTorch + detectron2 built from source + vlkd + Java (pycocoevalcap).
# No data and no weights inside: mount them (see docs/CLUSTER.md).
#
#   docker build -t vlkd:0.1.0 .
#   docker build --build-arg DETECTRON2=pypi -t vlkd:0.1.0-pypi .   # PyPI snapshot, no compiler
#
# Base pinned by tag; pin by digest too in production registries (docker buildx imagetools
# inspect pytorch/pytorch:<tag>).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

# git: detectron2 source; default-jre-headless: pycocoevalcap's PTB tokenizer and METEOR;
# tini: a real PID 1 so SIGTERM from the batch system reaches vlkd (shards resume cleanly).
RUN apt-get update \
 && apt-get install -y --no-install-recommends git default-jre-headless tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# detectron2: "git" builds the official source at a pinned commit with CUDA kernels for
# V100 (7.0), A100 (8.0), H100 (9.0); "pypi" installs the sal-detectron2 snapshot as
# scripts/install.sh does (no compiler needed, torchvision ops only).
ARG DETECTRON2=git
ARG DETECTRON2_COMMIT=2dde706855d87baa9760fbcd0bdb6004a3937204
ENV TORCH_CUDA_ARCH_LIST="7.0;8.0;9.0+PTX" \
    FORCE_CUDA=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install fvcore iopath yacs termcolor tabulate cloudpickle "omegaconf<2.4" pycocotools \
        matplotlib pillow "setuptools<81" \
 && if [ "$DETECTRON2" = "git" ]; then \
        pip install --no-build-isolation \
            "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}"; \
    elif [ "$DETECTRON2" = "pypi" ]; then \
        d=$(mktemp -d) \
        && pip download --no-deps --only-binary=:all: --python-version 3.10 -d "$d" sal-detectron2==0.7.2 \
        && w=$(ls "$d"/*.whl) \
        && f="$d/$(basename "$w" | sed -E 's/-[^-]+-[^-]+-[^-]+\.whl$/-py3-none-any.whl/')" \
        && { [ "$w" = "$f" ] || mv "$w" "$f"; } && pip install --no-deps "$f" && rm -rf "$d"; \
    else echo "DETECTRON2 must be git or pypi, got $DETECTRON2" >&2; exit 1; fi

# vlkd itself (dependencies first for layer caching; torch comes from the base image).
WORKDIR /opt/vlkd
COPY setup.cfg pyproject.toml README.md ./
COPY vlkd_pkg ./vlkd_pkg
COPY common ./common
COPY data ./data
COPY extract ./extract
COPY train ./train
COPY demo ./demo
COPY configs ./configs
COPY scripts/docker-entrypoint.sh /usr/local/bin/vlkd-entrypoint
RUN pip install . && python -c "import vlkd.extract, vlkd.train, detectron2.modeling"

# Non-root user; data, weights and outputs are mounted under /data, /weights, /out.
RUN useradd --create-home --uid 1000 vlkd && mkdir -p /data /weights /out \
 && chown vlkd:vlkd /data /weights /out
USER vlkd
WORKDIR /home/vlkd
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

ENTRYPOINT ["tini", "--", "vlkd-entrypoint"]
CMD ["--help"]
