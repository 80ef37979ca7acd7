"""The PACS parts of ``POST /segment`` (issue #8): where the image comes from (``source``), where
the DICOM-SEG goes (``destinations``) and who is told (``callback_url``).

Everything a request names is checked against server-side configuration before a job exists:
an unknown node name, a URL where a name belongs, or a callback URL off the allowlist is a
422 - the service never connects to an address a client supplied.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from api.deps import Services
from api.errors import ApiError
from api.uploads import volume_for, volume_owner_key
from msam_service.pacs import nodes, received, webhooks
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
    extra: dict[str, Any] = field(default_factory=dict)  # stored in the job's request


#: what a destination receives unless the request says otherwise
DEFAULT_SEND = ("dicom-seg", "sr")


def outputs(destinations: list[str], callback_url: str | None, base: str,
            send: list[str] | tuple[str, ...] = DEFAULT_SEND) -> dict[str, Any]:
    """Validate destinations and callback; what the job record keeps of them (``send``: the
    result formats the destinations receive)."""
    extra: dict[str, Any] = {}
    if not destinations and not callback_url:
        return extra  # plain requests never read the PACS configuration
    pacs = _pacs()
    if destinations:
        try:
            extra["destinations"] = nodes.check_destinations(pacs, destinations)
        except nodes.UnknownNode as exc:
            raise ApiError(422, "unknown_node", f"destinations: {exc}") from exc
        extra["send"] = list(send)
    if callback_url:
        try:
            extra["callback_url"] = webhooks.check_callback(callback_url, pacs.allowlist(), pacs.webhook_secret)
        except webhooks.CallbackNotAllowed as exc:
            raise ApiError(422, "callback_not_allowed", str(exc)) from exc
    if extra:
        extra["base_url"] = base
    return extra


def route(svc: Services, payload: Any, who: str, base: str) -> Routing:
    """``payload``: a validated ``SegmentByVolume`` (``volume_id`` or ``source``)."""
    extra = outputs(list(payload.destinations or []), payload.callback_url, base, list(payload.send))
    if payload.volume_id is not None:
        return Routing(volume_for(svc, payload.volume_id, who), payload.volume_id, extra)
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
        extra["source"] = {"received_series_uid": src.received_series_uid}
        return Routing(volume_for(svc, rec.volume_id, who), rec.volume_id, extra)
    try:
        node = nodes.dicomweb_node(_pacs(), src.pacs)
    except nodes.UnknownNode as exc:
        raise ApiError(422, "unknown_node", f"source.pacs: {exc}") from exc
    volume_id = new_volume_id()  # reserved now; the worker stores the retrieved series under it
    svc.redis.set(volume_owner_key(volume_id), who, ex=svc.settings.job_ttl_s)
    extra["source"] = {"pacs": node.name, "study_uid": src.study_uid, "series_uid": src.series_uid}
    return Routing(None, volume_id, extra)


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
