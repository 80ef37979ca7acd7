"""One job: the job record in, calls on msam_core, results and a final status out.

Every user mistake (an :class:`~msam_core.errors.MsamError`) ends the job ``failed`` with the
same code and message the API would give; anything else ends it ``failed`` with a generic
message (the details go to the log, without image content or patient data). Once the mask
exists, a result format that cannot be written is reported in the job's
``unavailable_results`` and the other formats are kept; the job fails only when none could be
written. The embedding cache a job uses is its tenant's (:meth:`Runtime.cache_for`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from msam_core.checkpoints import LoadedModel
from msam_core.errors import InvalidVolume, MsamError, UnsupportedRequest
from msam_core.pipeline.segmenter import Segmenter, StageTimer
from msam_service import jobs
from msam_service.contract import RESULT_FILES, result_key
from msam_service.masks import load_masks
from msam_service.prompts import reference_lines, resolve, segment_labels
from msam_service.volumes import load_info, open_volume
from worker.runtime import Runtime, worker_name

logger = logging.getLogger(__name__)


Progress = Callable[[str, float], None]


class JobCanceled(Exception):
    """The client canceled the job; stop at the next step."""


class JobHooks(StageTimer):
    """The worker's view of a running :class:`Segmenter`: stage times (the job's ``timings``), a
    cancellation check before every stage, and progress after every lesion (``segment`` runs from
    ``start`` to ``end`` of the job's progress)."""

    def __init__(self, check: Callable[[], None], progress: Callable[[float], None],
                 start: float, end: float) -> None:
        super().__init__()
        self.check, self.progress, self.start, self.end = check, progress, start, end

    def before(self, stage: str) -> None:
        self.check()

    def lesion_done(self, done: int, total: int) -> None:
        self.progress(self.start + (self.end - self.start) * done / max(1, total))


def run_job(rt: Runtime, job_id: str, progress: Progress) -> str | None:
    """Run ``job_id``; returns its final status (``None`` when there was nothing to do)."""
    store = rt.store
    rec = store.get(job_id)
    if rec is None or rec.status in jobs.FINISHED:
        return None  # expired, deleted, canceled while queued, or a duplicate delivery
    lost = count_delivery(rt, job_id)
    if lost is not None:
        return lost
    started = time.time()
    if store.transition(job_id, jobs.RUNNING, (jobs.QUEUED, jobs.RUNNING), started_at=started,
                        stage="load", progress=0.05, worker=f"{worker_name()}/{os.getpid()}") is None:
        return None
    timings = {"queue": round(started - rec.created_at, 4)}

    def check() -> None:
        raw = rt.redis.hmget(jobs.job_key(job_id), "status", "cancel_requested")
        if raw[0] is None or raw[0] == b"canceled" or raw[1] == b"1":
            raise JobCanceled()

    def step(stage: str, fraction: float) -> None:
        check()
        store.update(job_id, stage=stage, progress=fraction)
        progress(stage, fraction)

    try:
        step("load", 0.05)
        t0 = time.perf_counter()
        loaded_before = rt.model_loaded()
        model = rt.model()
        if not loaded_before:
            timings["model_load"] = round(time.perf_counter() - t0, 4)  # first job of a process
        store.update(job_id, model=model.describe())
        t0 = time.perf_counter()
        info = load_info(rt.storage, rec.volume_id)
        if info is None:
            raise InvalidVolume(f"volume {rec.volume_id} no longer exists (it was deleted, or it expired); upload it again")
        volume, from_memory = rt.volume(info)
        timings["load"] = round(time.perf_counter() - t0, 4)
        step("segment", 0.2)
        doc = rec.request.prompts or {}
        hooks = JobHooks(check, lambda fraction: store.update(job_id, progress=round(fraction, 3)), 0.2, 0.85)
        cache = rt.cache_for(rec.tenant)
        segmenter = Segmenter(model.network, model.options, device=rt.settings.device, cache=cache,
                              max_windows=rt.settings.max_windows, hooks=hooks)
        t0 = time.perf_counter()
        lesions = resolve(doc, volume, load_masks(doc, volume, lambda v: open_mask(rt, v)))
        result = segmenter.segment_lesions(volume, lesions, iterations=int(doc.get("iterations", 1)))
        seg_s = time.perf_counter() - t0
        for stage in ("encode", "decode", "prior", "boundary"):
            timings[stage] = round(hooks.seconds[stage], 4)
        timings["preprocess"] = round(max(0.0, seg_s - sum(hooks.seconds.values())), 4)
        t0 = time.perf_counter()
        measured = measure_result(job_id, result.labels, volume, [o.lesion for o in result.lesions],
                                  result.intensity.hu if result.intensity is not None else None)
        measurements = {n: m.to_json() if m is not None else None for n, m in measured.items()}
        timings["measure"] = round(time.perf_counter() - t0, 4)
        step("write", 0.85)
        t0 = time.perf_counter()
        written, errors, warnings = write_results(rt, job_id, result.labels, volume, segment_labels(doc), model,
                                                  measured)
        warnings = [f"lesion {o.lesion} is empty: nothing was segmented at its prompts; put a positive click on "
                    "the lesion itself or add clicks" for o in result.lesions if o.voxels == 0] + warnings
        timings["write"] = round(time.perf_counter() - t0, 4)
        timings["total"] = round(time.time() - rec.created_at, 4)
        lines = reference_lines(doc, volume)
        numbers = segment_numbers({o.lesion: o.voxels for o in result.lesions}, written)
        summary = [{"lesion": o.lesion, "voxels": o.voxels, "windows": o.windows,
                    "cache_hits": o.cache_hits, "stopped_at_limit": o.stopped_at_limit,
                    "segment_number": numbers.get(o.lesion),
                    "measurements": measurements.get(o.lesion), "reference_line": lines.get(o.lesion)}
                   for o in result.lesions]
        fields = dict(finished_at=time.time(), stage="done", progress=1.0, timings=timings,
                      results=written, result_errors=errors, warnings=warnings, lesions=summary,
                      cache_hits=cache.hits, encoder_runs=hooks.runs["encode"],
                      volume_from_memory=from_memory, input_format=str(volume.meta.get("format", "")),
                      intensity=result.intensity.to_dict() if result.intensity else None)
        if store.transition(job_id, jobs.SUCCEEDED, (jobs.RUNNING,), **fields) is None:
            raise JobCanceled()
        rt.metrics.incr("jobs_succeeded")
        rt.metrics.observe_all(timings)
        progress("done", 1.0)
        logger.info("job %s succeeded in %.2f s (encoder runs %d)", job_id, timings["total"], hooks.runs["encode"])
        return jobs.SUCCEEDED
    except JobCanceled:
        rt.storage.delete_prefix(f"jobs/{job_id}")
        store.transition(job_id, jobs.CANCELED, (jobs.RUNNING, jobs.QUEUED), finished_at=time.time(),
                         stage="canceled")
        logger.info("job %s canceled", job_id)
        return jobs.CANCELED
    except MsamError as exc:
        return _fail(rt, job_id, exc.code, str(exc))
    except SoftTimeLimitExceeded:
        return _fail(rt, job_id, "timeout", f"the job ran longer than {rt.settings.job_soft_time_limit_s} s "
                     "and was stopped; try fewer lesions or a smaller max_windows")
    except Exception as exc:  # a bug or a broken environment: generic message, details logged
        logger.error("job %s failed: %s\n%s", job_id, type(exc).__name__,
                     "".join(traceback.format_tb(exc.__traceback__)))
        return _fail(rt, job_id, "internal_error",
                     f"the worker failed unexpectedly ({type(exc).__name__}); the job can be submitted again")


def segment_numbers(voxels: Mapping[int, int], written: list[str]) -> dict[int, int]:
    """Label -> its segment number in the DICOM-SEG written (``{}`` without one), from each
    label's voxel count: the SEG holds the labels present, numbered 1..n in ascending order
    (:func:`~msam_core.io.seg.write_seg`)."""
    if "dicom-seg" not in written:
        return {}
    present = sorted(label for label, n in voxels.items() if n > 0)
    return {label: number for number, label in enumerate(present, start=1)}


def count_delivery(rt: Runtime, job_id: str) -> str | None:
    """Count this delivery of ``job_id`` (its ``attempts``); a job delivered more often than
    ``MSAM_MAX_DELIVERIES`` has stopped its worker each time (a crash, an out-of-memory kill) and
    is failed instead of run again: returns the status it was given, else ``None``."""
    deliveries = rt.store.incr(job_id, "deliveries")
    if deliveries > 1:
        rt.metrics.incr("redeliveries")
        logger.warning("job %s delivered again (delivery %d)", job_id, deliveries)
    if deliveries > rt.settings.max_deliveries:
        return _fail(rt, job_id, "worker_lost",
                     f"the job stopped its worker {deliveries - 1} times (crash or out of memory) "
                     "and was not tried again; try a smaller image or fewer lesions")
    return None


def measure_result(job_id: str, labels, volume, lesions: list[int], hounsfield: bool | None = None) -> dict:
    """Lesion -> its :class:`~msam_core.measure.LesionMeasurements` (``None`` for a lesion left
    without voxels). Measuring is a report on the mask: a fault in it is logged
    and leaves the job's masks and other results as they are."""
    from msam_core.measure import measure_lesion

    out: dict = {}
    for lesion in lesions:
        try:
            measured = measure_lesion(labels == lesion, volume, hounsfield=hounsfield)
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost the segmentation
            logger.error("job %s: measuring lesion %d failed: %s\n%s", job_id, lesion, type(exc).__name__,
                         "".join(traceback.format_tb(exc.__traceback__)))
            measured = None
        out[lesion] = measured
    return out


def open_mask(rt: Runtime, volume_id: str):  # noqa: ANN202 - a Volume or None
    """A lesion mask's volume (decoded from storage, not kept in the worker's volume cache)."""
    info = load_info(rt.storage, volume_id)
    return open_volume(rt.storage, info) if info is not None else None


def _fail(rt: Runtime, job_id: str, code: str, message: str) -> str | None:
    rt.storage.delete_prefix(f"jobs/{job_id}")
    if rt.store.transition(job_id, jobs.FAILED, (jobs.QUEUED, jobs.RUNNING), finished_at=time.time(),
                           stage="failed", error={"code": code, "message": message}) is None:
        return None
    rt.metrics.incr("jobs_failed")
    logger.info("job %s failed: %s", job_id, code)
    return jobs.FAILED


def write_results(rt: Runtime, job_id: str, labels, volume, names: dict[int, str],
                  model: LoadedModel, measured: dict | None = None) -> tuple[list[str], dict[str, str], list[str]]:
    """Every output this input allows; returns (formats written, format -> why not, warnings).
    DICOM outputs name ``model`` (its name and version) as the algorithm that made them; the
    measurement SR (``measured``: lesion -> measurements) references the DICOM-SEG written
    before it, so it is written only when the SEG was.

    Each format stands alone: a user mistake (:class:`MsamError`) or an unexpected exception in
    one writer costs that format only (its reason goes to ``unavailable_results``, the exception
    type and traceback to the log). Only when no format could be written does the first
    unexpected exception propagate (the job fails ``internal_error``). A stop (cancel, time
    limit) always propagates. Warnings are what the DICOM writers fixed in the source's
    attributes (names, never values)."""
    from msam_core.io.nifti import save_mask_nifti
    from msam_core.io.preview import save_preview

    written: list[str] = []
    errors: dict[str, str] = {}
    warnings: list[str] = []
    unexpected: list[Exception] = []
    writers: dict[str, Callable[[Path], object]] = {
        "nifti": lambda p: save_mask_nifti(labels, volume, p),
        "png": lambda p: save_preview(volume, labels, p),
    }
    if volume.meta.get("format") == "metaimage":  # the input's own format, with its geometry
        from msam_core.io.metaimage import save_mask_metaimage

        writers["mha"] = lambda p: save_mask_metaimage(labels, volume, p)
    if volume.meta.get("format") == "dicom":
        from msam_core.io.rtstruct import write_rtstruct
        from msam_core.io.seg import write_seg

        writers["dicom-seg"] = lambda p: write_seg(labels, volume, p, segment_labels=names or None,
                                                   algorithm_name=model.name, algorithm_version=model.version,
                                                   warnings=warnings)
        if measured is not None:
            from msam_core.io.sr import write_sr

            def sr(p: Path) -> object:
                if "dicom-seg" not in written:
                    raise UnsupportedRequest("the measurement SR references the DICOM-SEG, which could not be written: "
                                             + errors.get("dicom-seg", "see dicom-seg"))
                with rt.storage.local_copy(result_key(job_id, "dicom-seg")) as seg:
                    return write_sr({n: m for n, m in measured.items() if m is not None}, volume, seg, p,
                                    algorithm_name=model.name, algorithm_version=model.version, warnings=warnings)

            writers["sr"] = sr
        writers["rtstruct"] = lambda p: write_rtstruct(labels, volume, p, roi_names=names or None,
                                                       algorithm_name=model.name, algorithm_version=model.version,
                                                       warnings=warnings)
    else:
        fmt = volume.meta.get("format", "not DICOM")
        for name in ("dicom-seg", "rtstruct", "sr"):
            errors[name] = f"{name} output needs a DICOM input (this image was {fmt}); ask for nifti or png"
    tmp = rt.storage.staging_dir()
    try:
        for name, write in writers.items():
            path = Path(tmp) / RESULT_FILES[name].name
            try:
                write(path)
            except (JobCanceled, SoftTimeLimitExceeded):
                raise
            except MsamError as exc:
                errors[name] = str(exc)
                continue
            except Exception as exc:  # a bug in one writer must not cost the other formats
                logger.error("job %s: the %s writer failed: %s\n%s", job_id, name, type(exc).__name__,
                             "".join(traceback.format_tb(exc.__traceback__)))
                errors[name] = (f"the {name} output could not be written ({type(exc).__name__}, a fault in msam, "
                                "not in the request); the other formats are complete. Report it with the job id")
                unexpected.append(exc)
                continue
            rt.storage.put_file(result_key(job_id, name), path)
            written.append(name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not written and unexpected:
        raise unexpected[0]
    return written, errors, list(dict.fromkeys(warnings))
