"""The client: :class:`Client` (volumes, jobs, results) and :class:`Session` (an interactive
session whose lesions' masks it keeps from the deltas it is answered)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from msam_client import protocol
from msam_client.errors import JobFailed, Unreachable, from_response

FINISHED = ("succeeded", "failed", "canceled")


@dataclass
class Volume:
    """An uploaded image: ``shape`` and ``affine_ras`` (voxel ``(i, j, k, 1)`` -> RAS mm)."""

    volume_id: str
    shape: tuple[int, int, int]
    affine_ras: np.ndarray
    format: str
    modality: str | None = None


@dataclass
class Job:
    client: Client
    job_id: str
    status: str = "queued"
    body: dict = field(default_factory=dict)

    def refresh(self) -> Job:
        self.body = self.client._json("GET", protocol.job(self.job_id))
        self.status = self.body["status"]
        return self

    def wait(self, timeout: float = 600.0, interval: float = 0.1) -> Job:
        """Poll until the job finished; :class:`JobFailed` when it did not succeed."""
        deadline = time.monotonic() + timeout
        while self.refresh().status not in FINISHED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {self.status} after {timeout} s")
            time.sleep(interval)
        if self.status != "succeeded":
            raise JobFailed(self.body)
        return self


@dataclass
class Answer:
    """One interaction's (or undo's, reset's) answer: the lesion's step, its measurements, and the
    raw ``delta`` that the session has already applied to its mask."""

    lesion: int
    step: int
    measurements: dict[str, Any]
    delta: dict | None
    base: str | None
    interaction_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Client:
    """The msam service at ``url`` (``api_key``: a bearer key, when the service has keys)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(str(self.http.base_url), f"{type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            try:
                body: object = r.json()
            except ValueError:
                body = r.text
            raise from_response(r.status_code, body)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> dict:
        return self._request(method, path, **kw).json()

    # -- volumes and jobs -------------------------------------------------------------------
    def upload(self, *paths: str | Path) -> Volume:
        """Upload one image (NIfTI, NRRD, MetaImage, a DICOM zip) or the DICOM files of a series
        (the files, or the folder that holds them: every file under it but hidden ones)."""
        found: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                inside = sorted(f for f in p.rglob("*") if f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(p).parts))
                if not inside:
                    raise FileNotFoundError(f"{p} holds no file to upload")
                found += inside
            else:
                found.append(p)
        files = [("image", (p.name, open(p, "rb"))) for p in found]  # noqa: SIM115
        try:
            body = self._json("POST", protocol.VOLUMES, files=files)
        finally:
            for _, (_, f) in files:
                f.close()
        return Volume(volume_id=body["volume_id"], shape=tuple(body["shape"]),  # type: ignore[arg-type]
                      affine_ras=np.asarray(body["affine_ras"]), format=body["format"], modality=body.get("modality"))

    def submit(self, volume_id: str, lesions: Sequence[dict], space: str = "voxel",
               destinations: Sequence[str] = (), callback_url: str | None = None) -> Job:
        """A job on an uploaded volume (``lesions`` as the job API's prompt document)."""
        body: dict[str, Any] = {"volume_id": volume_id, "prompts": {"space": space, "lesions": list(lesions)}}
        if destinations:
            body["destinations"] = list(destinations)
        if callback_url:
            body["callback_url"] = callback_url
        accepted = self._json("POST", protocol.SEGMENT, json=body)
        return Job(self, accepted["job_id"])

    def job(self, job_id: str) -> Job:
        return Job(self, job_id).refresh()

    def download(self, job_id: str, format: str | None = None, out: str | Path | None = None) -> bytes:
        """A result of a succeeded job (``format``: dicom-seg, rtstruct, nifti, png, mha); written to
        ``out`` when given."""
        params = {"format": format} if format else {}
        data = self._request("GET", protocol.job_result(job_id), params=params).content
        if out is not None:
            Path(out).write_bytes(data)
        return data

    # -- sessions ---------------------------------------------------------------------------
    def session(self, volume_id: str, space: str = "voxel") -> Session:
        """A new interactive session on an uploaded volume; points and boxes are in ``space``."""
        body = self._json("POST", protocol.SESSIONS, json={"volume_id": volume_id, "space": space})
        return Session(self, body)


class Session:
    """An interactive session. Every answer's delta is applied to :attr:`masks` (lesion ->
    ``bool`` array of the volume's shape), so ``masks[n]`` is what the service holds for lesion
    ``n``."""

    def __init__(self, client: Client, body: dict) -> None:
        self.client = client
        self.session_id: str = body["session_id"]
        self.volume_id: str = body["volume_id"]
        self.shape: tuple[int, int, int] = tuple(body["shape"])  # type: ignore[assignment]
        self.affine_ras = np.asarray(body["affine_ras"])
        self.masks: dict[int, np.ndarray] = {}
        self._measurements: dict[int, dict] = {}
        self._held: dict[int, str | None] = {}  # lesion -> the interaction whose mask masks[n] is
        self._lock = threading.Lock()  # answers of threads clicking at once are applied one at a time

    def add_lesion(self, label: str | None = None) -> int:
        body = self.client._json("POST", protocol.lesions(self.session_id),
                                 json={"label": label} if label is not None else {})
        self.masks[body["lesion"]] = np.zeros(self.shape, bool)
        self._held[body["lesion"]] = None
        return int(body["lesion"])

    def _apply(self, body: dict) -> Answer:
        """Apply an answer's delta to the lesion's mask. A delta applies to the mask after
        ``base``: when that is not the mask held here (answers to clicks sent at once on one
        lesion may arrive out of order), the whole mask is read from the service instead."""
        lesion = int(body["lesion"])
        with self._lock:
            mask = self.masks.setdefault(lesion, np.zeros(self.shape, bool))
            base = body.get("base")
            if base is not None and base != self._held.get(lesion):
                body = dict(body, **self.client._json("GET", protocol.lesion_verb(self.session_id, lesion, "mask")))
                base = None
            protocol.apply_delta(mask, body.get("delta"), base is None)
            self._held[lesion] = body.get("interaction_id")
            self._measurements[lesion] = body["measurements"]
        return Answer(lesion=lesion, step=body["step"], measurements=body["measurements"], delta=body.get("delta"),
                      base=base, interaction_id=body.get("interaction_id"), timings=body.get("timings", {}))

    def _interact(self, lesion: int, payload: dict, wait: float | None, timeout: float) -> Answer:
        params = {"wait": wait} if wait is not None else {}
        r = self.client._request("POST", protocol.interactions(self.session_id, lesion), json=payload, params=params)
        body = r.json()
        deadline = time.monotonic() + timeout
        while r.status_code == 202:  # not answered within the wait: ask again, waiting there
            if time.monotonic() > deadline:
                raise TimeoutError(f"interaction {body['interaction_id']} still {body['status']} after {timeout} s")
            r = self.client._request("GET", protocol.interaction(self.session_id, body["interaction_id"]),
                                     params={"wait": 5})
            body = r.json()
        return self._apply(body)

    def click(self, lesion: int, xyz: Sequence[float], positive: bool = True, wait: float | None = None,
              timeout: float = 300.0) -> Answer:
        """A positive (or negative) point; answers once the lesion's new mask is applied."""
        return self._interact(lesion, {"kind": "point", "xyz": _xyz(xyz, "xyz"), "positive": positive}, wait, timeout)

    def box(self, lesion: int, corner0: Sequence[float], corner1: Sequence[float], wait: float | None = None,
            timeout: float = 300.0) -> Answer:
        return self._interact(lesion, {"kind": "box", "corners": [_xyz(corner0, "corner0"), _xyz(corner1, "corner1")]},
                              wait, timeout)

    def mask_input(self, lesion: int, volume_id: str, label: int | None = None, wait: float | None = None,
                   timeout: float = 300.0) -> Answer:
        """A mask uploaded with :meth:`Client.upload` as the lesion's input."""
        payload = {"kind": "mask", "volume_id": volume_id, **({"label": label} if label else {})}
        return self._interact(lesion, payload, wait, timeout)

    def edit(self, lesion: int, edited: np.ndarray, wait: float | None = None, timeout: float = 300.0) -> Answer:
        """Send ``edited`` (the lesion's whole mask after painting or erasing, volume shape) as the
        lesion's input mask; only the box where it differs from the current mask travels."""
        edited = np.asarray(edited)
        if edited.shape != self.shape:
            raise ValueError(f"the edited mask has shape {edited.shape}; the volume's is {self.shape}")
        edited = edited.astype(bool)
        current = self.masks.get(lesion, np.zeros(self.shape, bool))
        changed = np.argwhere(current != edited)
        if changed.size == 0:
            raise ValueError("the edited mask equals the current one")
        lo, hi = changed.min(axis=0), changed.max(axis=0) + 1
        box = edited[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        change = {"lo": lo.tolist(), "hi": hi.tolist(), "data": protocol.encode_box(box)}
        return self._interact(lesion, {"kind": "mask", "edit": change}, wait, timeout)

    def undo(self, lesion: int) -> Answer:
        return self._apply(self.client._json("POST", protocol.lesion_verb(self.session_id, lesion, "undo")))

    def reset(self, lesion: int) -> Answer:
        return self._apply(self.client._json("POST", protocol.lesion_verb(self.session_id, lesion, "reset")))

    def sync(self, lesion: int) -> Answer:
        """Read the lesion's whole mask from the service (e.g. after reconnecting)."""
        return self._apply(self.client._json("GET", protocol.lesion_verb(self.session_id, lesion, "mask")))

    def measurements(self, lesion: int) -> dict:
        return dict(self._measurements.get(lesion, {"voxel_count": 0, "volume_ml": 0.0}))

    def labels(self) -> np.ndarray:
        """The lesions' masks as one label array (lesion ``n`` -> ``n``; an earlier lesion keeps a
        voxel two claim, as the committed outputs do)."""
        out = np.zeros(self.shape, np.uint8)
        for n in sorted(self.masks):
            out[self.masks[n] & (out == 0)] = n
        return out

    def state(self) -> dict:
        return self.client._json("GET", protocol.session(self.session_id))

    def commit(self, destinations: Sequence[str] = (), callback_url: str | None = None) -> Job:
        """Write the outputs (and send them to ``destinations`` / ``callback_url``): a job."""
        body: dict[str, Any] = {"destinations": list(destinations)}
        if callback_url:
            body["callback_url"] = callback_url
        accepted = self.client._json("POST", protocol.commit(self.session_id), json=body)
        return Job(self.client, accepted["job_id"])

    def delete(self) -> None:
        self.client._request("DELETE", protocol.session(self.session_id))


def _xyz(values: Sequence[float], name: str) -> list[float]:
    """Three finite numbers, or a ``ValueError`` that says what ``name`` was instead."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be three finite numbers, got {values!r}")
    return out
