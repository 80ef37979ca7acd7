"""The series rules of an order (msam_service.pacs.orders.choose) and the per-tenant node lookup,
on plain data (the QIDO-RS side runs against Orthanc in tests/integration/pacs/inner_ris.py)."""

from __future__ import annotations

import json

import pytest

from msam_service.pacs import nodes
from msam_service.pacs.orders import Candidate, OrderProblem, choose
from msam_service.pacs.settings import PacsSettings, SeriesRules


def c(uid: str, modality: str = "CT", description: str = "", instances: int = 100,
      thickness: float | None = 1.0) -> Candidate:
    return Candidate(series_uid=uid, modality=modality, description=description, instances=instances,
                     slice_thickness=thickness)


def test_filters_then_thinnest_then_most_images() -> None:
    rules = SeriesRules(modality=["CT"], exclude_description="scout|localizer", min_instances=10)
    found = [c("1", description="Scout", thickness=0.5), c("2", modality="SR"), c("3", instances=5, thickness=0.6),
             c("4", thickness=2.5, instances=300), c("5", thickness=1.0, instances=120), c("6", thickness=1.005, instances=200)]
    assert choose(found, rules).series_uid == "6"  # 1.0 and 1.005 are equal (0.01 mm); 6 has more images
    why = {x.series_uid: x.excluded for x in found}
    assert why["1"].startswith("series description matches") and why["2"].startswith("modality SR")
    assert why["3"].startswith("5 image(s)") and why["4"] == "thicker slices than 1 mm"
    assert why["5"] == "fewer images than 200" and why["6"] == ""


def test_unknown_thickness_loses_to_a_known_one_and_order_of_preferences_counts() -> None:
    assert choose([c("1", thickness=None, instances=500), c("2", thickness=3.0)], SeriesRules()).series_uid == "2"
    most_first = SeriesRules(prefer=["most_images", "thinnest"])
    assert choose([c("1", thickness=None, instances=500), c("2", thickness=3.0)], most_first).series_uid == "1"


def test_ties_and_nothing_left_are_refused_with_the_candidates() -> None:
    with pytest.raises(OrderProblem) as tie:
        choose([c("1"), c("2"), c("3", thickness=5.0)], SeriesRules())
    assert tie.value.status == 422 and tie.value.code == "ambiguous_series"
    assert [x["series_uid"] for x in tie.value.candidates] == ["1", "2", "3"]
    assert [x["excluded"] for x in tie.value.candidates] == ["", "", "thicker slices than 1 mm"]
    with pytest.raises(OrderProblem) as none:
        choose([c("1", modality="SEG")], SeriesRules(description="^body"))
    assert none.value.code == "no_matching_series" and none.value.candidates[0]["excluded"].startswith("modality SEG")


def test_nodes_of_other_tenants_look_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSAM_DICOMWEB_NODES", json.dumps({"a_pacs": "http://a/dw", "b_pacs": "http://b/dw",
                                                          "shared": "http://s/dw"}))
    monkeypatch.setenv("MSAM_DICOM_AES", json.dumps({"a_ae": {"ae_title": "A", "host": "h", "port": 104}}))
    monkeypatch.setenv("MSAM_PACS_NODE_OPTIONS", json.dumps({
        "a_pacs": {"tenants": ["a"]}, "b_pacs": {"tenants": ["b"]}, "a_ae": {"tenants": ["a"], "retrieve": "c-move"}}))
    s = PacsSettings()
    s.check()
    assert nodes.source_node(s, "a_pacs", "a").name == "a_pacs"
    ae = nodes.source_node(s, "a_ae", "a")
    assert isinstance(ae, nodes.DimseNode) and ae.retrieve == "c-move" and ae.move_destination == "MSAM"
    with pytest.raises(nodes.UnknownNode) as other:
        nodes.source_node(s, "a_pacs", "b")
    with pytest.raises(nodes.UnknownNode) as absent:
        nodes.source_node(s, "zzz", "b")
    assert str(other.value).replace("a_pacs", "X") == str(absent.value).replace("zzz", "X")
    assert "configured: b_pacs, shared" in str(other.value)
    with pytest.raises(nodes.UnknownNode):
        nodes.check_destinations(s, ["a_ae"], "b")
    assert nodes.check_destinations(s, ["shared", "a_ae"], "a") == ["shared", "a_ae"]
    with pytest.raises(nodes.InvalidNodeName):
        nodes.source_node(s, "http://evil/", "a")


@pytest.mark.parametrize("options, message", [
    ({"nowhere": {}}, "neither a DICOMweb node nor an AE"),
    ({"pacs": {"retrieve": "c-get"}}, "retrieves by wado-rs"),
    ({"pacs": {"series": {"description": "("}}}, "not a valid regular expression"),
])
def test_bad_node_options_are_refused(monkeypatch: pytest.MonkeyPatch, options: dict, message: str) -> None:
    monkeypatch.setenv("MSAM_DICOMWEB_NODES", json.dumps({"pacs": "http://p/dw"}))
    monkeypatch.setenv("MSAM_PACS_NODE_OPTIONS", json.dumps(options))
    with pytest.raises(ValueError, match=message):
        PacsSettings().check()
