"""HL7 v2 with hl7apy: orders in (ORM^O01, OMI^O23), acknowledgements out, results out (ORU^R01),
and MLLP framing for sending.

**Orders** (:func:`parse_order`): the accession number is OBR-18 (ORM^O01) or IPC-1 (OMI^O23,
falling back to OBR-18); the placer and filler order numbers are ORC-2 / ORC-3; PID-3 and PID-5
are kept only to be echoed in the result. What to segment is a note: an NTE segment whose
NTE-3 is ``MSAM-PROMPTS`` followed by the ``POST /segment`` prompt document as JSON, e.g.
``NTE|1||MSAM-PROMPTS {"space":"LPS","lesions":[{"positive":[[-12.5,30,102]],"label":"liver"}]}``.

**Acknowledgements** (:func:`ack`, original mode, v2.5): ``AA`` accepted (MSA-3 names the job),
``AE`` application error (the study is not found, no series or several fit the node's rules,
the prompts are missing or malformed: ERR-8 says which), ``AR`` rejected (unparsable message,
unsupported type or character set, no message control id, more than one order in the message,
unknown sending application). MSA-2 echoes the order's MSH-10 whole.

**Character sets** (:func:`decode`): an incoming message is read in the character set its MSH-18
names (ASCII, ISO 8859 parts, UTF-8); without MSH-18, as UTF-8 when it is valid UTF-8, else as
ISO 8859-1 (what most senders that leave MSH-18 empty mean). Everything msam sends is UTF-8 and
says so (MSH-18 ``UNICODE UTF-8``).

**Results** (:func:`oru`): ORU^R01 v2.5 with the order's PID, ORC (``RE``) and OBR (placer,
filler, universal service and accession echoed; OBR-25 ``F``, or ``X`` when the job failed,
with an NTE saying why), then per lesion (OBX-4 = lesion number): an ST OBX with its name
(DCM 125007 "Measurement Group") and one NM OBX per measurement with a code
(:data:`msam_service.ris.fhir.CODES`: SNOMED CT + UCUM); then an RP OBX with the DICOM-SEG's
URL, an ST OBX with its SOP Instance UID and, when the job wrote one, an ST OBX with the
measurement SR's SOP Instance UID (local codes ``99MSAM``). MSH-10 is derived from
the job id, so a resent result carries the same message control id.

Nothing here logs message content.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message

from msam_service.jobs import JobRecord
from msam_service.pacs.nodes import PacsError
from msam_service.ris.fhir import CODES

VERSION = "2.5"
PROMPTS_NOTE = "MSAM-PROMPTS"
START, END = b"\x0b", b"\x1c\x0d"
ORDER_TYPES = ("ORM^O01", "OMI^O23")
#: MSH-18 of every message msam sends.
CHARSET = "UNICODE UTF-8"
#: MSH-18 values (HL7 table 0211) -> Python codecs.
CHARSETS = {"ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
            **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)}}


class OrderError(ValueError):
    """An order msam cannot act on: ``code`` AE (application error) or AR (rejected)."""

    def __init__(self, message: str, code: str = "AE") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Order:
    message_type: str
    control_id: str
    sending_application: str
    sending_facility: str
    accession_number: str
    placer_order: str = ""
    filler_order: str = ""
    universal_service: str = ""
    patient_id: str = ""  # PID-3, ER7 as received
    patient_name: str = ""  # PID-5, ER7 as received
    prompts: dict[str, Any] | None = field(default=None, repr=False)

    def to_record(self) -> dict[str, Any]:
        """What the job keeps of the order (to answer with ORU^R01); no prompts."""
        out = asdict(self)
        out.pop("prompts")
        return out


def _text(value: str) -> str:
    """``value`` as an escaped ST component (``|^~\\&`` become escape sequences)."""
    return datatype_factory("ST", value, version=VERSION).to_er7()


def _unescape(raw: str) -> str:
    for seq, char in (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~"), ("\\E\\", "\\")):
        raw = raw.replace(seq, char)
    return raw


def _segments(msg: Message, name: str) -> list[Any]:
    return [c for c in msg.children if c.name == name]


def _field(segment: Any, name: str) -> str:
    try:
        return str(getattr(segment, name).to_er7())
    except Exception:
        return ""


def parse_order(text: str) -> Order:
    """An ORM^O01 / OMI^O23 message -> :class:`Order`; :class:`OrderError` says what is wrong."""
    try:
        msg = parse_message(text.replace("\n", "\r").strip("\r") + "\r", validation_level=VALIDATION_LEVEL.TOLERANT,
                            find_groups=False)
    except Exception as exc:
        raise OrderError(f"not a parsable HL7 v2 message ({type(exc).__name__})", "AR") from exc
    msh = msg.msh
    kind = "^".join(_field(msh, "msh_9").split("^")[:2])
    if kind not in ORDER_TYPES:
        raise OrderError(f"message type {kind or '?'} is not an order msam takes (ORM^O01, OMI^O23)", "AR")
    if not _field(msh, "msh_10"):
        raise OrderError("the message has no control id (MSH-10); give every message its own, so that its "
                         "acknowledgement can be matched and a resent order recognised", "AR")
    obr, ipc, orc, pid = (_segments(msg, n) for n in ("OBR", "IPC", "ORC", "PID"))
    if max(len(obr), len(orc)) > 1:
        raise OrderError(f"the message holds {max(len(obr), len(orc))} orders (ORC/OBR groups); msam takes one "
                         "order per message: send each in its own", "AR")
    accession = _field(ipc[0], "ipc_1").split("^")[0] if ipc else ""
    if not accession and obr:
        accession = _field(obr[0], "obr_18").split("^")[0]
    accession = _unescape(accession)
    if not accession:
        raise OrderError("the order has no accession number (OBR-18 for ORM^O01, IPC-1 for OMI^O23)")
    notes = [_unescape(_field(n, "nte_3")) for n in _segments(msg, "NTE")]
    prompts_text = next((n[len(PROMPTS_NOTE):].strip() for n in notes if n.startswith(PROMPTS_NOTE)), None)
    prompts = None
    if prompts_text is not None:
        try:
            prompts = json.loads(prompts_text)
        except ValueError as exc:
            raise OrderError(f"the {PROMPTS_NOTE} note is not valid JSON ({exc.msg} at character {exc.pos})") from exc
        if not isinstance(prompts, dict):
            raise OrderError(f"the {PROMPTS_NOTE} note must be a JSON object (the POST /segment prompts)")
    return Order(
        message_type=kind, control_id=_field(msh, "msh_10"), sending_application=_field(msh, "msh_3").split("^")[0],
        sending_facility=_field(msh, "msh_4").split("^")[0], accession_number=accession,
        placer_order=_field(orc[0], "orc_2") if orc else _field(obr[0], "obr_2") if obr else "",
        filler_order=_field(orc[0], "orc_3") if orc else _field(obr[0], "obr_3") if obr else "",
        universal_service=_field(obr[0], "obr_4") if obr else "",
        patient_id=_field(pid[0], "pid_3") if pid else "", patient_name=_field(pid[0], "pid_5") if pid else "",
        prompts=prompts)


def _header(msg: Message, receiving_application: str, receiving_facility: str, kind: str, control_id: str) -> None:
    msg.msh.msh_3 = "MSAM"
    msg.msh.msh_4 = "MSAM"
    if receiving_application:
        msg.msh.msh_5 = _text(receiving_application)
    if receiving_facility:
        msg.msh.msh_6 = _text(receiving_facility)
    msg.msh.msh_9 = kind
    msg.msh.msh_10 = control_id[:20]
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = VERSION
    msg.msh.msh_18 = CHARSET


def _incoming_header(text: str) -> tuple[str, str, str, str]:
    """(sending application, sending facility, control id, trigger) of any message, best effort."""
    try:
        msh = next(line for line in text.replace("\n", "\r").split("\r") if line.startswith("MSH"))
        sep = msh[3]
        f = msh.split(sep)
        comp = msh[4] if len(msh) > 4 else "^"
        return f[2].split(comp)[0], f[3].split(comp)[0], f[9], (f[8].split(comp) + ["", ""])[1]
    except (StopIteration, IndexError):
        return "", "", "", ""


def ack(incoming: str, code: str, text: str = "") -> Message:
    """The original-mode acknowledgement of ``incoming``: AA, AE or AR (with ERR when not AA)."""
    application, facility, control_id, trigger = _incoming_header(incoming)
    msg = Message("ACK", version=VERSION)
    _header(msg, application, facility, f"ACK^{trigger or 'O01'}^ACK", uuid.uuid4().hex)
    msg.msa.msa_1 = code
    msg.msa.msa_2 = control_id or "UNKNOWN"  # whole: the sender matches its message by it
    if text:
        msg.msa.msa_3 = _text(text[:80])
    if code != "AA":
        err = msg.add_segment("ERR")
        err.err_3 = "207^Application internal error^HL70357" if code == "AE" else "200^Unsupported message type^HL70357"
        err.err_4 = "E"
        err.err_8 = _text(text[:250])
    return msg


def oru(rec: JobRecord, lesions: list[dict[str, Any]], seg_url: str = "", seg_uid: str = "",
        sr_uid: str = "") -> Message:
    """The ORU^R01 of a finished job (see the module's documentation for its content)."""
    order = rec.request.order or {}
    msg = Message("ORU_R01", version=VERSION)
    _header(msg, order.get("sending_application", ""), order.get("sending_facility", ""), "ORU^R01^ORU_R01",
            rec.job_id)
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_3 = order.get("patient_id") or "UNKNOWN"
    pid.pid_5 = order.get("patient_name") or "UNKNOWN"
    group = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = group.add_segment("ORC")
    orc.orc_1 = "RE"
    obr = group.add_segment("OBR")
    obr.obr_1 = "1"
    for seg, name, key in ((orc, "orc_2", "placer_order"), (orc, "orc_3", "filler_order"),
                           (obr, "obr_2", "placer_order"), (obr, "obr_3", "filler_order")):
        if order.get(key):
            setattr(seg, name, order[key])
    obr.obr_4 = order.get("universal_service") or "MSAM^msam lesion segmentation^99MSAM"
    source = rec.request.source
    accession = order.get("accession_number") or (source.accession_number if source is not None else None)
    if accession:
        obr.obr_18 = _text(accession)
    obr.obr_22 = time.strftime("%Y%m%d%H%M%S", time.gmtime(rec.finished_at or time.time()))
    obr.obr_25 = "F" if rec.status == "succeeded" else "X"
    if rec.status != "succeeded":
        note = group.add_segment("NTE")
        note.nte_1 = "1"
        why = (rec.error or {}).get("message") or f"the job {rec.status}"
        note.nte_3 = _text(f"msam: {why}"[:2000])
    n = 0

    def obx(kind: str, code: str, value: str, sub_id: str = "", unit: str = "") -> None:
        nonlocal n
        n += 1
        seg = group.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        seg.obx_1 = str(n)
        seg.obx_2 = kind
        seg.obx_3 = code
        if sub_id:
            seg.obx_4 = sub_id
        seg.obx_5 = value
        if unit:
            seg.obx_6 = f"{unit}^{unit}^UCUM"
        seg.obx_11 = "F"

    for lesion in lesions:
        sub = str(lesion["lesion"])
        obx("ST", "125007^Measurement Group^DCM", _text(str(lesion["label"])), sub)
        for name, (code, display, unit) in CODES.items():
            if name in lesion["measurements"]:
                obx("NM", f"{code}^{display}^SCT", f"{float(lesion['measurements'][name]):g}", sub, unit)
    if seg_url:
        obx("RP", "SEG^DICOM Segmentation^99MSAM", f"{_text(seg_url)}^^application^dicom")
    if seg_uid:
        obx("ST", "SEG_UID^Segmentation SOP Instance UID^99MSAM", seg_uid)
    if sr_uid:
        obx("ST", "SR_UID^Measurement report SOP Instance UID^99MSAM", sr_uid)
    return msg


def frame(msg: Message | str) -> bytes:
    text = msg if isinstance(msg, str) else msg.to_er7()
    return START + text.encode() + END


class FrameError(ValueError):
    """Bytes that are not one MLLP-framed message; ``data``: what was read (for its header)."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


def read_frame(sock: socket.socket, limit: int = 1 << 20, deadline_s: float | None = None) -> bytes:
    """One MLLP-framed message from ``sock``, without the framing, as bytes.

    Raises:
        FrameError: the peer closed before the end block, the bytes are not framed, the message
            is longer than ``limit`` bytes, or it did not arrive whole within ``deadline_s``
            seconds (each read waits at most what is left of it).
    """
    data = bytearray()
    end_by = None if deadline_s is None else time.monotonic() + deadline_s
    while not data.endswith(END):
        if end_by is not None:
            left = end_by - time.monotonic()
            if left <= 0:
                raise FrameError(f"the message did not arrive whole within {deadline_s:g} s", bytes(data))
            sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError as exc:
            raise FrameError(f"the message did not arrive whole within {deadline_s:g} s", bytes(data)) from exc
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise FrameError(f"the message is longer than {limit} bytes", bytes(data))
    start = data.find(START)
    if start < 0 or not data.endswith(END):
        raise FrameError("not an MLLP-framed message", bytes(data))
    return bytes(data[start + 1:-2])


def read_framed(sock: socket.socket, limit: int = 1 << 20) -> str:
    """One MLLP-framed message from ``sock`` (without the framing), read as msam sends: UTF-8."""
    return read_frame(sock, limit).decode("utf-8", errors="replace")


def charset_of(data: bytes) -> str:
    """MSH-18 of a message (upper case, the first repetition), or ``""``; read from its bytes,
    whose header is ASCII whatever the character set."""
    head = bytes(data[:4096]).split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    if not head.startswith("MSH") or len(head) < 4:
        return ""
    fields = head.split(head[3])
    value = fields[17] if len(fields) > 17 else ""
    repetition = head[5] if len(head) > 5 else "~"
    return value.split(repetition)[0].strip().upper()


def decode(data: bytes) -> str:
    """A message's text in the character set its MSH-18 names (see the module).

    Raises:
        OrderError: ``AR``, MSH-18 names a character set msam does not read, or the bytes are
            not valid in it.
    """
    charset = charset_of(data)
    if not charset:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("iso8859-1")
    codec = CHARSETS.get(charset)
    if codec is None:
        raise OrderError(f"character set {charset} (MSH-18) is not one msam reads; send UNICODE UTF-8, ASCII or "
                         "8859/1", "AR")
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise OrderError(f"the message is not valid {charset} (MSH-18) at byte {exc.start}", "AR") from exc


def send(host: str, port: int, msg: Message, timeout: float = 10.0, what: str = "the RIS") -> str:
    """Send ``msg`` over MLLP and check the acknowledgement (AA / CA); returns MSA-1.
    Connection problems are worth a retry (:class:`PacsError`); AE / AR are final."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(frame(msg))
            answer = read_framed(sock)
    except (OSError, FrameError) as exc:
        raise PacsError(f"MLLP to {what}: {type(exc).__name__}") from exc
    try:
        reply = parse_message(answer.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT,
                              find_groups=False)
        code = _field(reply.msa, "msa_1")
    except Exception as exc:
        raise PacsError(f"MLLP to {what}: the acknowledgement is not parsable ({type(exc).__name__})") from exc
    if code not in ("AA", "CA"):
        raise PacsError(f"{what} answered {code or 'no MSA-1'}", permanent=True)
    return code
