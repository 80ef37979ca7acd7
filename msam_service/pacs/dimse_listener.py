"""``msam dicom-listener``: a DICOM C-STORE SCP (pynetdicom) that receives series pushed by a
PACS, a modality or a router.

- Instances are written as they arrive to a private folder per (calling AE, series) under the
  storage's staging area (generated names; UIDs are checked, never used as paths).
- A series is **complete** when no instance of it arrived for ``MSAM_DICOM_IDLE_TIMEOUT_S``
  (DIMSE has no "end of series"; an association may carry several series, and a series may
  come over several associations).
- **Routing rules** (``MSAM_DICOM_ROUTES``, :class:`~msam_service.pacs.settings.RouteRule`) on
  modality, series description and calling AE title decide: drop it, store it as a volume the
  API can reference (``POST /segment`` with ``{"source": {"received_series_uid": ...}}``), or
  also queue a job at once with the rule's prompts, destinations and callback.
- Nothing from the headers is logged except counts, AE titles and the rule's name.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from msam_core.errors import MsamError
from msam_service import jobs, redis_conn
from msam_service.contract import JobRequest, JobSource
from msam_service.pacs import received
from msam_service.pacs.ingest import VOLUME_OWNER_KEY, ingest_series
from msam_service.pacs.settings import PacsSettings, RouteRule, get_pacs_settings
from msam_service.settings import Settings, get_settings
from msam_service.storage import Storage, make_storage
from msam_service.volumes import new_volume_id

logger = logging.getLogger("msam.dicom_listener")

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# C-STORE statuses
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass
class Pending:
    calling_ae: str
    series_uid: str
    study_uid: str
    modality: str
    description: str  # used for routing only; never logged
    folder: Path
    files: list[Path] = field(default_factory=list)
    last_seen: float = 0.0
    overflow: bool = False


class Listener:
    """The receiving and routing logic, independent of the network (tests drive it directly)."""

    def __init__(self, settings: Settings, pacs: PacsSettings, storage: Storage, r: Any,
                 submit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pacs = pacs
        self.storage = storage
        self.redis = r
        self.submit = submit
        self.clock = clock
        self.rules = pacs.routes()
        self.pending: dict[tuple[str, str], Pending] = {}
        self.lock = threading.Lock()
        self.completed = 0

    # -- receiving (pynetdicom's association threads) ----------------------------------------
    def on_store(self, event: Any) -> int:
        try:
            calling_ae = str(event.assoc.requestor.ae_title).strip()
            ds = event.dataset
            series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
            study_uid = str(ds.get("StudyInstanceUID", "")).strip()
            if not (UID_RE.match(series_uid) and len(series_uid) <= 64 and UID_RE.match(study_uid)
                    and len(study_uid) <= 64):
                logger.warning("refused an instance from %s: missing or invalid series/study UID", calling_ae)
                return CANNOT_UNDERSTAND
            modality = str(ds.get("Modality", "") or "")
            description = str(ds.get("SeriesDescription", "") or "")
            data = event.encoded_dataset()
        except Exception as exc:  # a malformed dataset must not stop the listener
            logger.warning("refused an undecodable instance (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND
        key = (calling_ae, series_uid)
        with self.lock:
            p = self.pending.get(key)
            if p is None:
                p = Pending(calling_ae, series_uid, study_uid, modality, description, self.storage.staging_dir() / "received")
                p.folder.mkdir()
                self.pending[key] = p
                logger.info("receiving a new series from %s", calling_ae)
            p.last_seen = self.clock()
            if len(p.files) >= self.pacs.dicom_max_instances:
                p.overflow = True
                return OUT_OF_RESOURCES
            path = p.folder / f"{len(p.files):06d}.dcm"
            p.files.append(path)
        with open(path, "wb") as f:
            f.write(data)
        return SUCCESS

    # -- completing (the main thread) --------------------------------------------------------
    def due(self) -> list[Pending]:
        now = self.clock()
        with self.lock:
            keys = [k for k, p in self.pending.items() if now - p.last_seen >= self.pacs.dicom_idle_timeout_s]
            return [self.pending.pop(k) for k in keys]

    def sweep(self) -> int:
        done = self.due()
        for p in done:
            try:
                self.complete(p)
            except Exception as exc:  # keep listening whatever one series did
                logger.error("completing a series from %s failed: %s", p.calling_ae, type(exc).__name__)
            finally:
                shutil.rmtree(p.folder.parent, ignore_errors=True)
                self.completed += 1
        return len(done)

    def route(self, p: Pending) -> RouteRule | None:
        return next((r for r in self.rules if r.matches(p.modality, p.description, p.calling_ae)), None)

    def complete(self, p: Pending) -> None:
        n = len(p.files)
        volume_id = received.expected_volume(self.redis, p.series_uid)
        if volume_id:  # brought by a C-MOVE of the I/O worker: the job's volume, no routing
            self._complete_expected(p, volume_id)
            return
        rule = self.route(p)
        if p.overflow:
            logger.warning("dropped a series of more than %d instances from %s (MSAM_DICOM_MAX_INSTANCES)",
                           self.pacs.dicom_max_instances, p.calling_ae)
            return
        if rule is None or rule.action == "ignore":
            logger.info("series from %s complete (%d instances): %s", p.calling_ae, n,
                        f"ignored by rule {rule.name!r}" if rule else "no routing rule matches; dropped")
            return
        ttl = self.settings.job_ttl_s
        rec = received.ReceivedSeries(series_uid=p.series_uid, status=received.READY, tenant=rule.tenant,
                                      study_uid=p.study_uid, calling_ae=p.calling_ae, instances=n, rule=rule.name)
        volume_id = new_volume_id()
        staging = p.folder.parent
        try:
            info, volume = ingest_series(self.storage, staging, p.files, volume_id, p.series_uid)
        except MsamError as exc:
            rec.status, rec.error = received.INVALID, str(exc)
            received.save(self.redis, rec, ttl)
            logger.info("series from %s complete (%d instances) but unusable: %s", p.calling_ae, n, exc.code)
            return
        self.redis.set(VOLUME_OWNER_KEY.format(volume_id), rule.tenant, ex=ttl)
        rec.volume_id = volume_id
        if rule.prompts is not None:
            rec.job_id = self._queue(rule, rec, volume)
        received.save(self.redis, rec, ttl)
        logger.info("series from %s complete (%d instances): volume %s by rule %r%s", p.calling_ae, n,
                    volume_id, rule.name, f", job {rec.job_id}" if rec.job_id else "")

    def _complete_expected(self, p: Pending, volume_id: str) -> None:
        ttl = self.settings.job_ttl_s
        outcome = ""
        if p.overflow:
            outcome = f"the series has more than {self.pacs.dicom_max_instances} instances (MSAM_DICOM_MAX_INSTANCES)"
        else:
            try:
                ingest_series(self.storage, p.folder.parent, p.files, volume_id, p.series_uid)
            except MsamError as exc:
                outcome = str(exc)
        self.redis.delete(received.expect_key(p.series_uid))
        self.redis.set(received.moved_key(volume_id), outcome, ex=ttl)
        logger.info("series from %s complete (%d instances): moved for volume %s%s", p.calling_ae, len(p.files),
                    volume_id, " (unusable)" if outcome else "")

    def _queue(self, rule: RouteRule, rec: received.ReceivedSeries, volume: Any) -> str:
        from msam_service.prompts import resolve

        try:
            resolve(rule.prompts or {}, volume)
        except MsamError as exc:
            rec.error = f"routing rule {rule.name!r}: {exc}"
            logger.warning("rule %r: prompts do not fit the received series (%s); nothing queued", rule.name, exc.code)
            return ""
        job_id = jobs.new_id()
        request = JobRequest(prompts=rule.prompts,  # type: ignore[arg-type]  # checked by check_rules
                             source=JobSource(received_series_uid=rec.series_uid),
                             destinations=list(rule.destinations), callback_url=rule.callback_url or None,
                             base_url=self.settings.public_url.rstrip("/") or None)
        jobs.JobStore(self.redis, self.settings.job_ttl_s).create(job_id, tenant=rule.tenant,
                                                                  volume_id=rec.volume_id, request=request)
        if self.submit is not None:
            self.submit(job_id)
        return job_id


def check_rules(pacs: PacsSettings) -> None:
    """Refuse rules that could never work, at start."""
    from msam_service.pacs.webhooks import check_callback
    from msam_service.prompts import to_points_boxes

    for rule in pacs.routes():
        if rule.prompts is not None:
            try:
                points, _ = to_points_boxes(rule.prompts)
            except Exception as exc:
                raise ValueError(f"routing rule {rule.name!r}: malformed prompts ({type(exc).__name__})") from exc
            if not points:
                raise ValueError(f"routing rule {rule.name!r}: prompts need at least one positive point")
        if rule.callback_url:
            check_callback(rule.callback_url, pacs.allowlist(), pacs.webhook_secret)


def make_ae(listener: Listener, ae_title: str) -> Any:
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_associations = 8
    if listener.pacs.dicom_calling_aes is not None:
        ae.require_calling_aet = list(listener.pacs.dicom_calling_aes)  # others: association rejected
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    return ae


def run(host: str | None = None, port: int | None = None) -> int:
    from pynetdicom import evt

    settings = get_settings()
    pacs = get_pacs_settings()
    check_rules(pacs)
    if not settings.redis_url:
        print("msam dicom-listener: error: MSAM_REDIS_URL / REDIS_URL is not set", file=sys.stderr)
        return 1
    from msam_service.queue import enqueue, make_celery

    queue_app = make_celery(settings, "msam-dicom-listener")
    listener = Listener(settings, pacs, make_storage(settings.storage_dir), redis_conn.client(settings.redis_url),
                        submit=lambda job_id: enqueue(queue_app, job_id))
    host = host or pacs.dicom_listener_host
    port = pacs.dicom_listener_port if port is None else port
    ae = make_ae(listener, pacs.dicom_ae_title)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, listener.on_store)])
    print(f"msam dicom-listener: AE {pacs.dicom_ae_title} on {host}:{server.server_address[1]}, "
          f"{len(listener.rules)} routing rule(s), series complete after "
          f"{pacs.dicom_idle_timeout_s:g} s idle", file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            listener.sweep()
            stop.wait(min(0.5, pacs.dicom_idle_timeout_s / 4))
    finally:
        server.shutdown()
        listener.sweep()  # series already idle are still completed
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dicom-listener", help="receive DICOM series by C-STORE (DIMSE) and route them to msam",
                       description="Receive DICOM series by C-STORE (DIMSE), complete them after an idle timeout and route them to msam.")
    p.add_argument("--host", default=None, help="address to listen on (default: $MSAM_DICOM_LISTENER_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default: $MSAM_DICOM_LISTENER_PORT)")
    p.set_defaults(func=lambda args: _main(args.host, args.port))


def _main(host: str | None, port: int | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug dumps carry header values
    try:
        return run(host, port)
    except (ValueError, OSError) as exc:
        print(f"msam dicom-listener: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="msam-dicom-listener")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    a = parser.parse_args()
    sys.exit(_main(a.host, a.port))
