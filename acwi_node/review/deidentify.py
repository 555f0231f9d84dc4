"""De-identifying an image before it leaves the node as training data.

DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, with the Retain
Patient Characteristics Option (optional). The profile's table of attributes and actions
(Table E.1-1, edition 2026c) comes from the ``dicom-anonymizer`` package's copy of it; the
actions are the node's:

* **X** removed; **Z** emptied (a sequence: no items); **K** kept.
* **D** a dummy value of the attribute's VR (``ANONYMIZED``, ``19000101``, ...); a sequence
  keeps its items, each de-identified in turn.
* **U** a new UID: ``2.25.`` and a keyed hash (HMAC-SHA256) of the original, so the same
  original always gets the same replacement, in this export and the next, and the references
  between images (study, series, frame of reference, source images) still hold.
* Where the table allows several actions, the one that keeps the object valid whatever its
  IOD: **X/Z** empties, **X/D**, **Z/D** and **X/Z/D** put a dummy, **X/Z/U*** replaces UIDs.
* Patient's Name and Patient ID become one pseudonym, a keyed hash of the issuer and the ID:
  images of one patient stay together (a training split by patient), and without the key
  nobody can tell whom a pseudonym stands for.
* Every private attribute, every curve (50xx) and overlay (60xx) group, and every Person Name
  the table does not list are removed or emptied as well.
* Patient Identity Removed (0012,0062) ``YES``, De-identification Method (0012,0063) and its
  code sequence (0012,0064: DCM 113100, 113108 with the Retain Patient Characteristics
  Option, 113107 with the Modified Dates Option) and Longitudinal Temporal Information
  Modified (0028,0303) ``REMOVED`` (``MODIFIED`` with the dates option) record what was done.

With the Retain Longitudinal Temporal Information with Modified Dates Option (optional,
``shift_dates``) every date (DA, and the date of a DT) but the patient's birth date is moved
back by the same whole number of days for all of a patient's images, 365 to 3,649 days, a
keyed hash of the patient (as the pseudonym), and times of day (TM, and the time of a DT) are
kept: the intervals between a patient's studies stay as they were (what a study of disease
progression or follow-up needs), while the calendar dates are gone. A date that cannot be
read as one becomes the dummy date.

With the Clean Pixel Data Option (``[[feedback.burned_in]]``, :mod:`.pixel_cleaning`) an
image of a kind the configuration names (a device that burns the patient's name into a corner)
has those regions blanked in every frame, whatever its Burned In Annotation says; it then says
``NO``, and DCM 113101 is among the method codes. Any other image whose Burned In Annotation
(0028,0301) is ``YES`` is refused (:class:`DeidentificationRefused`): its text is not found
without a signature.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import importlib
from collections.abc import Sequence as TypingSequence
from dataclasses import dataclass
from functools import cache

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from acwi_node import __version__
from acwi_node.config import BurnedInRegions
from acwi_node.review.pixel_cleaning import blank_regions, matching_signature

#: The edition of PS3.15 Table E.1-1 applied (a module of ``dicom-anonymizer``).
PROFILE_EDITION = "2026c"

#: The table's action lists, by the action the node takes.
_ACTIONS = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "Z_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
    "X_Z_U_STAR_TAGS": "U",
}

#: Kept with the Retain Patient Characteristics Option (PS3.15 E.3.6; a subset of the
#: option's list: removing more is always within the profile).
PATIENT_CHARACTERISTICS = frozenset(
    Tag(keyword) for keyword in ("PatientAge", "PatientSex", "PatientSize", "PatientWeight")
)

#: What each action puts in an attribute of a given VR (D).
_DUMMIES: dict[str, object] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
}
_NUMBERS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})


class DeidentificationRefused(ValueError):
    """An image the profile cannot make safe (burned-in annotation)."""


@dataclass(frozen=True)
class _Table:
    exact: dict[int, str]
    #: (group, element, group mask, element mask, action) for the table's ``xx`` entries.
    masked: tuple[tuple[int, int, int, int, str], ...]


@cache
def _table() -> _Table:
    module = importlib.import_module(
        f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{PROFILE_EDITION}"
    )
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in _ACTIONS.items():
        for entry in getattr(module, name):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return _Table(exact, tuple(masked))


#: The Modified Dates Option's name, as De-identification Method and its code say it.
MODIFIED_DATES_OPTION = "Retain Longitudinal Temporal Information Modified Dates Option"
#: How far back a patient's dates move: at least a year, under ten.
SHIFT_DAYS_MIN, SHIFT_DAYS_SPAN = 365, 3285


#: The Clean Pixel Data Option's name, as De-identification Method and its code say it.
CLEAN_PIXEL_DATA_OPTION = "Clean Pixel Data Option"


def method_description(
    retain_patient_characteristics: bool, shift_dates: bool = False, clean_pixels: bool = False
) -> str:
    """De-identification Method (0012,0063): what was applied, by whom (``clean_pixels``: the
    images of the configured kinds have their burned-in regions blanked)."""
    text = f"ACWI Node {__version__}: PS3.15 E.1 Basic Profile ({PROFILE_EDITION})"
    if retain_patient_characteristics:
        text += ", Retain Patient Characteristics Option"
    if shift_dates:
        text += f", {MODIFIED_DATES_OPTION} (dates shifted per patient)"
    if clean_pixels:
        text += f", {CLEAN_PIXEL_DATA_OPTION} (configured regions blanked)"
    else:
        text += "; pixel data not cleaned"
    return text + "; UIDs replaced by keyed hashes"


def method_values(
    retain_patient_characteristics: bool, shift_dates: bool = False, cleaned: bool = False
) -> list[str]:
    """De-identification Method (0012,0063), one value per part (LO: 64 characters each);
    ``cleaned``: this image's burned-in regions were blanked."""
    values = [f"ACWI Node {__version__}", f"PS3.15 E.1 Basic Profile {PROFILE_EDITION}"]
    if retain_patient_characteristics:
        values.append("Retain Patient Characteristics Option")
    if shift_dates:
        values.append(MODIFIED_DATES_OPTION)
    if cleaned:
        values.append(CLEAN_PIXEL_DATA_OPTION)
    return (
        values + ["UIDs replaced by keyed hashes"] + ([] if cleaned else ["pixel data not cleaned"])
    )


class Deidentifier:
    """Applies the profile with one key (the same key: the same UIDs and pseudonyms)."""

    def __init__(
        self,
        key: bytes,
        *,
        retain_patient_characteristics: bool = True,
        shift_dates: bool = False,
        burned_in: TypingSequence[BurnedInRegions] = (),
    ) -> None:
        if len(key) < 16:
            raise ValueError("the de-identification key must hold at least 16 bytes")
        self._key = key
        self.retain_patient_characteristics = retain_patient_characteristics
        self.shift_dates = shift_dates
        self.burned_in = tuple(burned_in)
        self._table = _table()

    # ---------------------------------------------------------------- identifiers
    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The replacement of a UID: ``2.25.`` and 128 bits of its keyed hash."""
        number = int.from_bytes(self._digest("uid", value.strip("\0 "))[:16], "big")
        return f"2.25.{number}"

    def pseudonym(self, patient_id: str, issuer: str = "") -> str:
        """A patient's pseudonym: ``ANON-`` and 80 bits of the keyed hash of issuer and ID."""
        digest = self._digest("patient", f"{issuer.strip()}\0{patient_id.strip()}")
        return "ANON-" + base64.b32encode(digest[:10]).decode("ascii")

    def date_shift(self, patient_id: str, issuer: str = "") -> dt.timedelta:
        """How far back a patient's dates move with the Modified Dates Option: the same for
        every image of the patient, 365 to 3,649 days, a keyed hash of issuer and ID."""
        digest = self._digest("date-shift", f"{issuer.strip()}\0{patient_id.strip()}")
        days = SHIFT_DAYS_MIN + int.from_bytes(digest[:8], "big") % SHIFT_DAYS_SPAN
        return dt.timedelta(days=-days)

    # ---------------------------------------------------------------- the profile
    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (its file meta included) and return it; an image of a
        kind ``burned_in`` names has its regions blanked (its pixels are read: ``ds`` must
        hold them)."""
        signature = matching_signature(ds, self.burned_in) if self.burned_in else None
        if signature is not None:
            blank_regions(ds, signature.regions)
            ds.BurnedInAnnotation = "NO"
        elif str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise DeidentificationRefused(
                "Burned In Annotation (0028,0301) is YES and no [[feedback.burned_in]] names"
                " this kind of image: the text in the pixels is not removed, so the image is"
                " not exported"
            )
        patient = str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")
        pseudonym = self.pseudonym(*patient)
        shift = self.date_shift(*patient) if self.shift_dates else None
        self._clean(ds, shift)
        ds.PatientName = pseudonym
        ds.PatientID = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = method_values(
            self.retain_patient_characteristics, self.shift_dates, cleaned=signature is not None
        )
        codes = [("113100", "Basic Application Confidentiality Profile")]
        if signature is not None:
            codes.append(("113101", CLEAN_PIXEL_DATA_OPTION))
        if self.shift_dates:
            codes.append(("113107", MODIFIED_DATES_OPTION))
        if self.retain_patient_characteristics:
            codes.append(("113108", "Retain Patient Characteristics Option"))
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*c) for c in codes])
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift else "REMOVED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            ds.file_meta = _clean_meta(meta, str(ds.get("SOPInstanceUID", "")))
        return ds

    def _action(self, tag: BaseTag) -> str | None:
        if self.retain_patient_characteristics and tag in PATIENT_CHARACTERISTICS:
            return "K"
        action = self._table.exact.get(int(tag))
        if action is not None:
            return action
        for group, element, group_mask, element_mask, masked_action in self._table.masked:
            if tag.group & group_mask == group and tag.element & element_mask == element:
                return masked_action
        return None

    def _clean(self, ds: Dataset, shift: dt.timedelta | None = None) -> None:
        """Apply the profile to ``ds`` and its items; with ``shift`` (the Modified Dates
        Option), every date but the birth date moves by it instead."""
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if tag.is_private or tag.element == 0 or (tag.group & 0xFF00) in (0x5000, 0x6000):
                del ds[tag]  # private, group lengths, curves and overlays
                continue
            action = self._action(tag)
            elem = ds[tag]
            vr = elem.VR
            if shift is not None and tag not in _BIRTH:
                if vr in ("DA", "DT"):
                    if not elem.is_empty:  # listed or not: every date moves alike
                        elem.value = _shifted(elem.value, elem.VM, vr, shift)
                    continue
                if vr == "TM":  # a time of day: the days moved, the hours stay
                    continue
            if action is None:
                if vr == "SQ":
                    for item in elem.value or ():
                        self._clean(item, shift)
                elif vr == "PN":
                    elem.value = ""  # a person's name the table does not list
                continue
            if action == "K":
                continue
            if action == "X":
                del ds[tag]
            elif action == "Z" or elem.is_empty:
                elem.value = [] if vr == "SQ" else _empty(vr)
            elif vr == "SQ":  # D or U: the items stay, each de-identified
                for item in elem.value or ():
                    self._clean(item, shift)
            elif vr == "UI":
                values = elem.value if elem.VM > 1 else [elem.value]
                replaced = [self.uid(str(v)) for v in values]
                elem.value = replaced if elem.VM > 1 else replaced[0]
            else:
                elem.value = _dummy(vr)


#: The patient's birth date and time: the profile's action, with the dates option too.
_BIRTH = frozenset({Tag("PatientBirthDate"), Tag("PatientBirthTime")})


def _shifted(value: object, vm: int, vr: str, shift: dt.timedelta) -> object:
    """A DA or DT value (one or several) moved by ``shift`` days; the time of a DT, its
    fraction and offset kept. A value that is not a readable date becomes the dummy."""
    values = [str(v) for v in value] if vm > 1 else [str(value)]  # type: ignore[attr-defined]
    out = []
    for text in values:
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            out.append(str(_DUMMIES[vr]))
            continue
        out.append((day + shift).strftime("%Y%m%d") + text[8:])
    return out if vm > 1 else out[0]


def _empty(vr: str) -> object:
    if vr in _NUMBERS:
        return None
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        return b""
    return ""


def _dummy(vr: str) -> object:
    if vr in _DUMMIES:
        return _DUMMIES[vr]
    if vr in _NUMBERS:
        return 0
    return _empty(vr)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _clean_meta(meta: FileMetaDataset, sop_instance_uid: str) -> FileMetaDataset:
    """The file meta of the de-identified object: its class, its (new) instance UID and its
    transfer syntax; the sender's AE titles and implementation are left out."""
    clean = FileMetaDataset()
    clean.MediaStorageSOPClassUID = meta.get("MediaStorageSOPClassUID", "")
    clean.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    if "TransferSyntaxUID" in meta:
        clean.TransferSyntaxUID = meta.TransferSyntaxUID
    return clean
