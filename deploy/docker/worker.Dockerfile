# Worker image: Celery worker with torch. One Dockerfile for the CPU and the GPU worker: they run
# the same steps and differ only in their build arguments (docker-compose.yml sets them):
#   CPU: docker build -f deploy/docker/worker.Dockerfile -t msam-worker-cpu .
#   GPU: docker build -f deploy/docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu128 \
#          --build-arg DEVICE=cuda -t msam-worker .
# BASE: any image with Python 3.11 and its venv module as `python3` (default: the public
# python:3.11-slim). A GPU needs no CUDA base: torch's CUDA build brings the CUDA runtime and cuDNN
# as nvidia-* wheels, and the NVIDIA Container Toolkit mounts the host's driver into the container.
# TORCH_VARIANT: the torch build, the local version label of its wheels (cpu, cu128, ...).
# TORCH_INDEX: where that build is found; empty: only pip's own configuration (an index or
# find-links of the build machine that carries it, docs/containers.md).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
# the image's default MSAM_DEVICE (cpu or cuda); compose and Kubernetes set it too
ARG DEVICE=cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /src
# The locked set (requirements.lock, made by `make lock`): every package at its locked version;
# torch at the locked version in the chosen build (the lock pins the CPU build, 2.13.0+cpu;
# cu128 installs 2.13.0+cu128 and the nvidia-* wheels that build requires).
COPY requirements.lock ./
RUN sed "s/^torch==\([^+ ]*\).*/torch==\1+${TORCH_VARIANT}/" requirements.lock > /tmp/requirements.txt \
 && pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY msam_core ./msam_core
COPY msam_service ./msam_service
COPY api ./api
COPY worker ./worker
COPY THIRD_PARTY_LICENSES /usr/share/doc/msam/THIRD_PARTY_LICENSES
RUN pip install --no-cache-dir --no-deps . && pip check \
 && useradd --uid 10001 --create-home msam && mkdir -p /data/msam /models && chown msam /data/msam
USER msam
# no MSAM_CHECKPOINT: the bundled default model (installed with msam_core) unless one is set
ENV MSAM_STORAGE_DIR=/data/msam MSAM_DEVICE=${DEVICE}
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s CMD python -m worker.healthcheck
# concurrency 1 and prefetch 1: one job per device at a time; the model loads once in the pool child
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
