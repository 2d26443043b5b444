"""From a file or an upload to a display-ready greyscale image and PHI-free metadata.

``load_image(path_or_bytes)`` is the one entry point. It recognises DICOM, PNG and JPEG by
content (never by extension), applies DICOM's Modality LUT → VOI LUT (LUT sequence, else
window centre/width, else a robust 0.5–99.5 percentile window) → MONOCHROME1 inversion,
and returns pixels as float32 in [0, 1] where 0 is black (air) and 1 white (bone).

Anything it cannot turn into a single chest radiograph raises ``ImageError`` with a message
written for a clinician. Metadata is built from an allow-list of non-identifying DICOM
attributes, so names, IDs, dates, accession numbers and institutions never leave this module.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "DR", ""}
# projection X-ray and unstated modalities: the image gate (``mrg.model.gate``) decides; any
# other modality (CT, MR, US, NM, PT, RT objects…) is not a radiograph at all
GATED_MODALITIES = RADIOGRAPH_MODALITIES | {"DF", "MG", "XA", "RF", "PX", "IO", "OT", "SC"}
COLOUR_SHARE = 0.01  # an image is in colour when this share of its pixels has chroma
FRONTAL_POSITIONS = {"PA", "AP"}
LATERAL_POSITIONS = {"LL", "RL", "LAT", "LATERAL", "RLD", "LLD"}


def not_a_radiograph(modality: str) -> str:
    """What a clinician reads about a DICOM file of a non-projection modality."""
    return (
        f"This is a {modality} image, not a chest radiograph; the model was trained on chest "
        "X-rays only."
    )


class ImageError(ValueError):
    """The input cannot be used as a chest radiograph; ``str(err)`` is safe to show a user."""


@dataclass(frozen=True)
class ImageLimits:
    """Refuse inputs beyond these sizes before decoding them (decompression bombs)."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass
class ImageMeta:
    """Non-identifying facts about an image, safe to show, log and store."""

    format: str
    width: int
    height: int
    modality: str = ""
    view_position: str = ""
    photometric_interpretation: str = ""
    bits_stored: int = 8
    pixel_spacing_mm: tuple[float, float] | None = None
    transfer_syntax: str = ""
    windowing: str = ""
    colour: bool = False  # a colour image (photograph, screenshot), not a greyscale radiograph
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def view(self) -> str:
        """``frontal``, ``lateral`` or ``unknown`` from the DICOM View Position."""
        position = self.view_position.upper()
        if position in FRONTAL_POSITIONS:
            return "frontal"
        if position in LATERAL_POSITIONS:
            return "lateral"
        return "unknown"


VALUES_SIDE = 1024  # the long side of the values kept for re-windowing (memory bound)


@dataclass
class LoadedImage:
    """Greyscale pixels ``[H, W]`` float32 in [0, 1] (0 = black), as the file's own window (or
    VOI LUT) shows them: what the model reads. ``values``: the modality values (after the
    Modality LUT, before any VOI windowing; the stored values for PNG/JPEG), float32, with
    the long side at most ``VALUES_SIDE``, for windowing in the viewer. ``inverted``:
    MONOCHROME1, where the lowest value is shown white. ``file_window``: the file's own
    ``(center, width)`` where it states one."""

    pixels: np.ndarray
    meta: ImageMeta
    values: np.ndarray | None = None
    inverted: bool = False
    file_window: tuple[float, float] | None = None

    def to_uint8(self) -> np.ndarray:
        return np.round(self.pixels * 255.0).astype(np.uint8)


def _display_size(shape: tuple[int, int], side: int = VALUES_SIDE) -> tuple[int, int]:
    """``(width, height)`` scaled so the long side is at most ``side``."""
    height, width = shape
    scale = min(1.0, side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def for_viewer(array: np.ndarray) -> np.ndarray:
    """``array [H, W]`` as float32, box-downsampled so its long side is at most
    ``VALUES_SIDE`` (an average of modality values is still a modality value)."""
    array = np.asarray(array, dtype=np.float32)
    size = _display_size(array.shape)
    if size == (array.shape[1], array.shape[0]):
        return array
    return np.asarray(Image.fromarray(array, mode="F").resize(size, Image.BOX), dtype=np.float32)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2.1), mapped to [0, 1]: one new array,
    the same arithmetic in place (a 2-Mpixel film's temporaries made a load 0.2–0.9 s)."""
    out = values - (center - 0.5)
    out /= max(width - 1.0, 1e-6)
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


DEFAULT_LIMITS = ImageLimits()


def load_image(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> LoadedImage:
    """Decode ``source`` (a path or the file's bytes); raise ``ImageError`` for unusable input."""
    data = _read_bytes(source, limits)
    try:
        if data[:8] == PNG_SIGNATURE or data[:3] == JPEG_SIGNATURE:
            return _load_raster(data, limits)
        return _load_dicom(data, limits)
    except ImageError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except (MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"The image is larger than the {limits.max_pixels / 1e6:.0f} megapixel limit. "
            "Please export a smaller image."
        ) from exc
    except BaseException as exc:  # decoders fail in their own ways, Rust panics included
        log.info("image decoding failed: %s", type(exc).__name__)
        raise ImageError(
            "The file is damaged or incomplete and could not be decoded as an image."
        ) from exc


def _read_bytes(source: str | Path | bytes, limits: ImageLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError("The file could not be found.")
        if path.stat().st_size > limits.max_file_bytes:
            raise ImageError(_too_big_file(limits))
        data = path.read_bytes()
    if not data:
        raise ImageError("The file is empty (0 bytes). Please upload the image again.")
    if len(data) > limits.max_file_bytes:
        raise ImageError(_too_big_file(limits))
    return data


def _too_big_file(limits: ImageLimits) -> str:
    return f"The file is larger than the {limits.max_file_bytes // (1024 * 1024)} MB upload limit."


def _too_many_pixels(width: int, height: int, limits: ImageLimits) -> str:
    return (
        f"The image is {width}×{height} pixels, more than the {limits.max_pixels / 1e6:.0f} megapixel "
        "limit. Please export a smaller image."
    )


# --------------------------------------------------------------------------- PNG / JPEG


def _load_raster(data: bytes, limits: ImageLimits) -> LoadedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(_too_many_pixels(width, height, limits))
        if getattr(image, "n_frames", 1) > 1:
            raise ImageError(
                "The file holds several images (an animation or stack); upload a single radiograph."
            )
        image.load()
    fmt = (image.format or "").lower()
    image = ImageOps.exif_transpose(image)
    meta = ImageMeta(format=fmt, width=image.width, height=image.height)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        meta.bits_stored = 16 if mode.startswith("I;16") or fmt == "png" else 32
        meta.windowing = "full range (min–max)"
        return LoadedImage(_min_max(pixels), meta, for_viewer(pixels))
    if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
        meta.colour = _is_colour(np.asarray(image.convert("RGB")))
    if meta.colour:
        meta.warnings.append(
            "This is a colour image; it was converted to greyscale. The model expects a chest radiograph."
        )
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    meta.windowing = "none (8-bit)"
    return LoadedImage(grey / 255.0, meta, for_viewer(grey))


def _is_colour(rgb: np.ndarray) -> bool:
    """More than ``COLOUR_SHARE`` of the pixels have chroma (a channel 24 levels from another):
    a radiograph saved as RGB, with JPEG noise or a small coloured marker, stays greyscale."""
    rgb = rgb[..., :3].astype(np.int16)
    chroma = np.maximum(np.abs(rgb[..., 0] - rgb[..., 1]), np.abs(rgb[..., 1] - rgb[..., 2]))
    return float((chroma > 24).mean()) > COLOUR_SHARE


def _min_max(pixels: np.ndarray) -> np.ndarray:
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros_like(pixels, dtype=np.float32)
    return ((pixels - low) / (high - low)).astype(np.float32)


# --------------------------------------------------------------------------- DICOM


def _load_dicom(data: bytes, limits: ImageLimits):
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    has_marker = len(data) > 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_marker)
    except InvalidDicomError as exc:
        raise ImageError(_NOT_AN_IMAGE) from exc
    if not has_marker and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise ImageError(_NOT_AN_IMAGE)
    modality = str(ds.get("Modality", "") or "").upper()
    if "PixelData" not in ds:
        raise ImageError(
            "This DICOM file contains no image (no pixel data); it may be a report or a structured document."
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(
            f"This DICOM file holds {frames} frames (a multi-frame or volumetric series such as CT or MR). "
            "Upload a single chest radiograph."
        )
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows * cols > limits.max_pixels:
        raise ImageError(_too_many_pixels(cols, rows, limits))
    meta = ImageMeta(
        format="dicom",
        width=cols,
        height=rows,
        modality=modality,
        view_position=str(ds.get("ViewPosition", "") or ""),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or ""),
        bits_stored=int(ds.get("BitsStored", 8) or 8),
        pixel_spacing_mm=_pixel_spacing(ds),
        transfer_syntax=_transfer_syntax_name(ds),
    )
    if modality not in GATED_MODALITIES:
        meta.warnings.append(not_a_radiograph(modality))
    elif modality not in RADIOGRAPH_MODALITIES:
        meta.warnings.append(
            f"Modality {modality} is not a radiograph (CR/DX); results may be meaningless."
        )
    try:
        raw = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Rust decoders panic with a BaseException
        raise ImageError(
            f"The DICOM image data could not be decoded ({meta.transfer_syntax or 'unknown encoding'}); "
            "the file may be damaged or use an unsupported compression."
        ) from exc
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and int(ds.get("SamplesPerPixel", 1)) > 1:
        meta.colour = _is_colour(raw[..., :3] >> max(int(ds.get("BitsStored", 8)) - 8, 0))
        if meta.colour:
            meta.warnings.append("This DICOM image is in colour; it was converted to greyscale.")
        pixels = (
            np.asarray(
                Image.fromarray(raw[..., :3].astype(np.uint8)).convert("L"), dtype=np.float32
            )
            / 255.0
        )
        meta.windowing = "none (colour image)"
        return LoadedImage(pixels, meta)
    if raw.ndim != 2:
        raise ImageError(
            "This DICOM file does not hold a single 2-D image; upload a single chest radiograph."
        )
    values = apply_modality_lut(raw, ds)
    pixels, meta.windowing = _window(values, ds)
    inverted = meta.photometric_interpretation == "MONOCHROME1"
    if inverted:
        pixels = 1.0 - pixels
        meta.windowing += ", MONOCHROME1 inverted"
    return LoadedImage(
        pixels.astype(np.float32), meta, for_viewer(values), inverted, _stated_window(ds)
    )


_NOT_AN_IMAGE = "This file is not a PNG, JPEG or DICOM image. Please upload a chest X-ray in one of these formats."


def _window(values: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """The file's VOI LUT or window over the modality ``values``, in [0, 1], with a
    description of what was applied."""
    from pydicom.pixels import apply_voi_lut

    steps = []
    if "ModalityLUTSequence" in ds:
        steps.append("Modality LUT sequence")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        steps.append("rescale slope/intercept")
    if "VOILUTSequence" in ds:
        lut_input = np.rint(values).astype(np.int64)  # LUTs are indexed by integer values
        out = apply_voi_lut(lut_input, ds, index=0, prefer_lut=True).astype(np.float64)
        top = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
        steps.append("VOI LUT sequence")
        return np.clip(out / top, 0.0, 1.0), ", ".join(steps)
    values = values.astype(np.float64)
    stated = _stated_window(ds)
    if stated is not None:
        steps.append(f"window {stated[0]:g}/{stated[1]:g}")
        return linear_window(values, *stated), ", ".join(steps)
    low, high = np.percentile(values, [0.5, 99.5])
    steps.append("percentile window 0.5–99.5%")
    if high <= low:
        return np.zeros_like(values), ", ".join(steps)
    return np.clip((values - low) / (high - low), 0.0, 1.0), ", ".join(steps)


def _stated_window(ds) -> tuple[float, float] | None:
    """The file's first ``(WindowCenter, WindowWidth)``, where it states a usable one."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    return (center, width) if center is not None and width is not None and width > 1 else None


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return (
            float(value[0])
            if hasattr(value, "__len__") and not isinstance(value, str)
            else float(value)
        )
    except (TypeError, ValueError, IndexError):
        return None


def _pixel_spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                spacing = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                return None
            return spacing if min(spacing) > 0 else None
    return None


def _transfer_syntax_name(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return getattr(uid, "name", "") if uid is not None else ""
