# syntax=docker/dockerfile:1
#
# mi300x-cert images. One file, three targets:
#
#   control-plane  Airflow 3.3.2 api-server / scheduler / dag-processor / triggerer (+ the embedded
#                  S3 server for a demo stack). No GPU libraries are needed here.
#   gpu-amd        An Edge worker for an AMD (ROCm) GPU server: ROCm PyTorch base, amdsmi from /opt/rocm.
#   gpu-nvidia     An Edge worker for an NVIDIA GPU server: CUDA PyTorch base, nvidia-ml-py.
#
#   docker build --target control-plane -t mi300x-cert/control-plane:0.1.0 .
#   docker build --target gpu-amd       -t mi300x-cert/gpu-amd:0.1.0 .
#   docker build --target gpu-nvidia    -t mi300x-cert/gpu-nvidia:0.1.0 .
#
# A GPU worker runs:  airflow edge worker -q gpu-${HOST} -c ${SLOTS} -H ${HOST}
# (HOST = the server's name in include/fleet.yaml, SLOTS = its card count; see docs/deployment.md).
# No secret is baked in: the JWT secret, the S3 credentials and the signing key come from the
# environment / mounted files at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ROCM_IMAGE=rocm/pytorch:rocm6.4.1_ubuntu24.04_py3.12_pytorch_release_2.6.0
ARG CUDA_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# --------------------------------------------------------------------------------------------------
# source: the package and the files the DAGs read, without caches or local state
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml requirements.txt README.md ./
COPY mi300x_cert ./mi300x_cert
COPY dags ./dags
COPY plugins ./plugins
COPY include ./include
COPY expectations ./expectations
# requirements for GPU images: the base image brings torch and its triton (ROCm or CUDA build); amdsmi comes from
# ROCm itself; nvidia-ml-py is only for the NVIDIA image
RUN grep -v -i -E '^(playwright|pytest|pytest-timeout)==' requirements.txt > requirements-control-plane.txt \
 && grep -v -i -E '^(torch|triton|amdsmi|nvidia-ml-py)==' requirements-control-plane.txt > requirements-gpu-amd.txt \
 && grep -v -i -E '^(torch|triton|amdsmi)==' requirements-control-plane.txt > requirements-gpu-nvidia.txt

# --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS control-plane
LABEL org.opencontainers.image.title="mi300x-cert control plane" \
      org.opencontainers.image.description="Airflow 3.3.2 control plane with the mi300x-cert DAGs"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    MI300X_CERT_HOME=/opt/mi300x-cert \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/mi300x-cert/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/mi300x-cert/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PATH=/opt/venv/bin:$PATH
# curl for the HEALTHCHECK; libpq for psycopg2 at run time
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libpq5 tini \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
COPY --from=source /src/requirements-control-plane.txt /tmp/requirements.txt
# CPU torch keeps the control plane light (it never runs a workload; DAGs import torch only inside
# tasks): torch==<pin>+cpu satisfies the torch==<pin> line of requirements.txt
RUN pip install --index-url https://download.pytorch.org/whl/cpu "$(grep -i -E '^torch==' /tmp/requirements.txt)" \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY --from=source /src /opt/mi300x-cert
RUN pip install --no-deps /opt/mi300x-cert \
 && useradd --create-home --uid 50000 --gid 0 --home-dir /home/airflow airflow \
 && mkdir -p /opt/airflow /var/lib/mi300x-cert \
 && chown -R airflow:0 /opt/airflow /var/lib/mi300x-cert \
 && chmod -R g+rwX /opt/airflow /var/lib/mi300x-cert
USER 50000
WORKDIR /opt/airflow
ENV MI300X_CERT_STATE_DIR=/var/lib/mi300x-cert
EXPOSE 8080
# the api-server answers its health endpoint; other roles override this check in compose
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=5 \
  CMD curl -fsS "http://127.0.0.1:${AIRFLOW__API__PORT:-8080}/api/v2/monitor/health" || exit 1
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "api-server"]

# --------------------------------------------------------------------------------------------------
FROM ${ROCM_IMAGE} AS gpu-amd
LABEL org.opencontainers.image.title="mi300x-cert GPU worker (AMD ROCm)" \
      org.opencontainers.image.description="Airflow Edge worker for an AMD GPU server"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    MI300X_CERT_HOME=/opt/mi300x-cert \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/mi300x-cert/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    MI300X_CERT_GPU_EXECUTOR=EdgeExecutor \
    MI300X_CERT_STATE_DIR=/var/lib/mi300x-cert \
    HF_HUB_OFFLINE=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    LD_LIBRARY_PATH=/opt/rocm/lib
COPY --from=source /src/requirements-gpu-amd.txt /tmp/requirements.txt
# torch stays the base image's ROCm build; amdsmi is the Python binding shipped with ROCm
RUN python3 -m pip install -r /tmp/requirements.txt \
 && python3 -m pip install /opt/rocm/share/amd_smi \
 && rm /tmp/requirements.txt
COPY --from=source /src /opt/mi300x-cert
RUN python3 -m pip install --no-deps /opt/mi300x-cert \
 && python3 -c "import torch, amdsmi, airflow.providers.edge3" \
 && (getent group video >/dev/null || groupadd --system video) \
 && (getent group render >/dev/null || groupadd --system render) \
 && useradd --create-home --uid 50000 --gid 0 --groups video,render --home-dir /home/airflow airflow \
 && mkdir -p /opt/airflow /var/lib/mi300x-cert \
 && chown -R airflow:0 /opt/airflow /var/lib/mi300x-cert \
 && chmod -R g+rwX /opt/airflow /var/lib/mi300x-cert
USER 50000
WORKDIR /opt/airflow
# `airflow edge status` reads the running worker's PID and status files (no network call)
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
  CMD airflow edge status || exit 1
CMD ["sh", "-c", "exec airflow edge worker -q gpu-${HOST} -c ${SLOTS} -H ${HOST}"]

# --------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-nvidia
LABEL org.opencontainers.image.title="mi300x-cert GPU worker (NVIDIA CUDA)" \
      org.opencontainers.image.description="Airflow Edge worker for an NVIDIA GPU server"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    MI300X_CERT_HOME=/opt/mi300x-cert \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/mi300x-cert/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    MI300X_CERT_GPU_EXECUTOR=EdgeExecutor \
    MI300X_CERT_STATE_DIR=/var/lib/mi300x-cert \
    HF_HUB_OFFLINE=1
COPY --from=source /src/requirements-gpu-nvidia.txt /tmp/requirements.txt
# torch stays the base image's CUDA build
RUN python -m pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY --from=source /src /opt/mi300x-cert
RUN python -m pip install --no-deps /opt/mi300x-cert \
 && python -c "import torch, pynvml, airflow.providers.edge3" \
 && useradd --create-home --uid 50000 --gid 0 --home-dir /home/airflow airflow \
 && mkdir -p /opt/airflow /var/lib/mi300x-cert \
 && chown -R airflow:0 /opt/airflow /var/lib/mi300x-cert \
 && chmod -R g+rwX /opt/airflow /var/lib/mi300x-cert
USER 50000
WORKDIR /opt/airflow
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
  CMD airflow edge status || exit 1
CMD ["sh", "-c", "exec airflow edge worker -q gpu-${HOST} -c ${SLOTS} -H ${HOST}"]
