"""The PACS block of the configuration (``MSAM_*`` environment, pydantic-settings).

Kept beside :class:`msam_service.settings.Settings` rather than inside it: the same environment,
the same prefix, read by the API (to validate requests), the worker (to pull and push) and the
listener. JSON-valued variables are parsed as JSON by pydantic-settings.

=================================  ==============================================================
``MSAM_DICOMWEB_NODES``            ``{"name": "http://host:8042/dicom-web", ...}``: the DICOMweb
                                   nodes a request may name as ``source.pacs`` or a destination
``MSAM_DICOMWEB_CREDENTIALS``      ``{"name": {"username": "...", "password": "..."}}`` or
                                   ``{"name": {"token": "..."}}`` (bearer); optional
``MSAM_DICOMWEB_CREDENTIALS_FILE`` the same JSON in a file (keeps secrets out of the environment)
``MSAM_DICOM_AES``                 ``{"name": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104}}``:
                                   DIMSE destinations (C-STORE SCU)
``MSAM_DICOM_AE_TITLE``            our AE title, calling (SCU) and called (listener); ``MSAM``
``MSAM_DICOM_LISTENER_HOST/PORT``  where ``msam dicom-listener`` listens; ``127.0.0.1:11112``
``MSAM_DICOM_IDLE_TIMEOUT_S``      a series is complete this long after its last instance; 10
``MSAM_DICOM_CALLING_AES``         JSON list of AE titles allowed to associate with the listener;
                                   unset: any (routing rules still decide what is kept)
``MSAM_DICOM_ROUTES``              routing rules, a JSON list (see :class:`RouteRule`); unset:
                                   accept every image series, queue nothing
``MSAM_DICOM_MAX_INSTANCES``       most instances per received or retrieved series; 5000
``MSAM_WEBHOOK_ALLOWLIST``         callback URL prefixes allowed (comma separated), e.g.
                                   ``https://ris.example.org/msam/``; empty: no webhooks
``MSAM_WEBHOOK_SECRET``            HMAC-SHA256 key for ``X-MSAM-Signature``
``MSAM_WEBHOOK_RETRIES``           delivery attempts after the first; 5
``MSAM_WEBHOOK_BACKOFF_S``         first retry delay, doubled each time (capped); 2
``MSAM_PACS_NODE_OPTIONS``         per node (DICOMweb node or AE): ``tenants`` allowed to use it,
                                   the ``retrieve`` method (``wado-rs``, ``c-get``,
                                   ``c-move``) and the ``series`` rules that pick a series for an
                                   order by accession number (see :class:`NodeOptions`)
``MSAM_PACS_RETRIES``              retrieval / push attempts after the first; 3
``MSAM_PACS_BACKOFF_S``            first retry delay, doubled each time; 2
``MSAM_RIS_ENDPOINTS``             HL7 v2 partners (see :class:`RisEndpoint`): who may send orders
                                   to ``msam hl7-listener`` and where ORU^R01 results go
``MSAM_HL7_LISTENER_HOST/PORT``    where ``msam hl7-listener`` listens (MLLP); ``127.0.0.1:2575``
``MSAM_FHIR_ENDPOINTS``            FHIR servers a job's DiagnosticReport may be POSTed to
                                   (see :class:`FhirEndpoint`)
=================================  ==============================================================
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AE_RE = r"^[ -~]{1,16}$"  # printable ASCII, at most 16 characters (DICOM AE VR)


class Credential(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print secrets
        return "Credential(***)"

    __str__ = __repr__


class AeNode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ae_title: str = Field(pattern=AE_RE)
    host: str
    port: int = Field(ge=1, le=65535)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class RouteRule(BaseModel):
    """One routing rule of the listener; the first rule that matches a completed series decides.

    Every criterion given must match: ``modality`` (one or a list, exact, case-insensitive),
    ``series_description`` (a regular expression searched case-insensitively), ``calling_ae``
    (one or a list of AE titles, exact). ``action``: ``accept`` stores the series as a volume
    the API can reference; ``ignore`` drops it. With ``prompts`` (the ``POST /segment`` prompt
    document), an accepted series is also queued at once, its result sent to ``destinations``
    and ``callback_url`` notified. A series no rule matches is dropped.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=64)
    modality: list[str] | None = None
    series_description: str | None = None
    calling_ae: list[str] | None = None
    action: Literal["accept", "ignore"] = "accept"
    tenant: str = Field(default="public", max_length=64)
    prompts: dict[str, Any] | None = None
    destinations: list[str] = Field(default_factory=list)
    callback_url: str | None = None

    _as_lists = field_validator("modality", "calling_ae", mode="before")(_as_list)

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"series_description is not a valid regular expression: {exc}") from exc
        return v

    def matches(self, modality: str, description: str, calling_ae: str) -> bool:
        if self.modality is not None and modality.upper() not in {m.upper() for m in self.modality}:
            return False
        if self.series_description is not None and not re.search(self.series_description, description, re.I):
            return False
        if self.calling_ae is not None and calling_ae.strip() not in {a.strip() for a in self.calling_ae}:
            return False
        return True


class SeriesRules(BaseModel):
    """How an order by accession number (or a study without a series) becomes one series.

    1. **Filters**, every one given must hold: ``modality`` (exact, case-insensitive),
       ``description`` (regular expression searched case-insensitively in SeriesDescription; a
       series without one does not match), ``exclude_description`` (a series it matches is
       dropped), at least ``min_instances`` images.
    2. **Preferences** in the order of ``prefer``: ``thinnest`` keeps the series with the smallest
       SliceThickness (within 0.01 mm; a series without SliceThickness counts as thicker than
       any with one), ``most_images`` keeps those with the most instances.
    3. One series left: chosen. None after the filters, or several after every preference: the
       order is refused (422) with the candidates listed, nothing is guessed.
    """

    model_config = ConfigDict(extra="forbid")
    modality: list[str] | None = Field(default_factory=lambda: ["CT", "MR"])
    description: str | None = None
    exclude_description: str | None = None
    min_instances: int = Field(default=1, ge=1)
    prefer: list[Literal["thinnest", "most_images"]] = Field(default_factory=lambda: ["thinnest", "most_images"])

    _as_lists = field_validator("modality", mode="before")(_as_list)

    @field_validator("description", "exclude_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v


class NodeOptions(BaseModel):
    """Per node (a DICOMweb node or an AE, by its configured name).

    ``tenants``: the tenants that may name the node (as a source or a destination); to every
    other tenant it does not exist (404). Unset: every tenant. ``retrieve``: how a series is
    fetched - ``wado-rs`` (DICOMweb nodes), ``c-get`` or ``c-move`` (AEs; C-MOVE sends the
    series to ``move_destination``, msam's own listener, default ``MSAM_DICOM_AE_TITLE``). An AE
    with no option retrieves by C-GET. ``series``: the :class:`SeriesRules` of this node.
    """

    model_config = ConfigDict(extra="forbid")
    tenants: list[str] | None = None
    retrieve: Literal["wado-rs", "c-get", "c-move"] | None = None
    move_destination: str | None = Field(default=None, pattern=AE_RE)
    series: SeriesRules = Field(default_factory=SeriesRules)

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


class RisEndpoint(BaseModel):
    """An HL7 v2 partner (a RIS). Orders whose MSH-3 (sending application) is ``application``
    (and MSH-4 is ``facility``, when given) are accepted by ``msam hl7-listener`` as jobs of
    ``tenant`` on series of the node ``pacs``; results are stored to ``destinations`` and an
    ORU^R01 is sent by MLLP to ``oru_host:oru_port`` (when set)."""

    model_config = ConfigDict(extra="forbid")
    application: str = Field(min_length=1, max_length=180)
    facility: str | None = Field(default=None, max_length=180)
    tenant: str = Field(default="public", max_length=64)
    pacs: str
    destinations: list[str] = Field(default_factory=list)
    oru_host: str | None = None
    oru_port: int | None = Field(default=None, ge=1, le=65535)
    timeout_s: float = Field(default=10.0, gt=0)


class FhirEndpoint(BaseModel):
    """A FHIR R4 server a job's DiagnosticReport (with its Observations, as a transaction
    Bundle) may be POSTed to; usable by ``tenants`` only (unset: every tenant)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://[^\s/@]+(/\S*)?$")
    tenants: list[str] | None = None
    token: str | None = Field(default=None, repr=False)
    timeout_s: float = Field(default=10.0, gt=0)

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


class PacsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSAM_", extra="ignore")

    dicomweb_nodes: dict[str, str] = Field(default_factory=dict)
    dicomweb_credentials: dict[str, Credential] = Field(default_factory=dict, repr=False)
    dicomweb_credentials_file: Path | None = None
    dicomweb_timeout_s: float = 60.0
    dicom_aes: dict[str, AeNode] = Field(default_factory=dict)
    dicom_ae_title: str = Field(default="MSAM", pattern=AE_RE)
    dicom_listener_host: str = "127.0.0.1"
    dicom_listener_port: int = Field(default=11112, ge=0, le=65535)
    dicom_idle_timeout_s: float = Field(default=10.0, gt=0)
    dicom_calling_aes: list[str] | None = None  # None: any calling AE may associate
    dicom_routes: list[RouteRule] | None = None
    dicom_max_instances: int = Field(default=5000, ge=1)
    webhook_allowlist: str = ""
    webhook_secret: str = Field(default="", repr=False)
    webhook_retries: int = Field(default=5, ge=0, le=20)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    pacs_node_options: dict[str, NodeOptions] = Field(default_factory=dict)
    pacs_retries: int = Field(default=3, ge=0, le=20)
    pacs_backoff_s: float = Field(default=2.0, gt=0)
    ris_endpoints: dict[str, RisEndpoint] = Field(default_factory=dict)
    hl7_listener_host: str = "127.0.0.1"
    hl7_listener_port: int = Field(default=2575, ge=0, le=65535)
    fhir_endpoints: dict[str, FhirEndpoint] = Field(default_factory=dict)

    def node_options(self, name: str) -> NodeOptions:
        return self.pacs_node_options.get(name) or NodeOptions()

    @field_validator("dicomweb_nodes")
    @classmethod
    def _nodes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, url in v.items():
            if not re.match(NAME_RE, name):
                raise ValueError(f"node name {name!r}: letters, digits, '_', '.', '-' only")
            if not re.match(r"^https?://[^\s/@]+(/\S*)?$", url):
                raise ValueError(f"node {name}: the base URL must be http(s)://host[:port]/path without credentials")
        return v

    def credentials(self) -> dict[str, Credential]:
        creds = dict(self.dicomweb_credentials)
        if self.dicomweb_credentials_file is not None:
            raw = json.loads(self.dicomweb_credentials_file.read_text())
            creds.update({k: Credential.model_validate(c) for k, c in raw.items()})
        return creds

    def allowlist(self) -> list[str]:
        return [p for p in re.split(r"[,\s]+", self.webhook_allowlist) if p]

    def routes(self) -> list[RouteRule]:
        return self.dicom_routes if self.dicom_routes is not None else [RouteRule(name="default")]

    def check(self) -> None:
        clash = set(self.dicomweb_nodes) & set(self.dicom_aes)
        if clash:
            raise ValueError(f"names used both as DICOMweb node and AE: {sorted(clash)}; destinations must be unambiguous")
        for name in self.dicom_aes:
            if not re.match(NAME_RE, name):
                raise ValueError(f"AE name {name!r}: letters, digits, '_', '.', '-' only")
        for name, options in self.pacs_node_options.items():
            if name not in self.dicomweb_nodes and name not in self.dicom_aes:
                raise ValueError(f"MSAM_PACS_NODE_OPTIONS: {name!r} is neither a DICOMweb node nor an AE")
            if name in self.dicomweb_nodes and options.retrieve not in (None, "wado-rs"):
                raise ValueError(f"node {name!r}: a DICOMweb node retrieves by wado-rs; C-GET / C-MOVE need an "
                                 "AE (MSAM_DICOM_AES)")
            if name in self.dicom_aes and options.retrieve == "wado-rs":
                raise ValueError(f"AE {name!r}: an AE retrieves by c-get or c-move")
        for name, ris in self.ris_endpoints.items():
            if not re.match(NAME_RE, name):
                raise ValueError(f"RIS endpoint name {name!r}: letters, digits, '_', '.', '-' only")
            for node in (ris.pacs, *ris.destinations):
                if node not in self.dicomweb_nodes and node not in self.dicom_aes:
                    raise ValueError(f"RIS endpoint {name!r}: unknown node {node!r}")
                if not self.node_options(node).allows(ris.tenant):
                    raise ValueError(f"RIS endpoint {name!r}: node {node!r} is not configured for tenant {ris.tenant!r}")
            if (ris.oru_host is None) != (ris.oru_port is None):
                raise ValueError(f"RIS endpoint {name!r}: give both oru_host and oru_port, or neither")
        for rule in self.routes():
            for dest in rule.destinations:
                if dest not in self.dicomweb_nodes and dest not in self.dicom_aes:
                    raise ValueError(f"routing rule {rule.name or '?'}: unknown destination {dest!r}")


@lru_cache(maxsize=1)
def get_pacs_settings() -> PacsSettings:
    s = PacsSettings()
    s.check()
    return s
