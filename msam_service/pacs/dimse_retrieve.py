"""Retrieval from archives that speak DIMSE only (pynetdicom), configured per AE
(``MSAM_PACS_NODE_OPTIONS``, ``retrieve``):

- **C-GET** (:func:`c_get`): one association; the archive sends the series' instances back over
  it by C-STORE (we take the SCP role for the storage classes offered) and each is written to a
  file as it arrives, counted against ``MSAM_DICOM_MAX_INSTANCES``.
- **C-MOVE** (:func:`c_move`): the archive opens its own association to the move destination,
  msam's ``dicom-listener`` (its AE title must be configured in the archive). Before the request,
  the series is announced to the listener (:func:`msam_service.pacs.received.expect`), which then
  stores it under the job's reserved volume id instead of routing it; :func:`c_move` returns when
  the archive reports the move complete, and the caller waits for the volume.

Study Root, SERIES level. Nothing from the datasets is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage, MRImageStorage,
    PositronEmissionTomographyImageStorage, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove)

from msam_service.pacs.nodes import DimseNode, PacsError

logger = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug output describes datasets

#: the image storage classes msam segments: offered for C-GET's C-STORE sub-operations
IMAGE_STORAGE = (CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage,
                 PositronEmissionTomographyImageStorage)
#: C-GET / C-MOVE statuses: pending, success, warning (some sub-operations failed)
PENDING = (0xFF00, 0xFF01)
SUCCESS, WARNING = 0x0000, 0xB000


def _query(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _final(node: DimseNode, op: str, responses: Any) -> tuple[int, int]:
    """Drain the responses; returns (completed, failed) sub-operations or raises PacsError."""
    status_code, completed, failed = None, 0, 0
    for status, _identifier in responses:
        code = getattr(status, "Status", None)
        if code is None:
            raise PacsError(f"{op} from {node.name}: no response (timeout or aborted association)")
        status_code = code
        completed = int(getattr(status, "NumberOfCompletedSuboperations", completed) or completed)
        failed = int(getattr(status, "NumberOfFailedSuboperations", failed) or failed)
        if code in PENDING:
            continue
        if code not in (SUCCESS, WARNING):
            raise PacsError(f"{op} from {node.name}: refused with status 0x{code:04X}")
    if status_code is None:
        raise PacsError(f"{op} from {node.name}: no final response")
    return completed, failed


def c_get(node: DimseNode, study_uid: str, series_uid: str, folder: Path, *, calling_ae: str = "MSAM",
          max_instances: int = 5000, timeout: float = 60.0) -> list[Path]:
    """C-GET the series into ``folder`` (``000000.dcm``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    overflow = False

    def on_store(event: Any) -> int:
        nonlocal overflow
        if len(paths) >= max_instances:
            overflow = True
            return 0xA700  # out of resources: the archive stops sending
        path = folder / f"{len(paths):06d}.dcm"
        with open(path, "wb") as f:
            f.write(event.encoded_dataset())
        paths.append(path)
        return SUCCESS

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in IMAGE_STORAGE:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in IMAGE_STORAGE]
    target = node.ae
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise PacsError(f"C-GET from {node.name}: association refused or not reachable")
    try:
        completed, failed = _final(node, "C-GET", assoc.send_c_get(_query(study_uid, series_uid),
                                                                   StudyRootQueryRetrieveInformationModelGet))
    finally:
        if assoc.is_established:
            assoc.release()
    if overflow:
        raise PacsError(f"the series on {node.name} has more than {max_instances} instances (MSAM_DICOM_MAX_INSTANCES)")
    if not paths:
        raise PacsError(f"series not found on {node.name} (C-GET returned no instance)", permanent=True)
    if failed:
        raise PacsError(f"C-GET from {node.name}: {failed} instance(s) were not sent")
    logger.info("retrieved %d instance(s) from %s by C-GET", len(paths), node.name)
    return paths


def c_move(node: DimseNode, study_uid: str, series_uid: str, *, calling_ae: str = "MSAM",
           timeout: float = 60.0) -> int:
    """C-MOVE the series to ``node.move_destination``; returns the number of instances moved."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    target = node.ae
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise PacsError(f"C-MOVE from {node.name}: association refused or not reachable")
    try:
        completed, failed = _final(node, "C-MOVE", assoc.send_c_move(
            _query(study_uid, series_uid), node.move_destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        raise PacsError(f"C-MOVE from {node.name}: {failed} instance(s) were not sent to {node.move_destination}")
    if not completed:
        raise PacsError(f"series not found on {node.name} (C-MOVE moved no instance)", permanent=True)
    logger.info("moved %d instance(s) from %s to %s", completed, node.name, node.move_destination)
    return completed
