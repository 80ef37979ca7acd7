"""Docker does not run on our machines: the compose file, Dockerfiles and Kubernetes manifests
are checked by parsing them (structure and the settings that matter), not by running them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"


def test_compose() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"redis", "api", "worker", "worker-cpu"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["MSAM_DEVICE"] == "cpu"
    for name in ("api", "worker", "worker-cpu"):
        assert "storage:/data/msam" in services[name]["volumes"], name
        env = services[name]["environment"]
        assert env["MSAM_STORAGE_DIR"] == "/data/msam" and env["MSAM_REDIS_URL"].startswith("redis://redis:")
        assert int(env["MSAM_VISIBILITY_TIMEOUT_S"]) > int(env["MSAM_JOB_TIME_LIMIT_S"])
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(services["worker"]["stop_grace_period"].rstrip("s")) > int(services["worker"]["environment"]["MSAM_JOB_TIME_LIMIT_S"])
    for name in ("api", "worker"):
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    assert set(doc["volumes"]) == {"redis-data", "storage"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    text = re.sub(r"<<'PY'.*?\nPY\n", "\n", text, flags=re.DOTALL)  # heredoc bodies are not instructions
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest))
    return out


def test_dockerfiles() -> None:
    known = {"FROM", "RUN", "COPY", "WORKDIR", "ENV", "ARG", "USER", "EXPOSE", "CMD", "HEALTHCHECK"}
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        ins = _instructions(ROOT / "deploy" / "docker" / name)
        assert ins[0][0] == "FROM" and {w for w, _ in ins} <= known, name
        assert ("USER", "msam") in ins, name  # never root
        for word, rest in ins:
            if word == "COPY" and "--from" not in rest:
                assert (ROOT / rest.split()[0]).exists(), rest
    api = _instructions(ROOT / "deploy" / "docker" / "api.Dockerfile")
    assert "torch" in (ROOT / "deploy" / "docker" / "api.Dockerfile").read_text()  # filtered out
    assert any(w == "CMD" and "uvicorn api.main:app" in r for w, r in api)
    worker = _instructions(ROOT / "deploy" / "docker" / "worker.Dockerfile")
    assert worker[0][1].startswith("nvidia/cuda:")
    assert any(w == "CMD" and "worker.celery_app" in r and '"--concurrency", "1"' in r for w, r in worker)


def _k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc.get("metadata", {}).get("name", ""))] = doc
    return docs


def test_kubernetes_manifests() -> None:
    docs = _k8s()
    kust = docs[("Kustomization", "")]
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} == set(kust["resources"])
    config = docs[("ConfigMap", "msam-config")]["data"]
    assert int(config["MSAM_VISIBILITY_TIMEOUT_S"]) > int(config["MSAM_JOB_TIME_LIMIT_S"])

    api = docs[("Deployment", "msam-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    svc = docs[("Service", "msam-api")]
    assert svc["spec"]["selector"] == docs[("Deployment", "msam-api")]["spec"]["template"]["metadata"]["labels"]

    worker = docs[("Deployment", "msam-worker-gpu")]["spec"]["template"]["spec"]
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["terminationGracePeriodSeconds"] > int(config["MSAM_JOB_TIME_LIMIT_S"])
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data/msam", "/models"}

    redis = docs[("StatefulSet", "msam-redis")]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(redis["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert docs[("PersistentVolumeClaim", "msam-storage")]["spec"]["accessModes"] == ["ReadWriteMany"]

    scaler = docs[("ScaledObject", "msam-worker-gpu")]["spec"]
    assert scaler["scaleTargetRef"]["name"] == "msam-worker-gpu"
    trigger = scaler["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "msam"  # the Celery queue
    assert trigger["metadata"]["address"].startswith("msam-redis.")
    for (kind, name), doc in docs.items():
        if kind not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == "msam", (kind, name)


def test_compose_and_the_worker_image_use_the_bundled_model_unless_told_otherwise(monkeypatch) -> None:
    """``docker compose up`` segments out of the box, as ``make run`` does: the compose default for
    MSAM_CHECKPOINT is empty, an empty variable means unset, and unset means the bundled model
    (installed with msam_core as package data)."""
    from msam_service.settings import DEFAULT_CHECKPOINT, Settings

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("worker", "worker-cpu"):
        value = doc["services"][name]["environment"]["MSAM_CHECKPOINT"]
        assert value == "${MSAM_CHECKPOINT:-}", name  # compose: empty when the variable is unset
    assert not any("MSAM_CHECKPOINT" in args for op, args in _instructions(ROOT / "deploy" / "docker" / "worker.Dockerfile")
                   if op == "ENV")
    monkeypatch.setenv("MSAM_CHECKPOINT", "")
    assert Settings().checkpoint_path() == DEFAULT_CHECKPOINT and DEFAULT_CHECKPOINT.is_file()
    monkeypatch.setenv("MSAM_CHECKPOINT", "/models/msam.safetensors")
    assert Settings().checkpoint_path() == Path("/models/msam.safetensors")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'msam_core = ["weights/*.safetensors"' in pyproject  # a non-editable install (the images) ships it
