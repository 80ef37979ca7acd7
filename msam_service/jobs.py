"""Job records in Redis: the one source of truth for a job's status, shared by api and worker.

A job is a hash ``msam:job:<id>``; JSON-valued fields are decoded by :class:`JobRecord`, its
``request`` into a :class:`~msam_service.contract.JobRequest`. Routes and tasks read a job through
:meth:`JobStore.get`, never the hash itself. Status
changes go through :meth:`JobStore.transition`, an atomic compare-and-set (Lua), so a cancel and
a finishing worker cannot both win. Queued jobs are also in the sorted set ``msam:queued``
(score = enqueue time) which gives the queue position. Records expire ``job_ttl_s`` after their
last change.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from msam_service.contract import JobRequest

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINISHED = (SUCCEEDED, FAILED, CANCELED)
_JSON_FIELDS = ("timings", "error", "results", "result_errors", "lesions", "model", "warnings",
                "intensity", "destinations_status")
#: the I/O worker's deliveries as a whole (:attr:`JobRecord.delivery`)
DELIVERY_PENDING, DELIVERY_DONE, DELIVERY_FAILED = "pending", "done", "failed"
_QUEUED_KEY = "msam:queued"
_RUNNING_KEY = "msam:running"

# KEYS[1] job hash; ARGV[1] new status; ARGV[2] ttl; ARGV[3] allowed old statuses (comma list);
# ARGV[4..] field/value pairs. Returns the old status, or false when not allowed / missing.
_TRANSITION = """
local old = redis.call('HGET', KEYS[1], 'status')
if not old then return false end
local ok = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == old then ok = true end end
if not ok then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return old
"""


def new_id() -> str:
    return uuid.uuid4().hex


def job_key(job_id: str) -> str:
    return f"msam:job:{job_id}"


@dataclass
class JobRecord:
    job_id: str
    status: str
    tenant: str = ""
    volume_id: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    stage: str = ""
    progress: float = 0.0
    deliveries: int = 0
    cancel_requested: bool = False
    cache_hits: int = 0
    encoder_runs: int = 0
    worker: str = ""
    input_format: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None
    results: list[str] = field(default_factory=list)
    result_errors: dict[str, str] = field(default_factory=dict)
    #: what the results differ in from the request or the source (e.g. a source attribute left
    #: empty in the DICOM outputs because DICOM refuses its value); attribute names, no values
    warnings: list[str] = field(default_factory=list)
    request: JobRequest = field(default_factory=JobRequest)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    #: the model that ran the job (``LoadedModel.describe()``), set once the worker has it
    model: dict[str, Any] | None = None
    #: what the pipeline took the image's values to be: ``{"hu": bool, "reason": str}``
    intensity: dict[str, Any] | None = None
    #: what the I/O worker did per target: a DICOM destination's name, ``ris:NAME``, ``fhir:NAME``
    #: -> ``stored`` / ``sent``, ``sending``, ``retrying: ...`` or why not
    destinations_status: dict[str, str] = field(default_factory=dict)
    #: the deliveries as a whole: ``pending``, ``done``, ``failed``; empty until the I/O worker
    #: first published them
    delivery: str = ""

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[bytes, bytes]) -> JobRecord:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        rec = cls(job_id=job_id, status=d.get("status", QUEUED))
        rec.tenant = d.get("tenant", "")
        rec.volume_id = d.get("volume_id", "")
        rec.created_at = float(d.get("created_at", 0) or 0)
        rec.started_at = float(d["started_at"]) if d.get("started_at") else None
        rec.finished_at = float(d["finished_at"]) if d.get("finished_at") else None
        rec.stage = d.get("stage", "")
        rec.progress = float(d.get("progress", 0) or 0)
        rec.deliveries = int(d.get("deliveries", 0) or 0)
        rec.cancel_requested = d.get("cancel_requested") == "1"
        rec.cache_hits = int(d.get("cache_hits", 0) or 0)
        rec.encoder_runs = int(d.get("encoder_runs", 0) or 0)
        rec.worker = d.get("worker", "")
        rec.input_format = d.get("input_format", "")
        rec.delivery = d.get("delivery", "")
        for name in _JSON_FIELDS:
            if d.get(name):
                setattr(rec, name, json.loads(d[name]))
        request = json.loads(d["request"]) if d.get("request") else {}
        rec.request = JobRequest.from_json(request if isinstance(request, dict) else {})
        return rec


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in fields.items():
        if isinstance(v, JobRequest):
            out[k] = json.dumps(v.to_json())
        elif k in _JSON_FIELDS:
            out[k] = json.dumps(v)
        elif isinstance(v, bool):
            out[k] = "1" if v else "0"
        elif v is None:
            out[k] = ""
        else:
            out[k] = str(v)
    return out


class JobStore:
    def __init__(self, r: redis.Redis, ttl_s: int) -> None:
        self.r = r
        self.ttl_s = ttl_s
        self._transition = r.register_script(_TRANSITION)

    # -- create / read ----------------------------------------------------------------------
    def create(self, job_id: str, *, tenant: str, volume_id: str, request: JobRequest) -> JobRecord:
        now = time.time()
        fields = _encode({"status": QUEUED, "tenant": tenant, "volume_id": volume_id,
                          "created_at": now, "request": request, "stage": "queued"})
        pipe = self.r.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(job_key(job_id), self.ttl_s)
        pipe.zadd(_QUEUED_KEY, {job_id: now})
        pipe.execute()
        return JobRecord(job_id=job_id, status=QUEUED, tenant=tenant, volume_id=volume_id,
                         created_at=now, request=request, stage="queued")

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(job_key(job_id))
        return JobRecord.from_hash(job_id, raw) if raw else None  # type: ignore[arg-type]

    def queue_position(self, job_id: str) -> int | None:
        """1 = next to run; ``None`` when not queued."""
        rank = self.r.zrank(_QUEUED_KEY, job_id)
        return None if rank is None else int(rank) + 1  # type: ignore[arg-type]

    def counts(self) -> dict[str, int]:
        return {QUEUED: int(self.r.zcard(_QUEUED_KEY)), RUNNING: int(self.r.scard(_RUNNING_KEY))}  # type: ignore[arg-type]

    # -- change -----------------------------------------------------------------------------
    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields (not the status) of an existing record."""
        pipe = self.r.pipeline()
        pipe.hset(job_key(job_id), mapping=_encode(fields))  # type: ignore[arg-type]
        pipe.expire(job_key(job_id), self.ttl_s)
        pipe.execute()

    def set_delivery(self, job_id: str, destinations: dict[str, str], delivery: str) -> None:
        """Publish the I/O worker's deliveries: the state per target and as a whole."""
        self.update(job_id, destinations_status=destinations, delivery=delivery)

    def incr(self, job_id: str, name: str) -> int:
        return int(self.r.hincrby(job_key(job_id), name, 1))  # type: ignore[arg-type]

    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], **fields: Any) -> str | None:
        """Atomically set ``status = to`` (plus ``fields``) if the status is one of
        ``allowed_from``; returns the old status, or ``None`` when nothing changed."""
        args: list[str] = [to, str(self.ttl_s), ",".join(allowed_from)]
        for k, v in _encode(fields).items():
            args += [k, v]
        old = self._transition(keys=[job_key(job_id)], args=args)
        if old is None:
            return None
        old_s = old.decode() if isinstance(old, bytes) else str(old)
        pipe = self.r.pipeline()
        if to != QUEUED:
            pipe.zrem(_QUEUED_KEY, job_id)
        if to == RUNNING:
            pipe.sadd(_RUNNING_KEY, job_id)
        else:
            pipe.srem(_RUNNING_KEY, job_id)
        pipe.execute()
        return old_s

    def delete(self, job_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(job_key(job_id))
        pipe.zrem(_QUEUED_KEY, job_id)
        pipe.srem(_RUNNING_KEY, job_id)
        pipe.execute()

    def prune_index(self) -> None:
        """Drop queue/running entries whose record expired (keeps gauges honest)."""
        queued: list[bytes] = self.r.zrange(_QUEUED_KEY, 0, -1)  # type: ignore[assignment]
        for jid in queued:
            if not self.r.exists(job_key(jid.decode())):
                self.r.zrem(_QUEUED_KEY, jid)
        running: set[bytes] = self.r.smembers(_RUNNING_KEY)  # type: ignore[assignment]
        for jid in running:
            if not self.r.exists(job_key(jid.decode())):
                self.r.srem(_RUNNING_KEY, jid)
