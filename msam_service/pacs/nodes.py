"""Named PACS nodes: what a request may refer to, resolved only from server-side configuration.

A request carries names (``"orthanc"``), never URLs, hosts or AE addresses: a name that is not
configured is an :class:`UnknownNode` (the API answers 404), so a client cannot make the
service connect anywhere an administrator did not list (no server-side request forgery).

Nodes belong to tenants (``MSAM_PACS_NODE_OPTIONS``, ``tenants``): a node configured for other
tenants is, to this one, exactly an unconfigured node - the same error, the same message, and it
is missing from the list of configured names the message gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import requests

from msam_service.pacs.settings import NAME_RE, AeNode, Credential, PacsSettings


class UnknownNode(ValueError):
    """A request named a node that is not configured."""


@dataclass(frozen=True)
class DicomwebNode:
    name: str
    url: str
    credential: Credential | None = None

    def session(self) -> requests.Session:
        """A requests session with this node's credentials; redirects are not followed (a
        node cannot send us elsewhere)."""
        s = requests.Session()
        s.max_redirects = 0
        s.trust_env = False  # no proxy / netrc from the environment
        if self.credential is not None:
            if self.credential.token:
                s.headers["Authorization"] = f"Bearer {self.credential.token}"
            elif self.credential.username is not None:
                s.auth = (self.credential.username, self.credential.password or "")
        return s


@dataclass(frozen=True)
class DimseNode:
    name: str
    ae: AeNode
    retrieve: str = "c-get"  # or c-move
    move_destination: str = ""  # C-MOVE: the AE title that receives the series (msam's listener)


class InvalidNodeName(UnknownNode):
    """Not even the form of a node name (a URL, an address...): a 422, not a 404."""


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not re.match(NAME_RE, name):
        raise InvalidNodeName(f"{kind} must be the name of a configured node (not a URL or address)")
    return name


def _visible(settings: PacsSettings, names: object, tenant: str | None) -> list[str]:
    return sorted(n for n in names if tenant is None or settings.node_options(n).allows(tenant))  # type: ignore[attr-defined]


def _dimse(settings: PacsSettings, name: str) -> DimseNode:
    options = settings.node_options(name)
    return DimseNode(name=name, ae=settings.dicom_aes[name], retrieve=options.retrieve or "c-get",
                     move_destination=options.move_destination or settings.dicom_ae_title)


def dicomweb_node(settings: PacsSettings, name: object, tenant: str | None = None) -> DicomwebNode:
    """The DICOMweb node ``name``, if configured for ``tenant`` (``None``: any tenant)."""
    name = _check_name("pacs", name)
    url = settings.dicomweb_nodes.get(name)
    if url is None or name not in _visible(settings, [name], tenant):
        known = ", ".join(_visible(settings, settings.dicomweb_nodes, tenant)) or "none configured (MSAM_DICOMWEB_NODES)"
        raise UnknownNode(f"unknown DICOMweb node {name!r}; configured: {known}")
    return DicomwebNode(name=name, url=url.rstrip("/"), credential=settings.credentials().get(name))


def source_node(settings: PacsSettings, name: object, tenant: str | None = None) -> DicomwebNode | DimseNode:
    """A node to retrieve from: a DICOMweb node (WADO-RS) or an AE (C-GET / C-MOVE)."""
    return _any_node(settings, "pacs", "PACS node", name, tenant)


def destination(settings: PacsSettings, name: object, tenant: str | None = None) -> DicomwebNode | DimseNode:
    """A destination: a DICOMweb node (STOW-RS) or a DIMSE AE (C-STORE)."""
    return _any_node(settings, "destination", "destination", name, tenant)


def _any_node(settings: PacsSettings, field: str, what: str, name: object,
              tenant: str | None) -> DicomwebNode | DimseNode:
    """The DICOMweb node or AE called ``name`` that ``tenant`` may use (``field`` and ``what``
    name it in the errors)."""
    name = _check_name(field, name)
    if name in _visible(settings, settings.dicomweb_nodes, tenant):
        return dicomweb_node(settings, name, tenant)
    if name in _visible(settings, settings.dicom_aes, tenant):
        return _dimse(settings, name)
    known = ", ".join(_visible(settings, [*settings.dicomweb_nodes, *settings.dicom_aes], tenant)) or \
        "none configured (MSAM_DICOMWEB_NODES, MSAM_DICOM_AES)"
    raise UnknownNode(f"unknown {what} {name!r}; configured: {known}")


def check_destinations(settings: PacsSettings, names: list[str], tenant: str | None = None) -> list[str]:
    if len(set(names)) != len(names):
        raise InvalidNodeName("destinations: a node is named twice")
    for name in names:
        destination(settings, name, tenant)
    return names


class PacsError(Exception):
    """A PACS could not be reached or refused an operation; the message names the node and
    the step, never patient data. The worker fails the job (pull) or reports the destination
    (push) with it."""

    code = "pacs_error"

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent  # trying again cannot help (the series does not exist, ...)
