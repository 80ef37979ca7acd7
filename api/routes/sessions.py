"""Interactive sessions (see :mod:`msam_service.sessions` for the state and the delta format).

One route per verb of a session: create it on an uploaded volume, add a lesion, add an
interaction to a lesion (a point, a box, a mask as input), undo, reset, read a lesion's mask,
commit (write and send the outputs), delete. An interaction's request waits for its answer up to
``MSAM_INTERACTION_WAIT_S`` (or the ``wait`` it asks for) and returns the lesion's new mask as a
delta; past that it returns 202 and a link that answers the same once the worker has.

Routing: an interaction goes to the queue of the worker that answered the session's last one
(that worker holds the decoded volume, crops and embeddings) while its heartbeat is alive, else
to the shared queue. Interactions are acknowledged on receipt, so a worker lost mid-interaction
does not hold it: whoever waits for an interaction whose worker (or the worker it was routed to)
is gone sends it again to the shared queue, once; a lost worker's own queue is emptied by the
live workers (:func:`msam_service.queue.sweep_lost_worker_queues`), under the same once-only mark.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Response

from api import pacs_requests
from api.deps import Services, base_url, json_body, services, tenant
from api.errors import ApiError
from api.schemas import (KEYED_RESPONSES, CommitRequest, ErrorBody, Interaction, InteractionOut, JobAccepted, LesionChange,
                         LesionCreate, LesionOut, MaskInteraction, PointInteraction, SessionCreate, SessionOut)
from api.uploads import volume_for
from msam_service import jobs
from msam_service import sessions as S
from msam_service.contract import SessionLesion, SessionSnapshot
from msam_service.masks import grid_difference, mask_grid_error
from msam_service.prompts import resolve
from msam_service.queue import live_worker_names, send_interaction, worker_alive
from msam_service.volumes import VolumeInfo

router = APIRouter(tags=["sessions"], responses=KEYED_RESPONSES)

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                                             413: {"model": ErrorBody}, 415: {"model": ErrorBody},
                                             422: {"model": ErrorBody}}
#: The routes whose body is JSON check its media type first (415 instead of a confusing 422).
_JSON = [Depends(json_body)]
#: Error codes of a failed interaction that are the caller's to fix (422); others are 409/503.
_CONFLICT = ("undone", "session_gone")


def _store(svc: Services) -> S.SessionStore:
    return S.SessionStore(svc.redis, svc.settings.job_ttl_s)


def _session(svc: Services, session_id: str, who: str) -> dict[str, Any]:
    doc = _store(svc).get(session_id) if len(session_id) == 32 and session_id.isalnum() else None
    if doc is None or doc["tenant"] != who:
        raise ApiError(404, "not_found", f"session {session_id} does not exist or has expired; start a new one "
                       "with POST /sessions")
    return doc


def _lesion(doc: dict[str, Any], number: int) -> dict[str, Any]:
    lesion = doc["lesions"].get(str(number))
    if lesion is None:
        raise ApiError(404, "not_found", f"the session has no lesion {number} (lesions: "
                       f"{sorted(int(n) for n in doc['lesions']) or 'none'}); add one with POST .../lesions")
    return lesion


def _change(svc: Services, session_id: str, edit) -> tuple[dict[str, Any], Any]:  # noqa: ANN001
    try:
        return _store(svc).change(session_id, edit)
    except S.SessionGone as exc:
        raise ApiError(404, "not_found", f"session {session_id} does not exist or has expired") from exc


def _lesion_out(svc: Services, doc: dict[str, Any], lesion: dict[str, Any], info: VolumeInfo) -> LesionOut:
    box = _store(svc).current_mask(doc["session_id"], lesion)
    return LesionOut(lesion=lesion["number"], label=lesion.get("label"), step=lesion["step"],
                     interactions=S.active(lesion),
                     measurements=_measured(svc, doc["session_id"], lesion, box, info) if box is not None else None)


def _measured(svc: Services, session_id: str, lesion: dict[str, Any], box: S.BoxMask,
              info: VolumeInfo) -> dict[str, Any]:
    """The measurements of the lesion's mask in effect (``box``)."""
    acts = S.active(lesion)
    return _store(svc).measurements_of(session_id, acts[-1]["id"] if acts else None, box,
                                       np.asarray(info.affine_ras))


def _session_out(svc: Services, doc: dict[str, Any], info: VolumeInfo) -> SessionOut:
    return SessionOut(session_id=doc["session_id"], volume_id=doc["volume_id"], space=doc["space"],
                      created_at=doc["created_at"], updated_at=doc["updated_at"], shape=info.shape,
                      affine_ras=info.affine_ras,
                      lesions=[_lesion_out(svc, doc, x, info) for _, x in sorted(doc["lesions"].items(),
                                                                                   key=lambda kv: int(kv[0]))])


@router.post("/sessions", status_code=201, response_model=SessionOut, responses=_ERRORS, dependencies=_JSON)
def create_session(body: SessionCreate, svc: Services = Depends(services), who: str = Depends(tenant)) -> SessionOut:
    """Start an interactive session on a volume uploaded with ``POST /volumes`` (a worker starts
    decoding the volume at once, ahead of the first click)."""
    info = volume_for(svc, body.volume_id, who)
    doc = _store(svc).create(who, body.volume_id, body.space)
    # the live worker holding the fewest sessions decodes the volume and holds the session (a
    # worker answers one click at a time: sessions piled on one worker wait for each other's)
    holder = S.claim_holder(svc.redis, doc["session_id"], live_worker_names(svc.redis), svc.settings.job_ttl_s)
    queue = svc.settings.queue if holder is None else S.worker_queue(svc.settings.queue, holder)
    svc.queue.send_task(S.OPEN_TASK, args=[doc["session_id"]], queue=queue, ignore_result=True)
    return _session_out(svc, doc, info)


@router.get("/sessions/{session_id}", response_model=SessionOut, responses=_ERRORS)
def get_session(session_id: str, svc: Services = Depends(services), who: str = Depends(tenant)) -> SessionOut:
    """The session: its lesions, their interactions in effect and measurements."""
    doc = _session(svc, session_id, who)
    return _session_out(svc, doc, volume_for(svc, doc["volume_id"], who))


@router.delete("/sessions/{session_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_session(session_id: str, svc: Services = Depends(services), who: str = Depends(tenant)) -> Response:
    """Forget the session (its masks too; committed results stay with their job)."""
    _session(svc, session_id, who)
    _store(svc).delete(session_id)
    return Response(status_code=204)


@router.post("/sessions/{session_id}/lesions", status_code=201, response_model=LesionOut, responses=_ERRORS,
             dependencies=_JSON)
def add_lesion(session_id: str, body: LesionCreate | None = None, svc: Services = Depends(services),
               who: str = Depends(tenant)) -> LesionOut:
    """A new lesion (numbered 1, 2, ... in the order added: its label value in the outputs)."""
    doc = _session(svc, session_id, who)
    info = volume_for(svc, doc["volume_id"], who)

    def edit(d: dict[str, Any]) -> dict[str, Any]:
        if len(d["lesions"]) >= svc.settings.max_lesions:
            raise ApiError(422, "too_many_prompts", f"the session has {len(d['lesions'])} lesions; at most "
                           f"{svc.settings.max_lesions} (MSAM_MAX_LESIONS)")
        number = d["next_lesion"]
        d["next_lesion"] = number + 1
        lesion = {"number": number, "label": body.label if body else None, "interactions": [], "step": 0}
        d["lesions"][str(number)] = lesion
        return lesion

    doc, lesion = _change(svc, session_id, edit)
    return _lesion_out(svc, doc, lesion, info)


def _validate(svc: Services, doc: dict[str, Any], lesion: dict[str, Any], act: dict[str, Any],
              info: VolumeInfo, who: str) -> None:
    """The lesion with ``act`` appended must make a valid prompt for the image (422 otherwise)."""
    if lesion["step"] >= svc.settings.max_interactions:
        raise ApiError(422, "too_many_prompts", f"lesion {lesion['number']} has {lesion['step']} interactions; at "
                       f"most {svc.settings.max_interactions} (MSAM_MAX_INTERACTIONS); reset it or add a lesion")
    trial = {**lesion, "interactions": S.active(lesion) + [act], "step": lesion["step"] + 1}
    prompt, mask = S.lesion_prompt_doc(trial)
    if mask is not None:
        prompt["mask"] = {"volume_id": "0" * 32}  # only its presence counts for the check below
    resolve({"space": doc["space"], "lesions": [prompt], "numbers": [int(lesion["number"])]}, info.geometry_volume())
    if act["kind"] == "mask" and act.get("volume_id"):
        mask_info = volume_for(svc, act["volume_id"], who)
        difference = grid_difference(mask_info.shape, np.asarray(mask_info.affine_ras), info.shape,
                                     np.asarray(info.affine_ras))
        if difference:
            raise mask_grid_error(lesion["number"], difference)


def _route(svc: Services, session_id: str) -> str:
    """The queue of the worker holding the session while it is alive, else the shared queue."""
    holder = svc.redis.get(S.holder_key(session_id))
    if holder and worker_alive(svc.redis, holder.decode()):  # type: ignore[union-attr]
        return S.worker_queue(svc.settings.queue, holder.decode())  # type: ignore[union-attr]
    return svc.settings.queue


def _send(svc: Services, interaction_id: str, queue: str) -> None:
    send_interaction(svc.queue, interaction_id, queue)


def _rescue(svc: Services, interaction_id: str, rec: dict[str, Any]) -> None:
    """Send the interaction to the shared queue when the worker it waits on is gone: the worker it
    was routed to (still queued there) or the one running it. Once per interaction."""
    if rec.get("resent"):
        return
    if rec["status"] == S.QUEUED and rec["queue"] != svc.settings.queue:
        owner = rec["queue"].rsplit(".w.", 1)[-1]
    elif rec["status"] == S.RUNNING and rec.get("worker"):
        owner = rec["worker"].split("/", 1)[0]
    else:
        return
    if worker_alive(svc.redis, owner):
        return
    if _store(svc).claim_resend(interaction_id, svc.settings.queue):
        _send(svc, interaction_id, svc.settings.queue)
        svc.metrics.incr("interactions_resent")


def _wait(svc: Services, interaction_id: str, wait_s: float) -> dict[str, Any]:
    """The interaction's record once answered, or as it is after ``wait_s``."""
    store = _store(svc)
    deadline = time.monotonic() + wait_s
    last_check = time.monotonic()
    while True:
        rec = store.interaction(interaction_id)
        if rec is None or rec["status"] in (S.DONE, S.FAILED):
            return rec or {}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _rescue(svc, interaction_id, rec)
            return rec
        if time.monotonic() - last_check > 1.0:
            _rescue(svc, interaction_id, rec)
            last_check = time.monotonic()
        # wakes as soon as the worker pushes; bounded below the Redis client's read timeout
        svc.redis.blpop([S.done_key(interaction_id)], timeout=min(remaining, 1.0))


def _answer(rec: dict[str, Any], interaction_id: str, session_id: str, base: str, response: Response) -> InteractionOut:
    url = f"{base}/sessions/{session_id}/interactions/{interaction_id}"
    status = rec.get("status", S.FAILED)
    if status == S.FAILED:
        error = rec.get("error") or {"code": "internal_error", "message": "the interaction failed"}
        code = 409 if error["code"] in _CONFLICT else 503 if error["code"] == "internal_error" else 422
        raise ApiError(code, error["code"], error["message"])
    if status != S.DONE:
        response.status_code = 202
        response.headers["Location"] = url
        return InteractionOut(interaction_id=interaction_id, session_id=session_id, lesion=int(rec["lesion"]),
                              status=status, status_url=url)  # type: ignore[arg-type]
    result = rec["result"]
    return InteractionOut(interaction_id=interaction_id, session_id=session_id, lesion=result["lesion"],
                          status="done", status_url=url, step=result["step"], base=result["base"],
                          delta=result["delta"], measurements=result["measurements"], timings=result["timings"])


@router.post("/sessions/{session_id}/lesions/{lesion}/interactions", response_model=InteractionOut,
             dependencies=_JSON,
             responses={202: {"model": InteractionOut, "description": "not answered within the wait: poll status_url"},
                        **_ERRORS})
def interact(session_id: str, lesion: int, body: Interaction, response: Response,
             wait: float | None = Query(default=None, ge=0, le=60, allow_inf_nan=False,
                                        description="seconds to wait for the answer "
                                        "(default MSAM_INTERACTION_WAIT_S); 0: answer 202 at once"),
             svc: Services = Depends(services), who: str = Depends(tenant), base: str = Depends(base_url)) -> InteractionOut:
    """Add a point, a box or a mask to a lesion; answers its new mask as a delta (200), or 202 and
    ``status_url`` when the answer takes longer than the wait."""
    doc = _session(svc, session_id, who)
    info = volume_for(svc, doc["volume_id"], who)
    current = _lesion(doc, lesion)
    interaction_id = S.new_id()
    act: dict[str, Any] = {"id": interaction_id, "kind": body.kind}
    if isinstance(body, PointInteraction):
        act.update(xyz=list(body.xyz), positive=body.positive)
    elif isinstance(body, MaskInteraction):
        if body.volume_id:
            act.update(volume_id=body.volume_id, label=body.label)
        else:
            act["stored"] = "in" + interaction_id
            _store_edit(svc, doc, current, body, act["stored"], info)
    else:
        act.update(corners=[list(c) for c in body.corners])
    _validate(svc, doc, current, act, info, who)

    def edit(d: dict[str, Any]) -> None:
        les = _lesion(d, lesion)
        les["interactions"] = S.active(les) + [act]
        les["step"] = len(les["interactions"])

    _change(svc, session_id, edit)
    try:
        queue = _route(svc, session_id)
        _store(svc).new_interaction(interaction_id, session_id, lesion, queue)
        _send(svc, interaction_id, queue)
    except Exception:
        _withdraw(svc, session_id, lesion, interaction_id)
        raise
    svc.metrics.incr("interactions_submitted")
    rec = _wait(svc, interaction_id, svc.settings.interaction_wait_s if wait is None else wait)
    return _answer(rec, interaction_id, session_id, base, response)


def _withdraw(svc: Services, session_id: str, lesion: int, interaction_id: str) -> None:
    """Take an interaction that could not be queued back out of its lesion, so that the error the
    client gets means "not applied: send it again". When Redis does not answer for this either,
    the error says that the click may be recorded and how to tell."""
    try:
        _store(svc).drop_interaction(session_id, lesion, interaction_id)
    except Exception as exc:
        raise ApiError(503, "unavailable", f"the interaction could not be queued and may still be recorded in the "
                       f"lesion (as {interaction_id}): GET /sessions/{session_id} once the service answers, and "
                       "undo it there before sending it again") from exc


def _store_edit(svc: Services, doc: dict[str, Any], lesion: dict[str, Any], body: MaskInteraction, key: str,
                info: VolumeInfo) -> None:
    """The lesion's current mask with the edit applied, stored as the interaction's input mask."""
    assert body.edit is not None
    current = _store(svc).current_mask(doc["session_id"], lesion)
    if current is None:
        raise ApiError(409, "busy", "the lesion's last interaction is still running; edit its mask once it answered")
    try:
        edited = S.apply_delta(current, body.edit.model_dump(), tuple(info.shape))
    except ValueError as exc:
        raise ApiError(422, "invalid_prompt", f"edit: {exc}") from exc
    if edited.voxels == 0:
        raise ApiError(422, "invalid_prompt", "edit: the edited mask is empty; to start the lesion again use "
                       "POST .../reset")
    _store(svc).put_mask(doc["session_id"], key, edited)


@router.get("/sessions/{session_id}/interactions/{interaction_id}", response_model=InteractionOut,
            responses={202: {"model": InteractionOut}, **_ERRORS})
def get_interaction(session_id: str, interaction_id: str, response: Response,
                    wait: float = Query(default=0, ge=0, le=60, allow_inf_nan=False,
                                       description="seconds to wait for the answer"),
                    svc: Services = Depends(services), who: str = Depends(tenant),
                    base: str = Depends(base_url)) -> InteractionOut:
    """An interaction's answer (200), or 202 while it is queued or running."""
    _session(svc, session_id, who)
    rec = _store(svc).interaction(interaction_id) if len(interaction_id) == 32 and interaction_id.isalnum() else None
    if rec is None or rec["session_id"] != session_id:
        raise ApiError(404, "not_found", f"interaction {interaction_id} does not exist or has expired")
    rec = _wait(svc, interaction_id, wait)
    return _answer(rec, interaction_id, session_id, base, response)


def _lesion_change(svc: Services, doc: dict[str, Any], lesion: dict[str, Any], old: S.BoxMask, old_id: str | None,
                   info: VolumeInfo) -> dict[str, Any]:
    new = _store(svc).current_mask(doc["session_id"], lesion) or S.BoxMask.empty()
    return {"lesion": lesion["number"], "step": lesion["step"], "base": old_id, "interaction_id": _in_effect(lesion),
            "delta": S.delta(old, new), "measurements": _measured(svc, doc["session_id"], lesion, new, info)}


def _in_effect(lesion: dict[str, Any]) -> str | None:
    """The id of the interaction whose mask the lesion has (``None``: none, the empty mask)."""
    acts = S.active(lesion)
    return acts[-1]["id"] if acts else None


def _undo_or_reset(svc: Services, session_id: str, lesion: int, who: str, reset: bool) -> dict[str, Any]:
    doc = _session(svc, session_id, who)
    info = volume_for(svc, doc["volume_id"], who)
    store = _store(svc)

    def edit(d: dict[str, Any]) -> tuple[S.BoxMask, str | None]:
        les = _lesion(d, lesion)
        acts = S.active(les)
        if not acts:
            raise ApiError(409, "nothing_to_undo", f"lesion {lesion} has no interaction in effect")
        old = store.mask(session_id, acts[-1]["id"])
        if old is None:
            raise ApiError(409, "busy", f"lesion {lesion}'s last interaction is still running; undo once it answered")
        les["step"] = 0 if reset else les["step"] - 1
        return old, acts[-1]["id"]

    doc, (old, old_id) = _change(svc, session_id, edit)
    return _lesion_change(svc, doc, _lesion(doc, lesion), old, old_id, info)


@router.post("/sessions/{session_id}/lesions/{lesion}/undo", response_model=LesionChange, responses=_ERRORS)
def undo(session_id: str, lesion: int, svc: Services = Depends(services), who: str = Depends(tenant)) -> dict[str, Any]:
    """Take back the lesion's last interaction; answers the change of its mask as a delta
    (``base``: the interaction undone), with the measurements of the mask now in effect."""
    return _undo_or_reset(svc, session_id, lesion, who, reset=False)


@router.post("/sessions/{session_id}/lesions/{lesion}/reset", response_model=LesionChange, responses=_ERRORS)
def reset(session_id: str, lesion: int, svc: Services = Depends(services), who: str = Depends(tenant)) -> dict[str, Any]:
    """Take back every interaction of the lesion (its mask becomes empty)."""
    return _undo_or_reset(svc, session_id, lesion, who, reset=True)


@router.get("/sessions/{session_id}/lesions/{lesion}/mask", response_model=LesionChange, responses=_ERRORS)
def lesion_mask(session_id: str, lesion: int, svc: Services = Depends(services),
                who: str = Depends(tenant)) -> dict[str, Any]:
    """The lesion's whole current mask in the delta format (``base`` null: over an empty mask)."""
    doc = _session(svc, session_id, who)
    info = volume_for(svc, doc["volume_id"], who)
    les = _lesion(doc, lesion)
    box = _store(svc).current_mask(session_id, les)
    if box is None:
        raise ApiError(409, "busy", f"lesion {lesion}'s last interaction is still running")
    return {"lesion": lesion, "step": les["step"], "base": None, "interaction_id": _in_effect(les),
            "delta": S.whole(box), "measurements": _measured(svc, session_id, les, box, info)}


@router.post("/sessions/{session_id}/commit", status_code=202, response_model=JobAccepted, responses=_ERRORS,
             dependencies=_JSON)
def commit(session_id: str, body: CommitRequest | None = None, svc: Services = Depends(services),
           who: str = Depends(tenant), base: str = Depends(base_url)) -> JobAccepted:
    """Write the session's outputs (DICOM-SEG and RTSTRUCT for a DICOM volume, NIfTI, PNG) from the
    lesions' current masks, as a job: poll ``status_url``, download from ``/jobs/{id}/result``.
    ``destinations`` and ``callback_url`` work as for ``POST /segment``."""
    body = body or CommitRequest()
    doc = _session(svc, session_id, who)
    store = _store(svc)
    volume_for(svc, doc["volume_id"], who)  # a volume deleted under the session: 404 now, not a failed job
    lesions: list[SessionLesion] = []
    for number, les in sorted(doc["lesions"].items(), key=lambda kv: int(kv[0])):
        acts = S.active(les)
        if acts:
            lesions.append(SessionLesion(lesion=int(number), mask=acts[-1]["id"], label=les.get("label")))
    if not lesions:
        raise ApiError(422, "invalid_prompt", "no lesion of the session has a mask yet; click on a lesion first")
    job = pacs_requests.outputs(list(body.destinations), body.callback_url, base, who)
    job.session = SessionSnapshot(session_id=session_id, lesions=lesions)
    job_id = jobs.new_id()
    # the job writes copies of the masks: deleting or changing the session after the commit
    # leaves what it writes as it was committed
    busy = store.keep_for_commit(session_id, job_id, {x.lesion: x.mask for x in lesions})
    if busy:
        raise ApiError(409, "busy", f"lesion {busy[0]}'s last interaction is still running; commit once it answered")
    store.touch(session_id, [x.mask for x in lesions])
    svc.store.create(job_id, tenant=who, volume_id=doc["volume_id"], request=job)
    svc.queue.send_task(S.COMMIT_TASK, args=[job_id], task_id=job_id, queue=svc.settings.queue)
    svc.metrics.incr("jobs_submitted")
    return JobAccepted(job_id=job_id, status_url=f"{base}/jobs/{job_id}", volume_id=doc["volume_id"])
