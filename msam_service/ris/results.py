"""A finished job's RIS outputs, assembled from its record and its volume's geometry: the FHIR
Bundle (``GET /jobs/{id}/result?format=fhir`` and the FHIR send) and the lesion list the HL7
ORU^R01 reports. Shared by the API and the I/O worker."""

from __future__ import annotations

from typing import Any

from msam_service.jobs import JobRecord
from msam_service.ris import fhir
from msam_service.ris.measurements import lesion_measurements
from msam_service.storage import Storage
from msam_service.volumes import load_info


def lesions_of(rec: JobRecord, storage: Storage) -> list[dict[str, Any]]:
    return lesion_measurements(rec, load_info(storage, rec.volume_id))


def seg_url(rec: JobRecord, base: str) -> str:
    return f"{base.rstrip('/')}/jobs/{rec.job_id}/result?format=dicom-seg" if "dicom-seg" in rec.results and base else ""


def fhir_bundle(rec: JobRecord, storage: Storage, base: str, transaction: bool = False) -> dict[str, Any]:
    """The job's DiagnosticReport and Observations as a Bundle (JSON-ready dict)."""
    out = fhir.bundle(rec, lesions_of(rec, storage), transaction=transaction, results_url=seg_url(rec, base))
    return out.model_dump(mode="json", exclude_none=True)
