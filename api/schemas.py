"""The public HTTP schemas, in one place (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from msam_core.io.dicom_text import TextRuleError, check_long_string
from msam_service.contract import PromptDocument


def _kind(value: Any) -> str:
    return {bool: "true/false", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _json_number(value: Any) -> Any:
    """Numbers only: pydantic's lax mode would take ``true`` as 1 and ``"12.5"`` as 12.5, so a
    client's type mix-up would place a click somewhere it never meant."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("number_type", "must be a JSON number, not {kind} (write 12.5, not \"12.5\")",
                                  {"kind": _kind(value)})
    return value


def _json_integer(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "must be a JSON integer, not {kind} (write 3, not \"3\", 3.0 or true)",
                                  {"kind": _kind(value) if not isinstance(value, float) else "a fraction"})
    return value


#: A coordinate: a finite JSON number (no booleans, no numeric strings, no NaN / infinity).
Coordinate = Annotated[float, BeforeValidator(_json_number), Field(strict=True, allow_inf_nan=False)]
StrictCount = Annotated[int, BeforeValidator(_json_integer), Field(strict=True)]
Xyz = tuple[Coordinate, Coordinate, Coordinate]
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
ResultFormat = Literal["dicom-seg", "nifti", "png", "rtstruct", "mha", "sr", "fhir"]
#: what a PACS destination receives
SendFormat = Literal["dicom-seg", "sr"]


class MaskRef(BaseModel):
    """A mask of one lesion, used as its previous-mask prompt: a volume uploaded with ``POST
    /volumes`` (``volume_id``) or a file sent with the request in the multipart field ``masks``
    (``upload``: that file's name). It must lie on the image's grid (same shape, spacing,
    directions and origin)."""

    model_config = ConfigDict(extra="forbid")
    volume_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$", description="a mask uploaded with POST /volumes")
    upload: str | None = Field(default=None, min_length=1, max_length=255,
                               description="file name of a file in the multipart field 'masks'")
    label: StrictCount | None = Field(default=None, ge=1, le=255,
                                      description="this lesion's label in the mask (default: every voxel that is not 0)")

    @model_validator(mode="after")
    def _one_source(self) -> MaskRef:
        if (self.volume_id is None) == (self.upload is None):
            raise ValueError("give exactly one of volume_id (a mask uploaded with POST /volumes) and upload (the name "
                             "of a file in the multipart field 'masks')")
        return self


def dicom_label(v: str | None) -> str | None:
    """A lesion's label checked by the DICOM writers' own rule
    (:func:`~msam_core.io.dicom_text.check_long_string`), so a label that reaches a worker is one
    DICOM-SEG and RTSTRUCT can hold exactly; a 422 naming the character otherwise."""
    if v is None:
        return None
    try:
        return check_long_string(v)
    except TextRuleError as exc:
        raise PydanticCustomError("dicom_text", "{reason}", {"reason": str(exc)}) from None


class Lesion(BaseModel):
    """One lesion: at least one ``positive`` click, or a ``mask``. Lesion *n* (1-based, in
    request order) is label *n* in the mask and, when no lesion before it came back empty, segment
    *n* in the DICOM-SEG (the job's ``lesions[].segment_number`` says)."""

    model_config = ConfigDict(extra="forbid")
    positive: list[Xyz] = Field(default_factory=list, description="clicks inside the lesion (with `negative`, at "
                                "most MSAM_MAX_POINTS per lesion: GET /info)")
    negative: list[Xyz] = Field(default_factory=list, description="clicks outside it")
    box: tuple[Xyz, Xyz] | None = Field(default=None, description="two opposite corners")
    label: str | None = Field(default=None, json_schema_extra={"maxLength": 64},
                              description="segment / ROI name (a DICOM LO value: at most 64 characters and "
                              "64 UTF-8 bytes, no backslash or control character; leading and trailing "
                              "spaces are removed)")
    mask: MaskRef | None = Field(default=None, description="a mask of the lesion (e.g. from another model or a "
                                 "previous study), refined as the previous-mask prompt, with or without clicks")
    line: tuple[Xyz, Xyz] | None = Field(default=None, description="a RECIST line: the two endpoints of the "
                                         "lesion's long axis as a radiologist measured it (in voxel space both in "
                                         "one slice of the acquisition plane); it becomes positive clicks on the "
                                         "line, and the status reports its length beside the measured long axis")

    @model_validator(mode="after")
    def _prompted(self) -> Lesion:
        if not self.positive and self.mask is None and self.line is None:
            raise ValueError("a lesion needs at least one positive click ('positive'), a 'line' or a 'mask'; "
                             "negative clicks only say where it is not")
        return self

    @field_validator("label")
    @classmethod
    def _dicom_long_string(cls, v: str | None) -> str | None:
        return dicom_label(v)


class Prompts(BaseModel):
    """Where the lesions are. ``space``: ``voxel`` = array indices i, j, k of the image as
    read (NIfTI: nibabel's ``dataobj[i, j, k]``; DICOM: column, row, slice along the normal);
    ``RAS`` / ``LPS`` = world millimetres."""

    model_config = ConfigDict(extra="forbid")
    space: Literal["voxel", "LPS", "RAS"] = "voxel"
    lesions: list[Lesion] = Field(min_length=1, description="at most MSAM_MAX_LESIONS (GET /info)")
    iterations: StrictCount = Field(default=1, ge=1, le=20, description="decoder passes (refinement)")

    def document(self) -> PromptDocument:
        """The stored form a job's request keeps (:class:`msam_service.contract.PromptDocument`)."""
        return self.model_dump()  # type: ignore[return-value]


_UID = r"^[0-9]+(\.[0-9]+)*$"


class DicomwebSource(BaseModel):
    """A series on a PACS node configured on the server (``MSAM_DICOMWEB_NODES`` or
    ``MSAM_DICOM_AES``), retrieved by the I/O worker (WADO-RS, C-GET or C-MOVE, per node). Name
    the series by ``study_uid`` + ``series_uid``, or order by ``accession_number`` (or
    ``study_uid`` alone): the series is then picked by the node's series rules (QIDO-RS), and a
    422 lists the candidates when the rules leave none or several."""

    model_config = ConfigDict(extra="forbid")
    pacs: str = Field(max_length=64, description="the node's configured name (never a URL)")
    study_uid: str | None = Field(default=None, max_length=64, pattern=_UID, description="StudyInstanceUID")
    series_uid: str | None = Field(default=None, max_length=64, pattern=_UID, description="SeriesInstanceUID")
    accession_number: str | None = Field(default=None, min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]+$",
                                         description="AccessionNumber (DICOM SH: at most 16 characters)")

    @model_validator(mode="after")
    def _a_study(self) -> DicomwebSource:
        if self.series_uid is not None and self.study_uid is None:
            raise ValueError("series_uid needs its study_uid")
        if self.study_uid is None and self.accession_number is None:
            raise ValueError("give accession_number, or study_uid (with or without series_uid)")
        if self.accession_number is not None and self.series_uid is not None:
            raise ValueError("give accession_number or study_uid + series_uid, not both")
        return self


class ReceivedSource(BaseModel):
    """A series received by ``msam dicom-listener`` (C-STORE) and accepted by its routing rules."""

    model_config = ConfigDict(extra="forbid")
    received_series_uid: str = Field(max_length=64, pattern=_UID, description="SeriesInstanceUID")


class SegmentByVolume(BaseModel):
    """``POST /segment`` as JSON: prompts on an image uploaded before with ``POST /volumes``
    (``volume_id``) or on a series in a PACS (``source``). Optionally the DICOM-SEG is stored to
    ``destinations`` and ``callback_url`` receives a signed POST when the job ends."""

    model_config = ConfigDict(extra="forbid")
    volume_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    source: DicomwebSource | ReceivedSource | None = Field(default=None, description="instead of volume_id")
    prompts: Prompts | None = Field(default=None, description="where the lesions are (required unless "
                                    "lines_from_pacs)")
    lines_from_pacs: bool = Field(default=False, description="with a DICOMweb source instead of prompts: every line "
                                  "measurement of the study on this series (DICOM SR SCOORD/SCOORD3D polylines, GSPS "
                                  "polylines) becomes a lesion prompted by its line; the status reports each "
                                  "lesion's measured long axis beside the line's length")
    destinations: list[str] = Field(default_factory=list, max_length=8,
                                    description="configured DICOMweb node or AE names (STOW-RS / C-STORE)")
    callback_url: str | None = Field(default=None, max_length=2048,
                                     description="webhook URL; must be on the server's allowlist")
    ris: str | None = Field(default=None, max_length=64, description="configured RIS endpoint "
                            "(MSAM_RIS_ENDPOINTS) that receives an ORU^R01 when the job ends")
    fhir: str | None = Field(default=None, max_length=64, description="configured FHIR endpoint "
                             "(MSAM_FHIR_ENDPOINTS) the DiagnosticReport is POSTed to when the job ends")
    send: list[SendFormat] = Field(default_factory=lambda: ["dicom-seg", "sr"], min_length=1, max_length=2,
                                   description="what the destinations receive: the DICOM-SEG and the measurement SR "
                                   "(default), or [\"dicom-seg\"] for the SEG only")

    @model_validator(mode="after")
    def _one_image(self) -> SegmentByVolume:
        if (self.volume_id is None) == (self.source is None):
            raise ValueError("give exactly one of volume_id and source")
        if self.lines_from_pacs:
            if not isinstance(self.source, DicomwebSource) or self.prompts is not None:
                raise ValueError("lines_from_pacs takes the lesions from the line measurements stored with a DICOMweb "
                                 "source's study: give source {pacs, study_uid, series_uid} and no prompts")
        elif self.prompts is None:
            raise ValueError("prompts: missing; give the lesions' prompts, or lines_from_pacs: true with a DICOMweb "
                             "source")
        if "dicom-seg" not in self.send:
            raise ValueError("send: the SR references the DICOM-SEG, so a destination gets the SEG with it; "
                             'give ["dicom-seg", "sr"] or ["dicom-seg"]')
        return self


class JobAccepted(BaseModel):
    job_id: str
    status: Status = "queued"
    status_url: str
    volume_id: str


class VolumeOut(BaseModel):
    volume_id: str
    format: str
    shape: list[int]
    spacing: list[float] = Field(description="mm along i, j, k")
    affine_ras: list[list[float]] = Field(description="voxel (i, j, k, 1) -> RAS mm")
    modality: str | None
    series_instance_uid: str | None


class ErrorInfo(BaseModel):
    code: str
    message: str
    candidates: list[dict[str, Any]] | None = Field(default=None, description="an order that did not name one "
                                                    "series: the series (or studies) considered, each with why it "
                                                    "was not chosen")


class ErrorBody(BaseModel):
    error: ErrorInfo


#: The answer every route that takes an API key may give (declared on their routers).
KEYED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no API key, or an unknown one"}}


class Timings(BaseModel):
    """Seconds per stage (absent until reached)."""

    model_config = ConfigDict(extra="allow")
    queue: float | None = None
    model_load: float | None = Field(default=None, description="only on a worker process's first job")
    load: float | None = None
    preprocess: float | None = Field(default=None, description="cropping, resampling and merging: the segment "
                                     "stage less the four below")
    encode: float | None = Field(default=None, description="image-encoder passes (cache misses)")
    decode: float | None = Field(default=None, description="decoder passes")
    prior: float | None = Field(default=None, description="stable-region prior (region growing)")
    boundary: float | None = Field(default=None, description="full-resolution boundary refinement")
    measure: float | None = Field(default=None, description="lesion measurements")
    write: float | None = None
    total: float | None = None


class PipelineOptionsOut(BaseModel):
    """The pipeline's settings around the network, as the checkpoint states them."""

    mask_threshold: float = Field(description="logit at which a voxel counts as lesion")
    prior_weight_first: float = Field(description="stable-region prior weight, one positive click (0 = off)")
    prior_weight: float = Field(description="stable-region prior weight after further clicks (0 = off)")
    prior_max_voxels: int = Field(description="largest stable region the prior takes (voxels at 1.5 mm)")
    boundary_band_first: int = Field(description="boundary refinement band, one positive click (voxels; 0 = off)")
    boundary_band: int = Field(description="boundary refinement band after further clicks (voxels; 0 = off)")
    coarse_view: bool = Field(description="second look at twice the spacing")


class ModelOut(BaseModel):
    """Which model answered: the checkpoint file and the pipeline options in force."""

    name: str = Field(description="checkpoint file name without suffix, e.g. msam_default; the DICOM "
                      "outputs' algorithm name")
    sha256: str = Field(description="SHA-256 of the checkpoint file (weights and their options)")
    version: str = Field(description="msam version + checkpoint digest; the DICOM outputs' algorithm version")
    network_id: str | None = Field(description="architecture + digest of the weights alone (embedding cache "
                                   "key); known once a worker has loaded the model")
    architecture: str | None = Field(description="network configuration (msam_small, msam, sam_med3d; null for an "
                                     "upstream file not loaded yet)")
    options: PipelineOptionsOut


class WorkerModel(BaseModel):
    """One live worker's model."""

    device: str
    loaded: bool = Field(description="the worker has loaded its model (on its first job); until then `model` "
                         "is what its checkpoint file states")
    model: ModelOut | None = Field(description="null when its checkpoint is missing or unreadable (see `problem`)")
    problem: str | None = None


class PromptRules(BaseModel):
    """What a request's ``prompts`` may hold."""

    types: list[str] = Field(description="per lesion: positive clicks (or a mask or a line), negative clicks, a box, "
                             "a mask (the previous-mask prompt), a RECIST line")
    spaces: list[str] = Field(description="coordinate spaces of clicks and boxes")
    max_lesions: int = Field(description="lesions per request (MSAM_MAX_LESIONS)")
    max_points_per_lesion: int = Field(description="positive and negative clicks of one lesion together "
                                       "(MSAM_MAX_POINTS)")
    max_prompts: int = Field(description="points, boxes and lines of all lesions together (MSAM_MAX_PROMPTS)")
    iterations: list[int] = Field(description="allowed decoder passes, [min, max]")


class Info(BaseModel):
    """Which models answer requests, and what a request may hold."""

    models: list[ModelOut] = Field(description="the distinct models of the live workers")
    workers: list[WorkerModel]
    prompts: PromptRules
    result_formats: list[str]


class AxisOut(BaseModel):
    """A measured line; ``slice_axis``/``slice_index`` name the slice of the acquisition plane it
    lies in (null for the 3D diameter)."""

    length_mm: float
    start_lps: list[float] = Field(description="first endpoint, LPS mm")
    end_lps: list[float] = Field(description="second endpoint, LPS mm")
    start_voxel: list[float] = Field(description="first endpoint, continuous voxel indices i, j, k of the image")
    end_voxel: list[float] = Field(description="second endpoint, continuous voxel indices i, j, k of the image")
    slice_axis: int | None = Field(description="voxel axis across the slices (0, 1, 2 = i, j, k)")
    slice_index: int | None = Field(description="the slice along slice_axis, in the image grid's order (for DICOM: the "
                                    "slices' order in space, not their instance numbers)")
    slice_sop_instance_uid: str | None = Field(default=None, description="DICOM input: the SOP Instance UID of the image "
                                               "that is this slice")
    slice_frame_number: int | None = Field(default=None, description="DICOM input: its frame number, in a multi-frame "
                                           "instance")


class IntensityStatsOut(BaseModel):
    unit: str = Field(description="HU for CT, else 'image units'")
    mean: float
    sd: float
    median: float
    min: float
    max: float


class MeasurementsOut(BaseModel):
    """A lesion's measurements on its mask (docs/measurements.md): lengths in mm, points in LPS mm."""

    voxels: int
    volume_ml: float = Field(description="voxel count x voxel volume")
    long_axis: AxisOut = Field(description="RECIST long axis: longest diameter within one slice of the "
                               "acquisition plane, on the slice where it is largest")
    short_axis: AxisOut = Field(description="longest extent perpendicular to the long axis, same slice")
    max_diameter_3d: AxisOut = Field(description="longest 3D diameter")
    centroid_lps: list[float]
    intensity: IntensityStatsOut | None
    surface_area_mm2: float
    sphericity: float


class ReferenceLineOut(BaseModel):
    """The line a lesion was prompted with (a radiologist's RECIST measurement), to compare with
    the measured long axis."""

    length_mm: float
    start_lps: list[float]
    end_lps: list[float]
    source: str = Field(description="'request' (the lesion's line), 'SR' (a TID 1500 measurement in the PACS) or "
                        "'GSPS' (a presentation state's polyline)")


class LesionSummary(BaseModel):
    lesion: int = Field(description="the lesion's number (request order): its label in the mask")
    voxels: int
    windows: int
    cache_hits: int
    stopped_at_limit: bool
    segment_number: int | None = Field(default=None, description="its segment in the DICOM-SEG (and ROI in the "
                                       "RTSTRUCT): DICOM numbers the segments 1..n without gaps, so an empty "
                                       "lesion has none and the lesions after it move down; null without a SEG")
    measurements: MeasurementsOut | None = Field(default=None, description="null when the lesion has no voxel")
    reference_line: ReferenceLineOut | None = Field(default=None, description="the line the lesion was prompted "
                                                    "with: its length beside measurements.long_axis.length_mm")


class IntensityOut(BaseModel):
    """What the pipeline took the image's values to be: CT Hounsfield units (clamped to
    [-1000, 1000] before each crop's z-score) or not (the crop z-scored as it is)."""

    hu: bool = Field(description="true: CT in Hounsfield units")
    reason: str = Field(description="the evidence: the header's modality, or the share of voxels below -500")


class JobOut(BaseModel):
    job_id: str
    status: Status
    stage: str
    progress: float = Field(ge=0, le=1)
    queue_position: int | None = Field(default=None, description="1 = next; only while queued")
    volume_id: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(description="deliveries to a worker (more than 1 after a lost worker)")
    timings: Timings
    cache_hits: int = Field(description="embeddings found in the cache (encoder skipped)")
    encoder_runs: int = Field(description="image-encoder passes this job ran")
    lesions: list[LesionSummary] = Field(default_factory=list)
    results: dict[str, str] = Field(default_factory=dict, description="format -> download URL")
    unavailable_results: dict[str, str] = Field(default_factory=dict, description="format -> why not")
    warnings: list[str] = Field(default_factory=list, description="what the results differ in from what was "
                                "asked or from the source: a lesion that came back empty, a source attribute "
                                "DICOM refuses that was left empty in the DICOM outputs (names attributes, never "
                                "patient values)")
    destinations: dict[str, str] = Field(default_factory=dict, description="PACS destination -> 'stored' or "
                                         "why not (DICOM-SEG by STOW-RS / C-STORE, once the job has succeeded); "
                                         "'ris:NAME' (ORU^R01) and 'fhir:NAME' (DiagnosticReport) -> 'sent' or why "
                                         "not; 'sending' or 'retrying: ...' while the I/O worker is at it")
    delivery: Literal["pending", "done", "failed"] | None = Field(
        default=None, description="the job's deliveries by the I/O worker (destinations, RIS, FHIR): pending, "
        "done, or failed (see destinations); absent when there is nothing to deliver")
    error: ErrorInfo | None = None
    model: ModelOut | None = Field(default=None, description="the model that ran the job (once a worker has "
                                   "started it)")
    intensity: IntensityOut | None = Field(default=None, description="what the image's values were taken to be "
                                           "(once the job has succeeded)")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    redis: bool
    workers: int
    reasons: list[str] = Field(default_factory=list)


# -- interactive sessions -------------------------------------------------------------------------
VoxelIndex = Annotated[int, BeforeValidator(_json_integer), Field(strict=True, ge=0)]
VoxelXyz = tuple[VoxelIndex, VoxelIndex, VoxelIndex]


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="a volume uploaded with POST /volumes")
    space: Literal["voxel", "LPS", "RAS"] = Field(
        default="voxel", description="coordinate space of every point and box of the session: voxel (i, j, k) "
        "of the stored image, or world mm in LPS or RAS")


class MaskDelta(BaseModel):
    """A mask over the box ``lo <= (i, j, k) < hi`` of the volume's voxel grid: ``data`` is the box's
    voxels in C order (i slowest, k fastest), one bit each, packed eight to a byte with the first
    voxel in the least significant bit, zlib-compressed (RFC 1950), base64-encoded."""

    model_config = ConfigDict(extra="forbid")
    lo: VoxelXyz
    hi: VoxelXyz
    encoding: Literal["zlib-packbits-le-c"] = "zlib-packbits-le-c"
    data: str = Field(max_length=8_000_000)


class PointInteraction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["point"]
    xyz: Xyz = Field(description="in the session's space")
    positive: StrictBool = Field(default=True, description="true: inside the lesion; false: outside (a negative click)")


class BoxInteraction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["box"]
    corners: tuple[Xyz, Xyz] = Field(description="two opposite corners, in the session's space; replaces an "
                                     "earlier box of the lesion")


class MaskInteraction(BaseModel):
    """A mask as the lesion's input, refined by the network: a mask volume uploaded with ``POST
    /volumes`` (``volume_id``, optionally one ``label`` of it), or an edit of the lesion's current
    mask (``edit``: the edited box, in the delta format, applied over the current mask)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mask"]
    volume_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    label: StrictCount | None = Field(default=None, ge=1, le=255)
    edit: MaskDelta | None = None

    @model_validator(mode="after")
    def _one_source(self) -> MaskInteraction:
        if (self.volume_id is None) == (self.edit is None):
            raise ValueError("give exactly one of volume_id (a mask uploaded with POST /volumes) and edit (the "
                             "edited part of the lesion's current mask)")
        return self


Interaction = Annotated[PointInteraction | BoxInteraction | MaskInteraction, Field(discriminator="kind")]


class LesionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(default=None, json_schema_extra={"maxLength": 64},
                              description="segment / ROI name in the outputs (the rule of a job's lesion label: a "
                              "DICOM LO value, at most 64 characters and 64 UTF-8 bytes, no backslash or control "
                              "character; leading and trailing spaces are removed)")

    @field_validator("label")
    @classmethod
    def _dicom_long_string(cls, v: str | None) -> str | None:
        # checked when the lesion is made, as a job's label is when it is submitted: a commit then
        # writes the DICOM-SEG and RTSTRUCT (and sends them) instead of failing on the label later
        return dicom_label(v)


class Measurements(BaseModel):
    """A session lesion's measurements: always its voxel count and volume; once the worker has
    measured the mask, also what a job reports per lesion (:class:`MeasurementsOut`: RECIST long
    and short axis, 3D diameter, centroid, intensity statistics, surface area, sphericity)."""

    voxel_count: int
    volume_ml: float
    long_axis: AxisOut | None = None
    short_axis: AxisOut | None = None
    max_diameter_3d: AxisOut | None = None
    centroid_lps: list[float] | None = None
    intensity: IntensityStatsOut | None = None
    surface_area_mm2: float | None = None
    sphericity: float | None = None


class DeltaOut(BaseModel):
    lo: list[int]
    hi: list[int]
    encoding: str
    data: str


class LesionOut(BaseModel):
    lesion: int
    label: str | None = None
    step: int = Field(description="interactions in effect")
    interactions: list[dict[str, Any]]
    measurements: Measurements | None = None


class SessionOut(BaseModel):
    session_id: str
    volume_id: str
    space: str
    created_at: float
    updated_at: float
    shape: list[int]
    affine_ras: list[list[float]] = Field(description="voxel (i, j, k, 1) -> RAS mm")
    lesions: list[LesionOut]


class InteractionOut(BaseModel):
    """An interaction's answer. ``delta`` applies to the lesion's mask after the interaction
    ``base`` (``null``: to an empty mask); ``null`` delta: the mask did not change."""

    interaction_id: str
    session_id: str
    lesion: int
    status: Literal["queued", "running", "done", "failed"]
    status_url: str
    step: int | None = None
    base: str | None = None
    delta: DeltaOut | None = None
    measurements: Measurements | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="worker seconds per stage, and queue")
    error: ErrorInfo | None = None


class CommitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destinations: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=16, description="configured node names for the DICOM-SEG")
    callback_url: str | None = Field(default=None, max_length=2048, description="webhook URL on the server's allowlist")


class LesionChange(BaseModel):
    """A lesion's mask changed by undo or reset (``delta`` applies to the mask after the
    interaction ``base``), or its whole mask (``base`` null: ``delta`` over an empty mask)."""

    lesion: int
    step: int
    base: str | None = None
    interaction_id: str | None = Field(default=None, description="the interaction whose mask the lesion has now "
                                       "(null: the empty mask, step 0): the base of the next answer that changes it")
    delta: DeltaOut | None = None
    measurements: Measurements
