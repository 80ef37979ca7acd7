from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from api.errors import describe
from api.schemas import Prompts, SegmentByVolume
from msam_core.errors import InvalidPrompt, InvalidVolume
from msam_service.prompts import resolve, segment_labels, to_points_boxes
from msam_service.storage import LocalStorage, check_key
from msam_service.volumes import VolumeInfo, arrange_upload, suffix_of


def test_prompts_schema() -> None:
    p = Prompts.model_validate_json(json.dumps({"space": "RAS", "lesions": [
        {"positive": [[1, 2, 3]], "negative": [[4, 5, 6]], "box": [[0, 0, 0], [9, 9, 9]], "label": "A"},
        {"positive": [[7, 8, 9]]}]}))
    points, boxes = to_points_boxes(p.model_dump())
    assert [(pt.lesion, pt.label, pt.space) for pt in points] == [(1, 1, "RAS"), (1, 0, "RAS"), (2, 1, "RAS")]
    assert boxes[0].lesion == 1 and boxes[0].corner1 == (9, 9, 9)
    assert segment_labels(p.model_dump()) == {1: "A"}
    for bad in ({"lesions": [{"negative": [[1, 2, 3]]}]}, {"lesions": [{"positive": [[1, 2]]}]},
                {"lesions": []}, {"space": "ijk", "lesions": [{"positive": [[1, 2, 3]]}]},
                {"lesions": [{"positive": [[1, 2, 3]]}], "iterations": 0},
                {"lesions": [{"positive": [[1, 2, 3]], "colour": "red"}]}):
        with pytest.raises(ValidationError) as info:
            Prompts.model_validate(bad)
        assert describe(info.value.errors())  # a readable one-line message
    with pytest.raises(ValidationError):
        SegmentByVolume.model_validate({"volume_id": "../x", "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}})


def test_a_source_error_names_the_field_the_client_sent_not_pydantics_union_members() -> None:
    """``source`` is one of two models: the errors are those of the model whose fields the request
    used, located by field; when none fits, each model's errors by its plain name."""
    def error(source: dict) -> str:
        with pytest.raises(ValidationError) as info:
            SegmentByVolume.model_validate({"source": source, "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}})
        return describe(info.value.errors())

    assert error({"pacs": "orthanc", "accession_number": ""}) == \
        "source.accession_number: String should have at least 1 character"
    assert error({"pacs": "orthanc"}).startswith("source: Value error, give accession_number")
    assert error({"received_series_uid": "x"}).startswith("source.received_series_uid: String should match")
    neither = error({"bogus": 1})
    assert "source.DicomwebSource.pacs: Field required" in neither and "source.ReceivedSource." in neither
    assert "function-after" not in neither


def test_prompts_checked_against_geometry_without_pixels() -> None:
    info = VolumeInfo(volume_id="v", format="nifti", shape=[10, 12, 8], spacing=[1, 1, 2],
                      affine_ras=np.diag([1.0, 1.0, 2.0, 1.0]).tolist(), modality=None,
                      series_instance_uid=None, input_key="volumes/v/input/image.nii")
    geometry = info.geometry_volume()
    assert geometry.shape == (10, 12, 8) and geometry.array.nbytes <= 10 * 12 * 8
    assert len(resolve({"lesions": [{"positive": [[5, 5, 4]]}]}, geometry)) == 1
    with pytest.raises(InvalidPrompt, match="outside the image"):
        resolve({"lesions": [{"positive": [[50, 5, 4]]}]}, geometry)


def test_storage_keys_and_expiry(tmp_path: Path) -> None:
    for bad in ("../x", "/abs", "a/../b", "a//b", "a b", ""):
        with pytest.raises(ValueError):
            check_key(bad)
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/j1/mask.nii.gz", b"x")
    store.put_bytes("volumes/v1/meta.json", b"{}")
    assert store.get_bytes("jobs/j1/mask.nii.gz") == b"x" and store.exists("volumes/v1/meta.json")
    old = time.time() - 1000
    os.utime(tmp_path / "jobs" / "j1", (old, old))
    assert store.sweep(max_age_s=500) == 1
    assert not store.exists("jobs/j1/mask.nii.gz") and store.exists("volumes/v1/meta.json")
    store.delete_prefix("volumes/v1")
    assert not store.exists("volumes/v1/meta.json")


def test_arrange_upload_uses_generated_names(tmp_path: Path) -> None:
    assert suffix_of("../../evil.NII.GZ") == ".nii.gz" and suffix_of("IM0001") == ""
    f = tmp_path / "u0"
    f.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    assert arrange_upload(tmp_path, [("../../etc/passwd", f)]).name == "image.dcm"
    g = tmp_path / "u1"
    g.write_bytes(b"hello")
    with pytest.raises(InvalidVolume, match="unknown format"):
        arrange_upload(tmp_path, [("notes", g)])
    files = []
    for n in range(3):
        p = tmp_path / f"s{n}"
        p.write_bytes(b"x")
        files.append((f"../slice{n}", p))
    folder = arrange_upload(tmp_path, files)
    assert sorted(x.name for x in folder.iterdir()) == ["000000.dcm", "000001.dcm", "000002.dcm"]


def test_a_nifti_named_for_the_other_compression_is_read_as_its_bytes_are(tmp_path: Path) -> None:
    """nibabel goes by the suffix: a gzipped NIfTI named .nii, or a plain one named .nii.gz, is
    stored under the suffix of what it holds and reads as the same image."""
    import gzip

    import nibabel as nib
    import numpy as np

    from msam_service.volumes import decode

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.9, 2.5, 1.0])), str(tmp_path / "plain.nii"))
    plain = (tmp_path / "plain.nii").read_bytes()
    for n, (name, data, suffix) in enumerate((("ct.nii.gz", plain, ".nii"), ("ct.nii", gzip.compress(plain), ".nii.gz"),
                                              ("ct.nii.gz", gzip.compress(plain), ".nii.gz"))):
        staging = tmp_path / f"staging{n}"
        staging.mkdir()
        (staging / "u").write_bytes(data)
        arranged = arrange_upload(staging, [(name, staging / "u")])
        assert arranged.name == f"image{suffix}", name
        volume = decode(arranged)
        assert np.array_equal(volume.array, array) and np.allclose(volume.spacing, (0.8, 0.9, 2.5))


def test_the_result_formats_are_the_stored_files_and_fhir() -> None:
    """``GET /jobs/{id}/result?format=`` accepts what the workers store, plus FHIR (built on request)."""
    from typing import get_args

    from api.schemas import ResultFormat
    from msam_service.contract import RESULT_FILES, result_key

    assert set(get_args(ResultFormat)) == set(RESULT_FILES) | {"fhir"}
    assert len({f.name for f in RESULT_FILES.values()}) == len(RESULT_FILES)
    assert result_key("j1", "dicom-seg") == "jobs/j1/seg.dcm"
