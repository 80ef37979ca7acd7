"""A RECIST line as the prompt: a radiologist's long-axis measurement of a lesion (two endpoints)
turned into the prompts the pipeline takes.

A line is given in one of the prompt spaces (:mod:`msam_core.pipeline.prompts`): ``voxel``
indices of the image, or ``LPS`` / ``RAS`` millimetres. It must have a length, lie inside the
image, and - in voxel space, where it can be checked exactly - lie in one slice of the
acquisition plane (:func:`msam_core.measure.acquisition_axis`), as a RECIST measurement does.

The line becomes positive clicks on it (:data:`STRATEGIES`): the first is the midpoint, where the
first crop is centred; the others are spread along the line; a strategy may add negative clicks
on the line's extension beyond its ends (where a RECIST line says the lesion has ended; those
falling outside the image are left out). Which strategy works best was
measured with ``msam evaluate``'s line protocol on the validation split
(``bench/line_strategies.py``; figures in docs/measurements.md); :data:`DEFAULT_STRATEGY` is
that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_core.pipeline.prompts import Point, Space, _check_space, _finite_xyz, _inside_image, to_ras

#: strategy -> (positions of the positive clicks along the line, midpoint first; positions of
#: negative clicks beyond its ends), 0 = start, 1 = end
STRATEGIES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "midpoint": ((0.5,), ()),
    "three": ((0.5, 0.25, 0.75), ()),
    "five": ((0.5, 0.3, 0.7, 0.15, 0.85), ()),
    "three_bounded": ((0.5, 0.25, 0.75), (-0.2, 1.2)),
    "midpoint_bounded": ((0.5,), (-0.2, 1.2)),
}
DEFAULT_STRATEGY = "three_bounded"
#: a line shorter than this (mm) has no length to measure or prompt with
MIN_LENGTH_MM = 1e-3


@dataclass(frozen=True)
class Line:
    """A line measurement: two endpoints in ``space``, for lesion ``lesion``."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    space: Space = "voxel"
    lesion: int = 1


def resolve_line(line: Line, volume: Volume) -> np.ndarray:
    """``(2, 3)`` RAS mm endpoints of ``line`` after checking it against ``volume``.

    Raises:
        InvalidPrompt: a coordinate that is not finite, zero length, an endpoint outside the
            image, or (voxel space) endpoints in different slices of the acquisition plane.
    """
    from msam_core.measure import acquisition_axis

    space = _check_space(line.space)
    ends = np.array([_finite_xyz(line.start, "line endpoint"), _finite_xyz(line.end, "line endpoint")])
    ras = to_ras(ends, space, volume)
    length = float(np.linalg.norm(ras[1] - ras[0]))
    what = f"the line of lesion {line.lesion} ({ends[0].tolist()} to {ends[1].tolist()}, {space})"
    if length < MIN_LENGTH_MM:
        raise InvalidPrompt(f"{what} has zero length: give the two different endpoints of the lesion's long axis")
    voxels = volume.ras_to_voxel(ras)
    outside = ~_inside_image(voxels, volume.shape)
    if outside.any():
        which = " and ".join(n for n, out in zip(("start", "end"), outside) if out)
        raise InvalidPrompt(f"{what}: its {which} is outside the image (voxel {np.round(voxels[outside][0], 1).tolist()}, "
                            f"image shape {list(volume.shape)}; voxel indices run from 0 to shape-1)")
    if space == "voxel":
        axis = acquisition_axis(volume)
        if abs(ends[0][axis] - ends[1][axis]) > 1e-6:
            raise InvalidPrompt(f"{what} is not in one slice: its endpoints lie in slices {ends[0][axis]:g} and "
                                f"{ends[1][axis]:g} along voxel axis {'ijk'[axis]} (the slices of the acquisition "
                                "plane); a RECIST line lies in one slice, so give both endpoints the same "
                                f"{'ijk'[axis]}")
    return ras


def line_points(line_ras: np.ndarray, strategy: str = DEFAULT_STRATEGY) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3)`` RAS clicks for the line ``(2, 3)`` and their ``(N,)`` labels (1 positive, the
    midpoint first; 0 negative)."""
    if strategy not in STRATEGIES:
        raise InvalidPrompt(f"unknown line strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    a, b = np.asarray(line_ras, dtype=np.float64)
    positive, negative = STRATEGIES[strategy]
    points = np.array([a + t * (b - a) for t in (*positive, *negative)])
    return points, np.array([1] * len(positive) + [0] * len(negative), dtype=np.int64)


def line_as_points(line: Line, volume: Volume, strategy: str = DEFAULT_STRATEGY) -> list[Point]:
    """``line`` checked (:func:`resolve_line`) and turned into RAS clicks of its lesion (negative
    clicks outside the image left out)."""
    points, labels = line_points(resolve_line(line, volume), strategy)
    inside = _inside_image(volume.ras_to_voxel(points), volume.shape)
    return [Point(xyz=tuple(float(v) for v in p), label=int(lab), space="RAS", lesion=line.lesion)  # type: ignore[arg-type]
            for p, lab, ok in zip(points, labels, inside) if ok or lab == 1]
