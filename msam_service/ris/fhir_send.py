"""POST a job's FHIR transaction Bundle to a configured FHIR server (``MSAM_FHIR_ENDPOINTS``).

Connection errors, timeouts, 408, 429 and 5xx are worth retrying (:class:`PacsError`); other
answers are final (``permanent``). The Bundle's entries are conditional creates on the job's
identifiers, so a retry after an answer that was lost creates nothing twice. Redirects are not
followed; nothing of the Bundle is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from msam_service.pacs.nodes import PacsError
from msam_service.pacs.settings import FhirEndpoint

logger = logging.getLogger(__name__)


def post_bundle(endpoint: FhirEndpoint, name: str, bundle: dict[str, Any]) -> str:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if endpoint.token:
        headers["Authorization"] = f"Bearer {endpoint.token}"
    try:
        with httpx.Client(timeout=endpoint.timeout_s, follow_redirects=False, trust_env=False) as c:
            r = c.post(endpoint.url.rstrip("/"), json=bundle, headers=headers)
    except httpx.HTTPError as exc:
        raise PacsError(f"FHIR endpoint {name}: {type(exc).__name__}") from exc
    if 200 <= r.status_code < 300:
        logger.info("FHIR bundle accepted by %s (HTTP %d)", name, r.status_code)
        return "sent"
    retry = r.status_code in (408, 429) or r.status_code >= 500
    raise PacsError(f"FHIR endpoint {name} answered HTTP {r.status_code}", permanent=not retry)
