"""PNG preview: three orthogonal slices through the lesion, mask outlined.

The image and mask are first permuted/flipped (no interpolation) to the axis order closest to
R, A, S; panels are shown in radiological convention (patient right on the left of the screen,
anterior / superior at the top, in the sagittal panel anterior on the left), as the viewer shows
them by default, and scaled to square millimetres. Left to right: axial, coronal, sagittal. The
only text drawn is each panel's orientation letters (R/L, A/P, S/I at the middle of its edges;
for an oblique image the nearest directions), so no patient data can end up in the picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from msam_core.io.orient import reorient_array_like, reorient_to_ras
from msam_core.io.volume import Volume

#: RGB outline colour per label (cycled).
COLOURS = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (80, 255, 80), (255, 96, 255), (255, 150, 40))
CT_WINDOW = (-160.0, 240.0)  # soft tissue
#: pixels along the longest side of the image (all panels share one mm-per-pixel scale)
PANEL_PIXELS = 384
#: orientation letters (left, right, top, bottom) of the axial, coronal and sagittal panels
LETTERS = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))
LETTER_COLOUR = (255, 255, 160)
LETTER_PIXELS = 16


def _window(volume: Volume, ct: bool) -> tuple[float, float]:
    if ct:
        return CT_WINDOW
    sample = volume.array[::4, ::4, ::4].astype(np.float32)
    lo, hi = np.percentile(sample, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _panel(image2d: np.ndarray, labels2d: np.ndarray, mm: tuple[float, float],
           window: tuple[float, float], scale: float) -> Image.Image:
    """One panel; ``image2d``/``labels2d`` are [row, col] with ``mm`` = (row, col) spacing;
    ``scale`` in pixels per mm."""
    lo, hi = window
    grey = np.clip((image2d.astype(np.float32) - lo) / (hi - lo), 0, 1)
    size_mm = np.array(image2d.shape) * np.array(mm)
    out_hw = np.maximum(1, np.rint(size_mm * scale).astype(int))
    img = Image.fromarray((grey * 255).astype(np.uint8)).resize((int(out_hw[1]), int(out_hw[0])),
                                                                Image.Resampling.BILINEAR)
    lab = np.asarray(Image.fromarray(labels2d.astype(np.uint8)).resize(
        (int(out_hw[1]), int(out_hw[0])), Image.Resampling.NEAREST))
    rgb = np.stack([np.asarray(img)] * 3, axis=-1)
    for value in np.unique(lab):
        if value == 0:
            continue
        region = lab == value
        edge = region & ~ndimage.binary_erosion(region, border_value=0)
        rgb[edge] = COLOURS[(int(value) - 1) % len(COLOURS)]
    return Image.fromarray(rgb)


def _letter(panel: Image.Image, letters: tuple[str, str, str, str]) -> None:
    """Draw the orientation ``letters`` (left, right, top, bottom) at the middle of ``panel``'s
    edges, outlined in black so that they read on any grey."""
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=LETTER_PIXELS)
    w, h, pad = panel.width, panel.height, 3
    anchors = (((pad, h / 2), "lm"), ((w - pad, h / 2), "rm"), ((w / 2, pad), "mt"), ((w / 2, h - pad), "mb"))
    for text, (xy, anchor) in zip(letters, anchors):
        draw.text(xy, text, fill=LETTER_COLOUR, font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def render_preview(volume: Volume, labels: np.ndarray, ct: bool | None = None) -> Image.Image:
    """The preview image for ``labels`` (shape ``volume.shape``) over ``volume``."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image shape {volume.shape}")
    if ct is None:
        from msam_core.pipeline.preprocess import is_ct

        ct = is_ct(volume)
    ras = reorient_to_ras(volume)
    lab = reorient_array_like(np.asarray(labels), volume.affine)
    sp = ras.spacing
    fg = np.argwhere(lab > 0)
    centre = np.rint(fg.mean(axis=0)).astype(int) if len(fg) else np.array(ras.shape) // 2
    i, j, k = (int(c) for c in centre)
    window = _window(volume, ct)
    scale = PANEL_PIXELS / float(np.max(np.array(ras.shape) * sp))
    img, flip = ras.array, (slice(None, None, -1), slice(None, None, -1))
    # [R, A] -> rows A (top = anterior), cols R reversed (patient right on screen left)
    axial = _panel(img[:, :, k].T[flip], lab[:, :, k].T[flip], (sp[1], sp[0]), window, scale)
    coronal = _panel(img[:, j, :].T[flip], lab[:, j, :].T[flip], (sp[2], sp[0]), window, scale)
    sagittal = _panel(img[i, :, :].T[flip], lab[i, :, :].T[flip], (sp[2], sp[1]), window, scale)
    panels = [axial, coronal, sagittal]
    for panel, letters in zip(panels, LETTERS):
        _letter(panel, letters)
    gap = 8
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, (height - p.height) // 2))
        x += p.width + gap
    return canvas


def save_preview(volume: Volume, labels: np.ndarray, path: str | Path) -> Path:
    """Write :func:`render_preview` as PNG."""
    path = Path(path)
    render_preview(volume, labels).save(str(path), format="PNG")
    return path
