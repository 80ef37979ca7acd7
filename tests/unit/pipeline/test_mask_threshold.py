"""``PipelineOptions.mask_threshold``: the Segmenter's logits and mask prompt in calibrated units."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from msam_core.checkpoints import load_model, save_checkpoint
from msam_core.model import build_model, get_config
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.segmenter import Segmenter

POINTS, LABELS = np.array([[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]), np.array([1, 0])


@pytest.fixture(scope="module")
def model_and_embedding():
    torch.manual_seed(0)
    model = build_model(replace(get_config("msam_small"), click_regions=True, region_logits=True)).eval()
    image = torch.randn(1, 1, 128, 128, 128)
    image[:, :, 50:80, 50:80, 50:80] += 2.0
    with torch.inference_mode():
        return model, model.encode(image)


def _at(model, threshold: float) -> Segmenter:
    return Segmenter(model, PipelineOptions(mask_threshold=threshold))


def test_predict_shifts_the_logits_and_takes_the_prompt_back_in_the_same_units(model_and_embedding):
    model, embedding = model_and_embedding
    prompt = torch.randn(1, 1, 32, 32, 32)
    raw_first = _at(model, 0.0).predict(embedding, POINTS, LABELS)
    raw_next = _at(model, 0.0).predict(embedding, POINTS, LABELS, prompt)
    first = _at(model, -1.5).predict(embedding, POINTS, LABELS)
    # the same network input: the raw prompt, given in calibrated units (raw - threshold)
    nxt = _at(model, -1.5).predict(embedding, POINTS, LABELS, prompt + 1.5)
    assert torch.allclose(first, raw_first + 1.5, atol=1e-5)
    assert torch.allclose(nxt, raw_next + 1.5, atol=1e-5)
    assert (first > 0).sum() > (raw_first > 0).sum()  # a lower threshold: a larger mask
    with torch.inference_mode():  # the network itself knows no threshold
        assert torch.allclose(model.decode(embedding, torch.tensor(POINTS, dtype=torch.float32)[None],
                                           torch.tensor(LABELS)[None]), raw_first, atol=1e-6)


def test_refine_matches_at_every_threshold(model_and_embedding):
    """refine starts from zero as the network sees it, so only the final shift differs."""
    model, embedding = model_and_embedding
    raw = _at(model, 0.0).predict(embedding, POINTS, LABELS, iterations=3)
    shifted = _at(model, 0.75).predict(embedding, POINTS, LABELS, iterations=3)
    assert torch.allclose(shifted, raw - 0.75, atol=1e-4)


def test_the_threshold_is_saved_with_the_checkpoint_and_the_network_is_unchanged(model_and_embedding, tmp_path):
    model, _ = model_and_embedding
    path = save_checkpoint(model, tmp_path / "m.safetensors", options=PipelineOptions(mask_threshold=-0.5))
    loaded = load_model(path)
    assert loaded.options.mask_threshold == -0.5
    assert loaded.model_id == model.model_id  # the options are not the network: same embeddings, same cache keys


def test_a_non_finite_threshold_is_refused():
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="mask_threshold"):
            PipelineOptions(mask_threshold=bad)
