"""The result as a summary image (Secondary Capture): what a PACS that renders no SR can still show.

One RGB image per analysed study revision, in the study it describes (its own
series, Modality OT as highdicom's SC IOD writes it):

- a black band on top with the result in words (suspicious nodule(s) with their
  probability and image, or "No nodule reached the threshold", or "not located"
  when the model has no map), the threshold, the model, and
  "UNVERIFIED - demo model, not for clinical use";
- the selected slices (:attr:`Result.selected_images`, best first, up to
  :data:`MAX_TILES` side by side) at their own resolution in the lung window
  (center -600, width 1500), each finding circled in yellow at its pixel
  (radius from its diameter and the Pixel Spacing, else :data:`DEFAULT_RADIUS_MM`),
  numbered when there are several;
- a caption band under each slice naming it (its Instance Number).

A negative study shows its top key image without a marker; a positive result
without findings shows its key images without a marker. The text never covers
the lung. Header: Patient/Study modules and character set from the first
source, BurnedInAnnotation YES, ConversionType WSD, the slices in the Source
Image and Referenced Image Sequences, the result in ImageComments, the model and
the node in Contributing Equipment (as :mod:`node.results.ko` builds them). No
Pixel Spacing: the image is for reading, not for measuring.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from node.preprocessing import LUNG_WINDOW, window
from node.results.facts import DEMO_NOTICE, Finding, NodeDevice, Result, SourceImage, percent
from node.results.dicom import IHE_CODING_SCHEME, check_common, check_images, contributing_equipment, copy_study_extras

logger = logging.getLogger(__name__)

MAX_TILES = 3
DEFAULT_RADIUS_MM = 8.0  # a finding without a diameter
DEFAULT_RADIUS_PX = 15  # ... on an image without Pixel Spacing
MARKER_COLOUR = (255, 230, 0)
NOTICE_COLOUR = (255, 170, 0)
TEXT_COLOUR = (255, 255, 255)
SERIES_DESCRIPTION = "ainode AI summary"
#: Tried in turn (a path, or a name FreeType finds in the system font folders), then Pillow's own font.
FONT_FILES = {False: ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"),
              True: ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf")}
_GAP = 8  # black columns between slices
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


@dataclass(frozen=True)
class Marker:
    """A finding's circle on the canvas: centre (x = column, y = row) and radius, in canvas pixels."""

    number: int
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Tile:
    """Where one slice lies on the canvas."""

    image: SourceImage
    left: int
    top: int
    rows: int
    columns: int


@dataclass(frozen=True)
class Summary:
    """The rendered canvas (rows, columns, 3) uint8, where its slices and markers lie, and its text."""

    pixels: np.ndarray
    tiles: tuple[Tile, ...]
    markers: tuple[Marker, ...]
    lines: tuple[str, ...]


def build_summary_image(
    result: Result,
    images: Sequence[Dataset],
    *,
    device: NodeDevice,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int = 9002,
    instance_number: int = 1,
) -> Dataset:
    """The summary image of one result, ready for ``save_as(..., enforce_file_format=True)``.

    ``images`` are source datasets, with pixel data, of the result's
    :attr:`~Result.shown_images`: at least the first :data:`MAX_TILES` of its
    :attr:`Result.selected_images`; none may be another image.

    Raises
    ------
    TypeError, ValueError
        When an argument is of the wrong type or inconsistent; the message names it.
    """
    check_common(result, device, series_uid, sop_instance_uid, series_number, instance_number)
    check_images(result, images, "images", series_uid, sop_instance_uid)
    summary = render_summary(result, images)
    drawn = [ds for t in summary.tiles for ds in images if ds.SOPInstanceUID == t.image.sop_instance_uid]
    first = drawn[0]
    now = _dt.datetime.now()
    sc = hd.sc.SCImage.from_ref_dataset(
        first, summary.pixels, "RGB", 8, "PATIENT",
        series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=device.manufacturer, manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        patient_orientation=_patient_orientation(first),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(result, device, now),
        series_description=SERIES_DESCRIPTION,
        content_date=now.date(), content_time=now.time(), series_date=now.date(), series_time=now.time(),
        coding_schemes=[IHE_CODING_SCHEME],
    )
    copy_study_extras(sc, first, ("BodyPartExamined",))
    sc.InstanceCreationDate, sc.InstanceCreationTime = sc.ContentDate, sc.ContentTime
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = device.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = device.model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = device.software_version
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = f"{result.summary()}. Model {result.model.title}. UNVERIFIED."
    labels = ", ".join(t.image.label for t in summary.tiles)
    sc.DerivationDescription = (
        f"Image(s) {labels} in the lung window (center {LUNG_WINDOW[0]:g}, width {LUNG_WINDOW[1]:g}) "
        f"with the AI result of {result.model.title} burned in"
    )[:1024]
    sc.SourceImageSequence = [_reference(ds, _SOURCE_PURPOSE) for ds in drawn]
    sc.ReferencedImageSequence = [_reference(ds) for ds in drawn]
    logger.info(
        "Study %s: summary image %s built (series %s, revision %d, %d slices, %d markers)",
        result.study_uid, sop_instance_uid, series_uid, result.revision, len(summary.tiles), len(summary.markers),
    )
    return sc


def render_summary(result: Result, images: Sequence[Dataset]) -> Summary:
    """The summary canvas of ``result`` drawn from ``images`` (see the module docstring)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    shown = result.shown_images
    for i, ds in enumerate(images):
        if str(ds.SOPInstanceUID) not in {img.sop_instance_uid for img in shown}:
            raise ValueError(f'Item {i} of argument "images" ({ds.SOPInstanceUID}) is not a shown image of "result".')
        if "PixelData" not in ds:
            raise ValueError(f'Item {i} of argument "images" ({ds.SOPInstanceUID}) has no pixel data.')
    drawn = result.selected_images[:MAX_TILES]
    missing = [img.label for img in drawn if img.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f'Argument "images" lacks the image(s) {", ".join(missing)} of "result".')
    slices = [by_uid[img.sop_instance_uid] for img in drawn]
    findings = result.findings if result.positive else ()
    for f in findings:
        on = by_uid.get(f.image.sop_instance_uid)
        if on is not None and not (0 <= f.row < int(on.Rows) and 0 <= f.column < int(on.Columns)):
            raise ValueError(f'Argument "result" has finding {f.number} at ({f.row}, {f.column}), off its image.')

    size = max(14, min(28, round(int(slices[0].Columns) / 28)))
    regular, bold = _font(size, False), _font(size, True)
    width = sum(int(ds.Columns) for ds in slices) + _GAP * (len(slices) - 1)
    header = _header_lines(result, drawn)
    styled = [(line, bold if i == 0 or i == len(header) - 1 else regular,
               NOTICE_COLOUR if i == len(header) - 1 else TEXT_COLOUR) for i, line in enumerate(header)]
    wrapped = [(part, font, colour) for line, font, colour in styled for part in _wrap(line, font, width - 2 * size)]
    line_h = round(size * 1.35)
    top = line_h * len(wrapped) + size
    captions = [_wrap(_caption(result, img, findings), regular, int(ds.Columns) - size)
                for img, ds in zip(drawn, slices)]
    height = top + max(int(ds.Rows) for ds in slices) + line_h * max(len(c) for c in captions) + size

    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (text, font, colour) in enumerate(wrapped):
        draw.text((size, size // 2 + i * line_h), text, fill=colour, font=font)
    tiles: list[Tile] = []
    markers: list[Marker] = []
    left = 0
    for img, ds, caption in zip(drawn, slices, captions):
        tile = Tile(img, left, top, int(ds.Rows), int(ds.Columns))
        picture = Image.fromarray(_lung_window(ds)).convert("RGB")
        pen = ImageDraw.Draw(picture)
        on_tile = [f for f in findings if f.image.sop_instance_uid == img.sop_instance_uid]
        for f in on_tile:
            r = _radius(f, ds)
            pen.ellipse((f.column - r, f.row - r, f.column + r, f.row + r), outline=MARKER_COLOUR,
                        width=max(2, size // 8))
            if len(findings) > 1:
                pen.text((f.column + 0.8 * r + 2, f.row - 0.8 * r - size), str(f.number), font=bold,
                         fill=MARKER_COLOUR, stroke_width=2, stroke_fill=(0, 0, 0))
            markers.append(Marker(f.number, left + f.column, top + f.row, r))
        canvas.paste(picture, (left, top))
        for j, text in enumerate(caption):
            draw.text((left + size // 2, top + tile.rows + size // 2 + j * line_h), text, fill=TEXT_COLOUR,
                      font=regular)
        tiles.append(tile)
        left += tile.columns + _GAP
    return Summary(np.asarray(canvas, dtype=np.uint8).copy(), tuple(tiles), tuple(markers),
                   tuple(header) + tuple(line for c in captions for line in c))


def _header_lines(result: Result, drawn: Sequence[SourceImage]) -> list[str]:
    """The words above the slices: headline first, "UNVERIFIED - ..." last."""
    threshold = f"threshold {percent(result.threshold)}"
    shown = {img.sop_instance_uid for img in drawn}
    if not result.positive:
        lines = ["No nodule reached the threshold", f"Study probability {percent(result.score)}, {threshold}"]
    elif not result.findings:
        keys = ", ".join(k.image.label for k in result.key_images)
        plural = "s" if len(result.key_images) > 1 else ""
        lines = ["Suspicious nodule, not located",
                 f"Study probability {percent(result.score)}, {threshold}; key image{plural} {keys}",
                 "The model gives no location: read the key image" + plural]
    elif len(result.findings) == 1:
        f = result.findings[0]
        lines = ["Suspicious nodule", f"Probability {percent(f.probability)}, {threshold}", _where(f).capitalize()]
    else:
        lines = [f"{len(result.findings)} suspicious nodules"]
        lines += [f"{f.number}: probability {percent(f.probability)}, {_where(f)}"
                  + ("" if f.image.sop_instance_uid in shown else " (not shown)") for f in result.findings]
        lines.append(threshold.capitalize())
    return lines + [f"AI model {result.model.title}", f"UNVERIFIED - {DEMO_NOTICE}"]


def _where(f: Finding) -> str:
    size = f", about {f.diameter_mm:.0f} mm" if f.diameter_mm else ""
    return f"image {f.image.label}{size}"


def _caption(result: Result, image: SourceImage, findings: Sequence[Finding]) -> str:
    numbers = [str(f.number) for f in findings if f.image.sop_instance_uid == image.sop_instance_uid]
    if numbers:
        what = f"finding{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}" if len(findings) > 1 else "finding"
    else:
        scores = [k.score for k in result.key_images if k.image.sop_instance_uid == image.sop_instance_uid]
        what = f"key image, slice probability {percent(scores[0])}" if scores else "key image"
    return f"Image {image.label}: {what}"


def _lung_window(ds: Dataset) -> np.ndarray:
    """The slice in the lung window as uint8 gray (rows, columns)."""
    hu = apply_modality_lut(ds.pixel_array, ds)
    return np.rint(window(hu) * 255.0).astype(np.uint8)


def _radius(f: Finding, ds: Dataset) -> float:
    """The circle's radius in pixels: the nodule's radius plus 3 mm, else DEFAULT_RADIUS_MM; always visible."""
    spacing = [float(v) for v in ds.get("PixelSpacing") or ()]
    if len(spacing) == 2 and min(spacing) > 0:
        mm = f.diameter_mm / 2 + 3.0 if f.diameter_mm else DEFAULT_RADIUS_MM
        r = mm / (sum(spacing) / 2)
    else:
        r = DEFAULT_RADIUS_PX
    return float(min(max(r, 8.0), min(int(ds.Rows), int(ds.Columns)) / 4))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a longer single word stays whole; "91 %" stays whole)."""
    lines: list[str] = []
    for word in text.replace(" %", "\u00a0%").replace(" mm", "\u00a0mm").split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return [line.replace("\u00a0", " ") for line in lines]


@lru_cache(maxsize=16)
def _font(size: int, bold: bool) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (bold) at ``size`` px when installed, else Pillow's built-in font."""
    for candidate in FONT_FILES[bold]:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    logger.debug("no DejaVu font found; using Pillow's built-in font")
    return ImageFont.load_default(size=size)


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation of the slice's rows and columns (e.g. ("L", "P") for an axial slice)."""
    cosines = [float(v) for v in ds.get("ImageOrientationPatient") or ()]
    if len(cosines) != 6:
        raise ValueError(f'Image {ds.SOPInstanceUID} of argument "images" has no Image Orientation (Patient).')
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    axes = [int(np.argmax(np.abs(v))) for v in (cosines[:3], cosines[3:])]
    row, col = (letters[a][0 if v[a] > 0 else 1] for a, v in zip(axes, (cosines[:3], cosines[3:])))
    return row, col


def _reference(ds: Dataset, purpose: hd.sr.CodedConcept | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = [purpose]
    return item
