"""The compose file, Dockerfiles and Kubernetes manifests: their structure and the settings that
matter, parsed (fast, no container runtime), and deploy/k8s rendered by ``kubectl kustomize``.
tests/containers builds the images and runs the compose stack with podman."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from msam_service import serve

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
    for name in ("api", "worker", "worker-cpu"):
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    # one worker Dockerfile; the GPU and CPU workers differ in build arguments and image name only
    gpu_build, cpu_build = services["worker"]["build"], services["worker-cpu"]["build"]
    assert gpu_build["dockerfile"] == cpu_build["dockerfile"] == "deploy/docker/worker.Dockerfile"
    assert gpu_build["args"] == {"TORCH_VARIANT": "cu128", "DEVICE": "cuda"}
    assert cpu_build["args"] == {"TORCH_VARIANT": "cpu", "DEVICE": "cpu"}
    assert services["worker"]["image"] != services["worker-cpu"]["image"]
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


def _build_args(ins: list[tuple[str, str]]) -> dict[str, str]:
    """``ARG NAME=default`` of a Dockerfile (``None`` default: declared without one)."""
    return dict(tuple(r.split("=", 1)) if "=" in r else (r, None) for w, r in ins if w == "ARG")


def test_dockerfiles() -> None:
    known = {"FROM", "RUN", "COPY", "WORKDIR", "ENV", "ARG", "USER", "EXPOSE", "CMD", "HEALTHCHECK"}
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        ins = _instructions(ROOT / "deploy" / "docker" / name)
        # the base is a build argument whose default is the public python:3.11-slim
        assert ins[0] == ("ARG", "BASE=python:3.11-slim"), name
        stages: set[str] = set()
        for w, r in ins:  # every stage starts from the base or from an earlier stage
            if w == "FROM":
                parent, _, alias = r.partition(" AS ")
                assert parent == "${BASE}" or parent in stages, (name, r)
                stages.add(alias.strip())
        assert {w for w, _ in ins} <= known, name
        assert ("USER", "msam") in ins, name  # never root
        for word, rest in ins:
            if word == "COPY" and "--from" not in rest:
                assert (ROOT / rest.split()[0]).exists(), rest
    api = _instructions(ROOT / "deploy" / "docker" / "api.Dockerfile")
    assert "torch" in (ROOT / "deploy" / "docker" / "api.Dockerfile").read_text()  # filtered out
    assert any(w == "CMD" and "uvicorn api.main:app" in r for w, r in api)
    # the request-head deadline runs in the image as under msam serve
    assert any(w == "CMD" and f"--http {serve.API_HTTP_PROTOCOL}" in r for w, r in api)
    worker = _instructions(ROOT / "deploy" / "docker" / "worker.Dockerfile")
    args = _build_args(worker)
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_INDEX"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert ("ENV", "MSAM_STORAGE_DIR=/data/msam MSAM_DEVICE=${DEVICE}") in worker and args["DEVICE"] == "cpu"
    install = next(r for w, r in worker if w == "RUN" and "requirements.lock" in r)
    assert "+${TORCH_VARIANT}" in install  # the locked torch version, in the chosen build
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


# -- the DICOM listener (`msam dicom-listener`) ------------------------------------------------

def _setting_names() -> set[str]:
    """Every environment variable the settings classes read (``MSAM_`` + field name, and aliases)."""
    from msam_service.pacs.settings import PacsSettings
    from msam_service.settings import Settings

    names = set()
    for cls in (Settings, PacsSettings):
        for field_name, info in cls.model_fields.items():
            names.add(f"MSAM_{field_name.upper()}")
            alias = info.validation_alias
            names.update(a.upper() for a in getattr(alias, "choices", [alias] if isinstance(alias, str) else []))
    return names


def _interpolate(value: str | None, host_env: dict[str, str]) -> str | None:
    """Compose's ``${NAME}`` / ``${NAME:-default}``, resolved against ``host_env``."""
    if value is None:
        return None

    def sub(m: re.Match) -> str:
        got = host_env.get(m.group(1))
        return got if got else (m.group(2) or "")

    return re.sub(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}", sub, str(value))


def _listener_command(argv: list[str]):
    """Parse a container's command the way ``msam`` does: its entry point in pyproject.toml is the
    script, the ``msam.commands`` plugin named by the sub-command registers the options."""
    import argparse
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert argv[0] in project["scripts"], argv
    target = project["entry-points"]["msam.commands"][argv[1]]
    module, _, func = target.partition(":")
    assert (module, func) == ("msam_service.pacs.dimse_listener", "register"), target
    parser = argparse.ArgumentParser(prog=argv[0])
    getattr(importlib.import_module(module), func)(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv[1:])  # an unknown option exits (SystemExit fails the test)


def _listener_settings(monkeypatch, env: dict[str, str | None]):
    """The settings the listener would read in that environment (and the start-up checks it makes)."""
    import os

    from msam_service.pacs.dimse_listener import check_rules
    from msam_service.pacs.settings import PacsSettings
    from msam_service.settings import Settings

    for name in list(os.environ):
        if name.startswith("MSAM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:  # compose: no value and not set on the host -> unset
            monkeypatch.setenv(name, value)
    settings, pacs = Settings(), PacsSettings()
    settings.check()
    pacs.check()
    check_rules(pacs)
    return settings, pacs


def _listen_address(command: list[str], pacs) -> tuple[str, int]:
    args = _listener_command(command)
    assert args.command == "dicom-listener" and callable(args.func)
    return args.host or pacs.dicom_listener_host, pacs.dicom_listener_port if args.port is None else args.port


def _assert_allow_list_reaches_the_ae(pacs_env: dict[str, str | None], monkeypatch) -> None:
    from types import SimpleNamespace

    from msam_service.pacs.dimse_listener import make_ae

    _, pacs = _listener_settings(monkeypatch, pacs_env)
    ae = make_ae(SimpleNamespace(pacs=pacs), pacs.dicom_ae_title)
    assert ae.require_calling_aet == ["ORTHANC"] and ae.ae_title == "MSAM-TEST"


def test_setting_names_catch_typos() -> None:
    names = _setting_names()
    assert {"MSAM_DICOM_AE_TITLE", "MSAM_DICOM_CALLING_AES", "MSAM_DICOM_LISTENER_PORT", "MSAM_REDIS_URL",
            "REDIS_URL", "MSAM_STORAGE_DIR"} <= names
    assert not {"MSAM_DICOM_CALLING_AE", "MSAM_DICOM_AETITLE", "MSAM_DICOM_PORT", "MSAM_LISTENER_PORT"} & names
    assert _interpolate("${X:-null}", {}) == "null" and _interpolate("${X:-null}", {"X": '["A"]'}) == '["A"]'


def test_compose_dicom_listener(monkeypatch) -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api, svc = services["api"], services["dicom-listener"]
    assert svc["image"] == api["image"] and svc["build"] == api["build"]  # the api image (no torch)
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy" and svc["restart"] == "unless-stopped"

    names = _setting_names()
    for name, s in services.items():  # a misspelt variable would silently be the default
        assert not {k for k in s.get("environment", {}) if k.startswith("MSAM_")} - names, name
    assert {"MSAM_DICOM_AE_TITLE", "MSAM_DICOM_CALLING_AES"} <= set(svc["environment"])
    env = {k: _interpolate(v, {}) for k, v in svc["environment"].items()}
    settings, pacs = _listener_settings(monkeypatch, env)
    host, port = _listen_address(svc["command"], pacs)
    assert host == "0.0.0.0"  # reachable through the published port
    assert pacs.dicom_ae_title == "MSAM" and pacs.dicom_calling_aes is None  # defaults: documented, any AE

    published = [_interpolate(p, {}).rsplit(":", 2) for p in svc["ports"]]
    assert [int(p[-1]) for p in published] == [port] and int(published[0][-2]) == 11112
    moved = _interpolate(svc["ports"][0], {"MSAM_DICOM_LISTENER_PORT": "104"})
    assert moved.split(":") == ["0.0.0.0", "104", str(port)]  # the host port is configurable, the container's is not
    local = _interpolate(svc["ports"][0], {"MSAM_PUBLISH_ADDRESS": "127.0.0.1"})
    assert local.split(":") == ["127.0.0.1", "11112", str(port)]  # and the host address
    health = " ".join(svc["healthcheck"]["test"])
    assert "8000" not in health and re.search(rf"create_connection\(\('127\.0\.0\.1', {port}\)", health)

    # same Redis and storage as the api
    api_settings, _ = _listener_settings(monkeypatch, {k: _interpolate(v, {}) for k, v in api["environment"].items()})
    assert settings.redis_url == api_settings.redis_url and settings.redis_url.startswith("redis://redis:")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    api_mounts = {v.split(":")[1]: v.split(":")[0] for v in api["volumes"]}
    assert mounts[str(settings.storage_dir)] == api_mounts[str(api_settings.storage_dir)] == "storage"

    # the AE title and allow-list set on the host reach the listener's AE
    host_env = {"MSAM_DICOM_AE_TITLE": "MSAM-TEST", "MSAM_DICOM_CALLING_AES": '["ORTHANC"]'}
    _assert_allow_list_reaches_the_ae({k: _interpolate(v, host_env) for k, v in svc["environment"].items()},
                                      monkeypatch)


def _container_env(docs: dict, container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(docs[("ConfigMap", ref["configMapRef"]["name"])]["data"])
        else:
            env.update(docs[("Secret", ref["secretRef"]["name"])]["stringData"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def _port(container: dict, ref) -> int:
    return ref if isinstance(ref, int) else next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


def test_kubernetes_dicom_listener(monkeypatch) -> None:
    docs = _k8s()
    dep, svc = docs[("Deployment", "msam-dicom-listener")], docs[("Service", "msam-dicom-listener")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels and svc["spec"]["selector"] == labels
    # no other workload's pods may answer on the listener's Service
    for (kind, name), doc in docs.items():
        if kind in ("Deployment", "StatefulSet") and name != "msam-dicom-listener":
            assert doc["spec"]["template"]["metadata"]["labels"] != labels, name
    # a series in flight lives in one process: never two listeners at once
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    api_dep = docs[("Deployment", "msam-api")]["spec"]["template"]["spec"]
    api, container = api_dep["containers"][0], pod["spec"]["containers"][0]
    assert container["image"] == api["image"]
    env = _container_env(docs, container)
    assert not {k for k in env if k.startswith("MSAM_")} - _setting_names()
    assert not set(docs[("ConfigMap", "msam-config")]["data"]) - _setting_names()  # api and workers read it too
    assert {"MSAM_DICOM_AE_TITLE", "MSAM_DICOM_CALLING_AES"} <= set(env)
    settings, pacs = _listener_settings(monkeypatch, env)
    host, port = _listen_address(container["command"] + container.get("args", []), pacs)
    assert host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port(container, container[probe]["tcpSocket"]["port"]) == port, probe
    (service_port,) = svc["spec"]["ports"]
    assert _port(container, service_port["targetPort"]) == port

    # same Redis and storage claim as the api
    api_settings, _ = _listener_settings(monkeypatch, _container_env(docs, api))
    assert settings.redis_url == api_settings.redis_url and settings.redis_url.startswith("redis://msam-redis:")

    def claim(spec: dict, c: dict, path: Path) -> str:
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path)]
        (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        return vol["persistentVolumeClaim"]["claimName"]

    assert claim(pod["spec"], container, settings.storage_dir) == claim(api_dep, api, api_settings.storage_dir) == "msam-storage"

    # the allow-list and AE title in msam-config reach the listener's AE
    edited = dict(env, MSAM_DICOM_AE_TITLE="MSAM-TEST", MSAM_DICOM_CALLING_AES='["ORTHANC"]')
    _assert_allow_list_reaches_the_ae(edited, monkeypatch)


# -- deploy/k8s rendered by kustomize ---------------------------------------------------------

def _kustomize(path: Path) -> dict[tuple[str, str], dict]:
    """``kubectl kustomize path``: the objects as they would be applied, by (kind, name)."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not installed: run `make tools` (Debian package kubernetes-client)")
    result = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


def _pods(docs: dict) -> dict[str, dict]:
    return {name: doc["spec"]["template"]["spec"] for (kind, name), doc in docs.items()
            if kind in ("Deployment", "StatefulSet")}


def test_kustomize_renders_the_images_compose_builds_and_settings_the_service_reads(monkeypatch) -> None:
    from urllib.parse import urlparse

    from msam_service.settings import Settings

    docs = _kustomize(K8S)
    assert {k for k, _ in docs} >= {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
                                   "PersistentVolumeClaim", "ScaledObject"}
    for (kind, name), doc in docs.items():  # the kustomization's namespace reached every object
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "msam", (kind, name)

    # the images: those docker-compose.yml builds (and tests/containers builds with podman)
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    pods = _pods(docs)
    image = {name: spec["containers"][0]["image"] for name, spec in pods.items()}
    assert image == {"msam-api": services["api"]["image"], "msam-dicom-listener": services["api"]["image"],
                     "msam-hl7-listener": services["hl7-listener"]["image"],
                     "msam-worker-io": services["worker-io"]["image"],
                     "msam-worker-gpu": services["worker"]["image"], "msam-redis": services["redis"]["image"]}
    # the I/O worker and the HL7 listener run in the torch-free API image, as in compose
    assert services["worker-io"]["image"] == services["hl7-listener"]["image"] == services["api"]["image"]
    assert services["api"]["build"]["dockerfile"] == "deploy/docker/api.Dockerfile"
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")  # the GPU Deployment: a CUDA build

    # the settings: every variable a container gets is one the settings classes read, and together
    # they pass the service's start-up checks
    names = _setting_names()
    for name in ("msam-api", "msam-dicom-listener", "msam-hl7-listener", "msam-worker-io", "msam-worker-gpu"):
        container = pods[name]["containers"][0]
        env = _container_env(docs, container)
        assert {k for k in env if k.startswith("MSAM_")} <= names, name
        for var in list(os.environ):
            if var.startswith("MSAM_") or var == "REDIS_URL":
                monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        settings = Settings()
        settings.check()
        # Redis: a rendered Service of this namespace, on a port it exposes, backed by the StatefulSet
        url = urlparse(settings.redis_url)
        redis_svc = docs[("Service", url.hostname)]
        assert url.port in [p["port"] for p in redis_svc["spec"]["ports"]], name
        assert redis_svc["spec"]["selector"] == docs[("StatefulSet", url.hostname)]["spec"]["template"]["metadata"]["labels"]
        if name == "msam-hl7-listener":  # takes orders into Redis only: no storage, no model
            assert "volumeMounts" not in container and "volumes" not in pods[name]
            continue
        # storage: a mounted claim, the same for every container; the checkpoint's folder is mounted
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pods[name]["volumes"]}
        assert volumes[mounts[str(settings.storage_dir)]]["persistentVolumeClaim"]["claimName"] == "msam-storage", name
        if name == "msam-worker-gpu":
            assert settings.device == "cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert str(settings.checkpoint_path().parent) in mounts
            claim = volumes[mounts[str(settings.checkpoint_path().parent)]]["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in docs


def test_kustomize_can_retarget_the_images(tmp_path: Path) -> None:
    """A site's overlay names its registry once; every Deployment using the image follows."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S, overlay)],
        "images": [{"name": "msam-api", "newName": "registry.example/msam-api", "newTag": "1.2.3"},
                   {"name": "msam-worker", "newName": "registry.example/msam-worker", "newTag": "1.2.3"}]}))
    pods = _pods(_kustomize(overlay))
    assert pods["msam-api"]["containers"][0]["image"] == "registry.example/msam-api:1.2.3"
    assert pods["msam-dicom-listener"]["containers"][0]["image"] == "registry.example/msam-api:1.2.3"
    assert pods["msam-worker-gpu"]["containers"][0]["image"] == "registry.example/msam-worker:1.2.3"
