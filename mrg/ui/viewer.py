"""The viewer panel: load a study (upload, example, dataset case) and show its views with
window/level, invert, zoom and pan, and the Grad-CAM overlay on the image itself.

Windowing works on the modality values (``LoadedImage.values``: after the Modality LUT,
before any VOI windowing), never on the 8-bit copy shown; the file's own window or VOI LUT
is the default. Each view is a ``gr.ImageSlider`` (Gradio's, with zoom and pan) holding the
image twice, or its Grad-CAM overlay first and the image second (``render``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder
from PIL import Image

from mrg.imaging import ImageError, for_viewer
from mrg.ui.common import UNEXPECTED, WHOLE_REPORT, DemoState, example_key, log_failure
from mrg.windowing import WINDOW_PRESETS, preset_window, window

if TYPE_CHECKING:
    from mrg.data.study import Study
    from mrg.imaging import LoadedImage

FILE_WINDOW = "file's own"
CUSTOM = "custom"
PRESETS = [FILE_WINDOW, *WINDOW_PRESETS, CUSTOM]
# What loading a study updates, in this order (the handlers return tuples).
LOADED = (
    "state",
    "reference",
    "frontal_view",
    "lateral_view",
    "preset",
    "center",
    "width",
    "meta",
    "load_status",
    "header_a",
    "findings_a",
    "impression_a",
    "header_b",
    "findings_b",
    "impression_b",
    "stats",
    "verdict_a",
    "categories_a",
    "verdict_b",
    "categories_b",
    "preference",
    "note",
)
VIEWER_INPUTS = ("state", "preset", "center", "width", "invert", "show_cam", "opacity")


def view_pixels(
    image: LoadedImage, preset: str, center: float, width: float, invert: bool
) -> np.ndarray:
    """``[h, w]`` in [0, 1] at the viewer's resolution, windowed as ``preset`` says."""
    if preset == FILE_WINDOW or image.values is None:
        shown = for_viewer(image.pixels)
        return 1.0 - shown if invert else shown
    if preset == CUSTOM:
        return window(image, center, width, invert)
    return window(image, *preset_window(image, preset), invert)


def to_uint8(grey: np.ndarray) -> np.ndarray:
    """``[h, w]`` in [0, 1] → greyscale uint8 (a third of RGB's bytes to encode and send)."""
    return np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)


def lossless_png(pixels: np.ndarray, folder: str | Path) -> str:
    """``pixels`` (uint8, grey or RGB) as a PNG under ``folder``, named by its content and
    written once: lossless at zlib level 1 (a 1955×1841 radiograph in 0.11 s, where PIL's
    default level 6 took 0.96 s for a file 15 % smaller)."""
    digest = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()[:32]
    path = Path(folder) / f"mrg-{digest}" / "view.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        Image.fromarray(pixels).save(partial, "png", compress_level=1)
        os.replace(partial, path)
    return str(path)


def page_image(pixels: np.ndarray) -> str:
    """What a slider shows, as a file in Gradio's cache (``lossless_png``): Gradio, given the
    array, encoded each side of the slider itself at PNG's default level, which was most of
    a study's load under py-spy (eight users at once); the same radiograph on both sides is
    now one file."""
    return lossless_png(pixels, get_upload_folder())


class ViewerPanel:
    """Handlers of the viewer; ``DemoApp`` mixes the panels together."""

    # ------------------------------------------------------------------ loading

    def _study_from(self, sources: list[Path | bytes], key: str) -> Study:
        """Frontal (and lateral) from the first two sources; DICOM view positions win over the order."""
        self.loading.imported()  # never import torch & co. beside the loading thread
        from mrg.data.study import study_from_sources

        lateral = sources[1] if len(sources) > 1 else None
        return study_from_sources(sources[0], lateral, study_id=key, limits=self.limits)

    def _loaded(self, state: DemoState, study: Study, key: str, reference: str, message: str):
        state.study, state.case_key, state.generated, state.heatmaps = study, key, {}, []
        state.shown, state.blinding = [], None
        state.reading, state.reading_key, state.conditions = None, "", {}
        first = study.views[0].image
        if first.values is not None:
            low, high = float(first.values.min()), float(first.values.max())
            center, width = first.file_window or preset_window(first, "full range")
            center_update = gr.update(minimum=low, maximum=high, value=center)
            width_update = gr.update(minimum=2, maximum=max(2.0, 2 * (high - low)), value=width)
        else:
            center_update = width_update = gr.update()
        frontal, lateral = self.render(state, FILE_WINDOW, 0.0, 1.0, False, False, 0.0)
        return (
            state,
            reference,
            frontal,
            gr.update(value=lateral, visible=lateral is not None),
            FILE_WINDOW,
            center_update,
            width_update,
            self._meta_markdown(study),
            message,
            *("",) * 7,  # a new study: the previous reports and their timing go,
            None,  # and so does the review of the previous study, so that it is never
            [],  # saved for this one by a key press
            None,
            [],
            None,
            "",
        )

    def _failed(self, state: DemoState, message: str):
        """The message in the status line; the study shown, and ``state``, stay as they were."""
        out = {name: gr.update() for name in LOADED}
        out["state"], out["load_status"] = state, f"**Could not load the study.** {message}"
        return tuple(out[name] for name in LOADED)

    def _read_uploads(self, frontal: str, lateral: str | None) -> tuple[list[bytes], str]:
        """The uploaded files' bytes (the files themselves are gone after this) and a content key."""
        data = [self.uploads.read(p) for p in (frontal, lateral) if p]
        return data, "sha256:" + hashlib.sha256(b"".join(data)).hexdigest()[:20]

    def _load(self, state: DemoState, read, reference: str, message: str):
        """Load a study from ``read() → (sources, key)``; any failure leaves ``state`` as it was."""
        try:
            sources, key = read()
            study = self._study_from(sources, key)
        except ImageError as err:
            return self._failed(state, str(err))
        except Exception as err:  # noqa: BLE001 — the user gets a message, the log the stack
            log_failure("loading a study", err)
            return self._failed(state, UNEXPECTED)
        return self._loaded(state, study, key, reference, self._warnings(study) or message)

    def load_upload(self, state: DemoState, frontal: str | None, lateral: str | None):
        if not frontal:
            return self._failed(state, "Please upload a frontal chest X-ray (PNG, JPEG or DICOM).")
        return self._load(
            state, lambda: self._read_uploads(frontal, lateral), "", "Study loaded from upload."
        )

    def load_example(self, state: DemoState, label: str | None):
        example = self.examples.get(label or "")
        if example is None:
            return self._failed(state, "Choose an example.")
        sources = [example.frontal] + ([example.lateral] if example.lateral else [])
        return self._load(
            state, lambda: (sources, example_key(label)), example.reference, "Example loaded."
        )

    @staticmethod
    def _warnings(study: Study) -> str:
        notes = [w for v in study.views for w in v.image.meta.warnings]
        return "⚠️ " + " ".join(notes) if notes else ""

    @staticmethod
    def _meta_markdown(study: Study) -> str:
        lines = [
            "| view | format | modality | size | pixel spacing | display |",
            "|---|---|---|---|---|---|",
        ]
        for view in study.views:
            m = view.image.meta
            spacing = (
                f"{m.pixel_spacing_mm[0]:.3f} × {m.pixel_spacing_mm[1]:.3f} mm"
                if m.pixel_spacing_mm
                else "—"
            )
            lines.append(
                f"| {view.position} | {m.format} | {m.modality or '—'} | {m.width}×{m.height} "
                f"| {spacing} | {m.windowing or '—'} |"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ display

    def render(
        self,
        state: DemoState,
        preset: str,
        center: float,
        width: float,
        invert: bool,
        show_cam: bool,
        opacity: float,
    ):
        """(frontal, lateral) for the two ``ImageSlider``s, each a pair of PNG files
        (``page_image``): ``(image, image)``, or with the Grad-CAM on ``(overlay, image)``,
        the overlay whole until the divider is slid."""
        if state.study is None:
            return None, None
        pairs = []
        for i, view in enumerate(state.study.views[:2]):
            grey = view_pixels(view.image, preset, float(center), float(width), bool(invert))
            shown = page_image(to_uint8(grey))
            if show_cam and i < len(state.heatmaps):
                pairs.append((page_image(state.heatmaps[i].overlay(grey, float(opacity))), shown))
            else:
                pairs.append((shown, shown))
        return tuple((pairs + [None, None])[:2])

    def choose_preset(
        self,
        state: DemoState,
        preset: str,
        center: float,
        width: float,
        invert: bool,
        show_cam: bool,
        opacity: float,
    ):
        """(center, width, frontal, lateral): the sliders follow a preset on the frontal view."""
        sliders = (gr.update(), gr.update())
        if state.study is not None and preset not in (CUSTOM, FILE_WINDOW):
            image = state.study.views[0].image
            if image.values is not None:
                center, width = preset_window(image, preset)
                sliders = (center, width)
        return *sliders, *self.render(state, preset, center, width, invert, show_cam, opacity)

    def set_window(
        self,
        state: DemoState,
        center: float,
        width: float,
        invert: bool,
        show_cam: bool,
        opacity: float,
    ):
        """(preset, frontal, lateral): a window set by hand is the custom preset."""
        return CUSTOM, *self.render(state, CUSTOM, center, width, invert, show_cam, opacity)

    # ------------------------------------------------------------------ layout

    def _build_study_row(self, c: dict) -> None:
        with gr.Row(equal_height=True):
            c["frontal_file"] = gr.File(
                label="Frontal view (PNG, JPEG or DICOM)",
                type="filepath",
                elem_id="frontal-upload",
                height=90,
                scale=2,
            )
            c["lateral_file"] = gr.File(
                label="Lateral view (optional)",
                type="filepath",
                elem_id="lateral-upload",
                height=90,
                scale=2,
            )
            with gr.Column(scale=3, min_width=240):
                c["example"] = gr.Dropdown(
                    list(self.examples), label="Example", value=None, elem_id="example"
                )
                c["load_status"] = gr.Markdown(elem_id="load-status")

    def _build_viewer(self, c: dict) -> None:
        with gr.Row():
            c["frontal_view"] = gr.ImageSlider(
                label="Frontal",
                type="filepath",
                format="png",
                interactive=False,
                max_height=520,
                slider_position=100,
                elem_id="frontal-view",
                scale=3,
            )
            c["lateral_view"] = gr.ImageSlider(
                label="Lateral",
                visible=False,
                type="filepath",
                format="png",
                interactive=False,
                max_height=520,
                slider_position=100,
                elem_id="lateral-view",
                scale=2,
            )
        with gr.Row():
            c["preset"] = gr.Dropdown(
                PRESETS,
                value=FILE_WINDOW,
                label="Window preset",
                elem_id="window-preset",
                scale=1,
                min_width=135,
            )
            c["center"] = gr.Slider(
                0, 1, value=0.5, label="Level (center)", elem_id="level", min_width=110, scale=2
            )
            c["width"] = gr.Slider(
                2, 4, value=2, label="Window (width)", elem_id="window", min_width=110, scale=2
            )
            c["invert"] = gr.Checkbox(
                label="Invert", value=False, elem_id="invert", scale=0, min_width=80
            )
        with gr.Row():
            c["show_cam"] = gr.Checkbox(
                label="Grad-CAM overlay (slide to compare)", value=False, elem_id="show-cam"
            )
            c["sentence"] = gr.Dropdown(
                [WHOLE_REPORT], value=WHOLE_REPORT, label="Explain", elem_id="sentence"
            )
            c["opacity"] = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity")
        c["explain_status"] = gr.Markdown(elem_id="explain-status")
        with gr.Accordion("Image details", open=False):
            c["meta"] = gr.Markdown(elem_id="meta")

    def _wire_viewer(self, c: dict) -> list:
        """Returns the loading events, for what follows a study's loading (its findings)."""
        loaded = [c[name] for name in LOADED]
        views = [c["frontal_view"], c["lateral_view"]]
        loads = [
            c["frontal_file"].upload(
                self.load_upload,
                [c["state"], c["frontal_file"], c["lateral_file"]],
                loaded,
                api_name="load_upload",
            ),
            c["lateral_file"].upload(
                self.load_upload,
                [c["state"], c["frontal_file"], c["lateral_file"]],
                loaded,
                api_name=False,
            ),
            c["example"].change(
                self.load_example, [c["state"], c["example"]], loaded, api_name="load_example"
            ),
        ]
        c["preset"].input(
            self.choose_preset,
            [c[name] for name in VIEWER_INPUTS],
            [c["center"], c["width"], *views],
            api_name=False,
        )
        for slider in (c["center"], c["width"]):
            slider.release(
                self.set_window,
                [c[name] for name in VIEWER_INPUTS if name != "preset"],
                [c["preset"], *views],
                api_name=False,
            )
        shown = [c[name] for name in VIEWER_INPUTS]
        c["invert"].change(self.render, shown, views, api_name=False)
        c["opacity"].release(self.render, shown, views, api_name=False)
        return loads
