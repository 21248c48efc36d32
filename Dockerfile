# syntax=docker/dockerfile:1.7
# STA re-ID training image: the project + Ray + DeepSpeed + PyTorch, run as a non-root user.
#
#   docker build -t registry.example.com/sta-reid:0.1.0-gpu .                      # CUDA 12.8, ops prebuilt
#   docker build --build-arg VARIANT=cpu -t registry.example.com/sta-reid:0.1.0-cpu .
#
# Versions come from the project's constraints files (constraints-gpu.txt / constraints-cpu.txt), the
# same pins as a local install. Credentials (S3, MLflow) are runtime environment only (Kubernetes
# Secret, Slurm job env): nothing secret is copied into or set in this image.
# cluster/docker/test-install-steps.sh replays the CPU variant's install steps in a fresh venv.
#
# Python: the GPU image uses Ubuntu 24.04's python3 (3.12; the CUDA images' OS has no 3.11 without a
# PPA), the CPU image python:3.11 (the version of the dev venv, CI and the install replay). Both are
# within requires-python and resolve the same constraints files; a CPU image on 3.12 would only need
# CPU_IMAGE=python:3.12.x-slim-bookworm.
#
# One stage, not multi-stage, on purpose: DeepSpeed compiles ops just-in-time at run time (e.g. its
# shared-memory comm op on the first engine start, and any op not prebuilt below), which needs the
# compiler, Python headers and, in the GPU image, nvcc and the CUDA headers of the -devel base. A
# runtime-only final stage would save ~3 GB but turn those builds into run-time failures.
# Layer order is for caching: constraints, torch, the dependencies (only pyproject.toml is copied
# for them), then the sources; a README or code edit rebuilds only the last, cheap layer.

ARG VARIANT=gpu
# devel: DeepSpeed's op build needs nvcc and the CUDA headers.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CPU_IMAGE=python:3.11.11-slim-bookworm

# ---- GPU base ----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV STA_CONSTRAINTS=constraints-gpu.txt \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    TORCH_PACKAGES="torch torchvision" \
    DS_BUILD_OPS=0 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="7.0;8.0;8.6;8.9;9.0+PTX"

# ---- CPU base ----------------------------------------------------------------------------------------
FROM ${CPU_IMAGE} AS base-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*
ENV STA_CONSTRAINTS=constraints-cpu.txt \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    TORCH_PACKAGES="torch" \
    DS_BUILD_OPS=0

# ---- common ------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS final
ENV VENV=/opt/venv \
    APP=/app \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
ENV PATH=${VENV}/bin:${PATH} \
    PIP_CONSTRAINT=${APP}/${STA_CONSTRAINTS}
WORKDIR ${APP}

# Constraints first: every pip step below (and DeepSpeed's build) resolves against them.
COPY constraints-cpu.txt constraints-gpu.txt ./
RUN python3 -m venv "${VENV}" \
 && pip install --no-cache-dir --upgrade "pip>=24" "setuptools>=77" "wheel>=0.42" "ninja>=1.11"

# PyTorch from its own index (CUDA or CPU build), pinned by the constraints file.
# TORCH_PACKAGES is a list on purpose (word splitting).
# hadolint ignore=DL3013,SC2086
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" ${TORCH_PACKAGES}

# Project dependencies (cached layer while pyproject.toml is unchanged). DeepSpeed is built against the
# torch installed above (no build isolation); in the GPU image with FusedAdam/CPUAdam compiled ahead.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && grep -i '^deepspeed' /tmp/requirements.txt > /tmp/deepspeed.txt \
 && pip install --no-cache-dir --no-build-isolation -r /tmp/deepspeed.txt \
 && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/deepspeed.txt

# The project itself (README.md is the package's long description).
COPY README.md ./
COPY sta_model ./sta_model
COPY pipeline ./pipeline
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps . \
 && python3 -P -c "import pipeline.train, sta_model.model, ray, deepspeed, torch; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"

# Unprivileged user; Ray and PyTorch write under $HOME and /tmp only. Ubuntu 24.04 images (the CUDA
# base) already have user and group `ubuntu` with id 1000: remove whatever holds id 1000 first, or
# useradd fails ("UID 1000 is not unique").
RUN old_user="$(awk -F: '$3 == 1000 {print $1}' /etc/passwd)" \
 && if [ -n "$old_user" ]; then userdel "$old_user" && rm -rf "/home/${old_user:?}"; fi \
 && old_group="$(awk -F: '$3 == 1000 {print $1}' /etc/group)" \
 && if [ -n "$old_group" ]; then groupdel "$old_group"; fi \
 && groupadd --gid 1000 ray \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash ray \
 && mkdir -p "${APP}/runs" && chown -R 1000:1000 "${APP}/runs"
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
ENV HOME=/home/ray
# Dashboard, GCS, Ray client.
EXPOSE 8265 6379 10001
CMD ["python", "-m", "pipeline.train", "--help"]
