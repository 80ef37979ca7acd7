"""DICOM text in msam's outputs (DICOM-SEG and RTSTRUCT alike): labels checked by the API's own
rule and read back exactly (UTF-8 when the source's character set cannot hold them), and
source patient/study attributes that break their VR left empty with a warning instead of
costing the output. Every output passes dciodvfy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from msam_core.errors import InvalidPrompt
from msam_core.io.dicom import read_series
from msam_core.io.dicom_text import TextRuleError, check_long_string
from msam_core.io.rtstruct import read_rtstruct, write_rtstruct
from msam_core.io.seg import read_seg, write_seg
from msam_core.io.volume import Volume
from tests.unit.io.dicom_synth import asymmetric_mask, dciodvfy_errors, make_ct_series

# the fixtures write values pydicom warns about on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The (PN component|value) length:UserWarning",
                                        "ignore:Unknown encoding:UserWarning")

SEGMENT_LABEL = Tag(0x0062, 0x0005)
ROI_NAME = Tag(0x3006, 0x0026)


def _seg(mask: np.ndarray, volume: Volume, path: Path, names: dict[int, str] | None = None, **kw: Any) -> Path:
    return write_seg(mask, volume, path, segment_labels=names, **kw)


def _rtstruct(mask: np.ndarray, volume: Volume, path: Path, names: dict[int, str] | None = None, **kw: Any) -> Path:
    return write_rtstruct(mask, volume, path, roi_names=names, **kw)


WRITERS: dict[str, tuple[Callable[..., Path], Callable[[Path, Volume], np.ndarray], Tag, str]] = {
    "seg": (_seg, read_seg, SEGMENT_LABEL, "DICOM-SEG"),
    "rtstruct": (_rtstruct, read_rtstruct, ROI_NAME, "RTSTRUCT"),
}


def _names_raw(path: Path, tag: Tag) -> tuple[Any, list[bytes]]:
    """(SpecificCharacterSet, the label elements' bytes as stored in the file)."""
    ds = pydicom.dcmread(path)
    seq = ds.SegmentSequence if tag == SEGMENT_LABEL else ds.StructureSetROISequence
    raw = []
    for item in seq:
        elem = item.get_item(tag)
        assert isinstance(elem, RawDataElement)  # not decoded yet: the bytes of the file
        raw.append(bytes(elem.value).rstrip(b" "))
    return ds.get("SpecificCharacterSet"), raw


def _series(tmp_path: Path, **changes: Any) -> Volume:
    """A small CT series (ISO_IR 100) with ``changes`` applied to every file: keyword -> value,
    None deletes, bytes stores the raw bytes as they are (a value pydicom would refuse to set)."""
    series = make_ct_series(tmp_path / "ct", write=False)
    (tmp_path / "ct").mkdir(parents=True, exist_ok=True)
    for path, ds in zip(series.paths, series.datasets):
        for keyword, value in changes.items():
            if value is None:
                del ds[keyword]
            elif isinstance(value, bytes):
                tag = Tag(keyword)
                ds[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(value), value, 0, False, True)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return read_series(tmp_path / "ct")


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_label_outside_the_source_charset_round_trips_in_utf8(tmp_path: Path, writer: str) -> None:
    write, read, tag, _ = WRITERS[writer]
    volume = _series(tmp_path, PatientName="Müller^Jürgen")
    mask = asymmetric_mask(volume.shape)
    path = write(mask, volume, tmp_path / "out.dcm", {1: "Läsion 腫瘍", 3: "tumour 🫁"})
    charset, raw = _names_raw(path, tag)
    assert charset == "ISO_IR 192"
    assert raw == ["Läsion 腫瘍".encode(), b"Lesion 2", "tumour 🫁".encode()]
    ds = pydicom.dcmread(path)
    seq = ds.SegmentSequence if writer == "seg" else ds.StructureSetROISequence
    assert [item[tag].value for item in seq] == ["Läsion 腫瘍", "Lesion 2", "tumour 🫁"]
    assert ds.PatientName == "Müller^Jürgen"  # copied from a Latin-1 source, re-encoded, unchanged
    np.testing.assert_array_equal(read(path, volume), mask)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_label_the_source_charset_holds_keeps_it(tmp_path: Path, writer: str) -> None:
    write, _, tag, _ = WRITERS[writer]
    volume = _series(tmp_path)
    path = write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", {2: "  Läsion  "})
    charset, raw = _names_raw(path, tag)
    assert charset == "ISO_IR 100" and raw[1] == "Läsion".encode("latin-1")  # spaces are not significant
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(("label", "position"), [("liver\\lesion", 6), ("a\tb", 2), ("   ", None),
                                                 ("x" * 65, 65), ("腫" * 22, 22), ("a\u2028b", 2)],
                         ids=["backslash", "tab", "spaces", "65-chars", "66-bytes", "line-separator"])
def test_a_label_dicom_refuses_is_never_written(tmp_path: Path, writer: str, label: str, position: int | None) -> None:
    write, _, _, _ = WRITERS[writer]
    volume = _series(tmp_path)
    with pytest.raises(InvalidPrompt, match=f"character {position}" if position else "only spaces"):
        write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", {2: label})
    assert not (tmp_path / "out.dcm").exists()
    with pytest.raises(TextRuleError) as refused:  # the same rule the API applies
        check_long_string(label)
    assert refused.value.position == position


def test_the_label_rule_names_the_character_and_its_position() -> None:
    with pytest.raises(TextRuleError, match=r"character 6 of the label is a backslash.*use '/'"):
        check_long_string("liver\\lesion")
    with pytest.raises(TextRuleError, match=r"character 4 of the label is the control character U\+0000 NULL"):
        check_long_string("abc\x00")
    with pytest.raises(TextRuleError, match="has 65 characters.*at most 64 .from character 65 on"):
        check_long_string("y" * 65)
    with pytest.raises(TextRuleError, match="takes 66 bytes in UTF-8.*from character 22 on"):
        check_long_string("腫" * 22)
    assert check_long_string("  Läsion 腫瘍 ") == "Läsion 腫瘍"
    assert check_long_string("x" * 64) == "x" * 64 and check_long_string("腫" * 21) == "腫" * 21


BAD_SOURCE = {
    "PatientBirthDate": ("19700132", "a valid date (DA)"),
    "PatientSex": ("X", "one of M, F, O"),
    "StudyTime": ("256199", "a valid time (TM)"),
    "StudyDate": ("2024-01-02", "a valid date (DA)"),
    "PatientName": ("A" * 70, "a valid person name (PN)"),
    "AccessionNumber": ("A" * 20, "a valid short string (SH)"),
    "ReferringPhysicianName": ("Dr\x01Who", "a valid person name (PN)"),
    "StudyDescription": (b"Study\\two", "a single long string (LO)"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("keyword", list(BAD_SOURCE))
def test_a_source_attribute_dicom_refuses_is_left_empty_with_a_warning(tmp_path: Path, writer: str,
                                                                        keyword: str) -> None:
    write, read, _, what = WRITERS[writer]
    value, why = BAD_SOURCE[keyword]
    volume = _series(tmp_path, **{keyword: value})
    mask = asymmetric_mask(volume.shape)
    warnings: list[str] = []
    path = write(mask, volume, tmp_path / "out.dcm", warnings=warnings)
    assert warnings == [f"{keyword} in the source is not {why} and was left empty in the {what}"]
    ds = pydicom.dcmread(path)
    assert keyword in ds and ds[keyword].value in ("", None)  # Type 2 attributes stay, empty
    assert ds.PatientID == "SYN0001" and ds.StudyInstanceUID  # the valid ones are copied as before
    np.testing.assert_array_equal(read(path, volume), mask)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_person_name_of_more_than_five_components_is_left_empty_with_a_warning(tmp_path: Path,
                                                                                 writer: str) -> None:
    """pydicom checks a PN's length and characters, not its structure; validators refuse a sixth
    component, so it is treated as any value that breaks its VR."""
    write, _, _, what = WRITERS[writer]
    volume = _series(tmp_path, PatientName="ZEBRA^QUUX^A^B^C^D")
    warnings: list[str] = []
    path = write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", warnings=warnings)
    assert warnings == ["PatientName in the source is not a valid person name (PN: at most five components, in "
                        f"at most three groups) and was left empty in the {what}"]
    assert pydicom.dcmread(path).PatientName == ""


@pytest.mark.parametrize("writer", list(WRITERS))
def test_missing_type2_attributes_and_unconvertible_values_cost_nothing(tmp_path: Path, writer: str) -> None:
    write, _, _, what = WRITERS[writer]
    volume = _series(tmp_path, PatientID=None, StudyID=None, StudyDate=None, PatientWeight=b"7x")
    warnings: list[str] = []
    path = write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", warnings=warnings)
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "" and ds.StudyID == "" and ds.StudyDate == ""
    expected = ["PatientWeight in the source is not a valid decimal string (DS) and was left empty in the "
                "DICOM-SEG"] if what == "DICOM-SEG" else []  # an RTSTRUCT does not copy the weight
    assert warnings == expected
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(("charset", "written", "warned"), [
    ("ISO_IR 999", "ISO_IR 192", True),  # not a character set: UTF-8, said so
    ("ISO_IR 6", None, False),  # not a defined term; means the default repertoire
    (["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 87"], False),  # valid DICOM that highdicom refuses
])
def test_source_character_sets_highdicom_refuses(tmp_path: Path, writer: str, charset: Any, written: Any,
                                                 warned: bool) -> None:
    write, _, _, what = WRITERS[writer]
    volume = _series(tmp_path, SpecificCharacterSet=charset)
    warnings: list[str] = []
    path = write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", warnings=warnings)
    ds = pydicom.dcmread(path)
    assert ds.get("SpecificCharacterSet") == written
    assert ds.PatientName == "Synthetic^Patient"
    assert warnings == ([f"SpecificCharacterSet in the source is not a character set DICOM defines; the {what} "
                         "is written in ISO_IR 192 (UTF-8)"] if warned else [])
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_no_warning_for_an_attribute_the_writer_sets_itself(tmp_path: Path, writer: str) -> None:
    """The source's Manufacturer is refused, but the output's is msam's own: nothing was lost."""
    write, _, _, _ = WRITERS[writer]
    volume = _series(tmp_path, Manufacturer="M" * 70, OperatorsName="Op\x01")
    warnings: list[str] = []
    path = write(asymmetric_mask(volume.shape), volume, tmp_path / "out.dcm", warnings=warnings)
    assert warnings == [] and pydicom.dcmread(path).Manufacturer == "msam"
