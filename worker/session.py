"""Interactive sessions on the worker: one interaction in, the lesion's new mask and its delta out;
a commit in, the session's outputs written (and sent) as a job's.

The session's state is in Redis (:mod:`msam_service.sessions`); what this process keeps is a
cache, per volume (:class:`HeldVolume`): the decoded volume, its sampler (intensity profile) and
the crop states of the lesions clicked on it (crop, embedding, coarse view, the regions grown
from its clicks by the decoder and by the stable-region prior), by crop grid. A follow-up click on a lesion whose crop is held costs the
decoder and the pipeline steps after it, nothing more. A process that never saw the session (the
holder died, or the gateway sent the interaction elsewhere) rebuilds the same state from
storage and Redis: the embedding cache key is the volume's id and the crop's grid
(:func:`~msam_core.pipeline.segmenter.grid_key`), so another worker's embedding is found
without hashing the crop.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from msam_core.errors import InvalidPrompt, InvalidVolume, MsamError
from msam_core.io.volume import Volume
from msam_core.pipeline.postprocess import clip_to_box, logits_to_volume_grid
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, intensity_profile
from msam_core.pipeline.segmenter import CropState, Segmenter, StageTimer
from msam_service import jobs
from msam_service import sessions as S
from msam_service.masks import load_masks
from msam_service.prompts import resolve
from msam_service.volumes import load_info
from worker.job import count_delivery, measure_result, open_mask, segment_numbers, write_results
from worker.runtime import Runtime, worker_name

logger = logging.getLogger(__name__)

#: Crop states kept per held volume (each holds a 128^3 crop, its embedding, coarse view and
#: grown regions: the prior's, 2 MB per positive click, and the decoder's, 0.5 MB per click and
#: view; tens of MB).
MAX_CROPS = 16


@dataclass
class HeldVolume:
    """What this process keeps of a volume that sessions click on."""

    volume: Volume
    sampler: VolumeSampler
    crops: OrderedDict[CropGrid, CropState] = field(default_factory=OrderedDict)

    def trim(self) -> None:
        while len(self.crops) > MAX_CROPS:
            self.crops.popitem(last=False)


_held: OrderedDict[str, HeldVolume] = OrderedDict()


def held_volume(rt: Runtime, volume_id: str) -> tuple[HeldVolume, bool]:
    """The held state of ``volume_id`` (``True`` when it was held already)."""
    held = _held.get(volume_id)
    if held is not None:
        _held.move_to_end(volume_id)
        rt.storage.touch(f"volumes/{volume_id}")
        return held, True
    info = load_info(rt.storage, volume_id)
    if info is None:
        raise InvalidVolume(f"volume {volume_id} no longer exists (it was deleted, or it expired); upload it again and start a "
                            "new session")
    volume, _ = rt.volume(info)
    held = HeldVolume(volume=volume, sampler=VolumeSampler(volume))
    _held[volume_id] = held
    while len(_held) > max(1, rt.settings.volume_cache_items):
        _held.popitem(last=False)
    return held, False


def run_open(rt: Runtime, session_id: str) -> None:
    """Decode a new session's volume while its user looks for the lesion. This worker becomes the
    session's holder first, so a click sent meanwhile waits here for the decoded volume instead of
    decoding it again elsewhere."""
    session = S.SessionStore(rt.redis, rt.settings.job_ttl_s).get(session_id)
    if session is None:
        return
    rt.redis.set(S.holder_key(session_id), worker_name(), ex=rt.settings.job_ttl_s)
    try:
        held_volume(rt, session["volume_id"])
    except MsamError as exc:  # the first interaction reports it
        logger.info("session %s: volume not opened (%s)", session_id, exc.code)


def run_interaction(rt: Runtime, interaction_id: str, delivered_from: str | None = None) -> str | None:
    """Answer one interaction; returns its final status (``None``: nothing to do).

    ``delivered_from``: the queue the message came from. A message from another queue than the
    one the record names is a stale copy (the interaction was sent again elsewhere after its
    worker was lost, and that worker came back under the same name): it is not run."""
    store = S.SessionStore(rt.redis, rt.settings.job_ttl_s)
    rec = store.interaction(interaction_id)
    if rec is None or rec["status"] in (S.DONE, S.FAILED):
        return None  # expired, or answered already (a second delivery after a fallback)
    if delivered_from and rec.get("queue") and delivered_from != rec["queue"]:
        logger.info("interaction %s: stale copy from another queue, not run", interaction_id)
        return None
    session_id, number = rec["session_id"], int(rec["lesion"])
    started = time.time()
    rt.redis.hset(S.interaction_key(interaction_id), mapping={"status": S.RUNNING, "started_at": str(started),
                                                              "worker": f"{worker_name()}/{os.getpid()}"})
    try:
        session = store.get(session_id)
        if session is None:
            raise _Stop("session_gone", "the session no longer exists (sessions expire); start a new one")
        lesion = session["lesions"].get(str(number))
        ids = [a["id"] for a in lesion["interactions"]] if lesion else []
        if interaction_id not in ids or ids.index(interaction_id) >= lesion["step"]:
            raise _Stop("undone", "the interaction was undone or reset before it ran")
        upto = ids.index(interaction_id) + 1
        base_id = ids[upto - 2] if upto >= 2 else None
        result = _segment(rt, store, session, {**lesion, "step": upto}, interaction_id, base_id)
        result["timings"]["queue"] = round(started - float(rec["created_at"]), 4)
        rt.redis.set(S.holder_key(session_id), worker_name(), ex=rt.settings.job_ttl_s)
        store.finish_interaction(interaction_id, S.DONE, result=result)
        rt.metrics.incr("interactions_done")
        return S.DONE
    except _Stop as stop:
        error = {"code": stop.code, "message": stop.message}
    except MsamError as exc:
        error = {"code": exc.code, "message": str(exc)}
    except Exception as exc:  # a bug or a broken environment: generic message, details logged
        logger.error("interaction %s failed: %s\n%s", interaction_id, type(exc).__name__,
                     "".join(traceback.format_tb(exc.__traceback__)))
        error = {"code": "internal_error", "message": f"the worker failed unexpectedly ({type(exc).__name__}); "
                 "send the interaction again"}
    store.drop_interaction(session_id, number, interaction_id)
    store.finish_interaction(interaction_id, S.FAILED, error=error)
    rt.metrics.incr("interactions_failed")
    return S.FAILED


def lost_interaction(rt: Runtime, interaction_id: str, resend: Callable[[str, str], None]) -> str | None:
    """An interaction whose pool process died while answering it (this runs in the worker's main
    process, which goes on beating, so neither the gateway nor the lost-worker sweep would see
    it lost): sent once more to the shared queue (``resend(interaction_id, queue)``), as for a
    lost worker; when it was sent again already (it killed a second process), failed, and taken
    out of its lesion. Returns what was done (``"resent"``, ``"failed"``), or ``None`` when it
    had been answered or expired."""
    store = S.SessionStore(rt.redis, rt.settings.job_ttl_s)
    rec = store.interaction(interaction_id)
    if rec is None or rec["status"] in (S.DONE, S.FAILED):
        return None
    if store.claim_resend(interaction_id, rt.settings.queue):
        resend(interaction_id, rt.settings.queue)
        rt.metrics.incr("interactions_resent")
        return "resent"
    store.drop_interaction(rec["session_id"], int(rec["lesion"]), interaction_id)
    store.finish_interaction(interaction_id, S.FAILED, error={
        "code": "internal_error", "message": "the worker process answering this interaction stopped twice; "
        "send it again, or undo the clicks before it if it keeps failing"})
    rt.metrics.incr("interactions_failed")
    return "failed"


class _Stop(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _segment(rt: Runtime, store: S.SessionStore, session: dict, lesion: dict, interaction_id: str,
             base_id: str | None) -> dict:
    """The lesion's mask with its interactions up to ``interaction_id``, stored, and the answer."""
    t_all = time.perf_counter()
    model = rt.model()
    t0 = time.perf_counter()
    held, was_held = held_volume(rt, session["volume_id"])
    volume = held.volume
    load_s = time.perf_counter() - t0
    doc, mask_act = S.lesion_prompt_doc(lesion)
    number = int(lesion["number"])
    prompt = {"space": session["space"], "lesions": [doc], "numbers": [number]}
    masks: dict[int, np.ndarray] = {}
    if mask_act is not None:
        if mask_act.get("volume_id"):
            prompt["lesions"][0]["mask"] = {"volume_id": mask_act["volume_id"], "label": mask_act.get("label")}
            masks = load_masks(prompt, volume, lambda v: open_mask(rt, v))
        else:
            edited = store.mask(session["session_id"], mask_act["stored"])
            if edited is None or edited.voxels == 0:
                raise InvalidPrompt("the edited mask no longer exists or is empty; send it again")
            full = np.zeros(volume.shape, bool)
            full[tuple(slice(int(a), int(b)) for a, b in zip(edited.lo, edited.hi))] = edited.mask
            masks = {number: full}
    timer = StageTimer()
    segmenter = Segmenter(model.network, model.options, device=rt.settings.device,
                          cache=rt.cache_for(session["tenant"]), max_windows=rt.settings.max_windows, hooks=timer)
    t0 = time.perf_counter()
    (prompted,) = resolve(prompt, volume, masks or None)
    canvas, outcome = segmenter.segment_lesion(held.sampler, prompted, crops=held.crops, source=session["volume_id"])
    held.trim()
    logits, affine = canvas.merged()
    on_grid = logits_to_volume_grid(logits, affine, volume)
    if prompted.box is not None:
        on_grid = clip_to_box(on_grid, prompted.box, volume)
    new = S.BoxMask.tight(on_grid.lo, on_grid.logits > 0) if on_grid is not None else S.BoxMask.empty()
    pipeline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = S.measurements(new, volume.affine, volume, hounsfield=held.sampler.intensity.hu)
    store.put_measurements(session["session_id"], interaction_id, measured)
    measure_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.put_mask(session["session_id"], interaction_id, new)
    old = store.mask(session["session_id"], base_id)
    if old is None:  # the previous interaction's mask is not there (it failed or still runs)
        old, base_id = S.BoxMask.empty(), None
    change = S.delta(old, new)
    encode_s = time.perf_counter() - t0
    timings = {name: round(timer.seconds[name], 4) for name in ("encode", "decode", "prior", "boundary")}
    timings.update(load=round(load_s, 4), pipeline=round(pipeline_s, 4), delta=round(encode_s, 4),
                   measure=round(measure_s, 4),
                   worker=round(time.perf_counter() - t_all, 4))
    return {"interaction_id": interaction_id, "session_id": session["session_id"], "lesion": int(lesion["number"]),
            "step": int(lesion["step"]), "base": base_id, "delta": change,
            "measurements": measured, "timings": timings,
            "windows": outcome.windows, "encoder_runs": timer.runs["encode"], "volume_held": was_held}


def run_commit(rt: Runtime, job_id: str) -> str | None:
    """Write a committed session's outputs as job ``job_id``'s results (the job's request holds
    the session's lesions as they were at commit: their mask ids and labels; the masks are the
    copies the commit took, :meth:`SessionStore.keep_for_commit`)."""
    store = rt.store
    rec = store.get(job_id)
    if rec is None or rec.status in jobs.FINISHED:
        return None
    lost = count_delivery(rt, job_id)
    if lost is not None:
        return lost
    started = time.time()
    if store.transition(job_id, jobs.RUNNING, (jobs.QUEUED, jobs.RUNNING), started_at=started, stage="write",
                        progress=0.1, worker=f"{worker_name()}/{os.getpid()}") is None:
        return None
    sessions = S.SessionStore(rt.redis, rt.settings.job_ttl_s)
    snapshot = rec.request.session
    try:
        if snapshot is None:
            raise InvalidPrompt("the job's request holds no session to commit")
        model = rt.model()
        store.update(job_id, model=model.describe())
        info = load_info(rt.storage, rec.volume_id)
        if info is None:
            raise InvalidVolume(f"volume {rec.volume_id} no longer exists (it was deleted, or it expired)")
        volume, _ = rt.volume(info)
        labels = np.zeros(volume.shape, np.uint8)
        summary, names = [], {}
        for item in snapshot.lesions:
            # the copy the commit took (a commit queued by an earlier gateway: the session's own)
            box = sessions.committed_mask(job_id, item.lesion) or sessions.mask(snapshot.session_id, item.mask)
            if box is None:
                raise InvalidPrompt(f"the mask of lesion {item.lesion} is no longer stored (the commit waited longer "
                                    "than MSAM_JOB_TTL_S); commit the session again")
            box.paste(labels, item.lesion)
            if item.label:
                names[item.lesion] = str(item.label)
        counts = np.bincount(labels.ravel(), minlength=256)
        # measured and written as a job's results are: the measurement SR with the DICOM outputs
        intensity = intensity_profile(volume)
        t0 = time.perf_counter()
        numbers = [i.lesion for i in snapshot.lesions]
        measured = measure_result(job_id, labels, volume, numbers, intensity.hu)
        measure_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        written, errors, warnings = write_results(rt, job_id, labels, volume, names, model, measured)
        segments = segment_numbers({n: int(counts[n]) for n in numbers}, written)
        summary = [{"lesion": n, "voxels": int(counts[n]), "windows": 0, "cache_hits": 0, "stopped_at_limit": False,
                    "segment_number": segments.get(n),
                    "measurements": measured[n].to_json() if measured.get(n) is not None else None}
                   for n in numbers]
        timings = {"queue": round(started - rec.created_at, 4), "measure": round(measure_s, 4),
                   "write": round(time.perf_counter() - t0, 4), "total": round(time.time() - rec.created_at, 4)}
        if store.transition(job_id, jobs.SUCCEEDED, (jobs.RUNNING,), finished_at=time.time(), stage="done",
                            progress=1.0, timings=timings, results=written, result_errors=errors, warnings=warnings,
                            lesions=summary, input_format=str(volume.meta.get("format", "")),
                            intensity=intensity.to_dict()) is None:
            return None
        sessions.drop_committed(job_id, numbers)
        rt.metrics.incr("jobs_succeeded")
        return jobs.SUCCEEDED
    except MsamError as exc:
        error = {"code": exc.code, "message": str(exc)}
    except Exception as exc:
        logger.error("commit %s failed: %s\n%s", job_id, type(exc).__name__,
                     "".join(traceback.format_tb(exc.__traceback__)))
        error = {"code": "internal_error", "message": f"the worker failed unexpectedly ({type(exc).__name__}); "
                 "commit again"}
    rt.storage.delete_prefix(f"jobs/{job_id}")
    store.transition(job_id, jobs.FAILED, (jobs.QUEUED, jobs.RUNNING), finished_at=time.time(), stage="failed",
                     error=error)
    if snapshot is not None:
        sessions.drop_committed(job_id, [i.lesion for i in snapshot.lesions])
    rt.metrics.incr("jobs_failed")
    return jobs.FAILED
