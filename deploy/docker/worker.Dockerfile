# CUDA worker image: Celery worker with torch (CUDA build). One container per GPU.
# Build from the repository root: docker build -f deploy/docker/worker.Dockerfile -t msam-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /src
# The locked set (requirements.lock, made by `make lock` for Python 3.11): torch first, from the CUDA
# index, at the locked version (the lock pins its CPU build, 2.13.0+cpu: here 2.13.0 from $TORCH_INDEX,
# with the nvidia-* wheels that build pins), then every other locked package at its locked version.
COPY pyproject.toml README.md requirements.lock ./
RUN TORCH=$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock) \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==$TORCH" \
 && grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt
COPY msam_core ./msam_core
COPY msam_service ./msam_service
COPY api ./api
COPY worker ./worker
COPY THIRD_PARTY_LICENSES /usr/share/doc/msam/THIRD_PARTY_LICENSES
RUN pip install --no-cache-dir --no-deps . && useradd --uid 10001 --create-home msam && mkdir -p /data/msam /models && chown msam /data/msam
USER msam
# no MSAM_CHECKPOINT: the bundled default model (installed with msam_core) unless one is set
ENV MSAM_DEVICE=cuda MSAM_STORAGE_DIR=/data/msam
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s CMD python -m worker.healthcheck
# concurrency 1 and prefetch 1: one job per GPU at a time; the model loads once in the pool child
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
