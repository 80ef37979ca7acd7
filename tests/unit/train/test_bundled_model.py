"""The bundled default model: present, small, msam format with provenance, documented."""

from __future__ import annotations

import pytest

from msam_core.checkpoints import load_checkpoint
from msam_core.cli.segment import DEFAULT_CHECKPOINT


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")
def test_bundled_model_loads_with_provenance_and_card() -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.config.name == "msam_small"
    prov = model.checkpoint_meta["provenance"]
    assert prov["trained_by"] == "msam train" and prov["steps"] > 0
    card = (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card.lower() and "Dice@1" in card
