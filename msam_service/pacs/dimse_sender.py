"""C-STORE SCU: send result instances (DICOM-SEG, ...) to a configured AE (pynetdicom).

One association per call; a presentation context per SOP class present, offering the file's
own transfer syntax plus Explicit/Implicit VR Little Endian. :func:`has_instance` asks the AE
by C-FIND (Study Root, IMAGE level) whether it holds an instance: how a delivery interrupted by
a crash learns whether its C-STORE arrived.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from msam_service.pacs.nodes import DimseNode, PacsError

logger = logging.getLogger(__name__)
# pynetdicom's INFO/DEBUG output can describe datasets; keep it out of the worker's log
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def send(node: DimseNode, paths: list[Path], calling_ae: str = "MSAM", timeout: float = 30.0) -> None:
    """C-STORE every file to ``node``; raises :class:`PacsError` unless all succeed."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
    target = node.ae
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise PacsError(f"C-STORE to {node.name}: association refused or not reachable "
                        f"({'rejected' if assoc.is_rejected else 'aborted' if assoc.is_aborted else 'no answer'})")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"C-STORE to {node.name}: no response (timeout or aborted association)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                raise PacsError(f"C-STORE to {node.name}: refused with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("sent %d instance(s) to %s by C-STORE", len(datasets), node.name)


def has_instance(node: DimseNode, study_uid: str, series_uid: str, sop_uid: str, calling_ae: str = "MSAM",
                 timeout: float = 30.0) -> bool:
    """Whether ``node`` answers a C-FIND for this SOP Instance UID with a match."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    target = node.ae
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise PacsError(f"C-FIND on {node.name}: association refused or not reachable")
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study_uid, series_uid, sop_uid
    found = False
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"C-FIND on {node.name}: no response (timeout or aborted association)")
            if code in (0xFF00, 0xFF01) and identifier is not None and \
                    str(getattr(identifier, "SOPInstanceUID", "")) == sop_uid:
                found = True
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PacsError(f"C-FIND on {node.name}: refused with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found
