"""DICOM input and output: a CT series and an RTSTRUCT in (pydicom, rt-utils), an RT Dose out (pydicom)."""

from __future__ import annotations

import datetime
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTIonPlanStorage,
    RTPlanStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds
from rt_utils.image_helper import create_series_mask_from_contour_sequence

logger = logging.getLogger(__name__)

SPACING_RTOL = 0.01
"""Slices count as evenly spaced when every gap is within 1% of the median gap."""
_UINT32_MAX = 2**32 - 1


def read_dicom(path: str | os.PathLike, **kwargs) -> Dataset:
    """``pydicom.dcmread`` with a ``ValueError`` naming ``path`` when the file is not readable DICOM."""
    try:
        return pydicom.dcmread(path, **kwargs)
    except Exception as err:  # pydicom raises many types on corrupt input
        raise ValueError(f"{path}: unreadable DICOM file ({type(err).__name__}: {err})") from err


@dataclass
class CTSeries:
    """A CT series sorted along the slice normal, with its volume in Hounsfield units.

    ``hu`` is ``(rows, columns, slices)``, slice ``k`` being ``slices[k]`` (its header, without pixel data).
    ``affine`` maps ``(row, column, slice)`` indices to DICOM patient coordinates (LPS, mm).
    """

    folder: Path
    slices: list[Dataset]
    hu: np.ndarray
    affine: np.ndarray

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.slices[0].FrameOfReferenceUID)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(row, column, slice) spacing in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def _geometry(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Image position, orientation and the grid description of one CT slice."""
    try:
        position = np.array(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        grid = (
            int(ds.Rows),
            int(ds.Columns),
            tuple(float(s) for s in ds.PixelSpacing),
            str(ds.FrameOfReferenceUID),
        )
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: CT slice without a usable image plane ({err})") from err
    return position, orientation, grid


def read_ct_series(folder: str | os.PathLike, series_uid: str | None = None) -> CTSeries:
    """Read and check the CT series in ``folder`` (searched recursively; hidden and non-CT files are skipped).

    Args:
        folder: folder holding the CT slices.
        series_uid: the series to read when the folder holds several (e.g. the RTSTRUCT's referenced series).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: unreadable files, no or several CT series, inconsistent image planes, missing, duplicate
            or unevenly spaced slices, non-square pixels or images (rt-utils rasterises those wrongly).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such CT folder")
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = read_dicom(path)
        if ds.get("Modality") == "CT" and "PixelData" in ds:
            series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not series:
        raise ValueError(f"{folder}: no CT images")
    if series_uid in series:
        files = series[series_uid]
    elif len(series) == 1:
        (files,) = series.values()
    else:
        raise ValueError(f"{folder}: {len(series)} CT series ({', '.join(series)}); keep one per folder")
    if len(files) < 2:
        raise ValueError(f"{folder}: a CT series needs at least 2 slices, found {len(files)}")

    geometry = [_geometry(ds, path) for path, ds in files]
    orientation, grid = geometry[0][1], geometry[0][2]
    for (path, _), (_, o, g) in zip(files, geometry, strict=True):
        if not np.allclose(o, orientation, atol=1e-4) or g != grid:
            raise ValueError(f"{path}: image plane (orientation, size, pixel spacing or frame of reference) differs")
    rows, columns, (row_spacing, column_spacing), _ = grid
    if rows != columns or not np.isclose(row_spacing, column_spacing):
        raise ValueError(
            f"{folder}: non-square CT images ({rows}x{columns} pixels of {row_spacing}x{column_spacing} mm) "
            "are not supported"
        )
    row_dir, column_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, column_dir)
    positions = np.array([g[0] @ normal for g in geometry])
    order = np.argsort(positions)
    files, positions = [files[i] for i in order], positions[order]
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 0:
        raise ValueError(f"{folder}: most slices share their position (duplicate slices)")
    for k, gap in enumerate(gaps):
        if abs(gap - step) > SPACING_RTOL * step:
            problem = "missing slice(s)" if gap > 1.5 * step else "duplicate or unevenly spaced slices"
            raise ValueError(
                f"{folder}: {problem} between {files[k][0].name} and {files[k + 1][0].name} "
                f"({gap:.3f} mm apart, the series' slice spacing is {step:.3f} mm)"
            )

    affine = plane_stack_affine(orientation, row_spacing, column_spacing, step, geometry[order[0]][0])
    hu = np.empty((rows, columns, len(files)), dtype=np.float32)
    for k, (path, ds) in enumerate(files):
        try:
            hu[..., k] = apply_modality_lut(pixel_array(ds), ds)
        except Exception as err:  # decoders raise many types
            raise ValueError(f"{path}: cannot decode the pixel data ({type(err).__name__}: {err})") from err
        del ds.PixelData  # held in `hu` now
    return CTSeries(folder=folder, slices=[ds for _, ds in files], hu=hu, affine=affine)


def referenced_series_uid(rtstruct: Dataset) -> str | None:
    """The image series an RTSTRUCT was contoured on, when it says so."""
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                return str(series.SeriesInstanceUID)
    return None


def read_rtstruct(path: str | os.PathLike) -> Dataset:
    """Read an RTSTRUCT file; ``FileNotFoundError`` when absent, ``ValueError`` when not a structure set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such RTSTRUCT file")
    ds = read_dicom(path)
    if ds.get("Modality") != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise ValueError(f"{path}: not an RTSTRUCT (modality {ds.get('Modality')})")
    return ds


class StructureSet:
    """The ROIs of an RTSTRUCT rasterised on the CT grid with rt-utils.

    rt-utils fills each contour polygon with its vertices rounded to pixel centres, edge pixels included, and
    puts a contour on the slice that its ContourImageSequence references.
    """

    def __init__(
        self, ds: Dataset, path: str | os.PathLike, ct: CTSeries, allow_patient_mismatch: bool = False
    ) -> None:
        """``ValueError`` when the RTSTRUCT's PatientID is not the CT's, unless ``allow_patient_mismatch`` (then a
        warning)."""
        self.path = Path(path)
        self.ct = ct
        if problem := ct_mismatch(ds, self.path, ct, ("PatientID",)):
            if not allow_patient_mismatch:
                raise ValueError(f"{problem}: another patient's structures (--allow-patient-mismatch accepts them)")
            logger.warning("%s: accepted (allow_patient_mismatch)", problem)
        self.rois = {int(roi.ROINumber): roi for roi in ds.StructureSetROISequence}
        self.contours = {
            int(c.ReferencedROINumber): c.get("ContourSequence", []) for c in ds.get("ROIContourSequence", [])
        }

    @property
    def names(self) -> list[str]:
        """ROI names in the file's order."""
        return [str(roi.ROIName) for roi in self.rois.values()]

    def mask(self, name: str) -> np.ndarray:
        """Boolean ``(rows, columns, slices)`` mask of ROI ``name`` (all false when it has no contour).

        Raises:
            ValueError: the ROI lies in another frame of reference than the CT, or has contours without
                ContourImageSequence or on images outside the CT series.
        """
        number = next(n for n, roi in self.rois.items() if roi.ROIName == name)
        frame = self.rois[number].get("ReferencedFrameOfReferenceUID")
        if frame != self.ct.frame_of_reference_uid:
            raise ValueError(
                f"{self.path}: ROI '{name}' is in frame of reference {frame}, the CT series in "
                f"{self.ct.frame_of_reference_uid}"
            )
        slice_uids = {str(ds.SOPInstanceUID) for ds in self.ct.slices}
        for contour in self.contours.get(number, []):
            images = contour.get("ContourImageSequence", [])
            if not images or any(str(im.ReferencedSOPInstanceUID) not in slice_uids for im in images):
                raise ValueError(
                    f"{self.path}: ROI '{name}' has contours without ContourImageSequence or on images "
                    f"outside the CT series of {self.ct.folder}"
                )
        return create_series_mask_from_contour_sequence(self.ct.slices, self.contours.get(number, []))


def plane_stack_affine(
    orientation: np.ndarray, row_spacing: float, column_spacing: float, step: float, origin: np.ndarray
) -> np.ndarray:
    """Voxel ``(row, column, frame)`` to patient (LPS, mm) affine of a stack of DICOM image planes with
    ImageOrientationPatient ``orientation``, PixelSpacing ``(row_spacing, column_spacing)``, ``step`` mm between
    planes along their normal and ImagePositionPatient ``origin`` of the first."""
    row_dir, column_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    affine = np.eye(4)
    affine[:3, 0] = column_dir * row_spacing  # down the rows
    affine[:3, 1] = row_dir * column_spacing  # along a row
    affine[:3, 2] = np.cross(row_dir, column_dir) * step
    affine[:3, 3] = origin
    return affine


def read_rtdose(path: str | os.PathLike, ct: CTSeries) -> tuple[np.ndarray, np.ndarray]:
    """The dose (Gy: pixel values times DoseGridScaling, ``(rows, columns, frames)``) of an RTDOSE file and its
    voxel-to-patient affine, checked to be of the CT's patient and frame of reference.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an RTDOSE in Gy, another PatientID or frame of reference than the CT's, or no usable
            dose grid, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such RTDOSE file")
    ds = read_dicom(path)
    if ds.get("Modality") != "RTDOSE" or "PixelData" not in ds:
        raise ValueError(f"{path}: not an RTDOSE with pixel data (modality {ds.get('Modality')})")
    if problem := ct_mismatch(ds, path, ct, ("FrameOfReferenceUID", "PatientID")):
        raise ValueError(f"{problem}: another patient's or another setup's dose")
    if ds.get("DoseUnits") != "GY":
        raise ValueError(f"{path}: dose units {ds.get('DoseUnits')!r}, not GY")
    try:
        row_spacing, column_spacing = (float(s) for s in ds.PixelSpacing)
        frames = int(ds.get("NumberOfFrames", 1))
        offsets = np.array(ds.GridFrameOffsetVector if frames > 1 else [0.0], dtype=np.float64)
        dose = pixel_array(ds).reshape(frames, int(ds.Rows), int(ds.Columns)).transpose(1, 2, 0)
        dose = dose * float(ds.DoseGridScaling)
        orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        origin = np.array(ds.ImagePositionPatient, dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: RTDOSE without a usable dose grid ({type(err).__name__}: {err})") from err
    offsets -= offsets[0]  # relative to the first frame, whether stored relative or as absolute positions
    step = float(np.median(np.diff(offsets))) if frames > 1 else 1.0
    if frames > 1 and (step == 0 or np.abs(np.diff(offsets) - step).max() > 0.01 * abs(step)):
        raise ValueError(f"{path}: unevenly spaced dose frames (GridFrameOffsetVector {offsets.tolist()})")
    return dose.astype(np.float32), plane_stack_affine(orientation, row_spacing, column_spacing, step, origin)


def read_rtplan(path: str | os.PathLike, ct: CTSeries) -> Dataset:
    """Read the RT Plan (or RT Ion Plan) a predicted dose is to be linked to, and check that it is of the CT's
    patient and frame of reference; ``FileNotFoundError`` when absent, ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such RT Plan file")
    ds = read_dicom(path, stop_before_pixels=True)
    if ds.get("SOPClassUID") not in (RTPlanStorage, RTIonPlanStorage):
        raise ValueError(f"{path}: not an RT Plan (SOP class {ds.get('SOPClassUID', 'missing')})")
    if problem := ct_mismatch(ds, path, ct, ("PatientID", "FrameOfReferenceUID")):
        raise ValueError(f"{problem}: another patient's or another setup's plan")
    return ds


def ct_mismatch(ds: Dataset, path: Path, ct: CTSeries, keywords: tuple[str, ...]) -> str | None:
    """``"<path>: <keyword> <value> is not the CT's (<value>)"`` for the first attribute of ``keywords`` that
    differs from the CT's, else ``None``."""
    reference = ct.slices[0]
    for keyword in keywords:
        if ds.get(keyword) != reference.get(keyword):
            return f"{path}: {keyword} {ds.get(keyword)!r} is not the CT's ({reference.get(keyword)!r})"
    return None


def _reference(image: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.SOPClassUID
    item.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return item


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def write_rtdose(
    dose: np.ndarray, ct: CTSeries, path: str | os.PathLike, description: str, plan: Dataset | None = None
) -> Path:
    """Write ``dose`` (Gy, on the CT grid, ``(rows, columns, slices)``) as an RT Dose file.

    The dose grid is the CT's: one frame per CT slice, ImagePositionPatient of the first slice and a
    GridFrameOffsetVector relative to it starting at 0. Pixels are uint32 times DoseGridScaling, which is
    formatted as a decimal string before the pixels are computed from it. Patient, study and frame of
    reference are the CT's; the CT slices are referenced from ReferencedImageSequence. DoseSummationType is
    ``PLAN``; ReferencedRTPlanSequence references ``plan`` (see :func:`read_rtplan`) when given, and is absent
    otherwise (a prediction has no plan of its own: planning systems then ask for one to be connected on import).
    """
    reference = ct.slices[0]
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTDoseStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = reference.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImageOrientationPatient",
        "PixelSpacing",
    ):
        setattr(ds, keyword, reference.get(keyword, ""))
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Manufacturer = "monai_dose"
    ds.ReferencedImageSequence = Sequence([_reference(image) for image in ct.slices])
    if plan is not None:
        ds.ReferencedRTPlanSequence = Sequence([_reference(plan)])

    positions = np.asarray([s.ImagePositionPatient for s in ct.slices], dtype=np.float64)
    offsets = (positions - positions[0]) @ (ct.affine[:3, 2] / ct.spacing[2])
    ds.ImagePositionPatient = list(reference.ImagePositionPatient)
    ds.SliceThickness = _ds(ct.spacing[2])
    ds.GridFrameOffsetVector = [_ds(o) for o in offsets]
    ds.NumberOfFrames = dose.shape[2]
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.Rows, ds.Columns = dose.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseComment = "Predicted dose; research use only"

    peak = float(np.max(dose))
    if not np.isfinite(peak):
        raise ValueError("the dose holds NaN or infinite values")
    ds.DoseGridScaling = scaling = _ds(peak / _UINT32_MAX) if peak > 0 else "1"
    ds.PixelData = b"".join(  # frame by frame: no float64 copy of the whole grid
        np.clip(np.rint(dose[..., k].astype(np.float64) / float(scaling)), 0, _UINT32_MAX).astype("<u4").tobytes()
        for k in range(dose.shape[2])
    )
    ds["PixelData"].VR = "OW"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path
