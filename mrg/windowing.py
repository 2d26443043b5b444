"""Re-windowing a loaded image for display: the DICOM linear VOI function and presets.

``window(image, center, width)`` maps ``LoadedImage.values`` (modality values, kept by
``mrg.imaging``) to [0, 1] for the viewer; the model never reads these pixels.
"""

from __future__ import annotations

import numpy as np

from mrg.imaging import LoadedImage, linear_window


def window(image: LoadedImage, center: float, width: float, invert: bool = False) -> np.ndarray:
    """``image.values`` through the DICOM linear window at ``center`` / ``width``, in [0, 1]
    with MONOCHROME1 shown as the file means it, then ``invert``."""
    if image.values is None:
        raise ValueError("this image keeps no modality values to window")
    out = linear_window(image.values, center, width)
    if image.inverted != invert:
        out = 1.0 - out
    return out.astype(np.float32)


# (low, high) percentiles of the displayed brightness that a preset spreads from black to
# white: radiographs have no Hounsfield scale, so presets follow each image's own values.
WINDOW_PRESETS = {
    "full range": (0.0, 100.0),
    "lung": (2.0, 65.0),
    "mediastinum": (35.0, 98.0),
    "bone": (70.0, 99.8),
}


def preset_window(image: LoadedImage, preset: str) -> tuple[float, float]:
    """``(center, width)`` in modality values for ``preset`` on this image."""
    low, high = WINDOW_PRESETS[preset]
    if image.inverted:  # bright is low values
        low, high = 100.0 - high, 100.0 - low
    a, b = np.percentile(image.values, [low, high])
    return round(float(a + b) / 2.0, 1), round(max(float(b - a), 2.0), 1)
