"""The I/O worker in compose and Kubernetes (parsed, not run): it exists, runs worker.io_app on
CPU in the torch-free api image, and the GPU autoscaler watches only the segmentation queue."""

from __future__ import annotations

import json

import yaml

from msam_service.settings import Settings
from tests.unit.api.test_deploy_files import K8S, ROOT, _k8s


def test_compose_io_worker() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    io = services["worker-io"]
    assert "profiles" not in io  # always on: webhooks and pushes need it whatever the worker profile
    assert io["image"] == services["api"]["image"] and "deploy" not in io  # no GPU, no torch
    command = io["command"]
    assert command[:4] == ["celery", "-A", "worker.io_app", "worker"] and "threads" in command
    assert io["environment"]["MSAM_REDIS_URL"] == services["api"]["environment"]["MSAM_REDIS_URL"]
    assert "storage:/data/msam" in io["volumes"]
    assert "inspect ping" in io["healthcheck"]["test"][1]
    for name in ("worker", "worker-cpu"):  # the segmentation workers do not consume the I/O queue
        assert "worker.io_app" not in str(services[name].get("command", ""))


def test_kubernetes_io_worker_and_autoscaling_on_the_gpu_queue_only() -> None:
    docs = _k8s()
    assert "worker-io.yaml" in docs[("Kustomization", "")]["resources"] and (K8S / "worker-io.yaml").is_file()
    io = docs[("Deployment", "msam-worker-io")]["spec"]["template"]["spec"]
    container = io["containers"][0]
    assert container["image"] == "msam-api:latest" and "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["command"][:3] == ["celery", "-A", "worker.io_app"]
    config = docs[("ConfigMap", "msam-config")]["data"]
    gpu_queue = config.get("MSAM_QUEUE", Settings.model_fields["queue"].default)
    io_queue = config.get("MSAM_IO_QUEUE", Settings.model_fields["io_queue"].default)
    assert gpu_queue != io_queue
    trigger = docs[("ScaledObject", "msam-worker-gpu")]["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in trigger] == [gpu_queue]


def test_hl7_listener_in_compose_and_kubernetes() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    hl7 = services["hl7-listener"]
    assert hl7["command"] == ["msam", "hl7-listener"] and hl7["profiles"] == ["ris"]
    assert hl7["environment"]["MSAM_HL7_LISTENER_HOST"] == "0.0.0.0"
    assert hl7["ports"][0].endswith(":" + hl7["environment"]["MSAM_HL7_LISTENER_PORT"])
    docs = _k8s()
    assert "hl7-listener.yaml" in docs[("Kustomization", "")]["resources"]
    pod = docs[("Deployment", "msam-hl7-listener")]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["msam", "hl7-listener"]
    assert docs[("Service", "msam-hl7-listener")]["spec"]["selector"] == pod["metadata"]["labels"]
    config = docs[("ConfigMap", "msam-config")]["data"]
    from msam_service.pacs.settings import PacsSettings

    parsed = PacsSettings.model_validate({k[5:].lower(): json.loads(v) for k, v in config.items()
                                          if k in ("MSAM_PACS_NODE_OPTIONS", "MSAM_RIS_ENDPOINTS", "MSAM_FHIR_ENDPOINTS")})
    assert parsed.ris_endpoints == {} and parsed.fhir_endpoints == {}
