"""Which SOP Classes hold nothing a model reads (they never re-open a study with results)."""

from __future__ import annotations

import pytest

from acwi_node.dicom_classes import is_single_frame_class, reads_nothing

S = "1.2.840.10008.5.1.4.1.1."


@pytest.mark.parametrize(
    ("sop_class", "expected"),
    [
        (S + "88.59", True),  # Key Object Selection
        (S + "88.22", True),  # Enhanced SR
        (S + "88.34", True),  # Comprehensive 3D SR
        (S + "11.1", True),  # Grayscale Softcopy Presentation State
        (S + "104.1", True),  # Encapsulated PDF
        (S + "9.1.1", True),  # 12-lead ECG
        (S + "66", True),  # Raw Data
        (S + "66.4", True),  # Segmentation
        (S + "481.3", True),  # RT Structure Set
        (S + "4.2", True),  # MR Spectroscopy
        (S + "78.7", True),  # Ophthalmic Axial Measurements
        (S + "481.10", True),  # RT Physician Intent
        (S + "481.12", True),  # RT Radiation Set
        (S + "131", True),  # Basic Structured Display
        (S + "90.1", True),  # Content Assessment Results
        (S + "91.1", True),  # Microscopy Bulk Simple Annotations
        (S + "201.1", True),  # Inventory
        (S + "10", True),  # Standalone Modality LUT (retired)
        (S + "11", True),  # Standalone VOI LUT (retired)
        ("1.2.840.10008.5.1.4.38.1", True),  # Hanging Protocol
        (" " + S + "88.59 ", True),  # padded as it may come from a header
        (S + "1.1", False),  # Digital X-Ray Image
        (S + "2", False),  # CT Image
        (S + "2.1", False),  # Enhanced CT Image
        (S + "4", False),  # MR Image
        (S + "7", False),  # Secondary Capture Image
        (S + "481.1", False),  # RT Image
        (S + "481.2", False),  # RT Dose (a grid of values)
        (S + "660", False),  # not 66 and its children
        (S + "6.1", False),  # Ultrasound Image
        (S + "6", False),  # Ultrasound Image (retired)
        (S + "3", False),  # Ultrasound Multi-frame Image (retired)
        (S + "5", False),  # Nuclear Medicine Image (retired)
        (S + "30", False),  # Parametric Map
        (S + "13.1.3", False),  # Breast Tomosynthesis Image
        (S + "110", False),  # not 11 and its children
        ("", False),
    ],
)
def test_reads_nothing(sop_class: str, expected: bool) -> None:
    assert reads_nothing(sop_class) is expected


@pytest.mark.parametrize(
    ("sop_class", "expected"),
    [
        (S + "1", True),  # Computed Radiography Image
        (S + "1.1", True),  # Digital X-Ray Image, For Presentation
        (S + "1.1.1", True),  # Digital X-Ray Image, For Processing
        (S + "1.2", True),  # Digital Mammography, For Presentation
        (S + "1.2.1", True),  # Digital Mammography, For Processing
        (S + "2", True),  # CT Image
        (S + "4", True),  # MR Image
        (S + "6.1", True),  # Ultrasound Image
        (S + "7", True),  # Secondary Capture Image
        (S + "128", True),  # PET Image
        (S + "77.1.5.7", True),  # Ophthalmic OCT En Face Image
        (S + "77.1.7", True),  # Dermoscopic Photography Image
        (S + "81.1", True),  # Ophthalmic Thickness Map
        (S + "82.1", True),  # Corneal Topography Map
        (S + "1.1\x00", True),  # padded as it may come from a header
        (S + "2.1", False),  # Enhanced CT Image
        (S + "4.1", False),  # Enhanced MR Image
        (S + "7.3", False),  # Multi-frame Grayscale Word Secondary Capture
        (S + "3.1", False),  # Ultrasound Multi-frame Image
        (S + "12.1", False),  # X-Ray Angiographic Image (a multi-frame IOD)
        (S + "13.1.3", False),  # Breast Tomosynthesis
        (S + "20", False),  # Nuclear Medicine Image (multi-frame)
        (S + "481.1", False),  # RT Image (has the Multi-frame Module)
        (S + "10", False),  # not 1 and its children
        ("", False),
    ],
)
def test_is_single_frame_class(sop_class: str, expected: bool) -> None:
    """The image classes whose IOD has no Multi-frame Module (PS3.3 Annex A)."""
    assert is_single_frame_class(sop_class) is expected


def test_every_class_whose_iod_has_no_image_reads_nothing() -> None:
    """Every storage class of highdicom's copy of PS3.3's tables whose IOD has no Image Pixel
    Module reads nothing (it never re-opens a study), and every class whose IOD has one is
    read."""
    from highdicom._standard_utils import get_iod_module_map, get_sop_class_iod_map

    modules = get_iod_module_map()
    for sop_class, iod in get_sop_class_iod_map().items():
        image = any(module["key"].endswith("image-pixel") for module in modules[iod])
        if sop_class.startswith(S + "66"):  # segmentations: images no model reads
            assert reads_nothing(sop_class), sop_class
            continue
        assert reads_nothing(sop_class) is not image, sop_class


def test_single_frame_classes_are_the_image_classes_without_a_multi_frame_module() -> None:
    """Every image class of highdicom's copy of PS3.3's tables whose IOD has no Number of
    Frames (no Multi-frame Module, no Multi-frame Functional Groups) is a single-frame class,
    and no other class of those tables is."""
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_sop_class_iod_map,
        is_attribute_in_iod,
    )

    modules = get_iod_module_map()
    for sop_class, iod in get_sop_class_iod_map().items():
        if not any(module["key"].endswith("image-pixel") for module in modules[iod]):
            continue  # no image
        single = not is_attribute_in_iod("NumberOfFrames", sop_class)
        assert is_single_frame_class(sop_class) is single, sop_class
