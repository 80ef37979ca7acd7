"""Interactive sessions: the contract between the gateway and the workers, kept in Redis.

A session belongs to one tenant and one stored volume. It holds lesions; each lesion holds the
ordered list of its interactions (a positive or negative point, a box, a mask as input) and a
``step``: how many of them are in effect (undo lowers it, reset sets it to 0, a new interaction
drops the ones past ``step`` and appends). Every piece of state lives in Redis, so a worker that
dies loses nothing: a worker keeps the decoded volume, crops, embeddings and grown regions only
as a cache (``worker/session.py``), rebuilt from Redis and storage when missing.

Keys (all expire ``ttl_s`` after the session's last change, like jobs):

- ``msam:session:<id>``: the session document (JSON), changed only by :meth:`SessionStore.change`
  (WATCH/MULTI, so two requests never lose each other's change);
- ``msam:session:<id>:holder``: the worker (``host:pid``) that ran its last interaction (at
  first: the live worker holding the fewest sessions when it was opened, :func:`least_loaded`),
  where the gateway routes the next one while that worker is alive;
- ``msam:session:<id>:mask:<interaction id>``: a lesion's mask after that interaction
  (:func:`pack_mask`); the mask at step 0 is empty;
- ``msam:job:<job id>:mask:<lesion>``: a lesion's mask as a commit took it (a copy, so that the
  commit's job writes it whatever happens to the session after: a delete, an undo, its expiry);
  dropped when the job has run, else it expires with the job;
- ``msam:interaction:<id>``: one interaction's status and answer (hash; ``queue``: where its
  live message was sent, ``resent``: set once it was sent again after a lost worker), and
  ``msam:interaction:<id>:done``: a list the worker pushes to when the answer is there (the
  gateway's bounded wait blocks on it).

Masks and deltas are on the volume's voxel grid: indices ``(i, j, k)`` of the stored array, the
same as prompts in ``"voxel"`` space (for NIfTI, ``img.dataobj[i, j, k]``); the volume's
``affine_ras`` (``GET /volumes/{id}``) maps them to RAS millimetres. A delta is the smallest box
``lo <= (i, j, k) < hi`` outside which the mask did not change, and the lesion's new mask inside
it, encoded by :func:`encode_box`: the box's voxels in C order (``i`` slowest, ``k`` fastest),
one bit each, packed eight to a byte with the first voxel in the least significant bit
(``numpy.packbits(..., bitorder="little")``), zlib-compressed (RFC 1950, what a browser's
``DecompressionStream("deflate")`` reads) and base64-encoded.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from msam_core.io.volume import Volume

logger = logging.getLogger(__name__)

#: The Celery tasks: open a session (a worker decodes its volume ahead of the first click), run one
#: interaction, write a session's outputs.
OPEN_TASK = "msam.session_open"
INTERACT_TASK = "msam.interact"
COMMIT_TASK = "msam.commit"
#: How a delta's mask is encoded (the ``encoding`` field of every delta).
DELTA_ENCODING = "zlib-packbits-le-c"

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
INTERACTION_KINDS = ("point", "box", "mask")


def new_id() -> str:
    return uuid.uuid4().hex


def session_key(session_id: str) -> str:
    return f"msam:session:{session_id}"


#: The lock :func:`claim_holder` holds while it chooses a new session's holder.
HOLDER_LOCK = "msam:session-holder-lock"


def holder_key(session_id: str) -> str:
    return f"msam:session:{session_id}:holder"


def mask_key(session_id: str, interaction_id: str) -> str:
    return f"msam:session:{session_id}:mask:{interaction_id}"


def committed_mask_key(job_id: str, lesion: int) -> str:
    return f"msam:job:{job_id}:mask:{lesion}"


def interaction_key(interaction_id: str) -> str:
    return f"msam:interaction:{interaction_id}"


def done_key(interaction_id: str) -> str:
    return f"msam:interaction:{interaction_id}:done"


def least_loaded(r: Any, workers: list[str]) -> str | None:
    """Of ``workers`` (``host:pid``), the one holding the fewest sessions (ties: the first), or
    ``None`` when there is none. Reads every session's holder key: a scan over the sessions."""
    if not workers:
        return None
    held = {w: 0 for w in workers}
    keys = list(r.scan_iter(match=holder_key("*"), count=500))
    for value in (r.mget(keys) if keys else []):
        name = value.decode() if isinstance(value, bytes) else value
        if name in held:
            held[name] += 1
    return min(workers, key=lambda w: held[w])


def claim_holder(r: Any, session_id: str, workers: list[str], ttl_s: int) -> str | None:
    """Make the :func:`least_loaded` of ``workers`` the holder of the new session ``session_id``
    and return it; choosing and claiming hold a Redis lock, so sessions opened at the same moment
    (through any gateway process) see each other's claims. ``None`` (no live worker, or the lock
    not had within a second): the session has no holder yet and its opening goes to the shared
    queue."""
    if not workers:
        return None
    lock = r.lock(HOLDER_LOCK, timeout=5, blocking_timeout=1)
    if not lock.acquire():
        return None
    try:
        holder = least_loaded(r, workers)
        if holder is not None:
            r.set(holder_key(session_id), holder, ex=ttl_s)
        return holder
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # expired meanwhile: nothing to release
            pass


def worker_queue(queue: str, worker: str) -> str:
    """The queue only the worker ``worker`` (``host:pid``) consumes, besides the shared one."""
    return f"{queue}.w.{worker}"


# -- masks ------------------------------------------------------------------------------------
@dataclass
class BoxMask:
    """A lesion's mask on the volume grid, kept as its bounding box: ``mask`` (bool) covers the
    voxels ``lo .. lo + mask.shape - 1``; everything else is background. Empty: ``mask.size == 0``."""

    lo: np.ndarray
    mask: np.ndarray

    @classmethod
    def empty(cls) -> BoxMask:
        return cls(lo=np.zeros(3, np.int64), mask=np.zeros((0, 0, 0), bool))

    @classmethod
    def tight(cls, lo: np.ndarray, mask: np.ndarray) -> BoxMask:
        """The same mask cut to the bounding box of its foreground."""
        idx = np.argwhere(mask)
        if idx.size == 0:
            return cls.empty()
        a, b = idx.min(axis=0), idx.max(axis=0) + 1
        return cls(lo=np.asarray(lo, np.int64) + a, mask=mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]].copy())

    @property
    def hi(self) -> np.ndarray:
        return self.lo + np.asarray(self.mask.shape, np.int64)

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    def over(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The mask over the box ``lo <= index < hi`` (bool, background where it has nothing)."""
        out = np.zeros(tuple(int(v) for v in hi - lo), bool)
        if self.mask.size == 0:
            return out
        a, b = np.maximum(self.lo, lo), np.minimum(self.hi, hi)
        if np.any(b <= a):
            return out
        src = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, self.lo))
        dst = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, lo))
        out[dst] = self.mask[src]
        return out

    def paste(self, labels: np.ndarray, value: int) -> None:
        """Set ``value`` in ``labels`` (the volume's shape) where this mask is set and ``labels``
        is still 0 (an earlier lesion keeps a voxel both claim)."""
        if self.mask.size == 0:
            return
        sl = tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))
        region = labels[sl]
        region[self.mask & (region == 0)] = value


def pack_mask(box: BoxMask) -> bytes:
    """``BoxMask`` -> bytes for Redis: magic, ``lo`` and shape (6 int32), zlib of the packed bits."""
    shape = box.mask.shape
    header = b"MSK1" + struct.pack("<6i", *[int(v) for v in box.lo], *shape)
    return header + zlib.compress(np.packbits(box.mask.ravel(), bitorder="little").tobytes(), 1)


def unpack_mask(data: bytes) -> BoxMask:
    if data[:4] != b"MSK1":
        raise ValueError("not a session mask")
    values = struct.unpack_from("<6i", data, 4)
    lo, shape = np.asarray(values[:3], np.int64), tuple(values[3:])
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(zlib.decompress(data[28:]), np.uint8), count=n, bitorder="little")
    return BoxMask(lo=lo, mask=bits.astype(bool).reshape(shape))


def encode_box(mask: np.ndarray) -> str:
    """A box's bool mask -> the ``data`` of a delta (see the module's docstring)."""
    packed = np.packbits(np.ascontiguousarray(mask, bool).ravel(), bitorder="little")
    return base64.b64encode(zlib.compress(packed.tobytes(), 6)).decode("ascii")


def decode_box(data: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A delta's ``data`` -> the bool mask of its box (``shape``: ``hi - lo``);
    ``ValueError`` when it does not hold that many voxels.

    The data comes from clients (a mask edit): it is inflated only as far as the box's bytes and
    one more, so a small body that inflates to gigabytes is refused after that many."""
    n = int(np.prod(shape))
    need = (n + 7) // 8
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.b64decode(data, validate=True), need + 1)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"the mask data is not base64 of zlib-compressed bits ({exc})") from exc
    if len(raw) > need:
        raise ValueError(f"the mask data holds more than {need * 8} bits; a box of shape {list(shape)} needs "
                         f"{n} ({need} bytes): send the mask of the box lo..hi alone")
    if len(raw) < need or not inflate.eof:
        cut = "" if inflate.eof else " and its zlib stream is cut short"
        raise ValueError(f"the mask data holds {len(raw) * 8} bits{cut}; a box of shape {list(shape)} needs {n} "
                         f"({need} bytes)")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
    return bits.astype(bool).reshape(shape)


def delta(old: BoxMask, new: BoxMask) -> dict[str, Any] | None:
    """The change from ``old`` to ``new``: ``{"lo", "hi", "encoding", "data"}`` with ``new``'s
    mask over the smallest box holding every changed voxel; ``None`` when nothing changed."""
    boxes = [b for b in (old, new) if b.mask.size]
    if not boxes:
        return None
    lo = np.min([b.lo for b in boxes], axis=0)
    hi = np.max([b.hi for b in boxes], axis=0)
    before, after = old.over(lo, hi), new.over(lo, hi)
    changed = np.argwhere(before != after)
    if changed.size == 0:
        return None
    a, b = changed.min(axis=0), changed.max(axis=0) + 1
    box = after[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    return {"lo": [int(v) for v in lo + a], "hi": [int(v) for v in lo + b], "encoding": DELTA_ENCODING,
            "data": encode_box(box)}


def whole(box: BoxMask) -> dict[str, Any] | None:
    """The whole mask in the delta format (its bounding box), ``None`` when empty."""
    return delta(BoxMask.empty(), box)


def apply_delta(box: BoxMask, change: dict[str, Any], shape: tuple[int, ...]) -> BoxMask:
    """``box`` with ``change`` (a delta) applied; ``ValueError`` for a box outside ``shape``."""
    lo, hi = np.asarray(change["lo"], np.int64), np.asarray(change["hi"], np.int64)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"the box needs three lo and three hi voxel indices, got lo={lo.tolist()} hi={hi.tolist()}")
    if np.any(hi <= lo):
        raise ValueError(f"the box lo={lo.tolist()} hi={hi.tolist()} is empty: hi is one past the last voxel, so "
                         "give lo < hi on every axis")
    if np.any(lo < 0) or np.any(hi > np.asarray(shape)):
        raise ValueError(f"the box lo={lo.tolist()} hi={hi.tolist()} is not inside the volume (shape "
                         f"{list(shape)}); give 0 <= lo < hi <= shape")
    part = decode_box(change["data"], tuple(int(v) for v in hi - lo))
    if box.mask.size == 0:
        return BoxMask.tight(lo, part)
    a, b = np.minimum(box.lo, lo), np.maximum(box.hi, hi)
    merged = box.over(a, b)
    merged[tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(lo, hi, a))] = part
    return BoxMask.tight(a, merged)


def measurements(box: BoxMask, affine_ras: np.ndarray, volume: Volume | None = None,
                 hounsfield: bool | None = None) -> dict[str, Any]:
    """What a lesion measures so far: voxel count and volume in millilitres (the voxel volume is
    the determinant of the affine's 3x3 part, so oblique and anisotropic grids count right); with
    ``volume``, also what the job API reports per lesion (:func:`msam_core.measure.measure_box`:
    RECIST long and short axis, 3D diameter, centroid, intensity statistics, surface area,
    sphericity). ``hounsfield``: the pipeline's conclusion that the values are HU (its
    :class:`~msam_core.pipeline.preprocess.IntensityProfile`, as the job API passes it; default:
    the header's modality). Measuring is a report on the mask: a fault in it is logged and the
    answer keeps the count and the volume."""
    voxels = box.voxels
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine_ras, np.float64)[:3, :3])))
    out: dict[str, Any] = {"voxel_count": voxels, "volume_ml": round(voxels * voxel_mm3 / 1000.0, 4)}
    if volume is None or voxels == 0:
        return out
    from msam_core.measure import measure_box

    try:
        measured = measure_box(box.mask, box.lo, volume, hounsfield=hounsfield)
    except Exception as exc:  # noqa: BLE001 - a bug in a report must not cost the click
        logger.error("measuring a session lesion failed: %s", type(exc).__name__)
        return out
    if measured is not None:
        out.update({k: v for k, v in measured.to_json().items() if k not in ("voxels", "volume_ml")})
    return out


# -- the session document ---------------------------------------------------------------------
class SessionBusy(Exception):
    """The change could not be made: another interaction of the lesion is still running."""


class SessionGone(Exception):
    """The session does not exist (expired or deleted)."""


def active(lesion: dict[str, Any]) -> list[dict[str, Any]]:
    """The interactions of a lesion that are in effect (the first ``step``)."""
    return lesion["interactions"][: lesion["step"]]


def lesion_prompt_doc(lesion: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """A lesion's interactions in effect as one lesion of the job API's prompt document
    (:mod:`msam_service.prompts`; coordinates in the session's ``space``), plus its mask input
    (the last mask interaction, or ``None``).

    Points keep their order; the last box counts; a mask interaction makes that mask the
    lesion's input mask, refined by the clicks after it."""
    doc: dict[str, Any] = {"positive": [], "negative": []}
    mask = None
    for act in active(lesion):
        if act["kind"] == "point":
            (doc["positive"] if act["positive"] else doc["negative"]).append(list(act["xyz"]))
        elif act["kind"] == "box":
            doc["box"] = act["corners"]
        elif act["kind"] == "mask":
            mask = act
    if lesion.get("label"):
        doc["label"] = lesion["label"]
    return doc, mask


class SessionStore:
    """Sessions in Redis (the gateway writes them, workers read them and write masks)."""

    def __init__(self, r: redis.Redis, ttl_s: int) -> None:
        self.r = r
        self.ttl_s = ttl_s

    def create(self, tenant: str, volume_id: str, space: str) -> dict[str, Any]:
        now = time.time()
        doc = {"session_id": new_id(), "tenant": tenant, "volume_id": volume_id, "space": space,
               "created_at": now, "updated_at": now, "next_lesion": 1, "lesions": {}}
        self.r.set(session_key(doc["session_id"]), json.dumps(doc), ex=self.ttl_s)
        return doc

    def get(self, session_id: str) -> dict[str, Any] | None:
        raw = self.r.get(session_key(session_id))
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def change(self, session_id: str, edit: Callable[[dict[str, Any]], Any]) -> tuple[dict[str, Any], Any]:
        """Apply ``edit`` (which changes the document in place and returns anything) atomically;
        retried when another request changed the session meanwhile. Raises :class:`SessionGone`,
        or what ``edit`` raises (nothing is written then)."""
        key = session_key(session_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise SessionGone(session_id)
                    doc = json.loads(raw)  # type: ignore[arg-type]
                    out = edit(doc)
                    doc["updated_at"] = time.time()
                    pipe.multi()
                    pipe.set(key, json.dumps(doc), ex=self.ttl_s)
                    pipe.execute()
                    return doc, out
                except redis.WatchError:
                    continue

    def delete(self, session_id: str) -> None:
        keys = [session_key(session_id), holder_key(session_id)]
        keys += list(self.r.scan_iter(match=f"{session_key(session_id)}:mask:*", count=500))
        self.r.delete(*keys)

    def touch(self, session_id: str, mask_ids: list[str]) -> None:
        """Extend the lifetime of the session and of the masks it still refers to."""
        pipe = self.r.pipeline()
        pipe.expire(session_key(session_id), self.ttl_s)
        for iid in mask_ids:
            pipe.expire(mask_key(session_id, iid), self.ttl_s)
        pipe.execute()

    # -- masks ------------------------------------------------------------------------------
    def mask(self, session_id: str, interaction_id: str | None) -> BoxMask | None:
        """The lesion's mask after ``interaction_id`` (``None``: step 0, the empty mask); ``None``
        when it is not computed (yet)."""
        if interaction_id is None:
            return BoxMask.empty()
        raw = self.r.get(mask_key(session_id, interaction_id))
        return unpack_mask(raw) if raw else None  # type: ignore[arg-type]

    def put_mask(self, session_id: str, interaction_id: str, box: BoxMask) -> None:
        self.r.set(mask_key(session_id, interaction_id), pack_mask(box), ex=self.ttl_s)

    def keep_for_commit(self, session_id: str, job_id: str, masks: dict[int, str]) -> list[int]:
        """Copy the masks ``masks`` (lesion number -> interaction id) for the commit job
        ``job_id`` (:func:`committed_mask_key`); returns the lesions whose mask is not computed
        (yet), and copies nothing then."""
        lesions = list(masks)
        pipe = self.r.pipeline()
        for n in lesions:
            pipe.get(mask_key(session_id, masks[n]))
        raw = pipe.execute()
        missing = [n for n, r in zip(lesions, raw) if r is None]
        if not missing:
            pipe = self.r.pipeline()
            for n, r in zip(lesions, raw):
                pipe.set(committed_mask_key(job_id, n), r, ex=self.ttl_s)
            pipe.execute()
        return missing

    def committed_mask(self, job_id: str, lesion: int) -> BoxMask | None:
        """A lesion's mask as the commit job ``job_id`` took it, or ``None`` when it expired."""
        raw = self.r.get(committed_mask_key(job_id, lesion))
        return unpack_mask(raw) if raw else None  # type: ignore[arg-type]

    def drop_committed(self, job_id: str, lesions: list[int]) -> None:
        if lesions:
            self.r.delete(*(committed_mask_key(job_id, n) for n in lesions))

    def put_measurements(self, session_id: str, interaction_id: str, measured: dict[str, Any]) -> None:
        """Keep what the worker measured on an interaction's mask (the API, which does not decode
        the volume, answers undo, reset and reads of the lesion with it)."""
        self.r.set(mask_key(session_id, interaction_id) + ":measurements", json.dumps(measured), ex=self.ttl_s)

    def drop_interaction(self, session_id: str, lesion: int, interaction_id: str) -> None:
        """Take an interaction out of its lesion (one that failed, or could not be queued), so
        the lesion is as it was before it; nothing when the session or the lesion is gone."""
        def edit(doc: dict[str, Any]) -> None:
            les = doc["lesions"].get(str(lesion))
            if les is None:
                return
            ids = [a["id"] for a in les["interactions"]]
            if interaction_id in ids:
                at = ids.index(interaction_id)
                del les["interactions"][at]
                if at < les["step"]:
                    les["step"] -= 1

        try:
            self.change(session_id, edit)
        except SessionGone:
            pass

    def measurements_of(self, session_id: str, interaction_id: str | None, box: BoxMask,
                        affine_ras: np.ndarray) -> dict[str, Any]:
        """The measurements of the mask after ``interaction_id``: the worker's, else the count and
        the volume (:func:`measurements`)."""
        if interaction_id is not None:
            raw = self.r.get(mask_key(session_id, interaction_id) + ":measurements")
            if raw:
                return json.loads(raw)
        return measurements(box, affine_ras)

    def current_mask(self, session_id: str, lesion: dict[str, Any]) -> BoxMask | None:
        acts = active(lesion)
        return self.mask(session_id, acts[-1]["id"] if acts else None)

    # -- interactions -----------------------------------------------------------------------
    def new_interaction(self, interaction_id: str, session_id: str, lesion: int, queue: str) -> None:
        pipe = self.r.pipeline()
        pipe.hset(interaction_key(interaction_id), mapping={
            "status": QUEUED, "session_id": session_id, "lesion": str(lesion), "created_at": str(time.time()),
            "queue": queue})
        pipe.expire(interaction_key(interaction_id), self.ttl_s)
        pipe.execute()

    def interaction(self, interaction_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(interaction_key(interaction_id))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
        for name in ("result", "error"):
            if d.get(name):
                d[name] = json.loads(d[name])
        return d

    def claim_resend(self, interaction_id: str, queue: str) -> bool:
        """Record that the interaction is sent again, to ``queue`` (the shared one), after the
        worker it waited on was lost; ``True`` for the one caller that may send it (the gateway
        waiting for it, or the sweep of a lost worker's queue), ``False`` once it has been resent.
        Whoever gets ``True`` sends it: an interaction is resent at most once."""
        key = interaction_key(interaction_id)
        if not self.r.exists(key) or not self.r.hsetnx(key, "resent", "1"):
            return False
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"status": QUEUED, "queue": queue})
        pipe.expire(key, self.ttl_s)
        pipe.execute()
        return True

    def finish_interaction(self, interaction_id: str, status: str, **fields: Any) -> None:
        """Record the answer (``result`` or ``error``) and wake whoever waits for it."""
        mapping = {"status": status, "finished_at": str(time.time())}
        mapping.update({k: json.dumps(v) for k, v in fields.items()})
        pipe = self.r.pipeline()
        pipe.hset(interaction_key(interaction_id), mapping=mapping)
        pipe.expire(interaction_key(interaction_id), self.ttl_s)
        pipe.rpush(done_key(interaction_id), "1")
        pipe.expire(done_key(interaction_id), 60)
        pipe.execute()
