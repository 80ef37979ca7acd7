"""PACS configuration, node names (no SSRF), webhook allowlist and signatures, routing rules."""

from __future__ import annotations

import json

import pytest

from msam_service.pacs import nodes, webhooks
from msam_service.pacs.settings import PacsSettings, RouteRule


def settings(**env: str) -> PacsSettings:
    return PacsSettings(**env)  # type: ignore[arg-type]


def test_nodes_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSAM_DICOMWEB_NODES", json.dumps({"orthanc": "http://127.0.0.1:8042/dicom-web/"}))
    monkeypatch.setenv("MSAM_DICOMWEB_CREDENTIALS", json.dumps({"orthanc": {"username": "u", "password": "secret-pw"}}))
    monkeypatch.setenv("MSAM_DICOM_AES", json.dumps({"pacs_ae": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}}))
    s = PacsSettings()
    s.check()
    node = nodes.dicomweb_node(s, "orthanc")
    assert node.url == "http://127.0.0.1:8042/dicom-web"
    session = node.session()
    assert session.auth == ("u", "secret-pw") and session.max_redirects == 0 and not session.trust_env
    assert "secret-pw" not in repr(s) and "secret-pw" not in repr(node)
    assert isinstance(nodes.destination(s, "pacs_ae"), nodes.DimseNode)
    assert isinstance(nodes.destination(s, "orthanc"), nodes.DicomwebNode)


def test_credentials_file_and_token(tmp_path) -> None:  # noqa: ANN001
    f = tmp_path / "creds.json"
    f.write_text(json.dumps({"pacs": {"token": "tok"}}))
    s = PacsSettings(dicomweb_nodes={"pacs": "https://pacs.example.org/dicom-web"}, dicomweb_credentials_file=f)
    assert nodes.dicomweb_node(s, "pacs").session().headers["Authorization"] == "Bearer tok"


@pytest.mark.parametrize("name", ["http://169.254.169.254/latest", "127.0.0.1:8042", "nope", "", "../x", 5, None,
                                  "orthanc@evil", "a" * 80])
def test_unknown_or_url_names_are_refused(name: object) -> None:
    s = PacsSettings(dicomweb_nodes={"orthanc": "http://127.0.0.1:8042/dicom-web"})
    with pytest.raises(nodes.UnknownNode):
        nodes.dicomweb_node(s, name)
    with pytest.raises(nodes.UnknownNode):
        nodes.destination(s, name)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        PacsSettings(dicomweb_nodes={"x": "ftp://host/"})
    with pytest.raises(ValueError):
        PacsSettings(dicomweb_nodes={"x": "http://user:pw@host/dicom-web"})
    with pytest.raises(ValueError):
        PacsSettings(dicomweb_nodes={"a": "http://h/"},
                     dicom_aes={"a": {"ae_title": "A", "host": "h", "port": 104}}).check()
    with pytest.raises(ValueError):
        PacsSettings(dicom_routes=[{"destinations": ["nowhere"]}]).check()
    with pytest.raises(ValueError):
        PacsSettings(dicom_routes=[{"series_description": "("}])


ALLOW = ["https://ris.example.org/msam/", "http://127.0.0.1:8099/hooks"]


@pytest.mark.parametrize("url", ["https://ris.example.org/msam/", "https://ris.example.org/msam/job/1?x=1",
                                 "https://RIS.example.org:443/msam/a", "http://127.0.0.1:8099/hooks",
                                 "http://127.0.0.1:8099/hooks/a"])
def test_callback_allowed(url: str) -> None:
    assert webhooks.check_callback(url, ALLOW, "k") == url


@pytest.mark.parametrize("url", ["http://ris.example.org/msam/", "https://ris.example.org/other",
                                 "https://ris.example.org.evil.com/msam/", "https://evil.com/ris.example.org/msam/",
                                 "https://user@ris.example.org/msam/", "https://ris.example.org:8443/msam/",
                                 "https://ris.example.org/msam/../admin", "https://ris.example.org/msam/%2e%2e/x",
                                 "http://127.0.0.1:8099/hooksX", "file:///etc/passwd", "gopher://127.0.0.1:8099/hooks",
                                 "http://127.0.0.1:8099/hooks/a#frag", "http://127.0.0.1:8099/hooks/\nx"])
def test_callback_refused(url: str) -> None:
    with pytest.raises(webhooks.CallbackNotAllowed):
        webhooks.check_callback(url, ALLOW, "k")


def test_webhooks_need_configuration() -> None:
    with pytest.raises(webhooks.CallbackNotAllowed, match="not configured"):
        webhooks.check_callback("https://ris.example.org/msam/", ALLOW, "")
    with pytest.raises(webhooks.CallbackNotAllowed, match="not configured"):
        webhooks.check_callback("https://ris.example.org/msam/", [], "k")


def test_signature_round_trip_and_tampering() -> None:
    body = webhooks.encode({"job_id": "x", "status": "succeeded"})
    headers = webhooks.signed_headers("s3cret", body, "d1", "job.finished", now=1_000_000)
    assert webhooks.verify("s3cret", headers, body, now=1_000_010)
    assert not webhooks.verify("other", headers, body, now=1_000_010)
    assert not webhooks.verify("s3cret", headers, body + b" ", now=1_000_010)
    assert not webhooks.verify("s3cret", headers, body, now=1_000_000 + 3600)  # replayed late
    tampered = dict(headers, **{webhooks.TIMESTAMP_HEADER: "1000001"})
    assert not webhooks.verify("s3cret", tampered, body, now=1_000_010)


def test_backoff_doubles_and_caps() -> None:
    assert [webhooks.backoff(n, 2.0, 10.0) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_routing_rules() -> None:
    rule = RouteRule(modality="ct", series_description="^thorax", calling_ae=["ORTHANC", "ROUTER"])
    assert rule.matches("CT", "Thorax 1.0 B31f", "ORTHANC")
    assert not rule.matches("MR", "Thorax", "ORTHANC")
    assert not rule.matches("CT", "abdomen", "ORTHANC")
    assert not rule.matches("CT", "thorax", "MODALITY1")
    assert RouteRule().matches("SEG", "", "ANY")
    assert PacsSettings().routes()[0].action == "accept"
