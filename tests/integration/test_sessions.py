"""Interactive sessions through HTTP, Redis and real worker processes: the delta in the
interaction's own response equals the job API's mask for the same prompts; undo, reset, mask
edits, commit to outputs; a lost holder worker costs one resent interaction, not the session."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import redis

from msam_service import redis_conn
from msam_service import sessions as S
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


class Mirror:
    """A client's copy of one lesion's mask, kept by applying the deltas it is answered."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.mask = np.zeros(shape, bool)

    def apply(self, answer: dict) -> None:
        if answer["base"] is None:
            self.mask[:] = False
        change = answer["delta"]
        if change is None:
            return
        lo, hi = change["lo"], change["hi"]
        box = S.decode_box(change["data"], tuple(h - l for l, h in zip(lo, hi)))
        self.mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = box


def _upload(c, path: Path) -> dict:
    with open(path, "rb") as f:
        r = c.post("/volumes", files={"image": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()


def _job_mask(service: Service, c, volume_id: str, positive: list, negative: list = ()) -> np.ndarray:
    """The job API's mask for the same prompts (the reference a session must match)."""
    lesion = {"positive": positive, **({"negative": list(negative)} if negative else {})}
    r = c.post("/segment", json={"volume_id": volume_id, "prompts": {"space": "voxel", "lesions": [lesion]}})
    assert r.status_code == 202, r.text
    job = service.wait_job(r.json()["job_id"])
    assert job["status"] == "succeeded", (job, service.logs())
    data = c.get(f"/jobs/{job['job_id']}/result", params={"format": "nifti"}).content
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj) == 1


def _wait_holder(service: Service, sid: str) -> str:
    """The worker that opened the session (it decodes the volume ahead of the first click)."""
    r = redis_conn.client(service.redis_url)
    deadline = time.monotonic() + 60
    while r.get(S.holder_key(sid)) is None:
        assert time.monotonic() < deadline, service.logs()
        time.sleep(0.05)
    return r.get(S.holder_key(sid)).decode()


def _click(c, sid: str, lesion: int, xyz, positive: bool = True) -> dict:
    r = c.post(f"/sessions/{sid}/lesions/{lesion}/interactions",
               json={"kind": "point", "xyz": list(xyz), "positive": positive})
    assert r.status_code == 200, r.text
    return r.json()


def test_session_clicks_undo_reset_commit(service: Service, ct_nifti: Path) -> None:
    with service.client() as c:
        vol = _upload(c, ct_nifti)
        r = c.post("/sessions", json={"volume_id": vol["volume_id"]})
        assert r.status_code == 201, r.text
        session = r.json()
        sid = session["session_id"]
        assert session["shape"] == vol["shape"] and session["lesions"] == []
        r = c.post(f"/sessions/{sid}/lesions", json={"label": "tumour A"})
        assert r.status_code == 201 and r.json()["lesion"] == 1, r.text
        mirror = Mirror(tuple(vol["shape"]))
        holder = _wait_holder(service, sid)

        first = _click(c, sid, 1, (22, 20, 12))
        assert first["status"] == "done" and first["step"] == 1 and first["base"] is None
        # the worker that opened the session decoded the volume before the click came
        ran = json.loads(redis_conn.client(service.redis_url).hget(S.interaction_key(first["interaction_id"]), "result"))
        assert ran["volume_held"] is True and redis_conn.client(service.redis_url).get(S.holder_key(sid)).decode() == holder
        assert first["delta"]["encoding"] == S.DELTA_ENCODING
        assert first["timings"]["encode"] > 0  # a fresh crop: the encoder ran
        mirror.apply(first)
        expected_one = _job_mask(service, c, vol["volume_id"], [[22, 20, 12]])
        np.testing.assert_array_equal(mirror.mask, expected_one)
        voxel_ml = abs(np.linalg.det(np.asarray(vol["affine_ras"])[:3, :3])) / 1000
        assert first["measurements"]["voxel_count"] == int(expected_one.sum()) > 0
        assert first["measurements"]["volume_ml"] == pytest.approx(expected_one.sum() * voxel_ml, rel=1e-3)

        second = _click(c, sid, 1, (27, 20, 12), positive=False)
        assert second["step"] == 2 and second["base"] == first["interaction_id"]
        assert second["timings"]["encode"] == 0  # the held crop's embedding: no encoder run, no cache read
        mirror.apply(second)
        np.testing.assert_array_equal(mirror.mask, _job_mask(service, c, vol["volume_id"], [[22, 20, 12]],
                                                             [[27, 20, 12]]))
        after_two = mirror.mask.copy()

        r = c.post(f"/sessions/{sid}/lesions/1/undo")
        assert r.status_code == 200, r.text
        undone = r.json()
        assert undone["step"] == 1 and undone["base"] == second["interaction_id"]
        mirror.apply(undone)
        np.testing.assert_array_equal(mirror.mask, expected_one)
        assert undone["measurements"]["voxel_count"] == int(expected_one.sum())

        # the whole mask, as a client reconnecting would read it
        whole = c.get(f"/sessions/{sid}/lesions/1/mask").json()
        fresh = Mirror(tuple(vol["shape"]))
        fresh.apply(whole)
        np.testing.assert_array_equal(fresh.mask, expected_one)

        # a new click after the undo replaces the undone one
        again = _click(c, sid, 1, (27, 20, 12), positive=False)
        assert again["step"] == 2 and again["base"] == first["interaction_id"]
        mirror.apply(again)
        np.testing.assert_array_equal(mirror.mask, after_two)
        state = c.get(f"/sessions/{sid}").json()
        assert [a["kind"] for a in state["lesions"][0]["interactions"]] == ["point", "point"]

        # commit: the outputs are the masks the client sees
        r = c.post(f"/sessions/{sid}/commit", json={})
        assert r.status_code == 202, r.text
        job = service.wait_job(r.json()["job_id"])
        assert job["status"] == "succeeded", (job, service.logs())
        assert set(job["results"]) == {"nifti", "png"}
        data = c.get(f"/jobs/{job['job_id']}/result", params={"format": "nifti"}).content
        committed = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        np.testing.assert_array_equal(np.asarray(committed.dataobj) == 1, mirror.mask)
        np.testing.assert_array_equal(committed.affine, nib.load(str(ct_nifti)).affine)
        assert job["lesions"][0]["voxels"] == int(mirror.mask.sum())
        # measured as a job's lesions are, with the numbers the session's last answer gave
        measured, answered = job["lesions"][0]["measurements"], again["measurements"]
        assert measured["voxels"] == answered["voxel_count"] == int(mirror.mask.sum())
        for key in ("long_axis", "short_axis", "max_diameter_3d", "centroid_lps", "intensity", "surface_area_mm2",
                    "sphericity"):
            assert measured[key] == answered[key], key
        assert job["attempts"] == 1 and job["model"]["name"] and job["intensity"]["hu"] is False

        r = c.post(f"/sessions/{sid}/lesions/1/reset")
        assert r.status_code == 200, r.text
        mirror.apply(r.json())
        assert not mirror.mask.any() and r.json()["measurements"]["voxel_count"] == 0
        r = c.post(f"/sessions/{sid}/lesions/1/undo")
        assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_undo"

        assert c.delete(f"/sessions/{sid}").status_code == 204
        assert c.get(f"/sessions/{sid}").status_code == 404


def test_a_commit_writes_the_masks_it_took_whatever_happens_to_the_session_after(service: Service,
                                                                                  ct_nifti: Path) -> None:
    """A session deleted (or changed) while its commit waits in the queue: the job writes the
    masks as they were at the commit. A session whose volume was deleted is refused at commit
    (404 naming the deletion), not failed later in a job."""
    import os
    import signal

    r = redis_conn.client(service.redis_url)
    with service.client() as c:
        vol, sid = _new_session(c, ct_nifti)
        mirror = Mirror(tuple(vol["shape"]))
        mirror.apply(_click(c, sid, 1, (22, 20, 12)))
        worker = service.workers["w1"]
        os.killpg(worker.pid, signal.SIGSTOP)  # the commit waits in the queue meanwhile
        try:
            committed = c.post(f"/sessions/{sid}/commit", json={})
            assert committed.status_code == 202, committed.text
            job_id = committed.json()["job_id"]
            reset = c.post(f"/sessions/{sid}/lesions/1/reset")
            assert reset.status_code == 200, reset.text
            assert c.delete(f"/sessions/{sid}").status_code == 204
            assert not list(r.scan_iter(match=S.session_key(sid) + "*"))
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        job = service.wait_job(job_id)
        assert job["status"] == "succeeded", (job, service.logs())
        data = c.get(f"/jobs/{job_id}/result", params={"format": "nifti"}).content
        written = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj) == 1
        np.testing.assert_array_equal(written, mirror.mask)
        assert mirror.mask.any() and not r.exists(S.committed_mask_key(job_id, 1))  # the copy went with the job

        vol, sid = _new_session(c, ct_nifti)
        _click(c, sid, 1, (22, 20, 12))
        assert c.delete(f"/volumes/{vol['volume_id']}").status_code == 204
        refused = c.post(f"/sessions/{sid}/commit", json={})
        assert refused.status_code == 404 and "was deleted" in refused.json()["error"]["message"], refused.text


def test_box_and_mask_edit(service: Service, ct_nifti: Path) -> None:
    with service.client() as c:
        vol = _upload(c, ct_nifti)
        sid = c.post("/sessions", json={"volume_id": vol["volume_id"]}).json()["session_id"]
        c.post(f"/sessions/{sid}/lesions")
        mirror = Mirror(tuple(vol["shape"]))
        # no wait: 202 and a link, which answers the same once the worker has
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", params={"wait": 0},
                   json={"kind": "box", "corners": [[12, 10, 6], [32, 30, 18]]})
        assert r.status_code == 202 and r.headers["location"] == r.json()["status_url"], r.text
        assert r.json()["status"] in ("queued", "running") and r.json()["delta"] is None
        r = c.get(r.json()["status_url"], params={"wait": 60})
        assert r.status_code == 200 and r.json()["status"] == "done" and r.json()["step"] == 1, r.text
        mirror.apply(r.json())
        mirror.apply(_click(c, sid, 1, (22, 20, 12)))
        assert mirror.mask.any()
        idx = np.argwhere(mirror.mask)  # the box clips the mask
        assert np.all(idx.min(axis=0) >= [12, 10, 6]) and np.all(idx.max(axis=0) <= [32, 30, 18]), idx
        # erase half of the mask (the slices k >= 12) and re-run with the edited mask as input
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        box = mirror.mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
        box[:, :, max(1, 12 - lo[2]):] = False
        edit = {"lo": lo.tolist(), "hi": hi.tolist(), "data": S.encode_box(box)}
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "mask", "edit": edit},
                   params={"wait": 60})
        assert r.status_code == 200, r.text
        answer = r.json()
        print("mask edit timings", answer["timings"])
        assert answer["step"] == 3 and answer["base"] is not None
        mirror.apply(answer)
        assert answer["measurements"]["voxel_count"] == int(mirror.mask.sum())
        # a box outside the volume is refused with the reason
        bad = {"lo": [0, 0, 0], "hi": [999, 1, 1], "data": S.encode_box(np.ones((999, 1, 1), bool))}
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "mask", "edit": bad})
        assert r.status_code == 422 and "not inside the volume" in r.json()["error"]["message"], r.text


def test_bad_session_requests_are_4xx(service: Service, ct_nifti: Path, tmp_path: Path) -> None:
    with service.client() as c:
        vol = _upload(c, ct_nifti)
        assert c.post("/sessions", json={"volume_id": "0" * 32}).status_code == 404
        sid = c.post("/sessions", json={"volume_id": vol["volume_id"]}).json()["session_id"]
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "point", "xyz": [1, 2, 3]})
        assert r.status_code == 404 and "no lesion 1" in r.json()["error"]["message"]
        # a label the DICOM outputs cannot hold is refused when the lesion is made, not at commit
        r = c.post(f"/sessions/{sid}/lesions", json={"label": "liver\\lesion"})
        assert r.status_code == 422, r.text
        assert "character 6 of the label is a backslash" in r.json()["error"]["message"], r.text
        assert c.get(f"/sessions/{sid}").json()["lesions"] == []
        c.post(f"/sessions/{sid}/lesions")
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "point", "xyz": [400, 2, 3]})
        assert r.status_code == 422 and "outside the image" in r.json()["error"]["message"], r.text
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "point", "xyz": [4, 2, 3],
                                                                     "positive": False})
        assert r.status_code == 422 and "no positive point" in r.json()["error"]["message"], r.text
        # a refusal names the session's lesion, whose prompt is checked alone
        c.post(f"/sessions/{sid}/lesions")
        c.post(f"/sessions/{sid}/lesions")
        r = c.post(f"/sessions/{sid}/lesions/3/interactions", json={"kind": "point", "xyz": [4, 2, 3],
                                                                     "positive": False})
        assert r.status_code == 422 and "lesion 3 has no positive point" in r.json()["error"]["message"], r.text
        image = nib.load(str(ct_nifti))
        empty = tmp_path / "empty_mask.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(empty))
        r = c.post(f"/sessions/{sid}/lesions/3/interactions",
                   json={"kind": "mask", "volume_id": _upload(c, empty)["volume_id"]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"].startswith("the mask of lesion 3 holds no voxel that is not 0"), r.text
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "scribble", "xyz": [4, 2, 3]})
        assert r.status_code == 422
        assert c.get(f"/sessions/{sid}").json()["lesions"][0]["step"] == 0  # nothing refused was kept
        r = c.post(f"/sessions/{sid}/commit", json={})
        assert r.status_code == 422 and "no lesion" in r.json()["error"]["message"]
        r = c.post(f"/sessions/{sid}/commit", json={"destinations": ["nowhere"]})
        assert r.status_code == 422


@contextmanager
def _two_workers(service: Service) -> Iterator[redis.Redis]:
    """A second worker for the test (a holder can die, another answers); afterwards the service
    has its one worker "w1" again, as later tests expect."""
    service.start_worker("w2")
    try:
        yield redis_conn.client(service.redis_url)
    finally:
        for name in [n for n in service.workers if n != "w1"]:
            service.kill_worker(name)
        if "w1" not in service.workers:
            service.start_worker("w1")


def _new_session(c, ct_nifti: Path, lesions: int = 1) -> tuple[dict, str]:
    vol = _upload(c, ct_nifti)
    sid = c.post("/sessions", json={"volume_id": vol["volume_id"]}).json()["session_id"]
    for _ in range(lesions):
        c.post(f"/sessions/{sid}/lesions")
    return vol, sid


def test_lost_holder_costs_one_resent_interaction(service: Service, ct_nifti: Path) -> None:
    with _two_workers(service) as r:
        with service.client() as c:
            vol, sid = _new_session(c, ct_nifti)
            mirror = Mirror(tuple(vol["shape"]))
            mirror.apply(_click(c, sid, 1, (22, 20, 12)))
            holder = r.get(S.holder_key(sid)).decode()
            # the next click goes to the holder's own queue, and the holder answers it
            follow = _click(c, sid, 1, (21, 20, 12))
            mirror.apply(follow)
            assert r.get(S.holder_key(sid)).decode() == holder
            assert follow["timings"]["encode"] == 0
            name = next(n for n, p in service.workers.items() if holder.endswith(f":{p.pid}"))
            service.kill_worker(name)
            # the holder is gone: the interaction is routed to (or resent to) another worker,
            # which rebuilds the session from Redis and storage
            answer = _click(c, sid, 1, (27, 20, 12), positive=False)
            mirror.apply(answer)
            ran = r.hget(S.interaction_key(answer["interaction_id"]), "worker")
            assert answer["step"] == 3 and r.get(S.holder_key(sid)).decode() != holder, (holder, ran, {
                n: p.pid for n, p in service.workers.items()})
            expected = _job_mask(service, c, vol["volume_id"], [[22, 20, 12], [21, 20, 12]], [[27, 20, 12]])
            np.testing.assert_array_equal(mirror.mask, expected)
            # a click whose queued message sits with a worker that died is resent to the others
            sid2 = c.post("/sessions", json={"volume_id": vol["volume_id"]}).json()["session_id"]
            c.post(f"/sessions/{sid2}/lesions")
            _wait_holder(service, sid2)
            r.set(S.holder_key(sid2), "gone-host:1")
            r.hset("msam:worker:gone-host:1", "alive_at", "0")
            r.expire("msam:worker:gone-host:1", 2)
            answer = c.post(f"/sessions/{sid2}/lesions/1/interactions", params={"wait": 30},
                            json={"kind": "point", "xyz": [22, 20, 12]})
            assert answer.status_code == 200, answer.text
            assert r.hget(S.interaction_key(answer.json()["interaction_id"]), "resent") == b"1"
            metrics = c.get("/metrics").text
            assert 'msam_interactions_total{outcome="resent"}' in metrics
            resent = [ln for ln in metrics.splitlines() if ln.startswith('msam_interactions_total{outcome="resent"}')]
            assert float(resent[0].split()[-1]) >= 1


def _metric(c, outcome: str) -> float:
    line = next(ln for ln in c.get("/metrics").text.splitlines()
                if ln.startswith(f'msam_interactions_total{{outcome="{outcome}"}}'))
    return float(line.split()[-1])


def test_a_lost_holders_own_queue_is_swept_each_interaction_run_once(service: Service, ct_nifti: Path) -> None:
    """Clicks wait in the holder's own queue when it dies: the live worker's sweep (or the gateway,
    for a click someone waits on) hands each to the shared queue once, and the queue is removed."""
    import os
    import signal

    with _two_workers(service) as r:
        with service.client() as c:
            _, sid = _new_session(c, ct_nifti, lesions=3)
            _click(c, sid, 1, (22, 20, 12))
            holder = r.get(S.holder_key(sid)).decode()
            own = S.worker_queue("msam", holder)
            name = next(n for n, p in service.workers.items() if holder.endswith(f":{p.pid}"))
            # the holder hangs (it takes no message), then dies with three clicks in its queue
            os.killpg(service.workers[name].pid, signal.SIGSTOP)
            time.sleep(2)  # a pop it had waiting at Redis times out (kombu waits 1 s per pop)
            done_before, resent_before = _metric(c, "done"), _metric(c, "resent")
            urls = {}
            for lesion, xyz in ((1, (21, 20, 12)), (2, (22, 20, 12)), (3, (24, 21, 12))):
                answer = c.post(f"/sessions/{sid}/lesions/{lesion}/interactions", params={"wait": 0},
                                json={"kind": "point", "xyz": list(xyz)})
                assert answer.status_code == 202, answer.text
                urls[lesion] = answer.json()["status_url"]
                rec = r.hgetall(S.interaction_key(answer.json()["interaction_id"]))
                assert rec[b"queue"].decode() == own and rec[b"status"] == b"queued"
            assert r.llen(own) == 3
            service.kill_worker(name)
            # someone waits on lesion 1's click: the gateway or the sweep resends it, whichever is first
            first = c.get(urls[1], params={"wait": 60})
            assert first.status_code == 200 and first.json()["step"] == 2, first.text
            # nobody waits on the others: the live worker's sweep hands them to the shared queue
            deadline = time.monotonic() + 60
            while r.exists(own, "_kombu.binding." + own, "_kombu.binding_permanent." + own):
                assert time.monotonic() < deadline, service.logs()
                time.sleep(0.2)
            for lesion in (2, 3):
                answer = c.get(urls[lesion], params={"wait": 60})
                assert answer.status_code == 200 and answer.json()["step"] == 1, answer.text
                assert answer.json()["delta"] is not None
            time.sleep(6)  # a second run, if there were one, would land meanwhile
            for url in urls.values():
                rec = r.hgetall(S.interaction_key(url.rsplit("/", 1)[1]))
                assert rec[b"resent"] == b"1" and rec[b"queue"] == b"msam" and rec[b"status"] == b"done"
                assert not rec[b"worker"].decode().startswith(holder + "/")
            assert _metric(c, "done") - done_before == 3, service.logs()
            assert _metric(c, "resent") - resent_before == 3
            assert not [k for k in r.scan_iter(match="*" + S.worker_queue("msam", holder) + "*")]


def _kill_when_running(r: redis.Redis, interaction_id: str, not_pid: int | None = None) -> int:
    """SIGKILL the pool process that runs the interaction (an OOM kill looks like this) once its
    record says it runs (on a process other than ``not_pid``); returns that process's pid."""
    import os
    import signal

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rec = {k.decode(): v.decode() for k, v in r.hgetall(S.interaction_key(interaction_id)).items()}
        if rec.get("status") == S.RUNNING and rec.get("worker"):
            pid = int(rec["worker"].rsplit("/", 1)[1])
            if pid != not_pid:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.005)
    raise AssertionError(f"interaction {interaction_id} never ran")


def test_a_pool_process_killed_mid_click_costs_one_resend_then_a_clear_failure(service: Service,
                                                                                 ct_nifti: Path) -> None:
    """The worker's main process goes on beating when its pool process dies, so the interaction
    is resent from there (once); one that kills a second process fails and leaves its lesion as
    it was, and the session goes on."""
    r = redis_conn.client(service.redis_url)
    with service.client() as c:
        vol, sid = _new_session(c, ct_nifti, lesions=2)
        _click(c, sid, 1, (22, 20, 12))
        # lesion 2 far from lesion 1: a crop of its own, so the click encodes (time to kill it)
        sent = c.post(f"/sessions/{sid}/lesions/2/interactions", params={"wait": 0},
                      json={"kind": "point", "xyz": [8, 8, 4], "positive": True})
        assert sent.status_code == 202, sent.text
        iid = sent.json()["interaction_id"]
        _kill_when_running(r, iid)
        answer = c.get(f"/sessions/{sid}/interactions/{iid}", params={"wait": 60})
        assert answer.status_code == 200 and answer.json()["step"] == 1, (answer.text, service.logs())
        assert r.hget(S.interaction_key(iid), "resent") == b"1"
        # a click that kills the process it runs on again fails with a message, not a hang
        sent = c.post(f"/sessions/{sid}/lesions/2/interactions", params={"wait": 0},
                      json={"kind": "point", "xyz": [40, 32, 20], "positive": True})
        iid = sent.json()["interaction_id"]
        first = _kill_when_running(r, iid)
        _kill_when_running(r, iid, not_pid=first)
        failed = c.get(f"/sessions/{sid}/interactions/{iid}", params={"wait": 60})
        assert failed.status_code == 503 and "stopped twice" in failed.json()["error"]["message"], failed.text
        lesion = c.get(f"/sessions/{sid}").json()["lesions"][1]
        assert lesion["step"] == 1 and iid not in _ids(lesion), lesion
        again = _click(c, sid, 2, (9, 8, 4))  # the session goes on
        assert again["step"] == 2
        committed = c.post(f"/sessions/{sid}/commit", json={})
        assert committed.status_code in (200, 202), committed.text


def _ids(lesion: dict) -> list[str]:
    return [a["id"] for a in lesion["interactions"]]
