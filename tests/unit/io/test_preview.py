"""PNG preview: three orthogonal panels through the lesion, outline where the mask is."""

from __future__ import annotations

import numpy as np
from PIL import Image

from msam_core.io.preview import COLOURS, LETTER_COLOUR, LETTERS, save_preview
from msam_core.io.volume import Volume
from tests.unit.pipeline.phantoms import centred_affine, sphere_truth, spheres_image

RED = COLOURS[0]


def _outline_centroid(panel: np.ndarray) -> np.ndarray:
    hits = np.argwhere(np.all(panel == RED, axis=-1))
    assert len(hits) > 10
    return hits.mean(axis=0)  # (row, col)


def test_preview_panels_follow_radiological_convention(tmp_path):
    shape, spacing = (64, 64, 64), (-1.0, 1.0, 1.0)  # i runs towards Left: must not matter
    affine = centred_affine(shape, spacing, None, (0.0, 0.0, 0.0))
    centre = np.array([15.0, 12.0, 10.0])  # right, anterior, superior of the image centre
    volume = Volume(spheres_image(shape, affine, [(centre, 8.0)]), affine)
    labels = sphere_truth(shape, affine, centre, 8.0).astype(np.uint8)
    path = save_preview(volume, labels, tmp_path / "p.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= 256
    # three equal square panels (64 mm each) separated by a gap
    width = (img.shape[1] - 16) // 3
    axial, coronal, sagittal = (img[:, n * (width + 8): n * (width + 8) + width] for n in range(3))
    half = width / 2
    r, c = _outline_centroid(axial)
    assert c < half and r < half  # patient right on screen left, anterior at the top
    r, c = _outline_centroid(coronal)
    assert c < half and r < half  # right on the left, superior at the top
    r, c = _outline_centroid(sagittal)
    assert c < half and r < half  # anterior on the left, superior at the top
    # each panel's orientation letters sit at its edges: left, right, top, bottom
    for panel, letters in zip((axial, coronal, sagittal), LETTERS):
        rgb = panel.astype(int)  # the letters' yellow, anti-aliased: not the image's grey nor an outline
        ink = (np.abs(rgb - LETTER_COLOUR).max(axis=-1) < 40) & (rgb[..., 0] - rgb[..., 2] > 40)
        h, w = ink.shape
        band = max(4, w // 12)
        margins = (ink[:, :band], ink[:, -band:], ink[:band, :], ink[-band:, :])
        assert all(m.sum() > 10 for m in margins), letters
        assert not ink[band:-band, band:-band].any()  # nothing drawn over the lesion's middle
    assert letters == ("A", "P", "S", "I")


def test_preview_of_empty_mask_is_written(tmp_path):
    affine = centred_affine((20, 30, 10), (1.0, 1.0, 3.0), None, (0.0, 0.0, 0.0))
    volume = Volume(np.random.default_rng(0).normal(size=(20, 30, 10)).astype(np.float32), affine)
    path = save_preview(volume, np.zeros(volume.shape, np.uint8), tmp_path / "e.png")
    assert Image.open(path).format == "PNG"
