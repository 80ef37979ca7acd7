"""What the gateway and the workers hand each other through a job record: the stored forms.

The gateway (and the DICOM and HL7 listeners) write a job's request once, as a
:class:`JobRequest`; the GPU worker, the I/O worker and the routes read it back as the same
type, never as a free dictionary. The public HTTP forms live in ``api/schemas.py``; a request
reaches this module through one conversion there (``Prompts.document``), and the listeners
build it from their server-side configuration.

The stored encoding is plain JSON in the job hash's ``request`` field (:mod:`msam_service.jobs`):
only the fields a request sets are written, and a field this version does not know is kept as
read (:attr:`JobRequest.extra`), so a record written by a newer or older version reads and
writes back without loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

#: what a PACS destination receives unless the request says otherwise (the SEG, then the SR
#: that references it)
DEFAULT_SEND = ("dicom-seg", "sr")



# -- the result files ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultFile:
    """One result format of a job, as the GPU worker stores it and the gateway and the I/O worker
    read it: ``name`` in the job's storage folder, the ``media_type`` and ``download`` name a
    download of it gets."""

    name: str
    media_type: str
    download: str


#: result format (``GET /jobs/{id}/result?format=``) -> its file (FHIR is built on request, not stored)
RESULT_FILES: dict[str, ResultFile] = {
    "dicom-seg": ResultFile("seg.dcm", "application/dicom", "seg.dcm"),
    "rtstruct": ResultFile("rtstruct.dcm", "application/dicom", "rtstruct.dcm"),
    "nifti": ResultFile("mask.nii.gz", "application/gzip", "mask.nii.gz"),
    "png": ResultFile("preview.png", "image/png", "preview.png"),
    "mha": ResultFile("mask.mha", "application/octet-stream", "mask.mha"),
    "sr": ResultFile("sr.dcm", "application/dicom", "sr.dcm"),
}


def result_key(job_id: str, fmt: str) -> str:
    """The storage key of the job's result in format ``fmt`` (a key of :data:`RESULT_FILES`)."""
    return f"jobs/{job_id}/{RESULT_FILES[fmt].name}"


# -- the prompt document -------------------------------------------------------------------------
class MaskDocument(TypedDict, total=False):
    volume_id: str | None  # a stored volume (the gateway turns an upload into one)
    upload: str | None  # a multipart file's name, as the request gave it
    label: int | None


class LesionDocument(TypedDict, total=False):
    positive: list[list[float]]
    negative: list[list[float]]
    box: list[list[float]] | None
    line: list[list[float]] | None
    label: str | None
    mask: MaskDocument | None
    #: where a line came from when the service found it (``SR`` / ``GSPS``); absent: the request
    line_source: str


class PromptDocument(TypedDict, total=False):
    """The validated ``prompts`` of ``POST /segment`` (``api.schemas.Prompts.document``), a
    routing rule's or an HL7 order's prompts, or the lines found in a PACS
    (:func:`msam_service.pacs.lines.prompts_from_lines`); read by :mod:`msam_service.prompts`."""

    space: Literal["voxel", "LPS", "RAS"]
    lesions: list[LesionDocument]
    iterations: int
    #: the lesions' numbers where they are not 1, 2, ... in order (a session's lesion is checked
    #: and segmented alone, under its number in the session); never from a request
    numbers: list[int]


def numbered_lesions(doc: PromptDocument) -> list[tuple[int, LesionDocument]]:
    """``doc``'s lesions with their numbers (``numbers``, else 1, 2, ...), which the messages
    about them and the outputs use."""
    lesions = doc.get("lesions", [])
    return list(zip(doc.get("numbers") or range(1, len(lesions) + 1), lesions))


# -- helpers -------------------------------------------------------------------------------------
def _known(cls: type, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``raw`` split into the fields of dataclass ``cls`` and the rest."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in raw.items() if k in names}, {k: v for k, v in raw.items() if k not in names}


def _set_fields(obj: Any) -> dict[str, Any]:
    """The fields of dataclass ``obj`` that differ from their defaults (what is stored)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = value
    return out


# -- the parts of a request ----------------------------------------------------------------------
@dataclass
class JobSource:
    """Where the job's image came from: a series in a configured PACS node (``pacs`` +
    ``study_uid`` + ``series_uid``, the I/O worker retrieves it), or one the DICOM listener
    received (``received_series_uid``)."""

    pacs: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    accession_number: str | None = None
    #: how the series was chosen when the request named an order, not a series
    selected_by: str | None = None
    received_series_uid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def in_archive(self) -> bool:
        """The image is still in the archive: the I/O worker retrieves it before the job runs."""
        return self.pacs is not None

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, **_set_fields(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobSource:
        known, extra = _known(cls, raw)
        return cls(**known, extra=extra)


@dataclass
class SessionLesion:
    lesion: int
    mask: str  # the id of the interaction whose mask is the lesion's at commit
    label: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"lesion": self.lesion, "mask": self.mask, "label": self.label}


@dataclass
class SessionSnapshot:
    """A committed interactive session's lesions as they were at commit."""

    session_id: str
    lesions: list[SessionLesion] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "lesions": [x.to_json() for x in self.lesions]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SessionSnapshot:
        return cls(session_id=str(raw["session_id"]),
                   lesions=[SessionLesion(lesion=int(x["lesion"]), mask=str(x["mask"]), label=x.get("label"))
                            for x in raw.get("lesions") or []])


# -- the request ---------------------------------------------------------------------------------
@dataclass
class JobRequest:
    """Everything a job was asked to do, as its record keeps it.

    What to segment: ``prompts`` (a segmentation job), ``lines_from_pacs`` (lesions from the
    study's line measurements, found by the I/O worker, which then sets ``prompts``) or
    ``session`` (a committed session's masks). Where the image is: the job's volume, or
    ``source``. What happens with the results: ``destinations`` receive ``send``, ``ris`` an
    ORU^R01, ``fhir`` a DiagnosticReport, ``callback_url`` a webhook; links in them start
    with ``base_url``. ``order``: the HL7 order the job answers. ``own_volume`` and
    ``mask_volumes``: volumes uploaded with the job, deleted with it.
    """

    prompts: PromptDocument | None = None
    lines_from_pacs: bool = False
    session: SessionSnapshot | None = None
    source: JobSource | None = None
    order: dict[str, str] | None = None  # msam_service.ris.hl7.Order.to_record()
    destinations: list[str] = field(default_factory=list)
    send: list[str] | None = None  # None: DEFAULT_SEND
    ris: str | None = None
    fhir: str | None = None
    callback_url: str | None = None
    base_url: str | None = None
    own_volume: bool = False
    mask_volumes: list[str] = field(default_factory=list)
    #: fields this version does not know, kept as read
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_delivery(self) -> bool:
        """A finished job has something for the I/O worker to deliver."""
        return bool(self.destinations or self.callback_url or self.ris or self.fhir)

    @property
    def wants_lines(self) -> bool:
        """The job asks for its lesions from the PACS's lines and has not got them yet."""
        return self.lines_from_pacs and not (self.prompts or {}).get("lesions")

    def sends(self, result: str) -> bool:
        """Whether the destinations receive ``result`` (``dicom-seg`` or ``sr``)."""
        return result in (DEFAULT_SEND if self.send is None else self.send)

    def base(self, public_url: str | None) -> str:
        """The base of the links the job's messages carry: the request's, else ``public_url``."""
        return str(self.base_url or public_url or "")

    def to_json(self) -> dict[str, Any]:
        out = {**self.extra, **_set_fields(self)}
        if self.session is not None:
            out["session"] = self.session.to_json()
        if self.source is not None:
            out["source"] = self.source.to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobRequest:
        known, extra = _known(cls, raw)
        if known.get("session") is not None:
            known["session"] = SessionSnapshot.from_json(known["session"])
        if known.get("source") is not None:
            known["source"] = JobSource.from_json(known["source"])
        for name in ("destinations", "mask_volumes"):
            if name in known:
                known[name] = list(known[name] or [])
        known["lines_from_pacs"] = bool(known.get("lines_from_pacs"))
        known["own_volume"] = bool(known.get("own_volume"))
        return cls(**known, extra=extra)
