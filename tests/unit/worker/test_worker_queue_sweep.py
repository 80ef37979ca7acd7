"""The own queues of lost workers, as kombu keeps them in a real Redis: emptied and removed, each
interaction in them resent to the shared queue at most once, the copies that must not run dropped."""

from __future__ import annotations

import base64
import json
import threading
from types import SimpleNamespace

import redis
from kombu import Exchange, Queue

from msam_service import sessions as S
from msam_service.queue import (SWEEP_LOCK, lost_worker_queues, make_celery, send_interaction,
                                sweep_lost_worker_queues, worker_key)
from msam_service.settings import Settings

SHARED = "q"


def _app(redis_url: str):  # noqa: ANN202
    return make_celery(Settings(redis_url=redis_url, queue=SHARED))


def _declare(app, name: str) -> None:  # noqa: ANN001
    """The queue as a worker's consumer declares it (``add_task_queue``): list and binding."""
    with app.connection_for_write() as conn:
        Queue(name, Exchange(name), routing_key=name)(conn.default_channel).declare()


def _alive(r: redis.Redis, name: str) -> None:
    r.hset(worker_key(name), "alive_at", "1")


def _interactions_on(r: redis.Redis, queue: str) -> list[str]:
    out = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == S.INTERACT_TASK
        out.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return out


def test_a_lost_workers_queue_is_emptied_once_and_removed(r: redis.Redis, redis_url: str) -> None:
    app = _app(redis_url)
    store = S.SessionStore(r, ttl_s=600)
    gone, live = S.worker_queue(SHARED, "gone-host:1"), S.worker_queue(SHARED, "live-host:2")
    _declare(app, gone)
    _declare(app, live)
    _alive(r, "live-host:2")
    ids = {name: S.new_id() for name in ("waiting", "answered", "resent", "expired", "running", "failed")}
    for name, iid in ids.items():
        if name != "expired":
            store.new_interaction(iid, "s" * 32, 1, gone)
        send_interaction(app, iid, gone)
    store.finish_interaction(ids["answered"], S.DONE, result={"step": 1})
    store.finish_interaction(ids["failed"], S.FAILED, error={"code": "undone", "message": "undone"})
    assert store.claim_resend(ids["resent"], SHARED)  # the gateway resent it already
    r.hset(S.interaction_key(ids["running"]), mapping={"status": S.RUNNING, "worker": "live-host:2/77"})
    other = S.new_id()
    app.send_task("msam.session_open", args=[other], queue=gone, ignore_result=True)
    kept = S.new_id()
    send_interaction(app, kept, live)

    assert set(lost_worker_queues(r, SHARED)) == {"gone-host:1"}
    sent: list[str] = []
    report = sweep_lost_worker_queues(r, SHARED, store, lambda iid: (sent.append(iid),
                                                                     send_interaction(app, iid, SHARED)))
    assert sent == [ids["waiting"]]
    assert (report.queues, report.resent, report.dropped, report.moved) == (1, 1, 5, 1)
    rec = store.interaction(ids["waiting"])
    assert rec["resent"] == "1" and rec["queue"] == SHARED and rec["status"] == S.QUEUED
    # the shared queue holds the resent interaction and the other message, moved as it was
    tasks = [json.loads(raw)["headers"]["task"] for raw in r.lrange(SHARED, 0, -1)]
    assert sorted(tasks) == sorted([S.INTERACT_TASK, "msam.session_open"])
    # the lost worker's queue and its binding are gone; the live worker's queue is untouched
    assert not r.exists(gone, "_kombu.binding." + gone, "_kombu.binding_permanent." + gone)
    assert _interactions_on(r, live) == [kept] and r.exists("_kombu.binding." + live)
    assert store.interaction(ids["answered"])["status"] == S.DONE
    assert store.interaction(ids["expired"]) is None  # nothing created for an expired one
    # a second sweep finds nothing to do
    again = sweep_lost_worker_queues(r, SHARED, store, sent.append)
    assert (again.queues, again.resent, again.dropped, again.moved) == (0, 0, 0, 0) and len(sent) == 1


def test_two_sweeps_at_once_resend_each_interaction_once(r: redis.Redis, redis_url: str) -> None:
    app = _app(redis_url)
    store = S.SessionStore(r, ttl_s=600)
    gone = S.worker_queue(SHARED, "gone-host:3")
    ids = [S.new_id() for _ in range(60)]
    for iid in ids:
        store.new_interaction(iid, "s" * 32, 1, gone)
        send_interaction(app, iid, gone)
    sent: list[str] = []
    lock = threading.Lock()

    def send(iid: str) -> None:
        with lock:
            sent.append(iid)

    threads = [threading.Thread(target=sweep_lost_worker_queues, args=(r, SHARED, store, send)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(sent) == sorted(ids)  # every one, once
    assert not r.exists(gone)


def test_a_stale_copy_from_another_queue_does_not_run(r: redis.Redis, redis_url: str) -> None:
    from worker.session import run_interaction

    store = S.SessionStore(r, ttl_s=600)
    iid = S.new_id()
    gone = S.worker_queue(SHARED, "gone-host:4")
    store.new_interaction(iid, "s" * 32, 1, gone)
    assert store.claim_resend(iid, SHARED)
    assert not store.claim_resend(iid, SHARED)  # once
    rt = SimpleNamespace(redis=r, settings=Settings(redis_url=redis_url, queue=SHARED))
    # the lost worker came back under the same name and took the copy left in its queue
    assert run_interaction(rt, iid, delivered_from=gone) is None  # type: ignore[arg-type]
    assert store.interaction(iid)["status"] == S.QUEUED and "worker" not in store.interaction(iid)


def test_one_worker_at_a_time_sweeps(r: redis.Redis, redis_url: str) -> None:
    from worker.heartbeat import Heartbeat

    settings = Settings(redis_url=redis_url, queue=SHARED, worker_queue_sweep_s=30)
    runs: list[str] = []
    first = Heartbeat(r, "host-a:1", settings, sweep=lambda: runs.append("a"))
    second = Heartbeat(r, "host-b:2", settings, sweep=lambda: runs.append("b"))
    assert first.sweep_if_due() and not second.sweep_if_due() and not first.sweep_if_due()
    assert runs == ["a"] and 0 < r.pttl(SWEEP_LOCK) <= 30_000
    r.delete(SWEEP_LOCK)  # the interval is over
    assert second.sweep_if_due() and runs == ["a", "b"]


def test_only_a_record_with_a_beat_keeps_a_workers_queue(r: redis.Redis, redis_url: str) -> None:
    app = _app(redis_url)
    for name in ("beating-host:5", "orphan-host:6"):
        _declare(app, S.worker_queue(SHARED, name))
    _alive(r, "beating-host:5")
    r.hset(worker_key("orphan-host:6"), "model_loaded", "1")  # a pool child's report, its main process gone
    assert set(lost_worker_queues(r, SHARED)) == {"orphan-host:6"}
