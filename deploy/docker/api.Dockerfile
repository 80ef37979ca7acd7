# Slim API image: FastAPI gateway, no torch (the API never runs the model).
# Build from the repository root: docker build -f deploy/docker/api.Dockerfile -t msam-api .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY msam_core ./msam_core
COPY msam_service ./msam_service
COPY api ./api
COPY worker ./worker
# The pinned dependencies of pyproject.toml, minus the model stack (torch, monai, safetensors).
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
skip = ("torch", "monai", "safetensors")
print("\n".join(d for d in deps if not d.split("==")[0].split("[")[0].strip().lower() in skip))
PY
RUN pip install --no-cache-dir --prefix=/install -r /tmp/requirements.txt \
 && pip install --no-cache-dir --prefix=/install --no-deps .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home msam && mkdir -p /data/msam && chown msam /data/msam
COPY --from=build /install /usr/local
USER msam
ENV MSAM_HOST=0.0.0.0 MSAM_PORT=8000 MSAM_STORAGE_DIR=/data/msam PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
CMD ["sh", "-c", "exec uvicorn api.main:app --host \"$MSAM_HOST\" --port \"$MSAM_PORT\" --http api.timeouts:HeaderTimeoutProtocol --proxy-headers --no-access-log"]
