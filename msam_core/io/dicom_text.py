"""DICOM text rules for what msam writes: one place shared by the API (label validation) and the
DICOM writers (DICOM-SEG, RTSTRUCT), so a value the writers get is always one DICOM accepts.

Three rules:

- **LO values msam writes** (SegmentLabel, ROIName, algorithm names): at most 64 characters and
  at most 64 bytes in UTF-8 (the standard counts characters, but dciodvfy and many archives count
  bytes, and a UTF-8 output has one byte per ASCII character and 2 to 4 per other one); no
  backslash (DICOM's value separator: ``liver\\lesion`` would become two values); no control
  character (C0, DEL, C1), line or paragraph separator, or unpaired surrogate. Leading and
  trailing spaces are not significant in DICOM and are removed; a value with no visible
  character is refused (SegmentLabel is Type 1). :func:`check_long_string` says which
  character is refused and where.
- **Character set**: an output keeps its source's Specific Character Set when every text value
  of the output can be encoded in it, and is written in ``ISO_IR 192`` (UTF-8) otherwise, so no
  character is ever replaced by ``?`` (:func:`apply_character_set`).
- **Source attributes copied into an output** (patient, study): a value that breaks its VR
  (a date ``19700132``, a Patient's Sex ``X``, a 70-character name, a control character) is
  left empty in the output, which every type of attribute allows, and reported by attribute
  name, never by value (:func:`conform_source_header`). highdicom refuses such values, which
  would otherwise cost the whole output.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LO_MAX_CHARS",
    "UTF8",
    "ConformedHeader",
    "TextRuleError",
    "apply_character_set",
    "check_long_string",
    "clean_long_string",
    "conform_source_header",
]

LO_MAX_CHARS = 64
#: Specific Character Set term for UTF-8
UTF8 = "ISO_IR 192"

#: Attributes highdicom reads from the source as required arguments (Type 2 in the Patient and
#: General Study modules): present, possibly empty, in every output.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                       "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")

#: Enumerated values of code-string attributes of the patient/study modules.
ENUMERATED = {
    "PatientSex": ("M", "F", "O"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
    "QualityControlSubject": ("YES", "NO"),
}

_VR_NAMES = {"DA": "date (DA)", "TM": "time (TM)", "DT": "date-time (DT)", "AS": "age (AS)",
             "PN": "person name (PN)", "SH": "short string (SH)", "LO": "long string (LO)",
             "ST": "short text (ST)", "LT": "long text (LT)", "UT": "unlimited text (UT)",
             "UC": "unlimited characters (UC)", "CS": "code string (CS)", "DS": "decimal string (DS)",
             "IS": "integer string (IS)"}
#: VRs whose text depends on the Specific Character Set (the others are ASCII by definition)
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
#: VRs checked in any source attribute; code, decimal and integer strings only in the patient
#: and clinical-trial-subject groups (elsewhere they describe the image, which msam does not copy)
_CHECKED_VRS = frozenset({"DA", "TM", "DT", "AS", "PN", "SH", "LO", "ST", "LT", "UC", "UT"})
_PATIENT_GROUP_VRS = frozenset({"CS", "DS", "IS"})
_PATIENT_GROUPS = (0x0010, 0x0012)
#: control characters that the text VRs (ST, LT, UT) allow
_TEXT_CONTROLS = frozenset("\t\n\f\r")
_DEFAULT_TERMS = ("", "ISO_IR 6")


class TextRuleError(ValueError):
    """A text value breaks a DICOM VR rule; the message names the character and its position."""

    def __init__(self, message: str, position: int | None = None, char: str | None = None) -> None:
        super().__init__(message)
        self.position = position
        self.char = char


#: names of common control characters (Unicode gives them none)
_CONTROL_NAMES = {"\0": "NULL", "\t": "TAB", "\n": "LINE FEED", "\r": "CARRIAGE RETURN", "\f": "FORM FEED",
                  "\x1b": "ESCAPE", "\x7f": "DELETE"}


def _describe(char: str) -> str:
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def _refused(char: str, allowed_controls: frozenset[str] = frozenset()) -> str | None:
    """Why ``char`` cannot be part of a DICOM text value (``None``: it can)."""
    if char == "\\":
        return "a backslash, which DICOM uses to separate values; use '/' or '-' instead"
    category = unicodedata.category(char)
    if category == "Cc" and char not in allowed_controls:
        return f"the control character {_describe(char)}, which DICOM text does not allow; remove it"
    if category in ("Zl", "Zp"):
        return f"a line break, {_describe(char)}, which a one-line DICOM value does not allow; remove it"
    if category == "Cs":
        return f"an unpaired surrogate, {_describe(char)}, which is not a character; remove it"
    return None


def check_long_string(value: str, what: str = "label") -> str:
    """``value`` as a DICOM LO value (SegmentLabel, ROIName), or :class:`TextRuleError`.

    Returns ``value`` without leading and trailing spaces (not significant in DICOM). Refuses,
    naming the first offending character and its 1-based position in ``value``: a backslash,
    a control character, a line or paragraph separator; and a value with more than 64
    characters or 64 UTF-8 bytes, or without a visible character.
    """
    text = str(value)
    for position, char in enumerate(text, start=1):
        why = _refused(char)
        if why is not None:
            raise TextRuleError(f"character {position} of the {what} is {why}", position, char)
    stripped = text.strip(" ")
    if not stripped or all(c.isspace() for c in stripped):
        raise TextRuleError(f"the {what} is empty or only spaces; DICOM needs a segment label and ROI name "
                            "with at least one visible character (or leave the label out: 'Lesion <n>')")
    if len(stripped) > LO_MAX_CHARS:
        lead = len(text) - len(text.lstrip(" "))
        raise TextRuleError(f"the {what} has {len(stripped)} characters and a DICOM long string (LO) holds at "
                            f"most {LO_MAX_CHARS} (from character {LO_MAX_CHARS + 1 + lead} on it does not fit): "
                            "shorten it", LO_MAX_CHARS + 1 + lead, stripped[LO_MAX_CHARS])
    size = len(stripped.encode("utf-8"))
    if size > LO_MAX_CHARS:
        lead = len(text) - len(text.lstrip(" "))
        used, position = 0, 0
        for position, char in enumerate(stripped, start=1):  # noqa: B007 - the first one past the limit
            used += len(char.encode("utf-8"))
            if used > LO_MAX_CHARS:
                break
        raise TextRuleError(f"the {what} takes {size} bytes in UTF-8 and a DICOM long string (LO) holds at most "
                            f"{LO_MAX_CHARS} (characters beyond ASCII take 2 to 4 bytes; from character "
                            f"{position + lead} on it does not fit): shorten it", position + lead,
                            stripped[position - 1])
    return stripped


def clean_long_string(text: str, fallback: str = "msam") -> str:
    """``text`` made into a valid LO value by dropping refused characters and cutting it to 64
    characters: for text msam composes itself (a model's name and version), never for a user's."""
    clean = "".join(c for c in str(text) if _refused(c) is None).strip()
    return clean[:LO_MAX_CHARS].strip() or fallback


# -- character set ------------------------------------------------------------------------------

def _terms(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _codecs(terms: list[str]) -> list[str] | None:
    """Python codecs of the Specific Character Set ``terms`` (``None``: a term pydicom does not
    know). The default repertoire is ASCII (pydicom reads it as Latin-1, which is lenient)."""
    from pydicom.charset import python_encoding

    if not terms:
        return ["ascii"]
    codecs = []
    for term in terms:
        term = term.strip()
        if term in _DEFAULT_TERMS or term == "ISO 2022 IR 6":
            codecs.append("ascii")
        elif term in python_encoding:
            codecs.append(python_encoding[term])
        else:
            return None
    return codecs


def _encodable(text: str, codecs: list[str]) -> bool:
    for codec in codecs:
        try:
            text.encode(codec)
            return True
        except (UnicodeError, LookupError):
            continue
    return False


def _texts(ds: Any) -> Iterable[str]:
    """Every charset-dependent text value of ``ds``, sequence items included."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _texts(item)
        elif elem.VR in _CHARSET_VRS and elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                yield str(v)


def apply_character_set(ds: Any, source_character_set: Any, what: str) -> str | None:
    """Give the finished output ``ds`` its Specific Character Set: the source's when it is a term
    pydicom knows and every text value of ``ds`` can be encoded in it, else ``ISO_IR 192``
    (UTF-8), which encodes every character. Returns a warning when the source's term was not
    a known character set (its text was decoded as well as pydicom could), else ``None``."""
    terms = _terms(source_character_set)
    if len(terms) == 1 and terms[0].strip() in _DEFAULT_TERMS:
        terms = []  # ISO_IR 6 is not a defined term: it means the default repertoire
    codecs = _codecs(terms)
    note = None
    if codecs is None:
        chosen: list[str] | None = [UTF8]
        note = (f"SpecificCharacterSet in the source is not a character set DICOM defines; the {what} is "
                f"written in {UTF8} (UTF-8)")
    elif all(_encodable(t, codecs) for t in _texts(ds)):
        chosen = terms or None
    else:
        chosen = [UTF8]
    if chosen is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = chosen[0] if len(chosen) == 1 else chosen
    return note


# -- source attributes --------------------------------------------------------------------------

@dataclass
class ConformedHeader:
    """A source header whose copied attributes all satisfy their VRs."""

    #: the source dataset's root elements, invalid values replaced by empty ones (the source
    #: itself is not changed)
    dataset: Any
    #: keyword -> what the source's value is not, e.g. "a valid date (DA)" (never the value)
    problems: dict[str, str] = field(default_factory=dict)

    def warnings(self, output: Any, what: str, copied: Iterable[str] | None = None) -> list[str]:
        """One sentence per emptied attribute that ``output`` carries empty (so it came from
        the source, not from the writer): what was wrong with the source's value, and that the
        attribute was left empty in ``what`` (``"DICOM-SEG"``). ``copied``: the attributes the
        writer copies, when it knows them (default: any)."""
        keep = None if copied is None else set(copied)
        return [f"{kw} in the source is not {why} and was left empty in the {what}"
                for kw, why in self.problems.items()
                if (keep is None or kw in keep) and kw in output and output[kw].value in ("", None)]


def _value_problem(keyword: str, vr: str, value: Any) -> str | None:
    """What ``value`` is not, e.g. ``"a valid date (DA)"`` (``None``: it is valid for ``vr``)."""
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DA, DT, TM, validate_value

    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    kind = "a valid " + _VR_NAMES.get(vr, f"{vr} value")
    for v in values:
        if isinstance(v, bytes):
            return kind  # undecodable
        text = str(v)
        if keyword in ENUMERATED and text not in ENUMERATED[keyword]:
            return "one of " + ", ".join(ENUMERATED[keyword])
        allowed = _TEXT_CONTROLS if vr in ("ST", "LT", "UT") else frozenset()
        if any(_refused(c, allowed) and c != "\\" for c in text):
            return kind
        if vr == "PN":  # pydicom checks lengths and characters, not the structure
            groups = text.split("=")
            if len(groups) > 3 or any(g.count("^") > 4 for g in groups):
                return "a valid person name (PN: at most five components, in at most three groups)"
        try:
            validate_value(vr, text, config.RAISE)
            if vr in ("DA", "TM", "DT") and text.strip():
                {"DA": DA, "TM": TM, "DT": DT}[vr](text.strip())  # real calendar dates and times
        except (ValueError, TypeError, OverflowError):
            return kind
    return None


def conform_source_header(source: Any) -> ConformedHeader:
    """A copy of the source dataset ``source`` fit to be copied into an output.

    Every root-level public text attribute whose value breaks its VR (syntax, length, calendar
    date, enumerated values, control characters) is replaced by an empty value in the copy; the
    Type 2 patient/study attributes highdicom requires are added empty when the source lacks
    them. Elements are shared with ``source`` except those replaced, so ``source`` is unchanged
    and the copy costs little.
    """
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag

    out = Dataset()
    if getattr(source, "file_meta", None) is not None:
        out.file_meta = source.file_meta
    problems: dict[str, str] = {}
    for tag in list(source.keys()):
        try:
            elem = source[tag]
        except Exception:  # noqa: BLE001 - a value pydicom cannot even convert (a DS "7x")
            raw = source.get_item(tag)
            keyword = keyword_for_tag(tag)
            if tag.is_private or not keyword:
                out[tag] = raw  # not copied into outputs: left as it is
            else:
                out[tag] = DataElement(tag, raw.VR or dictionary_VR(tag), "")
                problems[keyword] = "a valid " + _VR_NAMES.get(out[tag].VR, f"{out[tag].VR} value")
            continue
        out.add(elem)
        if tag.is_private or tag.group == 0x0002 or not elem.keyword:
            continue
        checked = elem.VR in _CHECKED_VRS or elem.keyword in ENUMERATED or (
            elem.VR in _PATIENT_GROUP_VRS and tag.group in _PATIENT_GROUPS)
        if not checked:
            continue
        why = _value_problem(elem.keyword, elem.VR, elem.value)
        if why is None and elem.VM > 1 and dictionary_VM(tag) == "1":  # a backslash split it
            why = "a single " + _VR_NAMES.get(elem.VR, f"{elem.VR} value")
        if why is not None:
            out[tag] = DataElement(tag, elem.VR, "")
            problems[elem.keyword] = why
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, "")
    return ConformedHeader(out, problems)
