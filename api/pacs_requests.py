"""The PACS parts of ``POST /segment``: where the image comes from (``source``), where
the DICOM-SEG goes (``destinations``) and who is told (``callback_url``).

Everything a request names is checked against server-side configuration before a job exists:
a URL where a name belongs or a callback URL off the allowlist is a 422; a node, RIS or FHIR
endpoint that is not configured *for the caller's tenant* is a 404, the same answer as for a
name configured nowhere - the service never connects to an address a client supplied, and a
tenant cannot learn which nodes other tenants use.

An order by accession number (or a study UID without a series) is resolved here, by QIDO-RS,
before the job exists, so that a study with no fitting series, or several, is a 422 listing
the candidates (:mod:`msam_service.pacs.orders`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from api.deps import Services
from api.errors import ApiError
from api.uploads import volume_for, volume_owner_key
from msam_service.contract import DEFAULT_SEND, JobRequest, JobSource
from msam_service.pacs import nodes, orders, received, webhooks
from msam_service.pacs.settings import PacsSettings, get_pacs_settings
from msam_service.volumes import VolumeInfo, new_volume_id

logger = logging.getLogger(__name__)


def _pacs() -> PacsSettings:
    try:
        return get_pacs_settings()
    except ValueError as exc:  # pydantic's ValidationError too: a server problem, not the caller's
        logger.error("invalid PACS configuration: %s", exc)
        raise ApiError(503, "pacs_misconfigured", "the PACS configuration of this server is invalid; "
                       "see the server log") from exc


@dataclass
class Routing:
    info: VolumeInfo | None  # None: the worker retrieves the series first
    volume_id: str
    request: JobRequest = field(default_factory=JobRequest)  # the job's, less what to segment


def _node_error(field: str, exc: nodes.UnknownNode) -> ApiError:
    if isinstance(exc, nodes.InvalidNodeName):
        return ApiError(422, "unknown_node", f"{field}: {exc}")
    return ApiError(404, "unknown_node", f"{field}: {exc}")


def outputs(destinations: list[str], callback_url: str | None, base: str, who: str | None = None,
            ris: str | None = None, fhir: str | None = None,
            send: list[str] | tuple[str, ...] = DEFAULT_SEND) -> JobRequest:
    """Validate destinations, callback, RIS and FHIR endpoints for tenant ``who``; the job's
    request with what it keeps of them (``send``: the result formats the destinations receive)."""
    req = JobRequest()
    if not destinations and not callback_url and not ris and not fhir:
        return req  # plain requests never read the PACS configuration
    pacs = _pacs()
    if destinations:
        try:
            req.destinations = nodes.check_destinations(pacs, destinations, who)
        except nodes.UnknownNode as exc:
            raise _node_error("destinations", exc) from exc
        req.send = list(send)
    if ris:
        endpoint = pacs.ris_endpoints.get(ris)
        if endpoint is None or who is None or endpoint.tenant != who or endpoint.oru_host is None:
            raise ApiError(404, "unknown_endpoint", f"ris: no RIS endpoint {ris!r} that takes results is "
                           "configured for this tenant (MSAM_RIS_ENDPOINTS)")
        req.ris = ris
    if fhir:
        fhir_endpoint = pacs.fhir_endpoints.get(fhir)
        if fhir_endpoint is None or who is None or not fhir_endpoint.allows(who):
            raise ApiError(404, "unknown_endpoint", f"fhir: no FHIR endpoint {fhir!r} is configured for this "
                           "tenant (MSAM_FHIR_ENDPOINTS)")
        req.fhir = fhir
    if callback_url:
        try:
            req.callback_url = webhooks.check_callback(callback_url, pacs.allowlist(), pacs.webhook_secret)
        except webhooks.CallbackNotAllowed as exc:
            raise ApiError(422, "callback_not_allowed", str(exc)) from exc
    req.base_url = base
    return req


def route(svc: Services, payload: Any, who: str, base: str) -> Routing:
    """``payload``: a validated ``SegmentByVolume`` (``volume_id`` or ``source``)."""
    req = outputs(list(payload.destinations or []), payload.callback_url, base, who, payload.ris, payload.fhir,
                    list(payload.send))
    if payload.volume_id is not None:
        return Routing(volume_for(svc, payload.volume_id, who), payload.volume_id, req)
    src = payload.source
    if getattr(src, "received_series_uid", None):
        rec = received.load(svc.redis, src.received_series_uid)
        if rec is None or rec.tenant != who:
            raise ApiError(404, "not_found",
                           "no received series with this SeriesInstanceUID: it may still be arriving (a series "
                           "is complete after MSAM_DICOM_IDLE_TIMEOUT_S without new instances), have been "
                           "dropped by the routing rules, or have expired")
        if rec.status != received.READY:
            raise ApiError(422, "invalid_volume", f"the received series cannot be used: {rec.error}")
        req.source = JobSource(received_series_uid=src.received_series_uid)
        return Routing(volume_for(svc, rec.volume_id, who), rec.volume_id, req)
    pacs = _pacs()
    try:
        node = nodes.source_node(pacs, src.pacs, who)
    except nodes.UnknownNode as exc:
        raise _node_error("source.pacs", exc) from exc
    study_uid, series_uid = src.study_uid, src.series_uid
    source = JobSource(pacs=node.name, accession_number=src.accession_number or None)
    if series_uid is None:
        study_uid, series_uid = order_series(pacs, node, src.accession_number, study_uid)
        source.selected_by = "series rules"
    volume_id = new_volume_id()  # reserved now; the I/O worker stores the retrieved series under it
    svc.redis.set(volume_owner_key(volume_id), who, ex=svc.settings.job_ttl_s)
    source.study_uid, source.series_uid = study_uid, series_uid
    req.source = source
    return Routing(None, volume_id, req)


def order_series(pacs: PacsSettings, node: nodes.DicomwebNode | nodes.DimseNode, accession_number: str | None,
                 study_uid: str | None) -> tuple[str, str]:
    """The series an order means, by the node's series rules (QIDO-RS); 404 / 422 / 502."""
    if not isinstance(node, nodes.DicomwebNode):
        raise ApiError(422, "needs_series_uid", f"source.pacs: {node.name} is a DIMSE node, which msam queries "
                       "by QIDO-RS only on DICOMweb nodes; give study_uid and series_uid")
    try:
        return orders.find_series(node, pacs.node_options(node.name).series, accession_number=accession_number,
                                  study_uid=study_uid, timeout=min(pacs.dicomweb_timeout_s, 30.0))
    except orders.OrderProblem as exc:
        details = {"candidates": exc.candidates} if exc.candidates else None
        raise ApiError(exc.status, exc.code, str(exc), details=details) from exc
    except nodes.PacsError as exc:
        raise ApiError(502, "pacs_error", f"{exc}; the order could not be looked up, try again later") from exc


def form_send(raw: object) -> list[str]:
    """The multipart field ``send``: ``dicom-seg,sr`` (default) or ``dicom-seg``."""
    if not isinstance(raw, str) or not raw.strip():
        return list(DEFAULT_SEND)
    parts = list(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
    unknown = [p for p in parts if p not in DEFAULT_SEND]
    if unknown or "dicom-seg" not in parts:
        raise ApiError(422, "invalid_request", "send: 'dicom-seg,sr' (the SEG and the measurement SR, the default) "
                       "or 'dicom-seg' (the SEG only); the SR references the SEG, so the SEG is always sent")
    return parts


def form_destinations(raw: object) -> list[str]:
    """The multipart field ``destinations``: a JSON list or comma-separated names."""
    if not isinstance(raw, str) or not raw.strip():
        return []
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", "destinations: not valid JSON") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(422, "invalid_request", "destinations: a list of node names")
        return value
    return [p.strip() for p in text.split(",") if p.strip()]
