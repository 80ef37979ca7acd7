"""Records of series received by the DICOM listener, in Redis: ``msam:received:<SeriesInstanceUID>``.

What the API needs to turn ``{"source": {"received_series_uid": ...}}`` into a volume: the
volume id, the owning tenant, whether decoding worked (else the reader's message), and the job
a routing rule queued. UIDs, AE titles and counts only: no header text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

READY, INVALID = "ready", "invalid"


def received_key(series_uid: str) -> str:
    return f"msam:received:{series_uid}"


@dataclass
class ReceivedSeries:
    series_uid: str
    status: str  # ready | invalid
    tenant: str
    volume_id: str = ""
    study_uid: str = ""
    calling_ae: str = ""
    instances: int = 0
    rule: str = ""
    job_id: str = ""
    error: str = ""
    received_at: float = 0.0


def save(r: redis.Redis, rec: ReceivedSeries, ttl_s: int) -> None:
    rec.received_at = rec.received_at or time.time()
    r.set(received_key(rec.series_uid), json.dumps(asdict(rec)), ex=ttl_s)


def load(r: redis.Redis, series_uid: str) -> ReceivedSeries | None:
    raw: Any = r.get(received_key(series_uid))
    if not raw:
        return None
    return ReceivedSeries(**json.loads(raw))


# -- C-MOVE: a series the I/O worker asked an archive to send to the listener ------------------
def expect_key(series_uid: str) -> str:
    return f"msam:expect:{series_uid}"


def expect(r: redis.Redis, series_uid: str, volume_id: str, ttl_s: int) -> None:
    """Announce a series a C-MOVE will bring: the listener stores it as ``volume_id`` (the job's
    reserved volume) instead of routing it."""
    r.set(expect_key(series_uid), volume_id, ex=ttl_s)


def expected_volume(r: redis.Redis, series_uid: str) -> str | None:
    raw: Any = r.get(expect_key(series_uid))
    return raw.decode() if isinstance(raw, bytes) else raw


def moved_key(volume_id: str) -> str:
    """Where the listener reports the outcome of an expected series ("" ok, else the reason)."""
    return f"msam:moved:{volume_id}"
