"""An order names a study (by accession number or StudyInstanceUID); msam needs one series.

:func:`find_series` asks the node by QIDO-RS (dicomweb-client): the study with this accession
number (exactly one must exist), its series with modality, description and number of images,
and for each series that passed the filters the SliceThickness of one of its instances. Then
:func:`choose` applies the node's :class:`~msam_service.pacs.settings.SeriesRules`; when they
leave no series or several, :class:`OrderProblem` carries the candidates (what the API's 422
and the HL7 listener's NAK list) and nothing is guessed.

Used by the API (``POST /segment`` with ``source.accession_number``) and ``msam hl7-listener``;
both answer before a job exists. Nothing here is logged: accession numbers, UIDs and series
descriptions identify a patient's study.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import requests

from msam_service.pacs import dicomweb
from msam_service.pacs.nodes import DicomwebNode, PacsError
from msam_service.pacs.settings import SeriesRules

#: slice thicknesses closer than this are equal (mm)
THICKNESS_TOLERANCE_MM = 0.01


class OrderProblem(Exception):
    """The order cannot become one series: ``status`` 404 (no such study) or 422 (no series or
    several fit the rules, or several studies share the accession number). ``candidates``: what
    was considered, with the reason each was not chosen."""

    def __init__(self, status: int, code: str, message: str, candidates: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.candidates = status, code, candidates or []


@dataclass
class Candidate:
    series_uid: str
    modality: str
    description: str
    instances: int
    slice_thickness: float | None = None
    excluded: str = ""  # why this series was not chosen ("" for the chosen one / the tied ones)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


def _filter(c: Candidate, rules: SeriesRules) -> str:
    """Why ``c`` fails the filters ("" if it passes)."""
    if rules.modality is not None and c.modality.upper() not in {m.upper() for m in rules.modality}:
        return f"modality {c.modality or 'missing'} is not {'/'.join(rules.modality)}"
    if rules.description is not None and not re.search(rules.description, c.description, re.I):
        return "series description does not match the node's pattern"
    if rules.exclude_description is not None and re.search(rules.exclude_description, c.description, re.I):
        return "series description matches the node's exclusion pattern"
    if c.instances < rules.min_instances:
        return f"{c.instances} image(s), fewer than {rules.min_instances}"
    return ""


def choose(candidates: list[Candidate], rules: SeriesRules) -> Candidate:
    """The one series the rules pick; :class:`OrderProblem` (422) when none or several remain.
    Marks every other candidate's ``excluded`` with the reason."""
    for c in candidates:
        c.excluded = _filter(c, rules)
    left = [c for c in candidates if not c.excluded]
    if not left:
        raise OrderProblem(422, "no_matching_series", "no series of the study fits this node's series rules "
                           "(MSAM_PACS_NODE_OPTIONS); name one with source.series_uid",
                           [c.to_dict() for c in candidates])
    for preference in rules.prefer:
        if len(left) == 1:
            break
        if preference == "thinnest":
            known = [c.slice_thickness for c in left if c.slice_thickness is not None]
            best = min(known) if known else None
            keep = [c for c in left if best is None or
                    (c.slice_thickness is not None and c.slice_thickness - best <= THICKNESS_TOLERANCE_MM)]
            reason = f"thicker slices than {best:g} mm" if best is not None else ""
        else:  # most_images
            most = max(c.instances for c in left)
            keep = [c for c in left if c.instances == most]
            reason = f"fewer images than {most}"
        for c in left:
            if c not in keep:
                c.excluded = reason
        left = keep
    if len(left) > 1:
        raise OrderProblem(422, "ambiguous_series", f"{len(left)} series of the study fit this node's series rules "
                           "equally; name one with source.series_uid", [c.to_dict() for c in candidates])
    return left[0]


def find_study(node: DicomwebNode, accession_number: str, timeout: float) -> str:
    """The StudyInstanceUID of the one study with ``accession_number`` on ``node``."""
    try:
        found = dicomweb.client(node, timeout).search_for_studies(
            search_filters={"AccessionNumber": accession_number}, fields=["StudyInstanceUID"])
    except requests.HTTPError as exc:
        raise PacsError(f"QIDO-RS on {node.name} failed ({dicomweb.http_reason(exc)})") from exc
    except Exception as exc:
        raise PacsError(f"QIDO-RS on {node.name} failed ({type(exc).__name__})") from exc
    studies = sorted({str(_value(s, "0020000D")) for s in found if _value(s, "0020000D")})
    if not studies:
        raise OrderProblem(404, "study_not_found", f"no study with this accession number on {node.name}")
    if len(studies) > 1:
        raise OrderProblem(422, "ambiguous_study", f"{len(studies)} studies on {node.name} have this accession "
                           "number; name one with source.study_uid", [{"study_uid": s} for s in studies])
    return studies[0]


def series_of(node: DicomwebNode, study_uid: str, timeout: float) -> list[Candidate]:
    """Every series of the study, by QIDO-RS (no SliceThickness yet)."""
    client = dicomweb.client(node, timeout)
    try:
        found = client.search_for_series(study_uid, fields=["Modality", "SeriesDescription",
                                                            "NumberOfSeriesRelatedInstances"])
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            found = []
        else:
            raise PacsError(f"QIDO-RS on {node.name} failed ({dicomweb.http_reason(exc)})") from exc
    except Exception as exc:
        raise PacsError(f"QIDO-RS on {node.name} failed ({type(exc).__name__})") from exc
    out = [Candidate(series_uid=str(_value(s, "0020000E")), modality=str(_value(s, "00080060")),
                     description=str(_value(s, "0008103E")), instances=int(_value(s, "00201209", 0) or 0))
           for s in found if _value(s, "0020000E")]
    if not out:
        raise OrderProblem(404, "study_not_found", f"no series of this study on {node.name}")
    return sorted(out, key=lambda c: c.series_uid)


def slice_thickness(node: DicomwebNode, study_uid: str, series_uid: str, timeout: float) -> float | None:
    """SliceThickness of one instance of the series (QIDO-RS ``includefield``; the instance's
    metadata by WADO-RS when the archive does not return the attribute in QIDO-RS)."""
    client = dicomweb.client(node, timeout)
    try:
        found = client.search_for_instances(study_uid, series_uid, fields=["SliceThickness"], limit=1)
        if not found:
            return None
        value = _value(found[0], "00180050", None)
        if value is None:
            sop = _value(found[0], "00080018", None)
            if sop is None:
                return None
            meta = client.retrieve_instance_metadata(study_uid, series_uid, sop)
            value = _value(meta, "00180050", None)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    except Exception as exc:
        raise PacsError(f"QIDO-RS on {node.name} failed ({type(exc).__name__})") from exc


def find_series(node: DicomwebNode, rules: SeriesRules, *, accession_number: str | None = None,
                study_uid: str | None = None, timeout: float = 10.0) -> tuple[str, str]:
    """``(study_uid, series_uid)`` for an order; :class:`OrderProblem` or :class:`PacsError`."""
    if study_uid is None:
        if not accession_number:
            raise OrderProblem(422, "invalid_request", "an order needs an accession number or a study UID")
        study_uid = find_study(node, accession_number, timeout)
    candidates = series_of(node, study_uid, timeout)
    for c in candidates:
        if not _filter(c, rules) and "thinnest" in rules.prefer:
            c.slice_thickness = slice_thickness(node, study_uid, c.series_uid, timeout)
    return study_uid, choose(candidates, rules).series_uid
