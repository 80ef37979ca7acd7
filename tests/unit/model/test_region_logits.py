"""The region logits: the click regions' direct, per-prompt weighted path to the logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from msam_core.checkpoints import init_from_checkpoint, save_checkpoint
from msam_core.model import build_model, get_config
from msam_core.model.high_res import unfold
from msam_core.model.msam import is_added_parameter
from msam_core.model.region_logits import RegionLogits

CONFIG = replace(get_config("msam_small"), click_regions=True, region_logits=True)


def regions_with(positive: list[float], negative: list[float]) -> torch.Tensor:
    """``[1, 6, 2, 2, 2]`` regions: every cell covered as given per scale."""
    values = torch.tensor(positive + negative)
    return values[None, :, None, None, None].expand(1, 6, 2, 2, 2).clone()


def test_at_the_start_the_middle_scale_decides():
    """Before training the logits are +2 per positive scale, -2 per negative one, -3 offset: a
    cell in the positive regions of two scales (the middle and the widest) is foreground, one
    in the widest only is not, and a negative region takes a cell back out."""
    head = RegionLogits(token_dim=8)
    token = torch.randn(1, 8)
    cases = {(0.0, 1.0, 1.0, 0.0, 0.0, 0.0): 1.0, (0.0, 0.0, 1.0, 0.0, 0.0, 0.0): -1.0,
             (1.0, 1.0, 1.0, 0.0, 0.0, 0.0): 3.0, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0): -3.0,
             (1.0, 1.0, 1.0, 0.0, 1.0, 1.0): -1.0, (0.0, 0.5, 1.0, 0.0, 0.0, 0.0): 0.0}
    for values, expected in cases.items():
        logits = head(token, regions_with(list(values[:3]), list(values[3:])))
        assert logits.shape == (1, 1, 2, 2, 2)
        assert torch.allclose(logits, torch.full_like(logits, expected)), values


def test_the_weights_depend_on_the_prompt_token_and_learn_from_the_start():
    """``A`` starts at zero (every token gets the prior) yet gets a gradient at once; once it is
    non-zero, two tokens weight the same regions differently (a scale per lesion)."""
    torch.manual_seed(0)
    head = RegionLogits(token_dim=8)
    regions = torch.rand(2, 6, 3, 3, 3)
    tokens = torch.randn(2, 8)
    same = head(tokens, regions[:1].expand(2, -1, -1, -1, -1))
    assert torch.equal(same[0], same[1])
    head(tokens, regions).square().mean().backward()
    assert head.hyper.weight.grad is not None and head.hyper.weight.grad.abs().sum() > 0
    assert head.prior.grad is not None and head.prior.grad.abs().sum() > 0
    with torch.no_grad():
        head.hyper.weight.normal_()
    differ = head(tokens, regions[:1].expand(2, -1, -1, -1, -1))
    assert not torch.allclose(differ[0], differ[1])


def test_bad_shapes_are_refused():
    head = RegionLogits(token_dim=8)
    with pytest.raises(ValueError, match="regions"):
        head(torch.randn(1, 8), torch.rand(1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="token"):
        head(torch.randn(1, 7), torch.rand(1, 6, 2, 2, 2))


def test_decode_adds_the_region_logits_to_the_decoders():
    """decode = the decoder's own mask logits + the head applied to the first mask token and the
    regions grown from the clicks, recomputed here by hand."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():
        model.region_logits.hyper.weight.normal_(std=0.1)
    image = torch.zeros(1, 1, 128, 128, 128)
    image[:, :, 50:80, 50:80, 50:80] = 2.0  # a bright cube: the click's regions cover it
    points, labels = torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1]])
    with torch.inference_mode():
        embedding = model.encode(image)
        e = CONFIG.prompt_embed_dim
        high_res, regions = model.high_res.prompted(unfold(embedding[:, e:]), points, labels, 128)
        assert regions.shape == (1, 6, 32, 32, 32)
        assert regions[0, :3, 16, 16, 16].min() == 1.0 and regions[0, :3, 2, 2, 2].max() == 0.0
        sparse, dense = model.prompt_encoder(points, labels, None)
        masks, _, tokens = model.mask_decoder.predict(model.mea(embedding[:, :e], dense),
                                                      model.prompt_encoder.dense_pe(), sparse, high_res)
        by_hand = masks[:, :1] + model.region_logits(tokens[:, 0], regions)
        decoded = model.decode(embedding, points, labels)
        assert torch.allclose(decoded, by_hand, atol=1e-5)
        assert not torch.allclose(decoded, masks[:, :1], atol=1e-2)


def test_config_and_init_from_a_model_without_them(tmp_path):
    """region_logits needs click_regions; a click-regions checkpoint without the head (the
    previous bundled model's kind) initialises a model with it, the head starting fresh."""
    with pytest.raises(ValueError, match="region_logits needs click_regions"):
        replace(get_config("msam_small"), region_logits=True)
    assert is_added_parameter("region_logits.prior") and is_added_parameter("region_logits.hyper.weight")
    before = build_model(replace(CONFIG, region_logits=False))
    path = save_checkpoint(before, tmp_path / "before.safetensors")
    model = build_model(CONFIG)
    fresh = init_from_checkpoint(model, path)
    assert sorted(fresh) == ["region_logits.hyper.weight", "region_logits.prior"]
    assert torch.equal(model.mask_decoder.mask_tokens.weight, before.mask_decoder.mask_tokens.weight)
    assert torch.equal(model.region_logits.prior, RegionLogits(CONFIG.prompt_embed_dim).prior)


def test_a_decode_cache_prepares_the_stem_once_per_embedding(monkeypatch):
    """The high-res stem's prompt-independent part (features, the pooled crop, the standardised
    features of the click similarity) is prepared once for passes on one embedding with a
    DecodeCache; every pass's logits are those of a pass without the cache, bit for bit."""
    from msam_core.model.decode_cache import DecodeCache

    torch.manual_seed(2)
    model = build_model(CONFIG)
    image = torch.zeros(1, 1, 128, 128, 128)
    image[:, :, 40:90, 50:80, 55:75] = 1.5
    prepared: list[int] = []
    real = model.high_res.prepare
    monkeypatch.setattr(model.high_res, "prepare", lambda f: prepared.append(1) or real(f))
    clicks = [(torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1]])),
              (torch.tensor([[[64.0, 64.0, 64.0], [20.0, 64.0, 64.0]]]), torch.tensor([[1, 0]])),
              (torch.tensor([[[64.0, 64.0, 64.0], [20.0, 64.0, 64.0], [70.0, 60.0, 66.0]]]), torch.tensor([[1, 0, 1]]))]
    with torch.inference_mode():
        embedding = model.encode(image)
        cache = DecodeCache()
        for points, labels in clicks:
            assert torch.equal(model.decode(embedding, points, labels, cache=cache), model.decode(embedding, points, labels))
    assert len(prepared) == 1 + len(clicks)  # the cache's one, and one per pass without it
