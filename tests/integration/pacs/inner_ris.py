"""RIS flows against a real Orthanc; run by test_pacs_orthanc.py INSIDE a private network namespace
(like inner_orthanc.py, whose Orthanc, webhook receiver and helpers it reuses).

In the namespace: Redis, the API with two tenants (API keys), a segmentation worker, the I/O
worker, ``msam dicom-listener`` (C-MOVE destination), ``msam hl7-listener``, Orthanc (DICOMweb
and DIMSE), a webhook receiver, an HTTP proxy in front of Orthanc's DICOMweb that can hold a
STOW-RS answer (to kill the I/O worker mid-push) and counts what it forwards, and an MLLP
receiver standing in for the RIS.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message

from msam_service import jobs, redis_conn, serve
from msam_service.ris import hl7
from tests.integration.conftest import service_env
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import make_ct_series
from tests.integration.pacs.inner_orthanc import (  # noqa: F401 - fixtures
    DICOMWEB, HOOKS, LISTENER, ORTHANC, ORTHANC_DICOM, PROMPTS, SECRET, ct, hooks, next_hook, orthanc,
    orthanc_store, seg_series_referencing, series_dir)

PROXY, FHIR, HL7_LISTENER, RIS_RECEIVER = 8097, 8096, 2575, 2576
KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789"}
ALPHA = {"Authorization": f"Bearer {KEYS['alpha']}"}
BETA = {"Authorization": f"Bearer {KEYS['beta']}"}
NODE_OPTIONS = {
    "orthanc": {"tenants": ["alpha"], "series": {"modality": "CT", "exclude_description": "scout",
                                                 "prefer": ["thinnest", "most_images"]}},
    "slow": {"tenants": ["alpha"]},
    "dead": {"tenants": ["alpha"]},
    "other": {"tenants": ["beta"]},
    "orthanc_get": {"tenants": ["alpha"], "retrieve": "c-get"},
    "orthanc_move": {"tenants": ["alpha"], "retrieve": "c-move"},
}


# -- a DICOMweb proxy in front of Orthanc: counts STOW-RS, can hold one answer -------------------
class Proxy(ThreadingHTTPServer):
    stored: Counter
    hold_next: bool
    forwarded: threading.Event
    release: threading.Event


class _ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else None
        path = self.path.split("/", 2)[2] if self.path.count("/") >= 2 else ""
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        r = httpx.request(method, f"{DICOMWEB}/{path}", content=body, headers=headers, timeout=60)
        if method == "POST":
            self.server.stored[self.path.split("/")[1]] += 1
            if self.server.hold_next:  # Orthanc has the instance; its answer is held back
                self.server.hold_next = False
                self.server.forwarded.set()
                self.server.release.wait(120)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() in ("content-type",):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        try:
            self.wfile.write(r.content)
        except OSError:
            pass  # the client was killed meanwhile

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    server = Proxy(("127.0.0.1", PROXY), _ProxyHandler)
    server.stored, server.hold_next = Counter(), False
    server.forwarded, server.release = threading.Event(), threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()


# -- the RIS: an MLLP receiver for ORU^R01, and a FHIR server stand-in ------------------------
class Ris(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    got: queue.Queue


class _RisHandler(socketserver.BaseRequestHandler):
    server: Ris

    def handle(self) -> None:
        text = hl7.read_framed(self.request)
        self.server.got.put(text)
        self.request.sendall(hl7.frame(hl7.ack(text, "AA")))


@pytest.fixture(scope="module")
def ris() -> Iterator[Ris]:
    server = Ris(("127.0.0.1", RIS_RECEIVER), _RisHandler)
    server.got = queue.Queue()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class FhirServer(ThreadingHTTPServer):
    bundles: list[dict]


class _FhirHandler(BaseHTTPRequestHandler):
    server: FhirServer

    def do_POST(self) -> None:
        self.server.bundles.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
        body = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[FhirServer]:
    server = FhirServer(("127.0.0.1", FHIR), _FhirHandler)
    server.bundles = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


# -- the service ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ris_service(tmp_path_factory: pytest.TempPathFactory, redis_server: str, checkpoint: Path,
                orthanc: str, hooks: Any, proxy: Proxy, ris: Ris, fhir_server: FhirServer) -> Iterator[Service]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("ris-service")
    ae = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": ORTHANC_DICOM}
    env = service_env(
        tmp, redis_server, checkpoint,
        MSAM_API_KEYS=",".join(f"{t}:{hashlib.sha256(k.encode()).hexdigest()}" for t, k in KEYS.items()),
        MSAM_DICOMWEB_NODES=json.dumps({"orthanc": DICOMWEB, "slow": f"http://127.0.0.1:{PROXY}/slow",
                                        "dead": "http://127.0.0.1:9/dicom-web", "other": DICOMWEB}),
        MSAM_DICOM_AES=json.dumps({"orthanc_get": ae, "orthanc_move": ae}),
        MSAM_PACS_NODE_OPTIONS=json.dumps(NODE_OPTIONS),
        MSAM_PACS_RETRIES="1", MSAM_PACS_BACKOFF_S="0.5",
        MSAM_DICOM_LISTENER_PORT=str(LISTENER), MSAM_DICOM_IDLE_TIMEOUT_S="1.0",
        MSAM_DICOM_ROUTES=json.dumps([{"name": "drop", "action": "ignore"}]),
        MSAM_WEBHOOK_ALLOWLIST=f"http://127.0.0.1:{HOOKS}/hooks/", MSAM_WEBHOOK_SECRET=SECRET,
        MSAM_WEBHOOK_BACKOFF_S="0.5",
        MSAM_RIS_ENDPOINTS=json.dumps({"ris": {"application": "RIS", "facility": "HOSP", "tenant": "alpha",
                                               "pacs": "orthanc", "destinations": ["orthanc"],
                                               "oru_host": "127.0.0.1", "oru_port": RIS_RECEIVER}}),
        MSAM_HL7_LISTENER_PORT=str(HL7_LISTENER),
        MSAM_FHIR_ENDPOINTS=json.dumps({"fhir": {"url": f"http://127.0.0.1:{FHIR}/fhir", "tenants": ["alpha"]}}),
    )
    svc = Service(tmp=tmp, redis_url=redis_server, env=env)
    log = open(tmp / "listener.log", "wb")  # noqa: SIM115
    listener = subprocess.Popen([sys.executable, "-m", "msam_service.pacs.dimse_listener"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hl7_log = open(tmp / "hl7-listener.log", "wb")  # noqa: SIM115
    hl7_listener = None
    try:
        svc.start_worker("w1")
        svc.start_io_worker("io1")
        svc.start_api()
        hl7_listener = subprocess.Popen([sys.executable, "-m", "msam_service.ris.hl7_listener"],
                                        env={**env, "MSAM_PUBLIC_URL": svc.api_url}, stdout=hl7_log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        serve.wait_until(lambda: b"dicom-listener: AE MSAM" in (tmp / "listener.log").read_bytes(), 30,
                         "the DICOM listener", listener)
        serve.wait_until(lambda: b"hl7-listener: MLLP on" in (tmp / "hl7-listener.log").read_bytes(), 30,
                         "the HL7 listener", hl7_listener)
        yield svc
    finally:
        if hl7_listener is not None:
            serve.stop(hl7_listener)
        serve.stop(listener)
        log.close()
        hl7_log.close()
        svc.stop()


def with_accession(series: Any, accession: str) -> Any:
    """Rewrite the synthetic series' AccessionNumber (the generator gives every study the same)."""
    for p in series.paths:
        ds = pydicom.dcmread(p)
        ds.AccessionNumber = accession
        ds.save_as(p, enforce_file_format=True)
    return series


def post(svc: Service, body: dict, headers: dict[str, str] = ALPHA) -> httpx.Response:
    with svc.client() as c:
        return c.post("/segment", json={"prompts": PROMPTS, **body}, headers=headers)


def job(svc: Service, job_id: str, headers: dict[str, str] = ALPHA) -> dict[str, Any]:
    with svc.client() as c:
        return c.get(f"/jobs/{job_id}", headers=headers).json()


def wait(svc: Service, job_id: str, check: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = job(svc, job_id)
        if check(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {job(svc, job_id)}\n{svc.logs()}")


def finished(body: dict) -> bool:
    return body.get("status") in ("succeeded", "failed", "canceled") and body.get("delivery") in (None, "done", "failed")


def stored_source(svc: Service, job_id: str) -> dict[str, Any]:
    rec = jobs.JobStore(redis_conn.client(svc.redis_url), 600).get(job_id)
    assert rec is not None
    assert rec.request.source is not None
    return rec.request.source.to_json()


# -- 1. orders by accession number ---------------------------------------------------------
def test_order_by_accession_number_picks_the_series_by_the_node_rules(ris_service: Service, series_dir: Path) -> None:
    folder = series_dir / "acc1"
    thick = ct(folder, "body 2.5", seed=11)  # 16 slices of 2.5 mm
    thin = make_ct_series(folder / "thin", shape=(48, 40, 24), spacing=(1.2, 1.1, 1.25), study_uid=thick.study_uid,
                          for_uid=thick.for_uid, series_description="body thin", seed=12)
    scout = make_ct_series(folder / "scout", shape=(48, 40, 30), spacing=(1.2, 1.1, 0.5), study_uid=thick.study_uid,
                           series_description="scout", seed=13)  # thinnest, but excluded by its description
    for s in (thick, thin, scout):
        orthanc_store(with_accession(s, "ACC-RIS-1").paths)
    r = post(ris_service, {"source": {"pacs": "orthanc", "accession_number": "ACC-RIS-1"}})
    assert r.status_code == 202, r.text
    body = wait(ris_service, r.json()["job_id"], finished)
    assert body["status"] == "succeeded", (body, ris_service.logs())
    source = stored_source(ris_service, body["job_id"])
    assert (source["study_uid"], source["series_uid"]) == (thick.study_uid, thin.series_uid)


def test_orders_the_rules_cannot_settle_answer_with_the_candidates(ris_service: Service, series_dir: Path) -> None:
    folder = series_dir / "acc2"
    a = ct(folder, "twin a", seed=21)
    b = make_ct_series(folder / "b", shape=(48, 40, 16), spacing=(1.2, 1.1, 2.5), study_uid=a.study_uid,
                       series_description="twin b", seed=22)
    only_scout = make_ct_series(folder / "s", shape=(48, 40, 4), spacing=(1.2, 1.1, 2.5), series_description="scout",
                                seed=23)
    for s, acc in ((a, "ACC-TWINS"), (b, "ACC-TWINS"), (only_scout, "ACC-SCOUT")):
        orthanc_store(with_accession(s, acc).paths)
    r = post(ris_service, {"source": {"pacs": "orthanc", "accession_number": "ACC-TWINS"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "ambiguous_series", r.text
    candidates = r.json()["error"]["candidates"]
    assert sorted(c["series_uid"] for c in candidates) == sorted([a.series_uid, b.series_uid])
    assert all(c["excluded"] == "" and c["slice_thickness"] == 2.5 and c["instances"] == 16 for c in candidates)

    r = post(ris_service, {"source": {"pacs": "orthanc", "accession_number": "ACC-SCOUT"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_matching_series", r.text
    assert [c["excluded"] for c in r.json()["error"]["candidates"]] == \
        ["series description matches the node's exclusion pattern"]

    r = post(ris_service, {"source": {"pacs": "orthanc", "accession_number": "NO-SUCH-ACC"}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "study_not_found", r.text

    r = post(ris_service, {"source": {"pacs": "orthanc", "study_uid": a.study_uid}})  # a study without series
    assert r.status_code == 422 and r.json()["error"]["code"] == "ambiguous_series", r.text


# -- 2. tenants ------------------------------------------------------------------------------
def test_a_tenant_cannot_use_another_tenants_nodes(ris_service: Service, series_dir: Path) -> None:
    series = ct(series_dir, "tenant CT", seed=31)
    orthanc_store(series.paths)
    src = {"study_uid": series.study_uid, "series_uid": series.series_uid}
    theirs = post(ris_service, {"source": {"pacs": "orthanc", **src}}, headers=BETA)
    absent = post(ris_service, {"source": {"pacs": "nowhere", **src}}, headers=BETA)
    assert theirs.status_code == absent.status_code == 404
    assert theirs.json()["error"]["code"] == absent.json()["error"]["code"] == "unknown_node"
    assert theirs.json()["error"]["message"].replace("orthanc", "X") == absent.json()["error"]["message"].replace("nowhere", "X")
    assert "configured: other" in theirs.json()["error"]["message"]  # only beta's own node is named
    r = post(ris_service, {"source": {"pacs": "other", **src}, "destinations": ["orthanc_get"]}, headers=BETA)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_node", r.text
    for endpoint in ({"fhir": "fhir"}, {"ris": "ris"}, {"fhir": "anything"}):  # alpha's endpoints, and none
        r = post(ris_service, {"source": {"pacs": "other", **src}, **endpoint}, headers=BETA)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_endpoint", r.text
    r = post(ris_service, {"source": {"pacs": "other", **src}}, headers=BETA)  # its own node works
    assert r.status_code == 202, r.text
    r = post(ris_service, {"source": {"pacs": "other", **src}})  # and alpha cannot use beta's
    assert r.status_code == 404, r.text


# -- 3. DIMSE-only retrieval -----------------------------------------------------------------
@pytest.mark.parametrize("node", ["orthanc_get", "orthanc_move"])
def test_dimse_only_retrieval(ris_service: Service, series_dir: Path, node: str) -> None:
    series = ct(series_dir, f"dimse {node}", seed=41 if node == "orthanc_get" else 42)
    orthanc_store(series.paths)
    r = post(ris_service, {"source": {"pacs": node, "study_uid": series.study_uid, "series_uid": series.series_uid}})
    assert r.status_code == 202, r.text
    body = wait(ris_service, r.json()["job_id"], finished)
    assert body["status"] == "succeeded", (body, ris_service.logs())
    assert "dicom-seg" in body["results"]
    with ris_service.client() as c:  # the SEG references the retrieved series: the right images came
        seg = pydicom.dcmread(io.BytesIO(c.get(body["results"]["dicom-seg"], headers=ALPHA).content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(series.paths)


# -- 4. failures retry with backoff and end in a clear status --------------------------------
def test_a_dead_archive_fails_the_job_or_the_destination_clearly(ris_service: Service, series_dir: Path) -> None:
    r = post(ris_service, {"source": {"pacs": "dead", "study_uid": "1.2.3", "series_uid": "1.2.3.4"}})
    assert r.status_code == 202, r.text
    body = wait(ris_service, r.json()["job_id"], finished)
    assert body["status"] == "failed" and body["error"]["code"] == "pacs_error", body
    assert "dead" in body["error"]["message"] and "after 2 attempts" in body["error"]["message"], body

    series = ct(series_dir, "dead destination CT", seed=51)
    orthanc_store(series.paths)
    r = post(ris_service, {"source": {"pacs": "orthanc", "study_uid": series.study_uid, "series_uid": series.series_uid},
                           "destinations": ["dead"]})
    body = wait(ris_service, r.json()["job_id"], finished)
    assert body["status"] == "succeeded" and body["delivery"] == "failed", body
    assert body["destinations"]["dead"].startswith("failed: STOW-RS to dead failed"), body
    assert body["destinations"]["dead"].endswith("(after 2 attempts)"), body


# -- 5. the I/O worker killed mid-push: nothing lost, nothing sent twice ---------------------
def test_killing_the_io_worker_mid_push_loses_and_duplicates_nothing(ris_service: Service, series_dir: Path,
                                                                   proxy: Proxy, hooks: Any) -> None:  # noqa: F811
    series = ct(series_dir, "kill CT", seed=61)
    orthanc_store(series.paths)
    proxy.hold_next, before = True, proxy.stored["slow"]
    r = post(ris_service, {"source": {"pacs": "orthanc", "study_uid": series.study_uid, "series_uid": series.series_uid},
                           "destinations": ["slow"], "callback_url": f"http://127.0.0.1:{HOOKS}/hooks/kill"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert proxy.forwarded.wait(180), ris_service.logs()  # Orthanc has the SEG; the answer is held
    during = job(ris_service, job_id)
    # the segmentation finished and left: the push is held by the I/O worker, not a GPU worker
    assert during["status"] == "succeeded" and during["delivery"] == "pending", during
    assert during["destinations"] == {"slow": "sending"}, during
    ris_service.kill_worker("io1")
    proxy.release.set()
    ris_service.start_io_worker("io2")
    body = wait(ris_service, job_id, lambda b: b.get("delivery") == "done", timeout=120)  # after the visibility timeout
    assert body["destinations"] == {"slow": "stored"}, body
    assert proxy.stored["slow"] - before == 1, proxy.stored  # the redelivery asked (QIDO-RS) and did not resend
    ledger = json.loads(redis_conn.client(ris_service.redis_url).hget(f"msam:delivery:{job_id}", "dicom:slow"))
    assert ledger == {"state": "done", "attempts": 1, "detail": "stored"}, ledger
    assert len(seg_series_referencing(series.series_uid)) == 1
    _, payload = next_hook(hooks, "/hooks/kill", timeout=60)
    assert payload["destinations"] == {"slow": "stored"}
    time.sleep(2)
    assert all(p != "/hooks/kill" for p, _, _ in list(hooks.queue)), "the webhook came twice"
    assert "interrupted send had arrived" in (ris_service.tmp / "worker-io2.log").read_text()


# -- 6. HL7 v2: an order by accession number -> SEG in Orthanc + ORU^R01 at the RIS; FHIR --------
def order(accession: str, control_id: str, application: str = "RIS", prompts: dict | None = PROMPTS) -> str:
    """An ORM^O01 as a RIS sends it (docs/ris.md shows the same form)."""
    segments = [f"MSH|^~\\&|{application}|HOSP|MSAM|MSAM|20261206120000||ORM^O01|{control_id}|P|2.5",
                "PID|1||PAT-0001^^^HOSP^MR||Test^Patient",
                "ORC|NW|PLACER-1|FILLER-1",
                "OBR|1|PLACER-1|FILLER-1|CTABD^CT abdomen^L" + "|" * 14 + accession]
    if prompts is not None:
        segments.append(f"NTE|1||{hl7.PROMPTS_NOTE} {json.dumps(prompts, separators=(',', ':'))}")
    return "\r".join(segments) + "\r"


def mllp(text: str) -> Any:
    with socket.create_connection(("127.0.0.1", HL7_LISTENER), timeout=60) as sock:
        sock.sendall(hl7.frame(text))
        return parse_message(hl7.read_framed(sock), find_groups=False)


def test_hl7_order_to_seg_in_orthanc_and_oru_at_the_ris(ris_service: Service, series_dir: Path, ris: Ris) -> None:
    series = with_accession(ct(series_dir, "hl7 CT", seed=71), "ACC-HL7-1")
    orthanc_store(series.paths)
    reply = mllp(order("ACC-HL7-1", "CTRL-0001"))
    assert reply.msh.msh_9.to_er7() == "ACK^O01^ACK" and reply.msa.msa_1.to_er7() == "AA", reply.to_er7()
    assert reply.msa.msa_2.to_er7() == "CTRL-0001"
    job_id = reply.msa.msa_3.to_er7().split()[-1]
    again = mllp(order("ACC-HL7-1", "CTRL-0001"))  # a RIS that missed the ACK sends the order again
    assert again.msa.msa_1.to_er7() == "AA" and again.msa.msa_3.to_er7().split()[-1] == job_id
    body = wait(ris_service, job_id, finished, timeout=180)
    assert body["status"] == "succeeded" and body["delivery"] == "done", (body, ris_service.logs())
    assert body["destinations"] == {"orthanc": "stored", "ris:ris": "sent"}, body
    segs = seg_series_referencing(series.series_uid)
    assert len(segs) == 1

    oru = parse_message(ris.got.get(timeout=30), find_groups=True)  # the RIS parses it with hl7apy
    assert oru.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and oru.msh.msh_5.to_er7() == "RIS"
    result = oru.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3.to_er7() == "PAT-0001^^^HOSP^MR"
    obr = result.oru_r01_order_observation.obr
    assert (obr.obr_2.to_er7(), obr.obr_3.to_er7(), obr.obr_18.to_er7(), obr.obr_25.to_er7()) == \
        ("PLACER-1", "FILLER-1", "ACC-HL7-1", "F")
    obx = {(o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_4.to_er7()): o.obx
           for o in result.oru_r01_order_observation.oru_r01_observation}
    assert obx[("125007", "1")].obx_5.to_er7() == "tumour"
    volume = obx[("118565006", "1")]
    assert volume.obx_2.to_er7() == "NM" and volume.obx_6.to_er7() == "mL^mL^UCUM"
    voxels = body["lesions"][0]["voxels"]
    assert abs(float(volume.obx_5.to_er7()) - voxels * 1.2 * 1.1 * 2.5 / 1000) < 1e-3  # the series' spacing
    assert obx[("SEG_UID", "")].obx_5.to_er7() == segs[0].SOPInstanceUID
    assert obx[("SEG", "")].obx_5.to_er7().startswith(f"{ris_service.api_url}/jobs/{job_id}/result?format=dicom-seg")

    with ris_service.client() as c:  # the same result as FHIR, validated by the FHIR model library
        r = c.get(f"/jobs/{job_id}/result", params={"format": "fhir"}, headers=ALPHA)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json"), r.text
    bundle = Bundle.model_validate(r.json())
    report, observation = (e.resource for e in bundle.entry)
    assert report.__resource_type__ == "DiagnosticReport" and report.code.coding[0].code == "18748-4"
    assert {i.value for i in report.identifier} == {job_id, "ACC-HL7-1"}
    component = observation.component[0]
    assert (component.code.coding[0].system, component.code.coding[0].code) == ("http://snomed.info/sct", "118565006")
    assert component.valueQuantity.code == "mL" and float(component.valueQuantity.value) == float(volume.obx_5.to_er7())


def test_an_hl7_order_without_prompts_segments_the_line_measured_in_the_study(ris_service: Service, series_dir: Path,
                                                                             ris: Ris) -> None:
    """No MSAM-PROMPTS note: the lesions are the radiologist's lines stored with the study (here a
    TID 1500 SR), and the ORU^R01 reports each lesion's measured long axis."""
    import numpy as np

    from msam_core.io.dicom import read_series
    from tests.unit.io.annotation_synth import recist_sr

    series = with_accession(ct(series_dir, "hl7 lines CT", seed=72), "ACC-HL7-LINES")
    volume = read_series(series.paths)
    image = {str(d.SOPInstanceUID): d for d in series.datasets}[volume.meta["sop_instance_uids"][8]]
    line = volume.voxel_to_ras(np.array([[18.0, 20.0, 8], [30.0, 20.0, 8]]))
    line_mm = float(np.linalg.norm(line[1] - line[0]))
    sr = recist_sr(image, [(18.5, 20.5), (30.5, 20.5)], round(line_mm, 1), series_dir / "hl7_reader_sr.dcm",
                   images=series.datasets)
    orthanc_store([*series.paths, sr])
    reply = mllp(order("ACC-HL7-LINES", "CTRL-0101", prompts=None))
    assert reply.msa.msa_1.to_er7() == "AA", reply.to_er7()
    job_id = reply.msa.msa_3.to_er7().split()[-1]
    body = wait(ris_service, job_id, finished, timeout=180)
    assert body["status"] == "succeeded" and body["delivery"] == "done", (body, ris_service.logs())
    (lesion,) = body["lesions"]
    assert lesion["reference_line"]["source"] == "SR"
    assert lesion["reference_line"]["length_mm"] == pytest.approx(line_mm, abs=0.01)
    deadline = time.monotonic() + 60
    while True:  # the ORU^R01 of this order (an earlier test's may still be queued)
        oru = parse_message(ris.got.get(timeout=max(1.0, deadline - time.monotonic())), find_groups=True)
        result = oru.oru_r01_patient_result.oru_r01_order_observation
        if result.obr.obr_18.to_er7() == "ACC-HL7-LINES":
            break
    obx = {(o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_4.to_er7()): o.obx for o in result.oru_r01_observation}
    assert obx[("125007", "1")].obx_5.to_er7() == "SR line 1"
    assert (("SR_UID", "") in obx) == ("sr" in body["results"])  # the measurement SR is referenced
    measured = lesion["measurements"]
    assert (("103339001", "1") in obx) == (measured is not None)  # a lesion with voxels reports its long axis
    if measured is not None:
        assert float(obx[("103339001", "1")].obx_5.to_er7()) == pytest.approx(measured["long_axis"]["length_mm"])
        assert float(obx[("103340004", "1")].obx_5.to_er7()) == pytest.approx(measured["short_axis"]["length_mm"])


@pytest.mark.parametrize("text, code, says", [
    (order("ACC-HL7-NONE", "CTRL-0002"), "AE", "no study with this accession number"),
    (order("ACC-HL7-1", "CTRL-0004", prompts={"lesions": []}), "AE", "at least one positive point"),
    (order("ACC-HL7-1", "CTRL-0005", application="OTHER"), "AR", "not a configured RIS endpoint"),
    (order("ACC-HL7-1", "CTRL-0006").replace("ORM^O01", "ADT^A01"), "AR", "ADT^A01"),
])
def test_hl7_orders_msam_cannot_take_are_refused(ris_service: Service, text: str, code: str, says: str) -> None:
    reply = mllp(text)
    assert reply.msa.msa_1.to_er7() == code, reply.to_er7()
    assert says in hl7._unescape(reply.msa.msa_3.to_er7() + reply.err.err_8.to_er7()), reply.to_er7()


def test_fhir_report_posted_to_the_tenants_fhir_endpoint(ris_service: Service, series_dir: Path,
                                                          fhir_server: FhirServer) -> None:
    series = ct(series_dir, "fhir CT", seed=81)
    orthanc_store(series.paths)
    r = post(ris_service, {"source": {"pacs": "orthanc", "study_uid": series.study_uid, "series_uid": series.series_uid},
                           "fhir": "fhir"})
    assert r.status_code == 202, r.text
    body = wait(ris_service, r.json()["job_id"], finished)
    assert body["destinations"] == {"fhir:fhir": "sent"} and body["delivery"] == "done", body
    sent = Bundle.model_validate(fhir_server.bundles[-1])
    assert sent.type == "transaction"
    assert [e.request.url for e in sent.entry] == ["DiagnosticReport", "Observation"]
    assert sent.entry[0].request.ifNoneExist == f"identifier=urn:msam:job|{body['job_id']}"


def test_an_interrupted_c_store_is_confirmed_by_c_find(ris_service: Service, series_dir: Path) -> None:
    """What the delivery ledger asks an AE before sending a SEG again."""
    from msam_service.pacs import dimse_sender, nodes
    from msam_service.pacs.settings import AeNode

    node = nodes.DimseNode(name="orthanc", ae=AeNode(ae_title="ORTHANC", host="127.0.0.1", port=ORTHANC_DICOM))
    series = ct(series_dir, "c-find CT", seed=91)
    ds = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    uids = (series.study_uid, series.series_uid, str(ds.SOPInstanceUID))
    assert not dimse_sender.has_instance(node, *uids)
    dimse_sender.send(node, series.paths[:1])
    assert dimse_sender.has_instance(node, *uids)
