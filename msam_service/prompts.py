"""The request's prompt document (validated by api/schemas.py, stored as
:class:`~msam_service.contract.PromptDocument`) -> msam_core prompts.

Document: ``{"space": "voxel"|"LPS"|"RAS", "lesions": [{"positive": [[x,y,z], ...],
"negative": [...], "box": [[x0,y0,z0],[x1,y1,z1]], "line": [[x0,y0,z0],[x1,y1,z1]],
"label": "name", "mask": {"volume_id": ID, "label": K}, "line_source": "SR"}], "iterations": N}``.
Lesion ``n`` (1-based, in the order given) becomes label ``n`` in the mask. A lesion's ``mask`` is
its previous-mask prompt (:mod:`msam_service.masks`); its ``line`` (a RECIST measurement) becomes
positive clicks on the line, placed before its other clicks so the first crop is centred on the
line's midpoint (:mod:`msam_core.pipeline.lines`). ``line_source`` says where a line came from
(set by the service for lines found in a PACS: ``SR`` or ``GSPS``; ``request`` otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from msam_core.io.volume import LPS_TO_RAS, Volume
from msam_core.pipeline.lines import Line, line_as_points, resolve_line
from msam_core.pipeline.prompts import Box, LesionPrompt, Point, resolve_prompts
from msam_service.contract import PromptDocument, numbered_lesions


def to_points_boxes(doc: PromptDocument) -> tuple[list[Point], list[Box]]:
    space = doc.get("space", "voxel")
    points: list[Point] = []
    boxes: list[Box] = []
    for n, lesion in numbered_lesions(doc):
        for xyz in lesion.get("positive", []):
            points.append(Point(xyz=tuple(xyz), label=1, space=space, lesion=n))  # type: ignore[arg-type]
        for xyz in lesion.get("negative", []) or []:
            points.append(Point(xyz=tuple(xyz), label=0, space=space, lesion=n))  # type: ignore[arg-type]
        if lesion.get("box"):
            c0, c1 = lesion["box"]
            boxes.append(Box(corner0=tuple(c0), corner1=tuple(c1), space=space, lesion=n))  # type: ignore[arg-type]
    return points, boxes


def lines_of(doc: PromptDocument) -> list[Line]:
    space = doc.get("space", "voxel")
    return [Line(start=tuple(lesion["line"][0]), end=tuple(lesion["line"][1]), space=space, lesion=n)  # type: ignore[arg-type]
            for n, lesion in numbered_lesions(doc) if lesion.get("line")]


def reference_lines(doc: PromptDocument, volume: Volume) -> dict[int, dict[str, Any]]:
    """Lesion -> its line as the job status reports it: length (mm), endpoints in LPS mm and
    where the line came from."""
    out = {}
    for line in lines_of(doc):
        lps = resolve_line(line, volume) * LPS_TO_RAS[:3, :3].diagonal()
        source = dict(numbered_lesions(doc))[line.lesion].get("line_source") or "request"
        out[line.lesion] = {"length_mm": round(float(np.linalg.norm(lps[1] - lps[0])), 2),
                            "start_lps": [round(float(v), 2) for v in lps[0]],
                            "end_lps": [round(float(v), 2) for v in lps[1]], "source": source}
    return out


def resolve(doc: PromptDocument, volume: Volume,
            masks: dict[int, np.ndarray] | None = None) -> list[LesionPrompt]:
    """Validate against ``volume`` (raises :class:`~msam_core.errors.InvalidPrompt`).

    ``masks``: lesion number -> its mask (from :func:`msam_service.masks.load_masks`). Without them (the gateway,
    which knows the image's geometry but not the masks' voxels) the clicks and boxes are checked
    alone: a lesion that has a mask needs no positive click, and one prompted by its mask alone is
    left to the worker."""
    points, boxes = to_points_boxes(doc)
    line_points = [p for line in lines_of(doc) for p in line_as_points(line, volume)]
    points = line_points + points  # a lesion's first positive click (its crop centre): its line's midpoint
    if masks is None:
        masked = {n for n, lesion in numbered_lesions(doc) if lesion.get("mask")}
        points = [dataclasses.replace(p, label=1) if p.lesion in masked else p for p in points]
        if not points and not boxes:
            return []
        return resolve_prompts(volume, points, boxes)
    return resolve_prompts(volume, points, boxes, lesion_priors=masks)


def segment_labels(doc: PromptDocument) -> dict[int, str]:
    return {n: str(lesion["label"]) for n, lesion in numbered_lesions(doc)
            if lesion.get("label")}
