"""The DICOM listener's receiving and routing logic, driven without a network (fake C-STORE
events, a fake clock, a dict for Redis)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest

from msam_service.pacs import received
from msam_service.pacs.dimse_listener import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Listener
from msam_service.pacs.settings import PacsSettings
from msam_service.settings import Settings
from msam_service.storage import LocalStorage
from tests.unit.io.dicom_synth import make_ct_series


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def set(self, key: str, value: Any, ex: int | None = None, nx: bool = False) -> bool:
        self.data[key] = value.encode() if isinstance(value, str) else value
        return True

    def get(self, key: str) -> Any:
        return self.data.get(key)


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def event(path: Path, calling_ae: str = "ORTHANC", **overrides: str) -> SimpleNamespace:
    ds = pydicom.dcmread(path)
    for k, v in overrides.items():
        setattr(ds, k, v)
    raw = path.read_bytes()
    return SimpleNamespace(assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=calling_ae)),
                           dataset=ds, encoded_dataset=lambda: raw)


@pytest.fixture
def listener(tmp_path: Path) -> tuple[Listener, FakeRedis, Clock]:
    pacs = PacsSettings(dicom_idle_timeout_s=5, dicom_max_instances=20, dicom_routes=[
        {"name": "ct", "modality": "CT", "series_description": "^keep", "tenant": "t1"},
        {"name": "rest", "action": "ignore"}])
    r, clock = FakeRedis(), Clock()
    return Listener(Settings(storage_dir=tmp_path / "storage"), pacs, LocalStorage(tmp_path / "storage"), r,
                    clock=clock), r, clock


def test_series_complete_after_idle_timeout_and_routed(listener, tmp_path: Path) -> None:  # noqa: ANN001
    lst, r, clock = listener
    keep = make_ct_series(tmp_path / "a", shape=(12, 10, 6), series_description="keep me")
    drop = make_ct_series(tmp_path / "b", shape=(12, 10, 6), series_description="localizer")
    for p in keep.paths[:3] + drop.paths:
        assert lst.on_store(event(p)) == SUCCESS
    clock.t += 4
    assert lst.sweep() == 0  # not idle long enough: more may come
    for p in keep.paths[3:]:
        assert lst.on_store(event(p)) == SUCCESS
    clock.t += 2
    assert lst.sweep() == 1  # the dropped series was idle for 6 s; the kept one for 2 s
    assert received.load(r, drop.series_uid) is None
    clock.t += 5
    assert lst.sweep() == 1
    rec = received.load(r, keep.series_uid)
    assert rec is not None and rec.status == received.READY and rec.instances == 6 and rec.tenant == "t1"
    assert r.get(f"msam:volume:{rec.volume_id}") == b"t1"
    assert (tmp_path / "storage" / "volumes" / rec.volume_id / "meta.json").is_file()
    assert not any((tmp_path / "storage" / "staging").iterdir())  # spool folders removed


def test_bad_instances_are_refused_and_limits_hold(listener, tmp_path: Path) -> None:  # noqa: ANN001
    lst, r, clock = listener
    s = make_ct_series(tmp_path / "a", shape=(8, 8, 4), series_description="keep")
    with pytest.warns(UserWarning):  # pydicom warns about the invalid UID too
        assert lst.on_store(event(s.paths[0], SeriesInstanceUID="../../etc")) == CANNOT_UNDERSTAND
    assert lst.on_store(event(s.paths[0], StudyInstanceUID="")) == CANNOT_UNDERSTAND
    big = make_ct_series(tmp_path / "big", shape=(8, 8, 21), series_description="keep")
    statuses = [lst.on_store(event(p)) for p in big.paths]
    assert statuses[:20] == [SUCCESS] * 20 and statuses[20] == OUT_OF_RESOURCES
    clock.t += 10
    lst.sweep()
    assert received.load(r, big.series_uid) is None  # an overflowing series is dropped whole


def test_unreadable_series_is_recorded_with_the_reason(listener, tmp_path: Path) -> None:  # noqa: ANN001
    lst, r, clock = listener
    s = make_ct_series(tmp_path / "gap", shape=(8, 8, 6), series_description="keep", drop_slices=(2,))
    for p in s.paths:
        lst.on_store(event(p))
    clock.t += 10
    lst.sweep()
    rec = received.load(r, s.series_uid)
    assert rec is not None and rec.status == received.INVALID and "slice" in rec.error
