"""The bundled default model: present, small, msam format with provenance, documented."""

from __future__ import annotations

import pytest

from msam_core.checkpoints import load_checkpoint, load_model
from msam_core.cli.segment import DEFAULT_CHECKPOINT

#: a floor well below what the bundled model measures on these phantoms
#: (docs/training-and-evaluation.md, "The guard on the shipped weights").
MIN_DICE_AT_3 = 0.45
#: how much better than on a blank (all-zero) crop, and than on another lesion's crop with the same
#: clicks, it must do after the first click. That click is the crop's centre for every lesion, so
#: the clicks alone cannot tell one lesion from another: a model that ignores the image, or draws
#: one shape around every first click, gains nothing here.
MIN_IMAGE_GAIN_AT_1 = 0.15


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")
def test_bundled_model_loads_with_provenance_and_card() -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    loaded = load_model(DEFAULT_CHECKPOINT)
    assert loaded.network.config.name == "msam_small"
    model = loaded.options
    prov = loaded.meta["provenance"]
    assert prov["trained_by"] == "msam train" and prov["steps"] > 0
    card = (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card.lower() and "Dice@1" in card
    # a stable-region prior ships only as chosen on validation, and the card says so
    calibration = prov.get("calibration", {})
    weights = (model.prior_weight_first, model.prior_weight)
    assert weights == (calibration.get("prior_weight_first", 0.0), calibration.get("prior_weight", 0.0))
    if any(weights):
        assert calibration["split"] == "validation" and f"{weights[0]:g},{weights[1]:g}" in calibration["prior_table"]
        assert f"weighted {weights[0]:g} for a lesion prompted by one positive click" in card
        # at the bound the weights were chosen at, stated in the file and on the card
        assert calibration["prior_max_voxels"] == model.prior_max_voxels
        assert f"8 to {model.prior_max_voxels:,} voxels" in card
    # so does a boundary refinement
    bands = (model.boundary_band_first, model.boundary_band)
    assert bands == (calibration.get("boundary_band_first", 0), calibration.get("boundary_band", 0))
    if any(bands):
        assert f"{bands[0]},{bands[1]}" in calibration["boundary_table"]
        assert f"and {bands[1]} voxel" in card and "after further clicks, chosen by `msam calibrate --boundary-bands`" in card
    # and the coarse view, with the scores it was set on
    if model.coarse_view:
        record = calibration["coarse_view"]
        assert record["coarse_view"] is True and set(record["table"]) == {"off", "on"}
        assert "set with `msam calibrate --coarse-view on`" in card
        assert f"off {record['table']['off']['mean_dice']:.3f}, on {record['table']['on']['mean_dice']:.3f}" in card


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")
def test_bundled_model_keeps_its_pipeline_options_out_of_the_network() -> None:
    """The bundled file predates the options' own object (format 1, options inside the config):
    it loads unchanged, with the prior, the boundary refinement and the coarse view it was
    calibrated with, and the network's config holds none of them."""
    loaded = load_model(DEFAULT_CHECKPOINT)
    assert loaded.meta["format_version"] in (1, 2)
    assert loaded.options.prior_weight_first > 0 and loaded.options.boundary_band_first > 0
    assert loaded.options.coarse_view is True
    assert not set(loaded.options.to_dict()) & set(loaded.network.config.to_dict())
    assert load_checkpoint(DEFAULT_CHECKPOINT).model_id == loaded.model_id


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")
def test_bundled_network_is_the_named_msam_small_regions_config() -> None:
    """The bundled file states its network under the name ``msam_small`` (it predates the name
    ``msam_small_regions``) and loads with exactly that stated config; every other field equals the
    registry's ``msam_small_regions``, the config ``make model`` trains, and that config builds a
    network the bundled weights load into with no key missing, unexpected or mis-shaped."""
    from dataclasses import replace

    from msam_core.model import build_model, get_config

    loaded = load_model(DEFAULT_CHECKPOINT)
    named = get_config("msam_small_regions")
    assert loaded.network.config == replace(named, name="msam_small")
    assert get_config("msam_small") != replace(named, name="msam_small")  # two networks, two names
    build_model(named).load_state_dict(loaded.network.state_dict(), strict=True)  # raises on any mismatch


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")
def test_bundled_model_segments_lesions_better_than_region_growing(tmp_path) -> None:
    """A guard on the shipped weights: synthetic lesions in the test phantoms (never seen in
    training), evaluated with ``msam evaluate``'s protocol. The floors sit well below what the
    bundled model measured, so only a broken or much worse model fails - or one that stops using
    the image (the controls of MODEL_CARD.md: the same clicks on an all-zero crop and on another
    lesion's crop)."""
    from msam_train.evaluate import evaluate
    from msam_train.synth import synthesize
    from tests.unit.train.phantoms import phantom_scans

    synthesize(tmp_path, seed=11, n_train=0, n_val=4, n_heldout=0, scans=phantom_scans(), log=lambda *_: None)
    summary = evaluate(tmp_path, DEFAULT_CHECKPOINT, "validation", clicks=3, log=lambda *_: None,
                       blank_control=True, other_image_control=True)
    stats = summary["groups"]["all"]
    msam, rg = stats["msam"]["dice"], stats["region_growing"]["dice"]
    assert msam[2] >= MIN_DICE_AT_3, msam
    assert msam[2] > rg[2] + 0.2, (msam, rg)
    blank = stats["msam_blank_image"]["dice"]
    assert msam[0] > blank[0] + MIN_IMAGE_GAIN_AT_1, (msam, blank)
    assert msam[2] > blank[2], (msam, blank)  # and the image still helps once clicks shape the mask
    other = stats["msam_other_image"]["dice"]
    assert msam[0] > other[0] + MIN_IMAGE_GAIN_AT_1, (msam, other)
    assert msam[2] > other[2], (msam, other)
