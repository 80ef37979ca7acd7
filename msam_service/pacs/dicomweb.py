"""DICOMweb through dicomweb-client: WADO-RS retrieve of one series (pull), STOW-RS (push).

Only nodes from :mod:`msam_service.pacs.nodes` are contacted. Instances are streamed to files one
at a time (``iter_series``), never the whole series in memory, and counted against a limit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from msam_service.pacs.nodes import DicomwebNode, PacsError

logger = logging.getLogger(__name__)
# dicomweb-client logs study/series UIDs at INFO; UIDs identify a patient's study: keep them out
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


#: dicomweb-client retries connection errors and 408/429/503/504 with exponential backoff; its
#: default (5 attempts, 2+4+8+16 s) keeps a job waiting 30 s on a node that is down.
ATTEMPTS, BACKOFF_MS = 3, 500


def client(node: DicomwebNode, timeout: float = 60.0) -> DICOMwebClient:
    c = DICOMwebClient(url=node.url, session=node.session(), timeout=timeout)
    c.set_http_retry_params(retry=True, max_attempts=ATTEMPTS, wait_exponential_multiplier=BACKOFF_MS)
    return c


def http_reason(exc: BaseException) -> str:
    """What went wrong, without the URL (which may carry UIDs): ``HTTP 503``, ``ConnectionError``..."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def retrieve_series(node: DicomwebNode, study_uid: str, series_uid: str, folder: Path, *,
                    max_instances: int = 5000, timeout: float = 60.0) -> list[Path]:
    """WADO-RS ``/studies/{study}/series/{series}`` into ``folder`` (``000000.dcm``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    try:
        for ds in client(node, timeout).iter_series(study_uid, series_uid):
            if len(paths) >= max_instances:
                raise PacsError(f"the series on {node.name} has more than {max_instances} instances "
                                "(MSAM_DICOM_MAX_INSTANCES)")
            path = folder / f"{len(paths):06d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
    except PacsError:
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            raise PacsError(f"series not found on {node.name} (WADO-RS 404): check study_uid and series_uid",
                            permanent=True) from exc
        raise PacsError(f"retrieving the series from {node.name} failed ({http_reason(exc)})") from exc
    except Exception as exc:  # connection errors, malformed multipart, ...
        raise PacsError(f"retrieving the series from {node.name} failed ({http_reason(exc)})") from exc
    if not paths:
        raise PacsError(f"series not found on {node.name} (WADO-RS returned no instance)", permanent=True)
    logger.info("retrieved %d instance(s) from %s", len(paths), node.name)
    return paths


def store(node: DicomwebNode, paths: list[Path], timeout: float = 60.0) -> None:
    """STOW-RS ``paths`` to ``node``; raises :class:`PacsError` unless every instance is stored."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = client(node, timeout).store_instances(datasets)
    except Exception as exc:
        raise PacsError(f"STOW-RS to {node.name} failed ({http_reason(exc)})") from exc
    failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
    if failed:
        reasons = sorted({str(getattr(item, "FailureReason", "?")) for item in failed})
        raise PacsError(f"STOW-RS to {node.name}: {len(failed)} instance(s) refused (failure reason {', '.join(reasons)})")
    logger.info("stored %d instance(s) on %s by STOW-RS", len(paths), node.name)


def has_instance(node: DicomwebNode, study_uid: str, series_uid: str, sop_uid: str, timeout: float = 60.0) -> bool:
    """Whether ``node`` already holds the instance (QIDO-RS): how a delivery interrupted by a
    crash learns whether its STOW-RS arrived before sending it again."""
    try:
        found = client(node, timeout).search_for_instances(study_uid, series_uid,
                                                          search_filters={"SOPInstanceUID": sop_uid})
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return False
        raise PacsError(f"QIDO-RS on {node.name} failed ({http_reason(exc)})") from exc
    except Exception as exc:
        raise PacsError(f"QIDO-RS on {node.name} failed ({http_reason(exc)})") from exc
    return any((item.get("00080018") or {}).get("Value", [None])[0] == sop_uid for item in found or [])
