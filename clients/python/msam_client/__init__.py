"""Python client of the msam service (httpx + numpy, no torch)."""

from msam_client.client import Answer, Client, Job, Session, Volume
from msam_client.errors import (Busy, Conflict, InvalidRequest, JobFailed, MsamError, NotFound,
                                Unauthorized, Unreachable)

__all__ = ["Answer", "Busy", "Client", "Conflict", "InvalidRequest", "Job", "JobFailed", "MsamError",
           "NotFound", "Session", "Unauthorized", "Unreachable", "Volume"]
