"""Expiry: uploads, results and job records live ``MSAM_JOB_TTL_S`` after their last use.

Job records and volume ownership are Redis keys with that TTL (refreshed on use). Files are
removed by :func:`sweep`, which the gateway runs every ``MSAM_SWEEP_INTERVAL_S``:

- any volume / job folder (and stale upload staging) not used for ``ttl_s`` (file mtime);
- any job folder whose record has gone, and any volume folder whose owner key has gone (so a
  file never outlives the record that lets a client reach it), after ``grace_s`` (uploads and
  results being written right now have a folder before their key).
"""

from __future__ import annotations

import logging

import redis

from msam_service.jobs import JobStore, job_key
from msam_service.storage import Storage

logger = logging.getLogger(__name__)


def volume_owner_key(volume_id: str) -> str:
    """The tenant owning an uploaded volume (set by the gateway and the DICOM listener)."""
    return f"msam:volume:{volume_id}"


def sweep(storage: Storage, store: JobStore, r: redis.Redis, ttl_s: float, grace_s: float = 600.0) -> int:
    """One expiry pass; returns the number of folders/files removed."""
    removed = storage.sweep(ttl_s)
    store.prune_index()
    for prefix, key in (("jobs", job_key), ("volumes", volume_owner_key)):
        for name, age_s in storage.entries(prefix):
            if age_s >= grace_s and not r.exists(key(name)):
                storage.delete_prefix(f"{prefix}/{name}")
                removed += 1
    return removed
