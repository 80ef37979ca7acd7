"""``ModelConfig.mask_threshold``: decode's logits and mask prompt in calibrated units."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from msam_core.checkpoints import load_checkpoint, save_checkpoint
from msam_core.model import build_model, get_config
from msam_core.train.calibrate import set_threshold

POINTS, LABELS = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]]), torch.tensor([[1, 0]])


@pytest.fixture(scope="module")
def model_and_embedding():
    torch.manual_seed(0)
    model = build_model(replace(get_config("msam_small"), click_regions=True, region_logits=True)).eval()
    image = torch.randn(1, 1, 128, 128, 128)
    image[:, :, 50:80, 50:80, 50:80] += 2.0
    with torch.inference_mode():
        return model, model.encode(image)


def test_decode_shifts_its_logits_and_takes_the_prompt_back_in_the_same_units(model_and_embedding):
    model, embedding = model_and_embedding
    prompt = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        set_threshold(model, 0.0)
        raw_first = model.decode(embedding, POINTS, LABELS)
        raw_next = model.decode(embedding, POINTS, LABELS, prompt)
        set_threshold(model, -1.5)
        first = model.decode(embedding, POINTS, LABELS)
        # the same network input: the raw prompt, given in calibrated units (raw - threshold)
        nxt = model.decode(embedding, POINTS, LABELS, prompt + 1.5)
    assert torch.allclose(first, raw_first + 1.5, atol=1e-5)
    assert torch.allclose(nxt, raw_next + 1.5, atol=1e-5)
    assert (first > 0).sum() > (raw_first > 0).sum()  # a lower threshold: a larger mask


def test_refine_matches_at_every_threshold(model_and_embedding):
    """refine starts from zero as the network sees it, so only the final shift differs."""
    model, embedding = model_and_embedding
    with torch.inference_mode():
        set_threshold(model, 0.0)
        raw = model.refine(embedding, POINTS, LABELS, iterations=3)
        set_threshold(model, 0.75)
        shifted = model.refine(embedding, POINTS, LABELS, iterations=3)
    set_threshold(model, 0.0)
    assert torch.allclose(shifted, raw - 0.75, atol=1e-4)


def test_the_threshold_is_saved_with_the_checkpoint(model_and_embedding, tmp_path):
    model, _ = model_and_embedding
    set_threshold(model, -0.5)
    try:
        loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    finally:
        set_threshold(model, 0.0)
    assert loaded.config.mask_threshold == -0.5


def test_a_non_finite_threshold_is_refused():
    with pytest.raises(ValueError, match="finite"):
        replace(get_config("msam_small"), mask_threshold=float("nan"))
