"""Which instances of a routed study the route's model reads (``[routes.select]``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from acwi_node.config import Route, RouteMatch, RouteSelect
from acwi_node.routing.selection import select_instances

CT = "1.2.840.10008.5.1.4.1.1.2"
PET = "1.2.840.10008.5.1.4.1.1.128"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

# Some values are written as scanners that do not conform write them (lower case, padded); the
# warning pydicom gives for them is expected.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


def instance(
    uid: str,
    modality: str = "CT",
    sop_class: str = CT,
    image_type: list[str] | str | None = None,
    series_description: str | None = None,
) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    ds.Modality = modality
    ds.SOPClassUID = sop_class
    if image_type is not None:
        ds.ImageType = image_type
    if series_description is not None:
        ds.SeriesDescription = series_description
    return ds


def uids(datasets: list[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


def test_a_study_without_a_route_or_with_an_empty_one_is_read_whole() -> None:
    study = [instance("1"), instance("2", "PT", PET), instance("3", "SR", "1.2.3")]
    assert uids(select_instances(None, study).datasets) == ["1", "2", "3"]
    picked = select_instances(Route(name="all"), study)
    assert uids(picked.datasets) == ["1", "2", "3"] and picked.left_out == {}


def test_the_routes_modality_selects_the_instances_too() -> None:
    """A CT route matches a PET/CT study; its model reads the CT slices, not the PET images."""
    study = [instance("1"), instance("2", "PT", PET), instance("3", " ct ")]
    picked = select_instances(Route(name="ct", match=RouteMatch(modality=["CT"])), study)
    assert uids(picked.datasets) == ["1", "3"]
    assert picked.left_out == {"2": "not selected by route 'ct': Modality PT"}


def test_an_empty_select_list_reads_every_modality_of_a_matching_study() -> None:
    study = [instance("1"), instance("2", "PT", PET)]
    route = Route(name="ct", match=RouteMatch(modality=["CT"]), select=RouteSelect(modality=[]))
    assert uids(select_instances(route, study).datasets) == ["1", "2"]


def test_select_narrows_what_match_takes() -> None:
    """The study matches on either modality; the model reads one of them."""
    study = [instance("1"), instance("2", "PT", PET)]
    route = Route(
        name="pet", match=RouteMatch(modality=["CT", "PT"]), select=RouteSelect(modality=["PT"])
    )
    picked = select_instances(route, study)
    assert uids(picked.datasets) == ["2"]
    assert picked.left_out == {"1": "not selected by route 'pet': Modality CT"}


def test_sop_class_is_inherited_and_compared_exactly() -> None:
    """A radiograph sent both for presentation and for processing: read once."""
    study = [
        instance("1", "DX", DX_PRESENTATION),
        instance("2", "DX", DX_PROCESSING),
        instance("3", "DX", f" {DX_PRESENTATION} "),
    ]
    route = Route(name="dx", match=RouteMatch(sop_class_uid=[DX_PRESENTATION]))
    picked = select_instances(route, study)
    assert uids(picked.datasets) == ["1", "3"]
    assert picked.left_out == {"2": f"not selected by route 'dx': SOP Class {DX_PROCESSING}"}


def test_image_type_values_leave_reformats_and_projections_out() -> None:
    study = [
        instance("1.1", image_type=["ORIGINAL", "PRIMARY", "AXIAL"]),
        instance("1.2", image_type=["DERIVED", "SECONDARY", "reformatted", "MPR"]),
        instance("1.3", image_type="DERIVED\\SECONDARY\\MIP"),
        instance("1.4"),
    ]
    route = Route(name="ct", select=RouteSelect(image_type_exclude=["REFORMATTED", " mip "]))
    picked = select_instances(route, study)
    assert uids(picked.datasets) == ["1.1", "1.4"]
    assert picked.left_out == {
        "1.2": "not selected by route 'ct': Image Type DERIVED\\SECONDARY\\REFORMATTED\\MPR",
        "1.3": "not selected by route 'ct': Image Type DERIVED\\SECONDARY\\MIP",
    }


def test_series_description_patterns_are_searched_without_case() -> None:
    study = [
        instance("1", series_description="Thorax 1.0 B70f AXIAL"),
        instance("2", series_description="Dose Report"),
        instance("3"),
        instance("4", series_description="LUNG AXIAL 1.25mm"),
    ]
    route = Route(name="ct", select=RouteSelect(series_description=["axial", r"^lung\b"]))
    picked = select_instances(route, study)
    assert uids(picked.datasets) == ["1", "4"]
    # The description itself may name the patient's condition: the reason does not repeat it.
    assert picked.left_out == {
        "2": "not selected by route 'ct': Series Description not among the route's",
        "3": "not selected by route 'ct': Series Description not among the route's",
    }


def test_every_condition_must_hold() -> None:
    route = Route(
        name="ct",
        match=RouteMatch(modality=["CT"]),
        select=RouteSelect(image_type_exclude=["SECONDARY"], series_description=["axial"]),
    )
    study = [
        instance("2.1", image_type=["ORIGINAL", "PRIMARY", "AXIAL"], series_description="axial"),
        instance("2.2", "PT", PET, series_description="axial"),
        instance("2.3", image_type=["DERIVED", "SECONDARY"], series_description="axial"),
        instance("2.4", image_type=["ORIGINAL", "PRIMARY"], series_description="coronal"),
    ]
    picked = select_instances(route, study)
    assert uids(picked.datasets) == ["2.1"]
    assert sorted(picked.left_out) == ["2.2", "2.3", "2.4"]


def test_an_instance_without_a_uid_is_still_accounted_for() -> None:
    ds = instance("3", "PT", PET)
    del ds.SOPInstanceUID
    picked = select_instances(Route(name="ct", match=RouteMatch(modality=["CT"])), [ds])
    assert picked.datasets == [] and list(picked.left_out) == ["#0"]


def test_a_pattern_that_is_no_regular_expression_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="is not a regular expression"):
        RouteSelect(series_description=["axial(1"])
