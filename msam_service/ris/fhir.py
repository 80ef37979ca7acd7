"""A finished job as FHIR resources: one DiagnosticReport and one Observation per lesion.

Built with the fhir.resources models (``R4B``, whose DiagnosticReport, Observation and Bundle
use only elements that R4 4.0.1 has too): every resource is validated as it is constructed, so
a malformed one raises here, not at the receiver.

- **Observation** per lesion: ``code`` DCM 125007 "Measurement Group" with the lesion's name as
  text, ``bodySite`` absent (msam does not know it), one ``component`` per measurement that
  :data:`CODES` knows: SNOMED CT concept + UCUM unit. :func:`components` is the one function that
  maps a lesion's measurement dict to components; a measurement it has no code for is left out.
- **DiagnosticReport**: LOINC 18748-4 "Diagnostic imaging study", category RAD (v2-0074),
  ``identifier`` the job (``urn:msam:job``) and, when the order had one, the accession number
  (type ACSN), ``result`` the Observations, ``conclusion`` one line per lesion.
- :func:`bundle`: a ``collection`` Bundle (``GET /jobs/{id}/result?format=fhir``) or a
  ``transaction`` Bundle of conditional creates (``ifNoneExist`` on the job's identifier) for a
  FHIR server, so a resent transaction creates nothing twice.
"""

from __future__ import annotations

import uuid
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from msam_service.jobs import JobRecord

SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
JOB_SYSTEM = "urn:msam:job"
#: measurement name -> (SNOMED CT code, display, UCUM unit)
CODES: dict[str, tuple[str, str, str]] = {
    "volume_ml": ("118565006", "Volume", "mL"),
    "long_axis_mm": ("103339001", "Long axis", "mm"),
    "short_axis_mm": ("103340004", "Short axis", "mm"),
}


def _urn(job_id: str, what: str) -> str:
    """A stable ``urn:uuid`` per job and resource (the same on every call)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'msam:{job_id}:{what}')}"


def components(measurements: dict[str, float]) -> list[dict[str, Any]]:
    """A lesion's measurements (name -> value, see :mod:`msam_service.ris.measurements`) as
    Observation components, in :data:`CODES`' order; names without a code are skipped."""
    out = []
    for name, (code, display, unit) in CODES.items():
        if name in measurements:
            out.append({"code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
                        "valueQuantity": {"value": round(float(measurements[name]), 4), "unit": unit,
                                          "system": UCUM, "code": unit}})
    return out


def observation(rec: JobRecord, lesion: dict[str, Any], issued: str) -> Observation:
    return Observation.model_validate({
        "resourceType": "Observation",
        "identifier": [{"system": JOB_SYSTEM, "value": f"{rec.job_id}/lesion/{lesion['lesion']}"}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": [{"system": DCM, "code": "125007", "display": "Measurement Group"}],
                 "text": f"{lesion['label']} (lesion {lesion['lesion']})"},
        "issued": issued,
        "method": {"text": "msam promptable 3D segmentation"},
        "component": components(lesion["measurements"]),
    })


def _summary(lesion: dict[str, Any]) -> str:
    parts = [f"{CODES[n][1].lower()} {v:g} {CODES[n][2]}" for n, v in lesion["measurements"].items() if n in CODES]
    return f"{lesion['label']}: {', '.join(parts) if parts else 'segmented'}"


def report(rec: JobRecord, lesions: list[dict[str, Any]], results_url: str = "") -> tuple[DiagnosticReport, list[Observation]]:
    """The DiagnosticReport of a succeeded job and its Observations (not yet in a Bundle)."""
    issued = _instant(rec.finished_at or rec.created_at)
    observations = [observation(rec, lesion, issued) for lesion in lesions]
    identifiers: list[dict[str, Any]] = [{"system": JOB_SYSTEM, "value": rec.job_id}]
    source, order = rec.request.source, rec.request.order or {}
    accession = (source.accession_number if source is not None else None) or order.get("accession_number")
    if accession:
        identifiers.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "ACSN"}]}, "value": accession})
    doc: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "issued": issued,
        "result": [{"reference": _urn(rec.job_id, f"lesion/{lesion['lesion']}")} for lesion in lesions],
        "conclusion": "; ".join(_summary(lesion) for lesion in lesions),
    }
    if results_url:
        doc["presentedForm"] = [{"contentType": "application/dicom", "url": results_url,
                                 "title": "DICOM Segmentation (SEG)"}]
    return DiagnosticReport.model_validate(doc), observations


def bundle(rec: JobRecord, lesions: list[dict[str, Any]], *, transaction: bool = False,
           results_url: str = "") -> Bundle:
    """The report and its Observations in one Bundle (``collection``, or ``transaction`` of
    conditional creates keyed on the job's identifiers)."""
    dr, observations = report(rec, lesions, results_url)
    entries: list[dict[str, Any]] = []
    for lesion, obs in zip(lesions, observations):
        entry: dict[str, Any] = {"fullUrl": _urn(rec.job_id, f"lesion/{lesion['lesion']}"),
                                 "resource": obs.model_dump(mode="json", exclude_none=True)}
        if transaction:
            entry["request"] = {"method": "POST", "url": "Observation",
                                "ifNoneExist": f"identifier={JOB_SYSTEM}|{rec.job_id}/lesion/{lesion['lesion']}"}
        entries.append(entry)
    report_entry: dict[str, Any] = {"fullUrl": _urn(rec.job_id, "report"),
                                    "resource": dr.model_dump(mode="json", exclude_none=True)}
    if transaction:
        report_entry["request"] = {"method": "POST", "url": "DiagnosticReport",
                                   "ifNoneExist": f"identifier={JOB_SYSTEM}|{rec.job_id}"}
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction" if transaction else "collection",
                                  "timestamp": _instant(rec.finished_at or rec.created_at),
                                  "entry": [report_entry, *entries]})


def _instant(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat(timespec="seconds")
