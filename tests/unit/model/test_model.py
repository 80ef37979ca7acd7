"""Shapes, parameter counts, LoRA, MEA and the refinement loop."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from msam_core.model import MSAM, build_model, get_config
from msam_core.model.high_res import unfold


@pytest.fixture(scope="module")
def small() -> MSAM:
    torch.manual_seed(0)
    return build_model("msam_small")


def prompts(batch: int = 2):
    points = torch.tensor([[[64.0, 64.0, 64.0], [20.0, 30.0, 100.0]]] * batch)
    labels = torch.tensor([[1, 0]] * batch)
    return points, labels


def test_shapes(small):
    image = torch.randn(2, 1, 128, 128, 128)
    points, labels = prompts()
    with torch.inference_mode():
        embedding = small.encode(image)
        # 96 token channels + the stride-4 features (12 channels x 4^3 positions) folded in
        assert embedding.shape == (2, 96 + 12 * 64, 8, 8, 8) == (2, small.embedding_channels, 8, 8, 8)
        logits = small.decode(embedding, points, labels)
        assert logits.shape == (2, 1, 32, 32, 32)
        assert small.decode(embedding, points, labels, logits).shape == (2, 1, 32, 32, 32)
        assert small.refine(embedding, points, labels, iterations=3).shape == (2, 1, 32, 32, 32)
    assert torch.isfinite(logits).all()


def test_bad_shapes_are_refused(small):
    with pytest.raises(ValueError, match=r"\[B, 1, 128, 128, 128\]"):
        small.encode(torch.zeros(1, 1, 64, 64, 64))
    embedding = torch.zeros(1, small.embedding_channels, 8, 8, 8)
    with pytest.raises(ValueError, match=r"decodes \[B, 864, G, G, G\] embeddings"):
        small.decode(torch.zeros(1, 96, 8, 8, 8), *prompts(1))
    with pytest.raises(ValueError, match="points must be"):
        small.decode(embedding, torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        small.decode(embedding, *prompts(2))
    with pytest.raises(ValueError, match="iterations"):
        small.refine(embedding, *prompts(1), iterations=0)


def test_parameter_counts_match_m_sam():
    msam = build_model("msam")
    msam.set_trainable()
    trainable, total = msam.parameter_counts()
    # M-SAM reports about 21% trainable: 24.9M of 117.8M.
    assert round(trainable / 1e6, 1) == 24.9 and round(total / 1e6, 1) == 117.8
    assert abs(trainable / total - 0.211) < 0.001
    base = build_model("sam_med3d")
    base.set_trainable()
    base_trainable, base_total = base.parameter_counts()
    assert base_total == total - sum(p.numel() for n, p in msam.named_parameters() if n.startswith("mea.") or ".lora." in n)
    assert base_trainable == sum(p.numel() for n, p in base.named_parameters() if n.startswith(("prompt_encoder.", "mask_decoder.")))


def test_only_trainable_parameters_get_gradients(small):
    model = build_model("msam_small")
    model.set_trainable()
    model.train()
    logits = model.refine(model.encode(torch.randn(1, 1, 128, 128, 128)), *prompts(1), iterations=2)
    logits.mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("image_encoder.") and ".lora." not in name:
            assert not p.requires_grad and p.grad is None, name
    lora_a = model.image_encoder.blocks[0].attn.lora.a_q.weight
    lora_b = model.image_encoder.blocks[0].attn.lora.b_q.weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0  # while B is zero only B gets a gradient
    assert lora_a.requires_grad
    assert model.mea.fuse_attn.qkv.weight.grad.abs().sum() > 0
    assert model.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0


def test_zero_initialised_lora_leaves_encoder_unchanged():
    torch.manual_seed(1)
    with_lora = build_model("msam_small")
    without = build_model(replace(get_config("msam_small"), lora_rank=0))
    state = {k: v for k, v in with_lora.state_dict().items() if ".lora." not in k}
    without.load_state_dict(state)
    image = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        assert torch.equal(with_lora.encode(image), without.encode(image))
        # ... and a non-zero B does change it.
        with_lora.image_encoder.blocks[0].attn.lora.b_v.weight.fill_(0.05)
        assert not torch.allclose(with_lora.encode(image), without.encode(image))


def test_mea_replaces_the_sum(small):
    """Without the adapter, decode sums image and mask embeddings (SAM); with it, the MEA fuses them."""
    plain = build_model(replace(get_config("msam_small"), mea=False))
    plain.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith("mea.")})
    embedding = torch.randn(1, small.embedding_channels, 8, 8, 8)
    points, labels = prompts(1)
    tokens = embedding[:, :96]
    with torch.inference_mode():
        high_res, _ = small.high_res.prompted(unfold(embedding[:, 96:]), points, labels, 128)
        sparse, dense = plain.prompt_encoder(points, labels, None)
        by_hand, _ = plain.mask_decoder(tokens + dense, plain.prompt_encoder.dense_pe(), sparse, high_res)
        assert torch.allclose(plain.decode(embedding, points, labels), by_hand[:, :1])
        fused, _ = small.mask_decoder(small.mea(tokens, dense), small.prompt_encoder.dense_pe(), sparse, high_res)
        assert torch.allclose(small.decode(embedding, points, labels), fused[:, :1])
        assert not torch.allclose(fused[:, :1], by_hand[:, :1])


def test_a_decode_cache_keeps_the_adapter_output_without_a_mask_prompt(small):
    """With a DecodeCache the adapter runs once over passes without a mask prompt on one
    embedding and the logits are those of passes without the cache; a mask prompt, autograd or
    another embedding are not served from it."""
    from msam_core.model.decode_cache import DecodeCache

    torch.manual_seed(1)
    embedding = torch.randn(1, small.embedding_channels, 8, 8, 8)
    points, labels = prompts(1)
    more_points = torch.cat([points, torch.tensor([[[70.0, 60.0, 64.0]]])], 1)
    more_labels = torch.tensor([[1, 0, 1]])
    runs: list[int] = []
    hook = small.mea.register_forward_hook(lambda *_: runs.append(1))
    try:
        cache = DecodeCache()
        with torch.inference_mode():
            for pts, lab in ((points, labels), (more_points, more_labels)):
                assert torch.equal(small.decode(embedding, pts, lab, cache=cache), small.decode(embedding, pts, lab))
            assert len(runs) == 1 + 2  # the cache's one run and the two passes without it
            prompted = small.decode(embedding, points, labels, torch.ones(1, 1, 32, 32, 32), cache=cache)
            assert torch.equal(prompted, small.decode(embedding, points, labels, torch.ones(1, 1, 32, 32, 32)))
            assert len(runs) == 5  # a mask prompt runs the adapter
            with pytest.raises(ValueError, match="another embedding"):
                small.decode(embedding + 1, points, labels, cache=cache)
        with torch.enable_grad():
            small.decode(embedding, points, labels, cache=cache)
            small.decode(embedding, points, labels, cache=cache)
        assert len(runs) == 7  # training keeps nothing: each pass has its own graph
    finally:
        hook.remove()


def test_refine_feeds_each_prediction_back(small):
    embedding = torch.randn(1, small.embedding_channels, 8, 8, 8)
    points, labels = prompts(1)
    with torch.inference_mode():
        logits = torch.zeros(1, 1, 32, 32, 32)
        steps = []
        for _ in range(3):
            logits = small.decode(embedding, points, labels, logits)
            steps.append(logits)
        assert torch.equal(small.refine(embedding, points, labels, iterations=3), steps[-1])
        assert torch.equal(small.refine(embedding, points, labels, mask_logits=steps[0], iterations=2), steps[-1])
        assert not torch.allclose(steps[0], steps[1])  # the mask prompt matters


def test_point_order_is_tensor_axis_order(small):
    """A point at index (a, b, c) of the crop and one at (c, b, a) give different predictions."""
    embedding = torch.randn(1, small.embedding_channels, 8, 8, 8)
    labels = torch.tensor([[1]])
    with torch.inference_mode():
        one = small.decode(embedding, torch.tensor([[[10.0, 60.0, 110.0]]]), labels)
        other = small.decode(embedding, torch.tensor([[[110.0, 60.0, 10.0]]]), labels)
    assert not torch.allclose(one, other)


def test_model_id_is_stable_and_tracks_weights():
    torch.manual_seed(2)
    a = build_model("msam_small")
    b = build_model("msam_small")
    b.load_state_dict(a.state_dict())
    assert a.model_id == b.model_id and a.model_id.startswith("msam_small-")
    with torch.no_grad():
        b.mask_decoder.iou_token.weight.add_(1.0)
    b.invalidate_model_id()
    assert a.model_id != b.model_id


def test_autocast_is_a_no_op_on_cpu(small):
    assert isinstance(small.autocast(), contextlib.nullcontext)


def test_signed_log_input_transform(small, tmp_path):
    from msam_core.checkpoints import load_checkpoint, save_checkpoint

    with pytest.raises(ValueError, match="input_transform must be one of"):
        replace(get_config("msam_small"), input_transform="log")
    logged = MSAM(replace(small.config, input_transform="signed_log"))
    logged.load_state_dict(small.state_dict())
    image = 20 * torch.randn(1, 1, 128, 128, 128)
    compressed = torch.sign(image) * torch.log1p(image.abs())
    assert float(compressed.abs().max()) < 5
    with torch.inference_mode():
        torch.testing.assert_close(logged.encode(image), small.encode(compressed))
        assert not torch.allclose(logged.encode(image), small.encode(image), atol=1e-3)
    again = load_checkpoint(save_checkpoint(logged, tmp_path / "m.safetensors", provenance={}))
    assert again.config.input_transform == "signed_log"


def test_high_res_fold_is_exactly_invertible():
    from msam_core.model.high_res import fold, unfold

    x = torch.randn(2, 12, 32, 32, 32)
    folded = fold(x)
    assert folded.shape == (2, 12 * 64, 8, 8, 8)
    assert torch.equal(unfold(folded), x)
    # token (i, j, k) holds exactly the 4^3 block of positions it covers
    torch.testing.assert_close(folded[0, :, 1, 2, 3].reshape(12, 4, 4, 4), x[0, :, 4:8, 8:12, 12:16])
    with pytest.raises(ValueError, match="not divisible"):
        fold(torch.zeros(1, 1, 30, 32, 32))


def test_high_res_features_carry_fine_detail_to_the_logits():
    """With ``high_res_features`` a change inside one token's 16^3 patch reaches the logits at
    that position through the stem (stride 4) as well as through the ViT; without it the
    SAM-Med3D configurations are unchanged (same state-dict keys, 384-channel embeddings)."""
    torch.manual_seed(0)
    model = build_model("msam_small")
    assert model.high_res is not None and get_config("msam").high_res_features is False
    assert not any(k.startswith("high_res.") for k in build_model("sam_med3d").state_dict())
    image = torch.randn(1, 1, 128, 128, 128)
    bumped = image.clone()
    bumped[..., 72:76, 72:76, 72:76] += 5.0
    with torch.inference_mode():
        e0, e1 = model.encode(image), model.encode(bumped)
        e = model.config.prompt_embed_dim
        diff = (unfold(e1[:, e:]) - unfold(e0[:, e:])).abs().sum(1)[0]
        # the stem's receptive field is 19 voxels: the change stays local at stride 4
        assert diff[18, 18, 18] > 0 and diff[2, 2, 2] == 0 and diff[30, 30, 30] == 0
        p, lab = torch.tensor([[[74.0, 74.0, 74.0]]]), torch.ones(1, 1, dtype=torch.long)
        assert not torch.allclose(model.decode(e0, p, lab), model.decode(e1, p, lab))
    model.train()
    model.decode(model.encode(image), p, lab).mean().backward()
    assert model.high_res.net[0].weight.grad.abs().sum() > 0


def test_click_similarity_marks_what_looks_like_the_clicked_position():
    from msam_core.model.high_res import click_similarity

    g = torch.Generator().manual_seed(0)
    features = 0.05 * torch.randn(1, 12, 32, 32, 32, generator=g)
    features[:, :6, :16] += 1.0  # region A (first half of axis 0) differs from region B in 6 channels
    features[:, 6:, 16:] += 1.0
    points = torch.tensor([[[10.0, 60.0, 60.0], [100.0, 60.0, 60.0]]])  # crop voxels; /4 -> token 2 (A), 25 (B)
    sim = click_similarity(features, points, torch.tensor([[1, 0]]), img_size=128)
    assert sim.shape == (1, 2, 32, 32, 32) and sim.abs().max() <= 1 + 1e-5
    pos, neg = sim[0, 0], sim[0, 1]
    assert pos[:16].mean() > 0.9 and pos[16:].mean() < -0.9  # positives: like the positive click
    assert neg[16:].mean() > 0.9 and neg[:16].mean() < -0.9
    # the click's axis order is the tensor's: the same click with axes swapped lands in B
    one = click_similarity(features, torch.tensor([[[10.0, 60.0, 100.0]]]), torch.tensor([[1]]), img_size=128)
    other = click_similarity(features, torch.tensor([[[100.0, 60.0, 10.0]]]), torch.tensor([[1]]), img_size=128)
    assert one[0, 0, :16].mean() > 0.9 and other[0, 0, 16:].mean() > 0.9
    # no negative click: its channel is exactly zero
    only_pos = click_similarity(features, points[:, :1], torch.tensor([[1]]), img_size=128)
    assert torch.equal(only_pos[0, 1], torch.zeros(32, 32, 32))
    # a click outside the crop (another sliding window's) is no prototype here
    outside = click_similarity(features, torch.tensor([[[10.0, 60.0, 60.0], [-30.0, 60.0, 60.0]]]),
                               torch.tensor([[1, 0]]), img_size=128)
    assert torch.equal(outside[0, 1], torch.zeros(32, 32, 32))
