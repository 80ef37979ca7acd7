"""The PACS flows against a real Orthanc; run by test_pacs_orthanc.py INSIDE a private network
namespace (``unshare --net``, only ``lo`` up), so Orthanc - which binds every interface - and
everything else here can only talk over that namespace's loopback.

In the namespace: Redis (unix socket), the API, one Celery worker, ``msam dicom-listener``,
Orthanc (HTTP 8042 with the DICOMweb plugin, DICOM 4242) and a webhook receiver. Fixed ports are
safe: the namespace is ours alone.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from msam_service import serve
from msam_service.pacs import webhooks
from tests.integration.conftest import service_env
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import make_ct_series

if not os.environ.get("MSAM_PACS_INNER"):
    pytest.skip("run through tests/integration/pacs/test_pacs_orthanc.py (needs a private network namespace)",
                allow_module_level=True)

ORTHANC_HTTP, ORTHANC_DICOM, LISTENER, HOOKS = 8042, 4242, 11112, 8099
ORTHANC = f"http://127.0.0.1:{ORTHANC_HTTP}"
DICOMWEB = f"{ORTHANC}/dicom-web"
SECRET = "test-webhook-secret"
PROMPTS = {"space": "voxel", "lesions": [{"positive": [[24, 20, 8]], "label": "tumour"}]}
ROUTES = [
    {"name": "auto", "modality": "CT", "series_description": "^auto", "calling_ae": "STORESCU",
     "prompts": PROMPTS, "destinations": ["orthanc_ae"], "callback_url": f"http://127.0.0.1:{HOOKS}/hooks/auto"},
    {"name": "ct-from-orthanc", "modality": "CT", "series_description": "^pushed", "calling_ae": ["ORTHANC"]},
    {"name": "drop-the-rest", "action": "ignore"},
]


def test_namespace_is_private() -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links


# -- Orthanc ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("orthanc")
    config = {
        "Name": "msam-test", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "HttpPort": ORTHANC_HTTP, "DicomPort": ORTHANC_DICOM, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "DicomModalities": {"msam": ["MSAM", "127.0.0.1", LISTENER]},
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 1, "HttpThreadsCount": 8, "SaveJobs": False, "ConcurrentJobs": 2,
    }
    (tmp / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        serve.wait_until(lambda: httpx.get(f"{DICOMWEB}/studies", timeout=1).status_code == 200, 30, "Orthanc", proc)
        yield ORTHANC
    finally:
        serve.stop(proc)
        log.close()


def orthanc_store(paths: list[Path]) -> None:
    with httpx.Client(base_url=ORTHANC, timeout=30) as c:
        for p in paths:
            r = c.post("/instances", content=p.read_bytes())
            assert r.status_code == 200, r.text


def seg_series_referencing(series_uid: str) -> list[pydicom.Dataset]:
    """QIDO-RS for SEG series, then the SEG instances (WADO-RS) that reference ``series_uid``."""
    client = DICOMwebClient(DICOMWEB)
    found = []
    for s in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, series = s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]
        for ds in client.retrieve_series(study, series):
            if any(r.SeriesInstanceUID == series_uid for r in ds.ReferencedSeriesSequence):
                found.append(ds)
    return found


def msam_srs_referencing(seg_uid: str) -> list[pydicom.Dataset]:
    """QIDO-RS for SR series, then the SR instances whose evidence lists the SEG ``seg_uid``."""
    client = DICOMwebClient(DICOMWEB)
    found = []
    for s in client.search_for_series(search_filters={"Modality": "SR"}):
        for ds in client.retrieve_series(s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]):
            evidence = {str(i.ReferencedSOPInstanceUID) for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                        for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
            if seg_uid in evidence:
                found.append(ds)
    return found


# -- webhook receiver ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooks() -> Iterator[queue.Queue[tuple[str, dict[str, str], bytes]]]:
    got: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
    fail_first = {"/hooks/job": 1}  # the first delivery to /hooks/job gets a 503: retried

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if fail_first.get(self.path, 0) > 0:
                fail_first[self.path] -= 1
                self.send_response(503)
                self.end_headers()
                return
            got.put((self.path, dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", HOOKS), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield got
    server.shutdown()


def next_hook(got: queue.Queue[tuple[str, dict[str, str], bytes]], path: str, timeout: float = 60) -> tuple[dict[str, str], dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            p, headers, body = got.get(timeout=1)
        except queue.Empty:
            continue
        if p == path:
            assert webhooks.verify(SECRET, headers, body), "bad webhook signature"
            return headers, json.loads(body)
        got.put((p, headers, body))
        time.sleep(0.1)
    raise AssertionError(f"no webhook on {path} within {timeout} s")


# -- the service and the listener ------------------------------------------------------------
@pytest.fixture(scope="module")
def pacs_service(tmp_path_factory: pytest.TempPathFactory, redis_server: str, checkpoint: Path,
                 orthanc: str, hooks: Any) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("pacs-service")
    env = service_env(
        tmp, redis_server, checkpoint,
        MSAM_DICOMWEB_NODES=json.dumps({"orthanc": DICOMWEB}),
        MSAM_DICOM_AES=json.dumps({"orthanc_ae": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": ORTHANC_DICOM}}),
        MSAM_DICOM_LISTENER_PORT=str(LISTENER), MSAM_DICOM_IDLE_TIMEOUT_S="1.5",
        MSAM_DICOM_ROUTES=json.dumps(ROUTES), MSAM_DICOM_CALLING_AES=json.dumps(["ORTHANC", "STORESCU"]),
        MSAM_WEBHOOK_ALLOWLIST=f"http://127.0.0.1:{HOOKS}/hooks/", MSAM_WEBHOOK_SECRET=SECRET,
        MSAM_WEBHOOK_BACKOFF_S="0.5",
    )
    svc = Service(tmp=tmp, redis_url=redis_server, env=env)
    log = open(tmp / "listener.log", "wb")  # noqa: SIM115
    listener = subprocess.Popen([sys.executable, "-m", "msam_service.pacs.dimse_listener"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        svc.start_worker("w1")
        svc.start_io_worker("io1")
        svc.start_api()
        serve.wait_until(lambda: b"dicom-listener: AE MSAM" in (tmp / "listener.log").read_bytes(), 30,
                         "the DICOM listener", listener)
        env["MSAM_PUBLIC_URL"] = svc.api_url
        yield svc
    finally:
        serve.stop(listener)
        log.close()
        svc.stop()


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("series")


def ct(folder: Path, description: str, seed: int):
    return make_ct_series(folder / description.replace(" ", "_"), shape=(48, 40, 16), spacing=(1.2, 1.1, 2.5),
                          series_description=description, seed=seed)


# -- 1. DICOMweb: pull by WADO-RS, push by STOW-RS, signed webhook -----------------------------
def test_dicomweb_pull_stow_push_and_webhook(pacs_service: Service, orthanc: str, hooks: Any,
                                             series_dir: Path) -> None:
    series = ct(series_dir, "dicomweb CT", seed=1)
    orthanc_store(series.paths)
    with pacs_service.client() as c:
        r = c.post("/segment", json={
            "source": {"pacs": "orthanc", "study_uid": series.study_uid, "series_uid": series.series_uid},
            "prompts": PROMPTS, "destinations": ["orthanc"],
            "callback_url": f"http://127.0.0.1:{HOOKS}/hooks/job"})
        assert r.status_code == 202, r.text
        accepted = r.json()
    job = pacs_service.wait_job(accepted["job_id"], timeout=120)
    assert job["status"] == "succeeded", (job, pacs_service.logs())
    assert job["volume_id"] == accepted["volume_id"] and "dicom-seg" in job["results"]

    headers, payload = next_hook(hooks, "/hooks/job")  # the first attempt got a 503: this is a retry
    assert payload["job_id"] == accepted["job_id"] and payload["status"] == "succeeded"
    assert payload["destinations"] == {"orthanc": "stored"}, payload
    assert pacs_service.wait_job(accepted["job_id"])["destinations"] == {"orthanc": "stored"}
    assert payload["results"]["dicom-seg"].startswith("http://127.0.0.1:")
    assert payload["source"]["series_uid"] == series.series_uid
    assert headers[webhooks.SIGNATURE_HEADER].startswith("sha256=")

    segs = seg_series_referencing(series.series_uid)  # QIDO-RS Modality=SEG, then WADO-RS
    assert len(segs) == 1, segs
    seg = segs[0]
    assert seg.StudyInstanceUID == series.study_uid and seg.FrameOfReferenceUID == series.for_uid
    assert seg.SegmentSequence[0].SegmentLabel == "tumour"
    # the measurement SR went with the SEG (the default), its group referencing the SEG's segment
    from msam_core.io.sr import read_sr

    (sr,) = msam_srs_referencing(str(seg.SOPInstanceUID))
    sr.save_as(series_dir / "msam_sr.dcm", enforce_file_format=True)
    (group,) = read_sr(series_dir / "msam_sr.dcm")
    assert group.seg_instance_uid == seg.SOPInstanceUID and group.source_series_uid == series.series_uid
    assert group.values["volume_ml"] == pytest.approx(job["lesions"][0]["measurements"]["volume_ml"], abs=1e-3)

    with pacs_service.client() as c:  # a follow-up click on the retrieved volume: no new retrieve
        r = c.post("/segment", json={"volume_id": accepted["volume_id"], "prompts": PROMPTS})
        assert r.status_code == 202, r.text
    assert pacs_service.wait_job(r.json()["job_id"])["status"] == "succeeded"


# -- 1b. the radiologist's lines in the PACS (SR and GSPS) as the prompts -------------------
def test_lines_from_pacs_annotations_are_segmented_in_one_job(pacs_service: Service, orthanc: str,
                                                                series_dir: Path) -> None:
    import numpy as np

    from msam_core.io.dicom import read_series
    from tests.unit.io.annotation_synth import line_gsps, recist_sr

    series = ct(series_dir, "lines CT", seed=4)
    volume = read_series(series.paths)
    by_uid = {str(d.SOPInstanceUID): d for d in series.datasets}
    on = lambda k: by_uid[volume.meta["sop_instance_uids"][k]]  # noqa: E731 - the image of slice k
    sr_line = volume.voxel_to_ras(np.array([[18.0, 20.0, 8], [30.0, 20.0, 8]]))
    sr_mm = float(np.linalg.norm(sr_line[1] - sr_line[0]))
    gsps_line = volume.voxel_to_ras(np.array([[10.0, 10.0, 4], [16.0, 18.0, 4]]))
    gsps_mm = float(np.linalg.norm(gsps_line[1] - gsps_line[0]))
    objects = [recist_sr(on(8), [(18.5, 20.5), (30.5, 20.5)], round(sr_mm, 1), series_dir / "reader_sr.dcm",
                         images=series.datasets),
               line_gsps(on(4), [(10.5, 10.5), (16.5, 18.5)], series_dir / "reader_pr.dcm", images=series.datasets)]
    orthanc_store([*series.paths, *objects])
    with pacs_service.client() as c:
        r = c.post("/segment", json={
            "source": {"pacs": "orthanc", "study_uid": series.study_uid, "series_uid": series.series_uid},
            "lines_from_pacs": True, "destinations": ["orthanc"], "send": ["dicom-seg"]})
        assert r.status_code == 202, r.text
        r_bad = c.post("/segment", json={"volume_id": "0" * 32, "lines_from_pacs": True})
        assert r_bad.status_code == 422 and "DICOMweb source" in r_bad.text, r_bad.text
    job = pacs_service.wait_job(r.json()["job_id"], timeout=180)
    assert job["status"] == "succeeded", (job, pacs_service.logs())
    lines = [lesion["reference_line"] for lesion in job["lesions"]]
    assert [x["source"] for x in lines] == ["SR", "GSPS"]
    assert lines[0]["length_mm"] == pytest.approx(sr_mm, abs=0.01) and lines[1]["length_mm"] == pytest.approx(gsps_mm, abs=0.01)
    assert np.allclose(sorted([lines[0]["start_lps"], lines[0]["end_lps"]]),
                       sorted((sr_line * [-1, -1, 1]).tolist()), atol=0.01)
    for lesion in job["lesions"]:  # each lesion's measured long axis beside the line it was prompted with
        assert lesion["measurements"] is None or lesion["measurements"]["long_axis"]["length_mm"] > 0
    deadline = time.monotonic() + 60
    while (job := pacs_service.wait_job(r.json()["job_id"]))["delivery"] not in ("done", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["destinations"] == {"orthanc": "stored"}, job
    (seg,) = seg_series_referencing(series.series_uid)
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"SR line 1", "GSPS line 2"}
    assert msam_srs_referencing(str(seg.SOPInstanceUID)) == []  # send: ["dicom-seg"] - the SEG only

    with pacs_service.client() as c:  # a study without lines on that series: a failed job that says so
        other = ct(series_dir, "no lines CT", seed=5)
        orthanc_store(other.paths)
        r = c.post("/segment", json={"source": {"pacs": "orthanc", "study_uid": other.study_uid,
                                                "series_uid": other.series_uid}, "lines_from_pacs": True})
    job = pacs_service.wait_job(r.json()["job_id"], timeout=120)
    assert job["status"] == "failed" and "no line measurement" in job["error"]["message"], job


def test_missing_series_fails_the_job(pacs_service: Service, orthanc: str) -> None:
    with pacs_service.client() as c:
        r = c.post("/segment", json={"source": {"pacs": "orthanc", "study_uid": "1.2.3", "series_uid": "1.2.3.4"},
                                     "prompts": PROMPTS})
        assert r.status_code == 202, r.text
    job = pacs_service.wait_job(r.json()["job_id"])
    assert job["status"] == "failed" and job["error"]["code"] == "pacs_error", job
    assert "orthanc" in job["error"]["message"] and "not found" in job["error"]["message"]


# -- 2. a session: clicks write nothing; its commit stores the DICOM-SEG and calls the webhook --
def test_session_commit_sends_to_pacs_and_webhook(pacs_service: Service, orthanc: str, hooks: Any,
                                                  series_dir: Path) -> None:
    series = ct(series_dir, "session CT", seed=3)
    files = [("image", (f"IM{n}", p.read_bytes(), "application/dicom")) for n, p in enumerate(series.paths)]
    with pacs_service.client() as c:
        vol = c.post("/volumes", files=files).json()
        sid = c.post("/sessions", json={"volume_id": vol["volume_id"]}).json()["session_id"]
        c.post(f"/sessions/{sid}/lesions", json={"label": "session tumour"})
        for xyz, positive in (([24, 20, 8], True), ([30, 20, 8], False)):
            r = c.post(f"/sessions/{sid}/lesions/1/interactions", params={"wait": 60},
                       json={"kind": "point", "xyz": xyz, "positive": positive})
            assert r.status_code == 200, r.text
        assert not seg_series_referencing(series.series_uid)  # clicks send nothing
        r = c.post(f"/sessions/{sid}/commit", json={"destinations": ["orthanc"],
                                                      "callback_url": f"http://127.0.0.1:{HOOKS}/hooks/commit"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    job = pacs_service.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded" and {"dicom-seg", "rtstruct", "sr", "nifti", "png"} <= set(job["results"]), job
    assert job["lesions"][0]["measurements"]["long_axis"]["length_mm"] > 0 and job["attempts"] == 1, job
    _, payload = next_hook(hooks, "/hooks/commit")
    assert payload["job_id"] == job_id and payload["destinations"] == {"orthanc": "stored"}, payload
    segs = seg_series_referencing(series.series_uid)
    assert len(segs) == 1 and segs[0].SegmentSequence[0].SegmentLabel == "session tumour"


@pytest.mark.parametrize("body, status, code", [
    ({"source": {"pacs": "elsewhere", "study_uid": "1.2", "series_uid": "1.2.3"}}, 404, "unknown_node"),
    ({"source": {"pacs": "http://169.254.169.254/dicom-web", "study_uid": "1.2", "series_uid": "1.2.3"}}, 422, "unknown_node"),
    ({"source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3", "url": "http://x/"}}, 422, "invalid_request"),
    ({"source": {"pacs": "orthanc", "study_uid": "../../etc", "series_uid": "1.2.3"}}, 422, "invalid_request"),
    ({"source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3"}, "destinations": ["http://127.0.0.1:9/x"]}, 422, "unknown_node"),
    ({"source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3"}, "destinations": ["nowhere"]}, 404, "unknown_node"),
    ({"source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3"}, "callback_url": "http://127.0.0.1:8042/tools"}, 422, "callback_not_allowed"),
    ({"source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3"}, "callback_url": "http://x@127.0.0.1:8099/hooks/a"}, 422, "callback_not_allowed"),
    ({"source": {"received_series_uid": "1.2.3.4.5"}}, 404, "not_found"),
    ({"volume_id": "0" * 32, "source": {"received_series_uid": "1.2.3"}}, 422, "invalid_request"),
])
def test_requests_can_only_name_configured_nodes(pacs_service: Service, body: dict, status: int, code: str) -> None:
    with pacs_service.client() as c:
        r = c.post("/segment", json={**body, "prompts": PROMPTS})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def test_multipart_upload_checks_destinations_and_callback_first(pacs_service: Service, series_dir: Path) -> None:
    series = ct(series_dir, "upload CT", seed=5)
    with pacs_service.client() as c:
        for data, code in (({"destinations": '["http://127.0.0.1:8042/"]'}, "unknown_node"),
                           ({"callback_url": "http://127.0.0.1:8042/hooks/"}, "callback_not_allowed")):
            r = c.post("/segment", files=[("image", ("a.dcm", series.paths[0].read_bytes()))],
                       data={"prompts": json.dumps(PROMPTS), **data})
            assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


# -- 2. DIMSE: Orthanc pushes to the listener; the API references the received series ---------
def test_orthanc_pushes_to_listener_then_segment_received_series(pacs_service: Service, orthanc: str,
                                                                 series_dir: Path) -> None:
    series = ct(series_dir, "pushed CT", seed=2)
    orthanc_store(series.paths)
    with httpx.Client(base_url=ORTHANC, timeout=60) as c:
        found = c.post("/tools/lookup", content=series.series_uid).json()
        orthanc_id = next(x["ID"] for x in found if x["Type"] == "Series")
        r = c.post("/modalities/msam/store", json={"Resources": [orthanc_id], "Synchronous": True})
        assert r.status_code == 200, r.text  # C-STORE from AE ORTHANC to AE MSAM
    body = {"source": {"received_series_uid": series.series_uid}, "prompts": PROMPTS, "destinations": ["orthanc_ae"]}
    deadline = time.monotonic() + 30
    with pacs_service.client() as c:
        while (r := c.post("/segment", json=body)).status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.3)  # complete after 1.5 s without new instances
        assert r.status_code == 202, (r.text, pacs_service.logs())
    job = pacs_service.wait_job(r.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", (job, pacs_service.logs())
    deadline = time.monotonic() + 60  # the I/O worker sends the SEG and the SR after the job's status is final
    with pacs_service.client() as c:
        while (job := c.get(f"/jobs/{job['job_id']}").json())["delivery"] not in ("done", "failed") \
                and time.monotonic() < deadline:
            time.sleep(0.2)
    assert job["destinations"] == {"orthanc_ae": "stored"}, job
    segs = seg_series_referencing(series.series_uid)
    assert len(segs) == 1 and segs[0].Modality == "SEG"


# -- 3. storescu to the listener: routing rules queue one series, drop another -----------------
def test_storescu_routing_rules_auto_job_and_dropped_series(pacs_service: Service, orthanc: str, hooks: Any,
                                                            series_dir: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (make tools)")
    dropped = ct(series_dir, "scout CT", seed=3)
    auto = ct(series_dir, "auto CT", seed=4)
    for s in (dropped, auto):  # -aet STORESCU: the calling AE the "auto" rule asks for
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "MSAM", "127.0.0.1", str(LISTENER),
                        *map(str, s.paths)], check=True, capture_output=True, timeout=60)
    intruder = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "MSAM", "127.0.0.1", str(LISTENER),
                               str(auto.paths[0])], capture_output=True, text=True, timeout=60)
    assert intruder.returncode != 0 and "reject" in (intruder.stdout + intruder.stderr).lower(), intruder
    _, payload = next_hook(hooks, "/hooks/auto", timeout=120)
    assert payload["status"] == "succeeded", (payload, pacs_service.logs())
    assert payload["source"] == {"received_series_uid": auto.series_uid}
    assert payload["destinations"] == {"orthanc_ae": "stored"}
    assert len(seg_series_referencing(auto.series_uid)) == 1
    with pacs_service.client() as c:  # the scout series matched "drop-the-rest": nothing to reference
        r = c.post("/segment", json={"source": {"received_series_uid": dropped.series_uid}, "prompts": PROMPTS})
        assert r.status_code == 404, r.text
    log = (pacs_service.tmp / "listener.log").read_text()
    assert "ignored by rule 'drop-the-rest'" in log
    for phi in ("Synthetic", "synthetic", "scout", "auto CT", "pushed CT"):  # no header text in the logs
        assert phi not in log, phi
