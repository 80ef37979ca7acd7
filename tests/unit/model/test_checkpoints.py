"""Checkpoint formats: official SAM-Med3D and M-SAM files, msam's safetensors, errors."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from msam_core.checkpoints import (
    export_state_dict,
    init_from_checkpoint,
    load_checkpoint,
    load_model,
    msam_to_ours_key,
    ours_to_msam_key,
    read_weights,
    save_checkpoint,
)
from msam_core.cli import main as cli_main
from msam_core.errors import InvalidCheckpoint
from msam_core.model import build_model, get_config
from msam_core.pipeline.options import PipelineOptions
from tests.fixtures.golden_weights import make_inputs, make_state
from tests.fixtures.pickles import Exploit, TrainingNote

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SMALL_SAM = replace(get_config("msam_small"), name="sam_small_test", lora_rank=0, mea=False)


def upstream_keys(layout: str) -> dict[str, list[int]]:
    lines = (FIXTURES / f"upstream_keys_{layout}.txt").read_text().splitlines()
    return {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in lines}  # noqa: S307 - our own fixture


@pytest.fixture(scope="module")
def small_msam():
    torch.manual_seed(3)
    model = build_model("msam_small")
    with torch.no_grad():  # non-zero LoRA B so LoRA weights matter in round trips
        for block in model.image_encoder.blocks:
            block.attn.lora.b_q.weight.normal_(0, 0.02)
            block.attn.lora.b_v.weight.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("layout,name", [("sam_med3d", "sam_med3d"), ("m_sam", "msam")])
def test_export_layout_equals_upstream_module_layout(layout, name):
    """Key names and shapes equal those of upstream's modules (recorded by make_golden.py)."""
    exported = export_state_dict(build_model(name), layout)
    assert {k: list(v.shape) for k, v in exported.items()} == upstream_keys(layout)


@pytest.mark.parametrize("name,layout", [("sam_med3d", "sam_med3d"), ("msam", "m_sam")])
def test_official_file_loads_unchanged_and_gives_upstream_numbers(tmp_path, name, layout):
    """A file laid out as upstream saves it (training-checkpoint dict with pickled args) loads and
    reproduces the golden upstream decoder output."""
    model = build_model(name)
    model.load_state_dict(make_state(model.state_dict(), torch.float32))
    state = export_state_dict(model, layout)
    if layout == "m_sam":  # M-SAM wraps the model; sometimes saved from DDP
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / f"{name}.pth"
    torch.save(
        {
            "epoch": 199,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-4}]},
            "args": argparse.Namespace(model_type="vit_b_ori", lr=8e-4),
            "best_dice": np.float64(0.87),
        },
        path,
    )
    loaded = load_checkpoint(path)
    assert loaded.config.name == name
    golden = np.load(FIXTURES / f"golden_{name}.npz")
    inputs = make_inputs(torch.float32)
    with torch.inference_mode():
        logits = loaded.decode(torch.from_numpy(golden["embedding"]).float(), inputs["points"], inputs["labels"], inputs["mask_logits"])
    assert np.abs(logits.numpy() - golden["logits_mask"]).max() / np.abs(golden["logits_mask"]).max() < 1e-4


def test_key_mapping_round_trips(small_msam):
    for key in small_msam.state_dict():
        assert msam_to_ours_key(ours_to_msam_key(key, has_lora=True)) == key
    assert ours_to_msam_key("mea.blocks.0.mask_attn.qkv.weight", True) == "bidatt.bidirectional_attentions.0.prompt_multiheadattn.qkv.weight"
    assert ours_to_msam_key("image_encoder.blocks.3.attn.lora.b_v.weight", True) == "lora_sam.sam.image_encoder.blocks.3.attn.qkv.linear_b_v.weight"
    assert ours_to_msam_key("image_encoder.blocks.3.attn.qkv.bias", True) == "lora_sam.sam.image_encoder.blocks.3.attn.qkv.qkv.bias"


def test_round_trip_official_to_ours_to_official(tmp_path, small_msam):
    official = export_state_dict(small_msam, "m_sam")
    torch.save({"model_state_dict": official}, tmp_path / "m_sam.pth")
    ours = load_checkpoint(tmp_path / "m_sam.pth", config="msam_small")
    save_checkpoint(ours, tmp_path / "ours.safetensors")
    again = export_state_dict(load_checkpoint(tmp_path / "ours.safetensors"), "m_sam")
    assert again.keys() == official.keys()
    assert all(torch.equal(again[k], official[k]) for k in official)


def test_safetensors_keeps_config_and_provenance(tmp_path, small_msam):
    path = save_checkpoint(small_msam, tmp_path / "m.safetensors", provenance={"data": "synthetic v1", "epochs": 3})
    state, config, meta = read_weights(path)
    assert config == small_msam.config
    assert meta["provenance"] == {"data": "synthetic v1", "epochs": 3} and meta["format_version"] == 2
    loaded = load_checkpoint(path)
    assert loaded.model_id == small_msam.model_id
    image = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(image), small_msam.encode(image))


def test_network_config_and_pipeline_options_are_stored_apart(tmp_path, small_msam):
    options = PipelineOptions(mask_threshold=-0.5, prior_weight_first=4.0, prior_weight=2.0, prior_max_voxels=9000,
                              boundary_band_first=1, boundary_band=2, coarse_view=True)
    path = save_checkpoint(small_msam, tmp_path / "m.safetensors", options=options)
    _, config, meta = read_weights(path)
    assert config == small_msam.config and meta["pipeline"] == options.to_dict()
    assert not set(options.to_dict()) & set(meta["config"])  # the network's config holds no pipeline option
    loaded = load_model(path)
    assert loaded.options == options and loaded.model_id == small_msam.model_id
    record = loaded.describe()
    assert record["name"] == "m" and record["network_id"] == small_msam.model_id and len(record["sha256"]) == 64
    assert record["options"] == options.to_dict() and record["version"].endswith(record["sha256"][:16])
    # the file's identity follows its options: the same weights with other options are another file
    other = load_model(save_checkpoint(small_msam, tmp_path / "m2.safetensors", options=PipelineOptions()))
    assert other.sha256 != loaded.sha256 and other.model_id == loaded.model_id


def _as_format_1(src: Path, dst: Path) -> None:
    """Rewrite an msam file as format 1 wrote it: the pipeline options inside ``config``."""
    import json

    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["msam"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"].update(meta.pop("pipeline"))
    meta["format_version"] = 1
    save_file(state, str(dst), metadata={"msam": json.dumps(meta)})


def test_a_format_1_file_loads_unchanged_with_its_options(tmp_path, small_msam):
    options = PipelineOptions(prior_weight_first=8.0, prior_weight=2.0, boundary_band=1, coarse_view=True)
    _as_format_1(save_checkpoint(small_msam, tmp_path / "new.safetensors", options=options), tmp_path / "old.safetensors")
    loaded = load_model(tmp_path / "old.safetensors")
    assert loaded.options == options and loaded.network.config == small_msam.config
    assert loaded.model_id == small_msam.model_id
    # a file of a newer format is refused with what to do, not misread
    import json

    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta, state = json.loads(f.metadata()["msam"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 3
    save_file(state, str(tmp_path / "future.safetensors"), metadata={"msam": json.dumps(meta)})
    with pytest.raises(InvalidCheckpoint, match="format version 3 .*update msam"):
        load_model(tmp_path / "future.safetensors")
    meta["format_version"], meta["pipeline"] = 2, {"prior_weight": -1.0}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"msam": json.dumps(meta)})
    with pytest.raises(InvalidCheckpoint, match="pipeline options are not valid.*prior_weight"):
        load_model(tmp_path / "bad.safetensors")


def test_sam_med3d_layout_refuses_lora_weights(small_msam):
    with pytest.raises(InvalidCheckpoint, match="LoRA/MEA"):
        export_state_dict(small_msam, "sam_med3d")


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, small_msam):
    state = dict(small_msam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(2)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(InvalidCheckpoint) as info:
        load_checkpoint(tmp_path / "bad.pth", config="msam_small")
    message = str(info.value)
    assert "missing keys: mask_decoder.iou_token.weight" in message
    assert "unexpected keys: mask_decoder.extra.weight" in message
    assert "prompt_encoder.no_mask_embed.weight: file (1, 7) vs model (1, 96)" in message


def test_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(InvalidCheckpoint, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(InvalidCheckpoint, match="not a readable PyTorch or safetensors checkpoint"):
        load_checkpoint(junk)
    text = tmp_path / "README.md"  # its first byte once read as a pickle opcode: "needs arbitrary unpickling"
    text.write_text("# msam\n\nA promptable segmentation service.\n")
    with pytest.raises(InvalidCheckpoint, match="README.md is not a readable PyTorch or safetensors checkpoint: its "
                                                "first bytes are neither a zip archive"):
        load_checkpoint(text)
    truncated = tmp_path / "truncated.pth"
    torch.save({"model_state_dict": {"a": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(InvalidCheckpoint):
        load_checkpoint(truncated)
    no_weights = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, no_weights)
    with pytest.raises(InvalidCheckpoint, match="holds no model weights"):
        load_checkpoint(no_weights)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(InvalidCheckpoint, match="without msam metadata"):
        load_checkpoint(foreign)
    wrong_width = tmp_path / "wide.pth"
    torch.save({"model_state_dict": {"image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 1024)}}, wrong_width)
    with pytest.raises(InvalidCheckpoint, match="matches no built-in config"):
        load_checkpoint(wrong_width)


def test_arbitrary_unpickling_needs_an_explicit_opt_in(tmp_path, small_msam):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": small_msam.state_dict(), "payload": Exploit(str(marker))}, evil)
    with pytest.raises(InvalidCheckpoint, match="--allow-unsafe-pickle"):
        load_checkpoint(evil, config="msam_small")
    assert not marker.exists()

    noted = tmp_path / "noted.pth"
    torch.save({"model_state_dict": small_msam.state_dict(), "note": TrainingNote("v1")}, noted)
    with pytest.raises(InvalidCheckpoint, match="refused"):
        load_checkpoint(noted, config="msam_small")
    model = load_checkpoint(noted, config="msam_small", allow_unsafe_pickle=True)
    assert model.model_id == small_msam.model_id


def test_init_from_sam_med3d_weights_keeps_only_lora_and_mea_fresh(tmp_path):
    torch.manual_seed(4)
    base = build_model(SMALL_SAM)
    torch.save({"model_state_dict": base.state_dict()}, tmp_path / "base.pth")
    model = build_model("msam_small")
    fresh = init_from_checkpoint(model, tmp_path / "base.pth")
    assert fresh and all(k.startswith("mea.") or ".attn.lora." in k for k in fresh)
    assert set(fresh) == {k for k in model.state_dict() if k.startswith("mea.") or ".lora." in k}
    assert torch.equal(model.image_encoder.pos_embed, base.image_encoder.pos_embed)
    # Anything else missing is still an error.
    state = base.state_dict()
    del state["image_encoder.pos_embed"]
    torch.save({"model_state_dict": state}, tmp_path / "holey.pth")
    with pytest.raises(InvalidCheckpoint, match="missing keys: image_encoder.pos_embed"):
        init_from_checkpoint(build_model("msam_small"), tmp_path / "holey.pth")


def test_init_from_a_checkpoint_without_the_high_res_stem(tmp_path):
    """An msam_small checkpoint from before the high-res stem initialises today's msam_small:
    the stem starts fresh, like LoRA and MEA."""
    old = build_model(replace(get_config("msam_small"), high_res_features=False, click_regions=False))
    path = save_checkpoint(old, tmp_path / "old.safetensors", provenance={})
    model = build_model("msam_small")
    fresh = init_from_checkpoint(model, path)
    assert set(fresh) == {k for k in model.state_dict() if k.startswith("high_res.")}
    assert torch.equal(model.mask_decoder.iou_token.weight, old.mask_decoder.iou_token.weight)


def test_init_from_a_checkpoint_without_click_regions(tmp_path):
    """An msam_small checkpoint without ``click_regions`` loads as it was (its stated config) and
    initialises an msam_small with them: only the weight of the stem's ``fuse`` (more input
    channels) starts fresh; its bias, the stem's convolutions and the rest are taken over."""
    old = build_model("msam_small")
    path = save_checkpoint(old, tmp_path / "old.safetensors", provenance={})
    assert load_checkpoint(path).config.click_regions is False
    model = build_model(replace(get_config("msam_small"), click_regions=True))
    fresh = init_from_checkpoint(model, path)
    assert fresh == ["high_res.fuse.weight"]
    assert torch.equal(model.high_res.fuse.bias, old.high_res.fuse.bias)
    assert torch.equal(model.high_res.net[0].weight, old.high_res.net[0].weight)
    assert model.high_res.fuse.weight.shape != old.high_res.fuse.weight.shape


def test_cli_convert(tmp_path, small_msam, capsys):
    src = tmp_path / "m_sam.pth"
    torch.save({"model_state_dict": export_state_dict(small_msam, "m_sam")}, src)
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(src), str(out), "--config", "msam_small"]) == 0
    assert load_checkpoint(out).model_id == small_msam.model_id
    assert load_model(out).options == PipelineOptions()  # an upstream file states no options: all off
    back = tmp_path / "back.pth"
    assert cli_main(["convert", str(out), str(back)]) == 0
    assert torch.load(back, weights_only=True)["model_state_dict"].keys() == export_state_dict(small_msam, "m_sam").keys()
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli_main(["convert", str(out), str(tmp_path / "x.bin")]) == 2
    assert cli_main(["convert", str(out), str(tmp_path / "no" / "x.pth")]) == 2
    assert "output folder" in capsys.readouterr().err and not (tmp_path / "no").exists()
    # options calibrated into the file have no place in a .pth: said so, not dropped silently
    calibrated = save_checkpoint(small_msam, tmp_path / "calibrated.safetensors", provenance={},
                                 options=PipelineOptions(prior_weight_first=4.0, boundary_band=1))
    capsys.readouterr()
    assert cli_main(["convert", str(calibrated), str(tmp_path / "up.pth")]) == 0
    err = capsys.readouterr().err
    assert "holds the network only" in err and "prior_weight_first=4.0" in err and "boundary_band=1" in err, err
    assert cli_main(["convert", str(out), str(tmp_path / "plain.pth")]) == 0
    assert "holds the network only" not in capsys.readouterr().err  # nothing to lose
