"""Named PACS nodes: what a request may refer to, resolved only from server-side configuration.

A request carries names (``"orthanc"``), never URLs, hosts or AE addresses: a name that is not
configured is an :class:`UnknownNode` (the API answers 4xx), so a client cannot make the
service connect anywhere an administrator did not list (no server-side request forgery).
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


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not re.match(NAME_RE, name):
        raise UnknownNode(f"{kind} must be the name of a configured node (not a URL or address)")
    return name


def dicomweb_node(settings: PacsSettings, name: object) -> DicomwebNode:
    name = _check_name("pacs", name)
    url = settings.dicomweb_nodes.get(name)
    if url is None:
        known = ", ".join(sorted(settings.dicomweb_nodes)) or "none configured (MSAM_DICOMWEB_NODES)"
        raise UnknownNode(f"unknown DICOMweb node {name!r}; configured: {known}")
    return DicomwebNode(name=name, url=url.rstrip("/"), credential=settings.credentials().get(name))


def destination(settings: PacsSettings, name: object) -> DicomwebNode | DimseNode:
    """A destination: a DICOMweb node (STOW-RS) or a DIMSE AE (C-STORE)."""
    name = _check_name("destination", name)
    if name in settings.dicomweb_nodes:
        return dicomweb_node(settings, name)
    if name in settings.dicom_aes:
        return DimseNode(name=name, ae=settings.dicom_aes[name])
    known = ", ".join(sorted([*settings.dicomweb_nodes, *settings.dicom_aes])) or \
        "none configured (MSAM_DICOMWEB_NODES, MSAM_DICOM_AES)"
    raise UnknownNode(f"unknown destination {name!r}; configured: {known}")


def check_destinations(settings: PacsSettings, names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise UnknownNode("destinations: a node is named twice")
    for name in names:
        destination(settings, name)
    return names


class PacsError(Exception):
    """A PACS could not be reached or refused an operation; the message names the node and
    the step, never patient data. The worker fails the job (pull) or reports the destination
    (push) with it."""

    code = "pacs_error"
