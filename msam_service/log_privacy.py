"""Keep DICOM identifiers and echoed patient values out of the service's logs, library loggers
included (highdicom logs the SOP Instance UID of every source it copies from, at INFO; pydicom
echoes a value it finds invalid; highdicom a patient name it finds suspicious).

:func:`install` (run once per process by the API and the workers) redacts every log record at
its creation, whichever logger made it and whichever handler writes it, including handlers a
library or a deployment adds later. :class:`RedactIdentifiers` is the same rule as a
:class:`logging.Filter`, for deployments that configure logging themselves (``dictConfig``:
``"()": "msam_service.log_privacy.RedactIdentifiers"``); install() also puts it on the root
logger's handlers.

What is redacted (:func:`redact`):

- **UIDs** -> ``[uid]``: a run of digits and dots (not inside a longer number) with at least
  3 components that is either at least 9 characters long and starts with ``0``, ``1`` or ``2``
  (the ISO/ITU-T root arcs; every DICOM UID, e.g. ``1.2.840.113619.2.55.3``, and ``2.25.<uuid>``),
  or has at least 5 components (UIDs of non-conformant roots). Kept: version numbers (``0.28.2``,
  ``1.10.12``, ``0.115.12``), decimals (``12.345``), dates (``2024.10.12``), and IPv4 addresses
  (exactly 4 components, each at most 255: ``127.0.0.1``, ``10.0.0.12``).
- **Values libraries echo** -> ``[value]``: pydicom's ``Invalid value for VR XX: '...'``,
  ``... non-conformant value '...'``, ``Unable to convert '...'``, and highdicom's
  ``... is potentially invalid: "..."``.
- **DICOM person names** -> ``[name]``: a token holding the component separator ``^``
  (``Doe^John``).

Patient IDs and names without ``^`` have no recognisable shape; msam's own messages never
contain them, and the library messages that echo values are covered above.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["RedactIdentifiers", "install", "redact"]

UID_MARK = "[uid]"
VALUE_MARK = "[value]"
NAME_MARK = "[name]"

_DOTTED = re.compile(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+)+(?!\.?\d)")
_QUOTED = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_ECHOES = [
    re.compile(r"(Invalid value for VR \w{2}: )(" + _QUOTED + r"|\S+)"),
    re.compile(r"(non-conformant value )(" + _QUOTED + r")"),
    re.compile(r"(Unable to convert )(" + _QUOTED + r")"),
    re.compile(r"(is potentially invalid: )(" + _QUOTED + r")"),
    re.compile(r"(Invalid value ')([^']*)(' for AT element)"),
]
_PERSON_NAME = re.compile(r"""[^\s'"=,;()<>\[\]{}]*\^[^\s'"=,;()<>\[\]{}]*""")


def _is_identifier(token: str) -> bool:
    parts = token.split(".")
    if len(parts) == 4 and all(len(p) <= 3 and int(p) <= 255 for p in parts):
        return False  # an IPv4 address
    if len(parts) >= 5:
        return True
    return len(parts) >= 3 and len(token) >= 9 and parts[0] in ("0", "1", "2")


def redact(text: str) -> str:
    """``text`` without UIDs, echoed DICOM values and person names (see the module's rules)."""
    if not text:
        return text
    for pattern in _ECHOES:
        text = pattern.sub(lambda m: m.group(1) + VALUE_MARK + (m.group(3) if m.re.groups >= 3 else ""), text)
    if "^" in text:
        text = _PERSON_NAME.sub(NAME_MARK, text)
    if "." in text:
        text = _DOTTED.sub(lambda m: UID_MARK if _is_identifier(m.group(0)) else m.group(0), text)
    return text


def _scrub(record: logging.LogRecord) -> None:
    """Replace the record's message (arguments merged), exception and stack text by their
    redacted forms; once per record."""
    if getattr(record, "_msam_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - arguments that do not fit the format: keep the format only
        message = str(record.msg) + " [arguments dropped: they did not fit the message]"
    record.msg, record.args = redact(message), None
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # no formatter may render the raw exception again
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._msam_redacted = True


class RedactIdentifiers(logging.Filter):
    """A filter that redacts (never drops) a record: :func:`redact` on its message, exception
    and stack text."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub(record)
        return True


_lock = threading.Lock()
_installed = False


def install() -> None:
    """Redact every log record of this process from now on (idempotent): a record factory,
    so every logger and handler is covered, and the filter on the root logger's handlers.
    Python warnings go through logging too (``py.warnings``): pydicom warns with the value it
    found invalid, and a warning printed straight to stderr would bypass the redaction."""
    global _installed
    with _lock:
        if not _installed:
            previous = logging.getLogRecordFactory()

            def factory(*args, **kwargs) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                _scrub(record)
                return record

            logging.setLogRecordFactory(factory)
            logging.captureWarnings(True)
            _installed = True
    attach(logging.getLogger())


def attach(logger: logging.Logger) -> None:
    """Put :class:`RedactIdentifiers` on ``logger``'s handlers (those without it)."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactIdentifiers) for f in handler.filters):
            handler.addFilter(RedactIdentifiers())
