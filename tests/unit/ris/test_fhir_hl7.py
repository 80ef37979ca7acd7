"""The RIS outputs on plain job records: FHIR resources validated by fhir.resources, HL7 v2 messages
built and parsed back by hl7apy, measurement mapping, and order parsing with its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message

from msam_service.contract import JobRequest
from msam_service.jobs import JobRecord
from msam_service.ris import fhir, hl7
from msam_service.ris.measurements import lesion_measurements, voxel_volume_mm3
from msam_service.volumes import VolumeInfo

PROMPTS = {"space": "voxel", "lesions": [{"positive": [[1, 2, 3]], "label": "liver met"}, {"positive": [[4, 5, 6]]}]}


def record(**request: object) -> JobRecord:
    return JobRecord(job_id="a" * 32, status="succeeded", tenant="t", volume_id="b" * 32, created_at=1.7e9,
                     finished_at=1.7e9 + 5, request=JobRequest.from_json({"prompts": PROMPTS, **request}),
                     lesions=[{"lesion": 1, "voxels": 1000}, {"lesion": 2, "voxels": 10,
                                                              "measurements": {"long_axis_mm": 12.5, "short_axis_mm": 7.0}}])


def info(affine: list[list[float]]) -> VolumeInfo:
    return VolumeInfo(volume_id="b" * 32, format="dicom", shape=[10, 10, 10], spacing=[1, 1, 1], affine_ras=affine,
                      modality="CT", series_instance_uid=None, input_key="")


def test_volume_uses_the_affine_also_when_flipped_and_oblique() -> None:
    flipped = [[-0.8, 0, 0, 5], [0, 0.7, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]]
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = (np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ np.diag([0.8, 0.7, 2.5, 1])).tolist()
    assert voxel_volume_mm3(info(flipped)) == pytest.approx(1.4)
    assert voxel_volume_mm3(info(oblique)) == pytest.approx(1.4)
    lesions = lesion_measurements(record(), info(flipped))
    assert lesions[0] == {"lesion": 1, "label": "liver met", "measurements": {"volume_ml": 1.4}}
    assert lesions[1]["label"] == "lesion 2"
    assert lesions[1]["measurements"] == {"volume_ml": 0.014, "long_axis_mm": 12.5, "short_axis_mm": 7.0}


def test_components_map_known_measurements_with_snomed_and_ucum() -> None:
    got = fhir.components({"short_axis_mm": 7.0, "volume_ml": 1.5, "feret_mm": 3.0})
    assert [(x["code"]["coding"][0]["code"], x["valueQuantity"]["code"]) for x in got] == \
        [("118565006", "mL"), ("103340004", "mm")]  # CODES order; unknown names left out
    assert all(x["valueQuantity"]["system"] == "http://unitsofmeasure.org" for x in got)


def test_fhir_bundle_validates_and_links_report_and_observations() -> None:
    rec = record(source={"accession_number": "ACC9"})
    lesions = lesion_measurements(rec, info(np.diag([1.0, 1.0, 2.0, 1.0]).tolist()))
    collection = Bundle.model_validate(fhir.bundle(rec, lesions).model_dump(mode="json"))
    report = collection.entry[0].resource
    assert [r.reference for r in report.result] == [e.fullUrl for e in collection.entry[1:]]
    assert report.conclusion == "liver met: volume 2 mL; lesion 2: volume 0.02 mL, long axis 12.5 mm, short axis 7 mm"
    assert {i.value for i in report.identifier} == {"a" * 32, "ACC9"}
    second = collection.entry[2].resource
    assert [c.code.coding[0].code for c in second.component] == ["118565006", "103339001", "103340004"]
    again = fhir.bundle(rec, lesions)
    assert [e.fullUrl for e in again.entry] == [e.fullUrl for e in collection.entry]  # stable ids
    tx = fhir.bundle(rec, lesions, transaction=True)
    assert tx.type == "transaction" and tx.entry[1].request.ifNoneExist == f"identifier=urn:msam:job|{'a' * 32}/lesion/1"


ORDER = "\r".join([
    "MSH|^~\\&|RIS|HOSP|MSAM|MSAM|20261206120000||OMI^O23^OMI_O23|C1|P|2.5",
    "PID|1||P1^^^H^MR||Doe^Jane",
    "ORC|NW|PO1|FO1",
    "TQ1|1",
    "OBR|1|PO1|FO1|CTCHEST^CT chest",
    "IPC|ACC-OMI|REQ1|1.2.3|SPS1|CT",
    'NTE|1||MSAM-PROMPTS {"lesions":[{"positive":[[1,2,3]],"label":"a \\T\\ b"}]}',
]) + "\r"


def test_omi_order_parsed_with_accession_from_ipc_and_prompts_from_the_note() -> None:
    o = hl7.parse_order(ORDER)
    assert (o.message_type, o.control_id, o.accession_number, o.placer_order, o.filler_order) == \
        ("OMI^O23", "C1", "ACC-OMI", "PO1", "FO1")
    assert o.prompts == {"lesions": [{"positive": [[1, 2, 3]], "label": "a & b"}]}
    assert "prompts" not in o.to_record() and o.to_record()["patient_id"] == "P1^^^H^MR"


TWO_ORDERS = ORDER.replace("IPC|ACC-OMI|REQ1|1.2.3|SPS1|CT\r", "IPC|ACC-OMI|REQ1|1.2.3|SPS1|CT\rORC|NW|PO2|FO2\r"
                                                                "OBR|2|PO2|FO2|CTABD^CT abdomen\r")


@pytest.mark.parametrize("text, code", [
    ("garbage", "AR"),
    (ORDER.replace("|C1|P|", "||P|"), "AR"),  # no control id: its ACK could not be matched, a resend not recognised
    (TWO_ORDERS, "AR"),
    (ORDER.replace("OMI^O23^OMI_O23", "ADT^A01"), "AR"),
    (ORDER.replace("IPC|ACC-OMI", "IPC|"), "AE"),
    (ORDER.replace('{"lesions"', '{lesions'), "AE"),
])
def test_orders_msam_cannot_take(text: str, code: str) -> None:
    with pytest.raises(hl7.OrderError) as exc:
        hl7.parse_order(text)
    assert exc.value.code == code


def test_ack_and_oru_parse_back() -> None:
    a = parse_message(hl7.ack(ORDER, "AE", "2 series | fit").to_er7(), find_groups=False)
    assert a.msa.msa_1.to_er7() == "AE" and a.msa.msa_2.to_er7() == "C1" and a.msh.msh_9.to_er7() == "ACK^O23^ACK"
    assert a.msh.msh_18.to_er7() == "UNICODE UTF-8"
    uuid_id = "6f1c2e0a-8b7d-4c3e-9a1f-2d5e7b9c0a11"  # control ids longer than v2.5's 20 characters are whole
    assert parse_message(hl7.ack(ORDER.replace("|C1|", f"|{uuid_id}|"), "AA").to_er7(),
                         find_groups=False).msa.msa_2.to_er7() == uuid_id
    assert hl7._unescape(a.err.err_8.to_er7()) == "2 series | fit"
    rec = record(order=hl7.parse_order(ORDER).to_record())
    lesions = lesion_measurements(rec, info(np.eye(4).tolist()))
    message = hl7.oru(rec, lesions, "http://msam/jobs/x/result?format=dicom-seg", "1.2.826.0.1.1")
    assert message.validate() and message.msh.msh_18.to_er7() == "UNICODE UTF-8"
    back = parse_message(message.to_er7(), find_groups=True)
    group = back.oru_r01_patient_result.oru_r01_order_observation
    assert group.obr.obr_18.to_er7() == "ACC-OMI" and group.obr.obr_25.to_er7() == "F"
    rows = [(o.obx.obx_2.to_er7(), o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_4.to_er7(), o.obx.obx_5.to_er7())
            for o in group.oru_r01_observation]
    assert rows[:3] == [("ST", "125007", "1", "liver met"), ("NM", "118565006", "1", "1"), ("ST", "125007", "2", "lesion 2")]
    assert ("NM", "103339001", "2", "12.5") in rows and rows[-1] == ("ST", "SEG_UID", "", "1.2.826.0.1.1")
    failed = JobRecord(job_id="c" * 32, status="failed", tenant="t", volume_id="b" * 32, created_at=1.0,
                       request=JobRequest(order=rec.request.order), error={"code": "pacs_error", "message": "gone"})
    back = parse_message(hl7.oru(failed, []).to_er7(), find_groups=True)
    group = back.oru_r01_patient_result.oru_r01_order_observation
    assert group.obr.obr_25.to_er7() == "X" and "gone" in group.nte.nte_3.to_er7()
    assert json.loads(json.dumps(rec.request.order))  # what the job record keeps is plain JSON


def test_the_measurements_a_job_reports_reach_the_oru_and_fhir() -> None:
    """The job's lesions[].measurements as the worker writes them (msam_core.measure: nested axes)
    become long and short axis OBX / Observation components; the ORU references the SR."""
    from msam_core.io.volume import Volume
    from msam_core.measure import measure_lesion

    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    grid = np.indices((40, 40, 12)).astype(float)
    mask = ((grid[0] - 20) / 12) ** 2 + ((grid[1] - 20) / 6) ** 2 + ((grid[2] - 6) / 3) ** 2 <= 1
    measured = measure_lesion(mask, Volume(np.zeros(mask.shape, np.float32), affine)).to_json()
    rec = JobRecord(job_id="d" * 32, status="succeeded", tenant="t", volume_id="b" * 32, created_at=1.0,
                    finished_at=2.0, request=JobRequest(prompts=PROMPTS),
                    lesions=[{"lesion": 1, "voxels": int(mask.sum()), "measurements": measured}])
    (lesion,) = lesion_measurements(rec, info(affine.tolist()))
    m = lesion["measurements"]
    assert m["long_axis_mm"] == measured["long_axis"]["length_mm"] and m["short_axis_mm"] == measured["short_axis"]["length_mm"]
    assert m["max_diameter_3d_mm"] == measured["max_diameter_3d"]["length_mm"]
    assert m["volume_ml"] == pytest.approx(mask.sum() * 0.8 * 0.7 * 2.5 / 1000, abs=1e-3)
    back = parse_message(hl7.oru(rec, [lesion], "", "1.2.3", "1.2.4").to_er7(), find_groups=True)
    rows = {(o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_4.to_er7()): o.obx.obx_5.to_er7()
            for o in back.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation}
    assert float(rows[("103339001", "1")]) == pytest.approx(measured["long_axis"]["length_mm"])
    assert float(rows[("103340004", "1")]) == pytest.approx(measured["short_axis"]["length_mm"])
    assert rows[("SEG_UID", "")] == "1.2.3" and rows[("SR_UID", "")] == "1.2.4"
    codes = [c["code"]["coding"][0]["code"] for c in fhir.components(m)]
    assert codes == ["118565006", "103339001", "103340004"]


LATIN = ORDER.replace("Doe^Jane", "M\u00fcller^J\u00fcrgen")


@pytest.mark.parametrize("data, name", [
    (LATIN.replace("|P|2.5", "|P|2.5||||||8859/1").encode("iso8859-1"), "Müller^Jürgen"),  # as MSH-18 says
    (LATIN.encode("iso8859-1"), "Müller^Jürgen"),  # no MSH-18 and not UTF-8: ISO 8859-1
    (LATIN.encode("utf-8"), "Müller^Jürgen"),  # no MSH-18: UTF-8 when it is
    (LATIN.replace("|P|2.5", "|P|2.5||||||UNICODE UTF-8").encode("utf-8"), "Müller^Jürgen"),
    (ORDER.replace("|P|2.5", "|P|2.5||||||ASCII").encode("ascii"), "Doe^Jane"),
])
def test_orders_are_read_in_their_character_set(data: bytes, name: str) -> None:
    assert hl7.parse_order(hl7.decode(data)).patient_name == name


@pytest.mark.parametrize("data, says", [
    (LATIN.replace("|P|2.5", "|P|2.5||||||ISO IR87").encode("iso8859-1"), "ISO IR87"),
    (LATIN.replace("|P|2.5", "|P|2.5||||||UNICODE UTF-8").encode("iso8859-1"), "not valid UNICODE UTF-8"),
])
def test_a_character_set_msam_cannot_read_is_rejected(data: bytes, says: str) -> None:
    with pytest.raises(hl7.OrderError, match=says) as exc:
        hl7.decode(data)
    assert exc.value.code == "AR"
