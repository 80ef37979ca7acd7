"""The contract between gateway and workers (msam_service.contract) as the job hash stores it: a
request round-trips, a record written before the typed contract reads, a field this version
does not know survives reading and writing back, and the delivery state reads as typed fields."""

from __future__ import annotations

import dataclasses
import json

from msam_service import jobs
from msam_service.contract import JobRequest, JobSource, SessionLesion, SessionSnapshot
from msam_service.jobs import JobStore

PROMPTS = {"space": "voxel", "iterations": 1,
           "lesions": [{"positive": [[20.0, 20.0, 12.0]], "negative": [], "box": None, "line": None,
                        "label": "liver met", "mask": {"volume_id": "c" * 32, "upload": None, "label": 2}}]}


def test_every_field_round_trips_through_the_job_hash(r) -> None:
    request = JobRequest(
        prompts=PROMPTS, lines_from_pacs=True,  # type: ignore[arg-type]
        session=SessionSnapshot("s" * 32, [SessionLesion(1, "i" * 32, "a"), SessionLesion(3, "j" * 32)]),
        source=JobSource(pacs="orthanc", study_uid="1.2.3", series_uid="1.2.3.4", accession_number="ACC-1",
                         selected_by="series rules"),
        order={"control_id": "C1", "accession_number": "ACC-1", "patient_id": "P1^^^H^MR"},
        destinations=["orthanc", "ae"], send=["dicom-seg"], ris="ris", fhir="fhir",
        callback_url="https://hooks.example/x", base_url="https://msam.example", own_volume=True,
        mask_volumes=["d" * 32])
    assert JobRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    store = JobStore(r, ttl_s=60)
    store.create("a" * 32, tenant="t", volume_id="v" * 32, request=request)
    rec = store.get("a" * 32)
    assert rec is not None and rec.request == request
    assert JobRequest.from_json({}) == JobRequest() and JobRequest().to_json() == {}


def test_a_record_written_before_the_typed_contract_reads(r) -> None:
    """Hashes exactly as the gateway, the listeners and the I/O worker wrote them before: a PACS
    job (JSON request) already delivered, a multipart upload, a session commit, an HL7 order."""
    pacs_request = {"destinations": ["orthanc"], "send": ["dicom-seg", "sr"], "callback_url": "https://hooks.example/x",
                    "base_url": "https://msam.example",
                    "source": {"pacs": "orthanc", "selected_by": "series rules", "accession_number": "ACC-1",
                               "study_uid": "1.2.3", "series_uid": "1.2.3.4"},
                    "prompts": PROMPTS}
    r.hset(jobs.job_key("a" * 32), mapping={
        "status": "succeeded", "tenant": "t", "volume_id": "v" * 32, "created_at": "1700000000.5",
        "stage": "done", "request": json.dumps({"prompts": PROMPTS, **pacs_request}),
        "results": json.dumps(["dicom-seg", "nifti"]),
        "destinations_status": json.dumps({"orthanc": "stored", "ris:ris": "retrying: refused"}),
        "delivery": "pending"})
    rec = JobStore(r, ttl_s=60).get("a" * 32)
    assert rec is not None
    assert rec.request.destinations == ["orthanc"] and rec.request.sends("sr") and rec.request.needs_delivery
    assert rec.request.source == JobSource(pacs="orthanc", study_uid="1.2.3", series_uid="1.2.3.4",
                                           accession_number="ACC-1", selected_by="series rules")
    assert rec.request.source.in_archive and rec.request.source.to_json() == pacs_request["source"]
    assert rec.request.prompts == PROMPTS and rec.request.callback_url == "https://hooks.example/x"
    assert rec.request.base(None) == "https://msam.example" and rec.request.extra == {}
    assert rec.destinations_status == {"orthanc": "stored", "ris:ris": "retrying: refused"}
    assert rec.delivery == jobs.DELIVERY_PENDING
    assert rec.request.to_json() == {"prompts": PROMPTS, **pacs_request}  # and writes back the same

    r.hset(jobs.job_key("b" * 32), mapping={"status": "queued", "tenant": "t", "volume_id": "v" * 32,
                                            "created_at": "1.0", "stage": "queued",
                                            "request": json.dumps({"prompts": PROMPTS, "own_volume": True,
                                                                   "mask_volumes": ["d" * 32]})})
    rec = JobStore(r, ttl_s=60).get("b" * 32)
    assert rec is not None and rec.request.own_volume and rec.request.mask_volumes == ["d" * 32]
    assert not rec.request.needs_delivery and rec.destinations_status == {} and rec.delivery == ""
    assert rec.request.base("https://public.example") == "https://public.example"

    session = {"session_id": "s" * 32, "lesions": [{"lesion": 2, "mask": "i" * 32, "label": None}]}
    r.hset(jobs.job_key("c" * 32), mapping={"status": "queued", "request": json.dumps({"session": session})})
    rec = JobStore(r, ttl_s=60).get("c" * 32)
    assert rec is not None and rec.request.session == SessionSnapshot("s" * 32, [SessionLesion(2, "i" * 32)])
    assert rec.request.prompts is None and rec.request.to_json() == {"session": session}

    order = {"message_type": "OMI^O23", "control_id": "C1", "sending_application": "RIS", "sending_facility": "H",
             "accession_number": "ACC-2", "placer_order": "", "filler_order": "", "universal_service": "",
             "patient_id": "P1", "patient_name": "DOE^J"}
    hl7_request = {"lines_from_pacs": True, "ris": "ris", "order": order,
                   "source": {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.5",
                              "accession_number": "ACC-2", "selected_by": "series rules"}}
    r.hset(jobs.job_key("d" * 32), mapping={"status": "queued", "request": json.dumps(hl7_request)})
    rec = JobStore(r, ttl_s=60).get("d" * 32)
    assert rec is not None and rec.request.wants_lines and rec.request.order == order
    assert rec.request.ris == "ris" and rec.request.needs_delivery and not rec.request.destinations
    assert rec.request.to_json() == hl7_request


def test_fields_this_version_does_not_know_are_kept(r) -> None:
    stored = {"prompts": PROMPTS, "priority": "urgent", "labels": {"study": "x"},
              "source": {"received_series_uid": "1.2.3", "received_at": 12.5}}
    r.hset(jobs.job_key("a" * 32), mapping={"status": "queued", "request": json.dumps(stored)})
    store = JobStore(r, ttl_s=60)
    rec = store.get("a" * 32)
    assert rec is not None
    assert rec.request.extra == {"priority": "urgent", "labels": {"study": "x"}}
    assert rec.request.source == JobSource(received_series_uid="1.2.3", extra={"received_at": 12.5})
    assert rec.request.source is not None and not rec.request.source.in_archive
    lines = {"space": "LPS", "lesions": [{"line": [[0, 0, 0], [1, 0, 0]], "line_source": "SR"}], "iterations": 1}
    store.update("a" * 32, request=dataclasses.replace(rec.request, prompts=lines))  # as the I/O worker does
    assert json.loads(r.hget(jobs.job_key("a" * 32), "request")) == {**stored, "prompts": lines}


def test_the_delivery_state_is_written_and_read_through_the_store(r) -> None:
    store = JobStore(r, ttl_s=60)
    store.create("a" * 32, tenant="t", volume_id="v" * 32,
                 request=JobRequest(prompts=PROMPTS, destinations=["orthanc"], send=["dicom-seg", "sr"],  # type: ignore[arg-type]
                                    base_url="https://msam.example"))
    rec = store.get("a" * 32)
    assert rec is not None and rec.destinations_status == {} and rec.delivery == ""
    store.set_delivery("a" * 32, {"orthanc": "sending"}, jobs.DELIVERY_PENDING)
    # the encodings of the hash fields are the ones records always had
    assert json.loads(r.hget(jobs.job_key("a" * 32), "destinations_status")) == {"orthanc": "sending"}
    assert r.hget(jobs.job_key("a" * 32), "delivery") == b"pending"
    assert json.loads(r.hget(jobs.job_key("a" * 32), "request")) == {
        "prompts": PROMPTS, "destinations": ["orthanc"], "send": ["dicom-seg", "sr"], "base_url": "https://msam.example"}
    store.set_delivery("a" * 32, {"orthanc": "stored"}, jobs.DELIVERY_DONE)
    rec = store.get("a" * 32)
    assert rec is not None and rec.destinations_status == {"orthanc": "stored"} and rec.delivery == "done"


def test_what_a_request_asks_for() -> None:
    assert JobRequest().sends("sr") and JobRequest().sends("dicom-seg")
    assert not JobRequest(send=["dicom-seg"]).sends("sr")
    assert not JobRequest(base_url="https://x").needs_delivery
    assert all(JobRequest(**{name: value}).needs_delivery  # type: ignore[arg-type]
               for name, value in (("destinations", ["a"]), ("callback_url", "https://x"), ("ris", "r"),
                                   ("fhir", "f")))
    assert JobRequest(lines_from_pacs=True, prompts={"space": "LPS", "lesions": [], "iterations": 1}).wants_lines
    assert not JobRequest(lines_from_pacs=True, prompts=PROMPTS).wants_lines  # type: ignore[arg-type]
    assert not JobRequest(prompts={"lesions": []}).wants_lines
