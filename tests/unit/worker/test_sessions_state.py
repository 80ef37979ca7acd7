"""Session state and the mask delta codec (msam_service.sessions), on a real Redis."""

from __future__ import annotations

import base64
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
import redis

from msam_service import sessions as S


def _random_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    lo = rng.integers(0, np.asarray(shape) // 2)
    hi = lo + rng.integers(1, np.asarray(shape) // 2)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(hi - lo)) > 0.3
    return mask


def _apply(mask: np.ndarray, change: dict | None) -> np.ndarray:
    out = mask.copy()
    if change:
        lo, hi = change["lo"], change["hi"]
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = S.decode_box(change["data"], tuple(h - l for l, h in zip(lo, hi)))
    return out


def test_delta_turns_the_old_mask_into_the_new_one() -> None:
    rng = np.random.default_rng(0)
    shape = (31, 17, 9)  # odd sizes: bit packing across byte boundaries
    for _ in range(30):
        a, b = _random_mask(rng, shape), _random_mask(rng, shape)
        old, new = S.BoxMask.tight(np.zeros(3, int), a), S.BoxMask.tight(np.zeros(3, int), b)
        change = S.delta(old, new)
        np.testing.assert_array_equal(_apply(a, change), b)
        if change is not None:  # the box is the smallest holding every change
            lo, hi = np.asarray(change["lo"]), np.asarray(change["hi"])
            diff = np.argwhere(a != b)
            assert np.all(diff.min(0) == lo) and np.all(diff.max(0) + 1 == hi)
        # the stored form keeps the mask exactly
        back = S.unpack_mask(S.pack_mask(new))
        np.testing.assert_array_equal(back.over(np.zeros(3, int), np.asarray(shape)), b)
    same = S.BoxMask.tight(np.zeros(3, int), a)
    assert S.delta(same, same) is None and S.delta(S.BoxMask.empty(), S.BoxMask.empty()) is None


def test_apply_delta_edits_and_refuses_boxes_outside_the_volume() -> None:
    shape = (20, 20, 10)
    base = np.zeros(shape, bool)
    base[5:10, 5:10, 2:6] = True
    box = S.BoxMask.tight(np.zeros(3, int), base)
    erased = base.copy()
    erased[5:10, 5:10, 4:6] = False
    edit = {"lo": [5, 5, 4], "hi": [10, 10, 6], "data": S.encode_box(erased[5:10, 5:10, 4:6])}
    np.testing.assert_array_equal(S.apply_delta(box, edit, shape).over(np.zeros(3, int), np.asarray(shape)), erased)
    with pytest.raises(ValueError, match="not inside the volume"):
        S.apply_delta(box, {"lo": [0, 0, 0], "hi": [21, 1, 1], "data": S.encode_box(np.ones((21, 1, 1), bool))}, shape)
    with pytest.raises(ValueError, match="needs 8"):
        S.apply_delta(box, {"lo": [0, 0, 0], "hi": [2, 2, 2], "data": S.encode_box(np.ones(100, bool))}, shape)
    with pytest.raises(ValueError, match="base64"):
        S.apply_delta(box, {"lo": [0, 0, 0], "hi": [2, 2, 2], "data": "not base64!"}, shape)
    with pytest.raises(ValueError, match="is empty: hi is one past the last voxel"):
        S.apply_delta(box, {"lo": [5, 5, 5], "hi": [4, 6, 6], "data": S.encode_box(np.ones(1, bool))}, shape)
    cut = base64.b64encode(zlib.compress(np.packbits(np.ones(8, np.uint8)).tobytes() * 8)[:-3]).decode()
    with pytest.raises(ValueError, match="cut short"):
        S.apply_delta(box, {"lo": [0, 0, 0], "hi": [4, 4, 4], "data": cut}, shape)


def test_a_mask_edit_that_inflates_to_gigabytes_is_refused_after_the_box_s_bytes() -> None:
    """A client's edit is inflated only as far as its box needs: 200 KB of zlib that would
    inflate to 200 MB costs a few bytes of memory before the 422's message."""
    bomb = base64.b64encode(zlib.compress(b"\xff" * (200 << 20), 9)).decode()
    assert len(bomb) < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 64 bits; a box of shape \\[4, 4, 4\\] needs 64"):
            S.decode_box(bomb, (4, 4, 4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # the base64-decoded body (about 200 KB), not the 200 MB


def test_measurements_use_the_voxel_volume_of_oblique_grids() -> None:
    mask = np.ones((10, 10, 10), bool)
    box = S.BoxMask.tight(np.zeros(3, int), mask)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * c, -0.8 * s, 0, 1], [0.8 * s, 0.8 * c, 0, 2], [0, 0, -2.5, 3], [0, 0, 0, 1]])
    m = S.measurements(box, affine)
    assert m["voxel_count"] == 1000 and m["volume_ml"] == pytest.approx(1000 * 0.8 * 0.8 * 2.5 / 1000)
    assert S.measurements(S.BoxMask.empty(), affine) == {"voxel_count": 0, "volume_ml": 0.0}


def test_prompt_document_of_the_interactions_in_effect() -> None:
    lesion = {"number": 1, "label": "a", "step": 4, "interactions": [
        {"id": "1", "kind": "point", "xyz": [1, 2, 3], "positive": True},
        {"id": "2", "kind": "box", "corners": [[0, 0, 0], [5, 5, 5]]},
        {"id": "3", "kind": "point", "xyz": [4, 5, 6], "positive": False},
        {"id": "4", "kind": "mask", "volume_id": "v"},
        {"id": "5", "kind": "point", "xyz": [7, 8, 9], "positive": True},  # undone (past step)
    ]}
    doc, mask = S.lesion_prompt_doc(lesion)
    assert doc == {"positive": [[1, 2, 3]], "negative": [[4, 5, 6]], "box": [[0, 0, 0], [5, 5, 5]], "label": "a"}
    assert mask is not None and mask["id"] == "4"


def test_concurrent_changes_are_not_lost(r: redis.Redis) -> None:
    store = S.SessionStore(r, 60)
    doc = store.create("t", "v" * 32, "voxel")

    def add(n: int) -> None:
        def edit(d: dict) -> None:
            d["lesions"][str(n)] = {"number": n, "interactions": [], "step": 0}
        store.change(doc["session_id"], edit)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(n) for n in store.get(doc["session_id"])["lesions"]) == list(range(1, 9))
    assert 0 < r.ttl(S.session_key(doc["session_id"])) <= 60
    with pytest.raises(S.SessionGone):
        store.change("0" * 32, lambda d: None)
    store.put_mask(doc["session_id"], "i1", S.BoxMask.tight(np.zeros(3, int), np.ones((2, 2, 2), bool)))
    store.delete(doc["session_id"])
    assert store.get(doc["session_id"]) is None and not r.exists(S.mask_key(doc["session_id"], "i1"))


def test_a_new_session_goes_to_the_live_worker_holding_the_fewest(r: redis.Redis) -> None:
    from msam_service.queue import live_worker_names, worker_key

    assert S.least_loaded(r, []) is None
    for name in ("h:1", "h:2", "h:3"):
        r.hset(worker_key(name), mapping={"alive_at": "1"})
    r.hset(worker_key("h:4"), mapping={"model_loaded": "1"})  # still starting: no beat yet
    workers = live_worker_names(r)
    assert workers == ["h:1", "h:2", "h:3"]
    assert S.least_loaded(r, workers) == "h:1"  # none holds a session: the first
    for sid, holder in (("a", "h:1"), ("b", "h:1"), ("c", "h:2"), ("d", "h:9")):
        r.set(S.holder_key(sid), holder)
    assert S.least_loaded(r, workers) == "h:3"
    r.set(S.holder_key("e"), "h:3")
    assert S.least_loaded(r, workers) == "h:2"


def test_sessions_opened_at_once_are_spread_over_the_workers(r: redis.Redis, redis_url: str) -> None:
    """Eight sessions claimed from eight threads (each its own client, as gateway processes)
    end up four on each of two workers: choosing and claiming are one step under a lock."""
    from msam_service import redis_conn
    from msam_service.queue import worker_key

    for name in ("h:1", "h:2"):
        r.hset(worker_key(name), mapping={"alive_at": "1"})
    start = threading.Barrier(8)
    got: list[str | None] = []

    def claim(n: int) -> None:
        client = redis_conn.client(redis_url)
        start.wait()
        got.append(S.claim_holder(client, f"s{n}", ["h:1", "h:2"], 60))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ["h:1"] * 4 + ["h:2"] * 4
    assert sorted(r.get(S.holder_key(f"s{n}")).decode() for n in range(8)) == sorted(got)
    assert S.claim_holder(r, "x", [], 60) is None and r.get(S.holder_key("x")) is None


def test_measurements_take_the_pipeline_s_word_on_hounsfield_units() -> None:
    """A NIfTI has no modality: the pipeline takes it for CT on evidence (air), and the session's
    measurements then report HU as the job's do (the worker passes the sampler's conclusion)."""
    from msam_core.io.volume import Volume

    array = np.full((12, 12, 6), -1000.0, np.float32)
    array[3:8, 3:8, 1:4] = 40.0
    volume = Volume(array, np.diag([0.8, 0.8, 2.5, 1.0]))
    box = S.BoxMask.tight(np.array([3, 3, 1]), np.ones((5, 5, 3), bool))
    assert S.measurements(box, volume.affine, volume)["intensity"]["unit"] == "image units"
    measured = S.measurements(box, volume.affine, volume, hounsfield=True)
    assert measured["intensity"]["unit"] == "HU" and measured["intensity"]["mean"] == 40.0
