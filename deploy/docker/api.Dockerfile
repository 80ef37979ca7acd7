# Slim API image: FastAPI gateway, no torch (the API never runs the model).
# Build from the repository root: docker build -f deploy/docker/api.Dockerfile -t msam-api .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md requirements-api.lock ./
COPY msam_core ./msam_core
COPY msam_service ./msam_service
COPY api ./api
COPY worker ./worker
# The locked torch-free set: requirements-api.lock is requirements.lock's versions for the runtime
# dependencies minus the model stack (torch, monai, safetensors), made by `make lock`.
RUN pip install --no-cache-dir --prefix=/install -r requirements-api.lock \
 && pip install --no-cache-dir --prefix=/install --no-deps .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home msam && mkdir -p /data/msam && chown msam /data/msam
COPY --from=build /install /usr/local
COPY THIRD_PARTY_LICENSES /usr/share/doc/msam/THIRD_PARTY_LICENSES
USER msam
ENV MSAM_HOST=0.0.0.0 MSAM_PORT=8000 MSAM_STORAGE_DIR=/data/msam PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
CMD ["sh", "-c", "exec uvicorn api.main:app --host \"$MSAM_HOST\" --port \"$MSAM_PORT\" --http api.timeouts:HeaderTimeoutProtocol --proxy-headers --no-access-log"]
