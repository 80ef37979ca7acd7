"""No DICOM UID or echoed patient value in a log line of a service process, whichever logger
(highdicom's, pydicom's, msam's) wrote it and whichever handler prints it."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from msam_service.log_privacy import NAME_MARK, UID_MARK, VALUE_MARK, RedactIdentifiers, redact

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


@pytest.mark.parametrize(("text", "expected"), [
    ('copy Patient-related attributes from dataset "1.2.826.0.1.3680043.8.498.978841542753"',
     f'copy Patient-related attributes from dataset "{UID_MARK}"'),
    ("series 2.25.329800735698586629295641978511506172918", f"series {UID_MARK}"),
    ("file 1.2.840.113619.2.55.3.dcm and uid=1.3.6.1.4.1.9590", f"file {UID_MARK}.dcm and uid={UID_MARK}"),
    ("non-ISO root 9.3.12.2.1107.5.1", f"non-ISO root {UID_MARK}"),
    ("highdicom 0.28.2, fastapi 0.115.12, numpy 1.26.4, v1.10.12", None),  # versions stay
    ("bound to 127.0.0.1:8000 and 10.0.0.12, mask 255.255.255.0", None),  # IPv4 addresses stay
    ("took 12.345 s at 1700000000.123456 on 2024.10.12", None),  # numbers and dates stay
    ("model 0.1.0+sha256.0123456789abcdef", None),
    ("Invalid value for VR DA: '19700132'. Please see the standard", f"Invalid value for VR DA: {VALUE_MARK}. Please see the standard"),
    ('value of argument "patient_name" is potentially invalid: "Doe John"',
     f'value of argument "patient_name" is potentially invalid: {VALUE_MARK}'),
    ("Unable to convert non-conformant value '256199' to 'TM' object",
     f"Unable to convert non-conformant value {VALUE_MARK} to 'TM' object"),
    ("patient Synthetic^Patient arrived", f"patient {NAME_MARK} arrived"),
])
def test_the_redaction_rule(text: str, expected: str | None) -> None:
    assert redact(text) == (text if expected is None else expected)


def test_highdicom_and_pydicom_records_reach_handlers_redacted(tmp_path: Path) -> None:
    """highdicom's INFO lines name every source SOP Instance UID; pydicom echoes an invalid
    birth date. Through a handler added after msam_service was imported, neither is left."""
    from msam_core.io.dicom import read_series
    from msam_core.io.seg import write_seg
    from tests.unit.io.dicom_synth import asymmetric_mask, make_ct_series

    series = make_ct_series(tmp_path / "ct", write=False)
    (tmp_path / "ct").mkdir(exist_ok=True)
    for path, ds in zip(series.paths, series.datasets):
        ds.PatientBirthDate = "19700132"
        ds.save_as(path, enforce_file_format=True)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        volume = read_series(tmp_path / "ct")
        out = write_seg(asymmetric_mask(volume.shape), volume, tmp_path / "seg.dcm", warnings=[])
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert "copy Patient-related attributes" in text and UID_MARK in text  # highdicom did log
    import pydicom

    seg = pydicom.dcmread(out)
    for uid in [*(ds.SOPInstanceUID for ds in series.datasets), series.series_uid, series.study_uid,
                series.for_uid, seg.SOPInstanceUID, seg.SeriesInstanceUID]:
        assert uid not in text
    assert "19700132" not in text and "Synthetic" not in text


def test_a_fresh_process_redacts_from_import_on_messages_and_tracebacks() -> None:
    """What the API and the workers get by importing msam_service: handlers configured later
    (uvicorn's, Celery's) and exception text are covered too."""
    code = (
        "import logging, sys, warnings\n"
        "import msam_service\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(name)s %(message)s')\n"
        "uid = '1.2.826.0.1.3680043.8.498.1234567890'\n"
        "logging.getLogger('highdicom.base').info('copy from dataset \"%s\"', uid)\n"
        "try:\n"
        "    raise ValueError(f'no such instance {uid}')\n"
        "except ValueError:\n"
        "    logging.getLogger('celery').exception('task failed for %s', uid)\n"
        "warnings.warn(\"Invalid value for VR DA: '19700132'.\")\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    text = out.stdout + out.stderr
    assert "1.2.826.0.1.3680043" not in text and "19700132" not in text, text
    assert text.count(UID_MARK) == 3 and "ValueError: no such instance [uid]" in text, text
    assert "Invalid value for VR DA: [value]" in text, text


def test_the_filter_is_the_same_rule_for_a_deployment_s_own_logging() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "instance %s", ("1.2.840.113619.2.55.3.604688",), None)
    record._msam_redacted = False
    assert RedactIdentifiers().filter(record) is True
    assert record.getMessage() == f"instance {UID_MARK}"
