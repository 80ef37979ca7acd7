# Slim API image: FastAPI gateway, no torch (the API never runs the model). Also runs
# `msam dicom-listener` (docker-compose.yml, deploy/k8s).
# Build from the repository root: docker build -f deploy/docker/api.Dockerfile -t msam-api .
# BASE: any image with Python 3.11 and its venv module as `python3` (the default is the public
# python:3.11-slim; the tests build on a Debian 12 stand-in, docs/containers.md).
ARG BASE=python:3.11-slim

FROM ${BASE} AS deps
# a virtual environment: the same layout whichever Python 3.11 the base carries
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The locked torch-free set: requirements-api.lock is requirements.lock's versions for the runtime
# dependencies minus the model stack (torch, monai, safetensors), made by `make lock`. This stage
# changes only with the lock: a code change reuses its layer in the final image.
COPY requirements-api.lock ./
RUN pip install --no-cache-dir -r requirements-api.lock

# msam itself, as a wheel
FROM deps AS wheel
COPY pyproject.toml README.md ./
COPY msam_core ./msam_core
COPY msam_service ./msam_service
COPY api ./api
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE}
RUN useradd --uid 10001 --create-home msam && mkdir -p /data/msam && chown msam /data/msam
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
# (no `pip check`: msam declares torch, which this image leaves out on purpose)
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl
COPY THIRD_PARTY_LICENSES /usr/share/doc/msam/THIRD_PARTY_LICENSES
USER msam
ENV PATH=/opt/venv/bin:$PATH MSAM_HOST=0.0.0.0 MSAM_PORT=8000 MSAM_STORAGE_DIR=/data/msam PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
CMD ["sh", "-c", "exec uvicorn api.main:app --host \"$MSAM_HOST\" --port \"$MSAM_PORT\" --http api.timeouts:HeaderTimeoutProtocol --proxy-headers --no-access-log"]
