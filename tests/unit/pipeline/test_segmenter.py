"""Segmenter: large lesions over several windows, several lesions, boxes, priors, the cache,
and one end-to-end run of the real (randomly initialised) network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msam_core.io.volume import Volume
from msam_core.pipeline.preprocess import CropGrid
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.prompts import Box, Point
from msam_core.pipeline.segmenter import DictEmbeddingCache, Segmenter, StageTimer, crop_key, grid_key
from tests.unit.pipeline.phantoms import (RegionGrowDouble, centred_affine, dice, rotation,
                                          sphere_truth, spheres_image, voxel_centres_ras)

# a capsule 40 mm thick and ~380 mm long along S: two crops (192 mm) cannot hold it
CAPSULE = [(np.array([5.0, -3.0, z]), 40.0) for z in np.arange(-150.0, 151.0, 15.0)]


def _capsule_truth(shape, affine) -> np.ndarray:
    return np.any([sphere_truth(shape, affine, c, r) for c, r in CAPSULE], axis=0)


@pytest.fixture(scope="module")
def capsule_volume() -> Volume:
    shape = (40, 40, 160)
    affine = centred_affine(shape, (3.0, 3.0, 3.0), rotation((1, 0, 0), 10.0), (5.0, -3.0, 0.0))
    return Volume(spheres_image(shape, affine, CAPSULE, edge_mm=3.0), affine)


def test_large_lesion_is_followed_over_several_windows(capsule_volume):
    truth = _capsule_truth(capsule_volume.shape, capsule_volume.affine)
    click = [Point((5.0, -3.0, 20.0), space="RAS")]
    one = Segmenter(RegionGrowDouble(), PipelineOptions(), max_windows=1).segment(capsule_volume, click)
    assert one.lesions[0].stopped_at_limit
    assert dice(one.labels, truth) < 0.75  # a single crop holds half of it

    model = RegionGrowDouble()
    many = Segmenter(model, PipelineOptions(), max_windows=8).segment(capsule_volume, click)
    outcome = many.lesions[0]
    assert 3 <= outcome.windows <= 8 and not outcome.stopped_at_limit
    assert model.encode_calls == outcome.windows
    assert dice(many.labels, truth) > 0.93
    # the mask reaches both ends, far beyond the first crop (which ends ~96 mm from the click)
    z = voxel_centres_ras(capsule_volume.shape, capsule_volume.affine)[..., 2][many.labels > 0]
    assert z.min() < -150 and z.max() > 150


def test_several_lesions_get_labels_1_to_k(tmp_path):
    shape = (90, 60, 40)
    affine = centred_affine(shape, (1.0, 1.2, 2.0), None, (0.0, 0.0, 0.0))
    a, b, c = np.array([-25.0, 0, 0]), np.array([25.0, 5.0, 0]), np.array([0.0, -20.0, 20.0])
    volume = Volume(spheres_image(shape, affine, [(a, 12.0), (b, 9.0), (c, 8.0)]), affine)
    result = Segmenter(RegionGrowDouble(), PipelineOptions()).segment(volume, [
        Point(tuple(a), space="RAS"),
        Point(tuple(b), space="RAS", lesion=2),
        Point(tuple(c * [-1, -1, 1]), space="LPS", lesion=3),
    ])
    assert set(np.unique(result.labels)) == {0, 1, 2, 3}
    for label, (centre, radius) in enumerate([(a, 12.0), (b, 9.0), (c, 8.0)], start=1):
        # 6 mm logits (32^3 over 192 mm) limit Dice on spheres this small
        assert dice(result.labels == label, sphere_truth(shape, affine, centre, radius)) > 0.8
    assert [o.lesion for o in result.lesions] == [1, 2, 3]
    assert all(o.voxels > 0 for o in result.lesions)


def test_box_centres_prompts_and_clips():
    shape = (70, 70, 70)
    affine = centred_affine(shape, (1.0, 1.0, 1.0), None, (0.0, 0.0, 0.0))
    centre = np.array([3.0, -2.0, 4.0])
    volume = Volume(spheres_image(shape, affine, [(centre, 18.0)]), affine)
    lo, hi = centre - 18, centre + 18
    full = Segmenter(RegionGrowDouble(), PipelineOptions()).segment(volume, boxes=[Box(tuple(lo), tuple(hi), space="RAS")])
    assert dice(full.labels, sphere_truth(shape, affine, centre, 18.0)) > 0.93
    # a box over the upper half only: clipped at the box's lower face (z = centre)
    half = Segmenter(RegionGrowDouble(), PipelineOptions()).segment(
        volume, boxes=[Box(tuple(lo * [1, 1, 0] + [0, 0, centre[2]]), tuple(hi), space="RAS")])
    z = voxel_centres_ras(shape, affine)[..., 2]
    assert half.labels.sum() > 0 and z[half.labels > 0].min() >= centre[2] - 1e-6
    # a voxel-space box gives the same as the same box in RAS here (axis-aligned storage)
    vlo, vhi = volume.ras_to_voxel(lo)[0], volume.ras_to_voxel(hi)[0]
    vox = Segmenter(RegionGrowDouble(), PipelineOptions()).segment(volume, boxes=[Box(tuple(vlo), tuple(vhi))])
    assert dice(vox.labels, full.labels) > 0.99


def test_prior_mask_alone_segments_its_lesion():
    shape = (60, 60, 60)
    affine = centred_affine(shape, (1.5, 1.5, 1.5), None, (0.0, 0.0, 0.0))
    centre = np.array([10.0, 5.0, -8.0])
    volume = Volume(spheres_image(shape, affine, [(centre, 20.0)]), affine)
    prior = sphere_truth(shape, affine, centre, 12.0).astype(np.uint8)  # too small a guess
    result = Segmenter(RegionGrowDouble(), PipelineOptions()).segment(volume, prior=prior, iterations=3)
    assert dice(result.labels, sphere_truth(shape, affine, centre, 20.0)) > 0.93


def test_embedding_cache_key_is_model_and_crop_content():
    shape = (60, 60, 60)
    affine = centred_affine(shape, (1.0, 1.0, 1.0), None, (0.0, 0.0, 0.0))
    volume = Volume(spheres_image(shape, affine, [((0.0, 0.0, 0.0), 15.0)]), affine)
    cache = DictEmbeddingCache()
    model = RegionGrowDouble()
    seg = Segmenter(model, PipelineOptions(), cache=cache)
    first = seg.segment(volume, [Point((0.0, 0.0, 0.0), space="RAS")])
    # a second click on the same lesion: same crop (centred on the first click) -> cache hit
    second = seg.segment(volume, [Point((0.0, 0.0, 0.0), space="RAS"), Point((25.0, 0.0, 0.0), label=0, space="RAS")])
    assert model.encode_calls == 1 and cache.hits == 1 and second.lesions[0].cache_hits == 1
    assert np.array_equal(first.labels, second.labels)
    # the key names the model and changes with the crop content
    sampler = seg.sampler(volume)
    grid = CropGrid.centred(np.zeros(3))
    image = sampler.crop(grid)
    embedding, key = seg.encode(image)
    assert key.startswith(model.model_id + ":")
    assert key == crop_key(model.model_id, image.clone())
    assert key != crop_key(model.model_id, sampler.crop(grid.shifted((1, 0, 0))))
    assert key != crop_key("another-model", image)


def test_session_crops_are_reused_and_keyed_by_volume_and_grid(capsule_volume):
    """An interactive session keeps its crop states: a follow-up click neither cuts the crop nor
    asks the cache, and gives the logits a fresh Segmenter gives for the same clicks; the cache
    key of a stored volume's crop is model + volume + grid, no digest of the crop."""
    from msam_core.pipeline.prompts import resolve_prompts

    model = RegionGrowDouble()
    cache = DictEmbeddingCache()
    seg = Segmenter(model, PipelineOptions(prior_weight=1.0, prior_weight_first=1.0), cache=cache, max_windows=4)
    sampler = seg.sampler(capsule_volume)
    cuts = []
    original = sampler.crop
    sampler.crop = lambda grid: (cuts.append(grid), original(grid))[1]  # count the crops cut
    crops: dict = {}
    clicks = [Point((5.0, -3.0, 0.0), space="RAS"), Point((5.0, 30.0, 0.0), label=0, space="RAS")]
    (first,) = resolve_prompts(capsule_volume, clicks[:1])
    canvas1, out1 = seg.segment_lesion(sampler, first, crops=crops, source="vol1")
    windows, cut_first = len(crops), len(cuts)
    assert windows == out1.windows >= 2 and model.encode_calls == windows
    assert all(key.startswith(f"{model.model_id}:grid:vol1:") for key in cache._items)
    assert grid_key(model.model_id, "vol1", next(iter(crops))) in cache._items
    (both,) = resolve_prompts(capsule_volume, clicks)
    canvas2, out2 = seg.segment_lesion(sampler, both, crops=crops, source="vol1")
    new_windows = len(crops) - windows
    assert len(cuts) - cut_first == new_windows and model.encode_calls == windows + new_windows
    assert cache.hits == 0  # held crops never reach the cache
    fresh = Segmenter(model, PipelineOptions(prior_weight=1.0, prior_weight_first=1.0), max_windows=4)
    canvas3, _ = fresh.segment_lesion(fresh.sampler(capsule_volume), both)
    np.testing.assert_array_equal(canvas2.merged()[0], canvas3.merged()[0])


def test_real_network_end_to_end():
    """The real network (random weights) through the Segmenter: shapes, grid, dtype; no Dice."""
    from msam_core.model import build_model

    torch.manual_seed(0)
    model = build_model("msam_small")
    shape = (48, 40, 30)
    affine = centred_affine(shape, (0.9, 1.1, 2.5), rotation((0, 0, 1), 15.0), (1.0, 2.0, 3.0))
    volume = Volume(spheres_image(shape, affine, [((1.0, 2.0, 3.0), 10.0)]), affine)
    cache = DictEmbeddingCache()
    seg = Segmenter(model, PipelineOptions(), cache=cache, max_windows=2)
    image = seg.prepare(seg.sampler(volume), __import__("msam_core.pipeline.prompts", fromlist=["x"])
                        .resolve_prompts(volume, [Point((24, 20, 15))])[0]).image
    embedding, key = seg.encode(image)
    assert embedding.shape[0] == 1 and embedding.shape[2:] == (8, 8, 8)
    assert key.startswith(model.model_id)
    logits = seg.predict(embedding, np.array([[64.0, 64.0, 64.0]]), np.array([1]), iterations=2)
    assert logits.shape == (1, 1, 32, 32, 32) and torch.isfinite(logits).all()
    result = seg.segment(volume, [Point((24, 20, 15))], iterations=2)
    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1}
    assert result.model_id == model.model_id and cache.hits >= 1


class _Stop(Exception):
    pass


class _Recorder(StageTimer):
    def __init__(self, stop_at: str | None = None) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.stop_at = stop_at

    def before(self, stage: str) -> None:
        self.events.append(("before", stage))
        if stage == self.stop_at:
            raise _Stop(stage)

    def lesion_done(self, done: int, total: int) -> None:
        self.events.append(("lesion", f"{done}/{total}"))


def test_hooks_hear_every_stage_and_can_stop_before_one():
    """What the worker relies on instead of wrapping the network: every stage the options turn
    on is announced and timed, lesions are counted, and an exception in ``before`` stops the
    request before that stage runs."""
    shape = (60, 50, 30)
    affine = centred_affine(shape, (1.0, 1.1, 2.0), rotation((0, 0, 1), 15.0), (0.0, 0.0, 0.0))
    a, b = np.array([-12.0, 0.0, 0.0]), np.array([14.0, 4.0, 0.0])
    image = spheres_image(shape, affine, [(a, 8.0), (b, 7.0)])
    volume = Volume((image + np.random.default_rng(0).normal(0, 0.05 * np.ptp(image), shape)).astype(np.float32),
                    affine)
    points = [Point(tuple(a), space="RAS"), Point(tuple(b), space="RAS", lesion=2)]
    options = PipelineOptions(prior_weight_first=2.0, boundary_band_first=1)
    hooks = _Recorder()
    model = RegionGrowDouble()
    Segmenter(model, options, hooks=hooks).segment(volume, points)
    assert hooks.runs == {"encode": 2, "decode": 2, "prior": 2, "boundary": 2}
    assert all(hooks.seconds[stage] > 0 for stage in hooks.runs)
    assert [e for e in hooks.events if e[0] == "lesion"] == [("lesion", "1/2"), ("lesion", "2/2")]
    # without the options, their stages do not run
    plain = StageTimer()
    Segmenter(RegionGrowDouble(), PipelineOptions(), hooks=plain).segment(volume, points)
    assert plain.runs == {"encode": 2, "decode": 2, "prior": 0, "boundary": 0}
    # a stop before the first decoder pass: the encoder ran, the decoder never did
    stopper, model = _Recorder(stop_at="decode"), RegionGrowDouble()
    with pytest.raises(_Stop):
        Segmenter(model, options, hooks=stopper).segment(volume, points)
    assert model.encode_calls == 1 and model.decode_calls == 0


def test_options_must_be_given_as_pipeline_options():
    with pytest.raises(TypeError, match="PipelineOptions"):
        Segmenter(RegionGrowDouble(), {"coarse_view": True})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundled():
    from msam_core.checkpoints import load_model
    from msam_core.cli.segment import DEFAULT_CHECKPOINT

    return load_model(DEFAULT_CHECKPOINT)


def _nodule_ct() -> tuple[Volume, np.ndarray]:
    """A lung-like CT in HU (noisy) with a 12 mm nodule and a vessel-like rod next to it; returns
    the volume and the nodule's centre (RAS mm)."""
    rng = np.random.default_rng(3)
    shape = (96, 96, 40)
    affine = centred_affine(shape, (0.8, 0.8, 2.5), rotation((0, 0, 1), 0.0), (0.0, 0.0, 0.0))
    world = voxel_centres_ras(shape, affine)
    image = np.full(shape, -850.0) + rng.normal(0, 25, shape)
    centre = np.array([4.0, -3.0, 2.0])
    image[np.linalg.norm(world - centre, axis=-1) < 12.0] = 40.0
    image[np.linalg.norm(world[..., :2] - np.array([22.0, 10.0]), axis=-1) < 3.0] = 30.0
    return Volume((image + rng.normal(0, 20, shape)).astype(np.float32), affine), centre


def test_follow_up_clicks_on_a_kept_crop_give_a_fresh_crops_logits(bundled, monkeypatch):
    """An interactive session keeps the crop state (decoder regions, stable regions) across
    clicks: each click's logits equal those of the same clicks on a freshly opened crop, with
    the bundled model's full pipeline (prior, boundary walker, coarse view); the decoder grows
    only the new click's region on each view (none where it falls in an earlier click's cell),
    and runs the Mask-Enhanced Adapter once per view of the kept crop, at its first click."""
    import msam_core.model.click_regions as module

    volume, centre = _nodule_ct()
    seg = Segmenter(bundled.network, bundled.options, cache=DictEmbeddingCache())
    assert bundled.options.coarse_view and bundled.options.boundary_band and bundled.options.prior_weight
    sampler = seg.sampler(volume)
    from types import SimpleNamespace

    window = seg.prepare(sampler, SimpleNamespace(center_ras=centre))
    kept = seg.open_crop(window.image, window.grid, sampler=sampler)
    offsets = [(0, 0, 0), (5.0, 0, 0), (28.0, 0, 0), (0, -5.0, 2.5), (0, 26.0, 0), (-4.0, 3.0, 0)]
    clicks = window.grid.ras_to_crop(centre + np.asarray(offsets))
    labels = np.array([1, 1, 0, 1, 0, 1])
    grow = module.grow
    grown: list[int] = []
    adapter_runs: list[int] = []
    for n in range(1, len(labels) + 1):
        monkeypatch.setattr(module, "grow", lambda windows, *a: (grown.append(len(windows)), grow(windows, *a))[1])
        hook = bundled.network.mea.register_forward_hook(lambda *_: adapter_runs.append(n))
        followed = seg.click(kept, clicks[:n], labels[:n])
        hook.remove()
        monkeypatch.setattr(module, "grow", grow)
        fresh = seg.click(seg.open_crop(window.image, window.grid, sampler=sampler), clicks[:n], labels[:n])
        assert followed.dtype == fresh.dtype and np.array_equal(followed, fresh), f"click {n}"
        assert (followed > 0).any()
    # at most the new click's region per view and click, each region grown once
    assert set(grown) == {1} and len(grown) <= 2 * len(labels)
    assert len(grown) == len(kept.decoded.regions) + len(kept.coarse.decoded.regions)
    assert adapter_runs == [1, 1]  # fine and coarse view, first click only


def test_the_bundled_pipeline_computes_only_what_can_be_lesion_and_gives_the_whole_crops_mask(bundled):
    """The bundled model with its full pipeline (prior, boundary walker, coarse view): the mask and
    every logit > 0 of each click equal those of computing every voxel of the crop, and most of
    the crop is not computed."""
    from types import SimpleNamespace

    from msam_core.pipeline.postprocess import BACKGROUND_LOGIT

    volume, centre = _nodule_ct()
    seg = Segmenter(bundled.network, bundled.options, cache=DictEmbeddingCache())
    sampler = seg.sampler(volume)
    window = seg.prepare(sampler, SimpleNamespace(center_ras=centre))
    state = seg.open_crop(window.image, window.grid, sampler=sampler)
    offsets = [(0, 0, 0), (5.0, 0, 0), (28.0, 0, 0), (0, -5.0, 2.5), (0, 26.0, 0)]
    clicks = window.grid.ras_to_crop(centre + np.asarray(offsets))
    labels = np.array([1, 1, 0, 1, 0])
    for n in range(1, len(labels) + 1):
        answer = seg.answer(state, clicks[:n], labels[:n])
        whole = seg.finish(state, answer, clicks[:n], labels[:n], whole=True)
        part = seg.finish(state, answer, clicks[:n], labels[:n])
        assert (whole > 0).any() and np.array_equal(whole > 0, part > 0), f"click {n}"
        assert np.array_equal(whole[whole > 0], part[whole > 0]), f"click {n}"
        assert np.mean(part > BACKGROUND_LOGIT) < 0.25, f"click {n}"


def test_a_volume_with_non_finite_voxels_segments_as_loaded_from_a_file(bundled):
    """A Volume made by hand with NaN and inf voxels gives the mask the same image gives once
    loaded (non-finite voxels read as the lowest finite value), not an empty one; an image
    without a finite voxel is refused."""
    from msam_core.errors import InvalidVolume
    from msam_core.io.load import finite_volume

    volume, centre = _nodule_ct()
    array = volume.array.copy()
    array[0, 0, :] = np.nan
    array[50, 60, 20] = np.inf
    array[tuple(np.round(np.linalg.inv(volume.affine) @ [*centre, 1.0])[:3].astype(int))] = np.nan  # at the click
    raw = Volume(array, volume.affine)
    seg = Segmenter(bundled.network, bundled.options)
    point = [Point(tuple(centre), space="RAS")]
    got = seg.segment(raw, point).labels
    assert got.any() and np.array_equal(got, seg.segment(finite_volume(raw, "test"), point).labels)
    with pytest.raises(InvalidVolume, match="every voxel is NaN or infinite"):
        seg.segment(Volume(np.full(volume.shape, np.nan, np.float32), volume.affine), point)
