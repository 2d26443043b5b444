"""Fit the chest-radiograph gate, choose its thresholds, and measure what it refuses.

    python scripts/build_gate.py [--checkpoints assets/checkpoints] [--metrics assets/gate_metrics.json]
    python scripts/build_gate.py --features-only   # after a new findings head: its features only

The gate (``mrg.model.gate``) is fitted on the NIH training split's radiographs (by patient,
as everywhere), its thresholds set at quantiles of the validation split's scores, and
measured on what neither saw:

* radiographs that must pass: the NIH test split, the shared OpenI images (frontal and
  lateral), the shipped examples and pydicom-data's chest CR (``RG1_*``);
* images that must be refused: every pydicom-data image that is not a chest radiograph
  (CT, MR, US, NM, RT dose, segmentations, secondary captures, a leg radiograph), scikit-image's
  sample images, the NIH test radiographs rotated by 90°, 180°, 270° and inverted, and blanks.

Each goes through the serving path (``load_image`` → the findings head's view → ``screen``).
Writes ``<checkpoints>/gate/`` and the metrics JSON the table of docs/gate.md is made from.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import Study, View, study_from_sources
from mrg.environment import setting
from mrg.imaging import ImageError, LoadedImage, load_image
from mrg.model.findings import FINDINGS_FOLDER, FindingsHead
from mrg.model.gate import GATE_FOLDER, ChestGate, screen_study
from mrg.train.gate import fit_features, fit_gate, radiograph_tensors

log = logging.getLogger("build_gate")
CHEST_CR = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")
SKIMAGE_SAMPLES = [
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "cat",
    "coins",
    "horse",
    "moon",
    "page",
    "text",
    "clock",
    "immunohistochemistry",
    "logo",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "grass",
    "gravel",
    "brick",
    "microaneurysms",
]


def pydicom_images() -> list[tuple[str, str, bytes]]:
    """(file name, modality, bytes) of every pydicom-data file that decodes as one image."""
    from pydicom.data import get_testdata_files

    out = []
    for path in sorted(get_testdata_files("*.dcm")):
        try:
            image = load_image(path)
        except ImageError:
            continue
        out.append((Path(path).name, image.meta.modality or "none", Path(path).read_bytes()))
    return out


def skimage_images() -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of scikit-image's sample images shipped in its wheel."""
    import skimage.data

    out = []
    for name in SKIMAGE_SAMPLES:
        array = getattr(skimage.data, name)()
        if array.dtype != np.uint8:
            array = (np.asarray(array, dtype=np.float32) * 255 / max(float(array.max()), 1)).astype(
                np.uint8
            )
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        out.append((name, buffer.getvalue()))
    return out


def png(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``pixels`` in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def transformed(images: list[LoadedImage]) -> dict[str, list[bytes]]:
    """The radiographs rotated (counter-clockwise) and inverted, as PNG files a user would send."""
    return {
        "rotated 90°": [png(np.rot90(i.pixels, 1)) for i in images],
        "rotated 180°": [png(np.rot90(i.pixels, 2)) for i in images],
        "rotated 270°": [png(np.rot90(i.pixels, 3)) for i in images],
        "inverted": [png(1.0 - i.pixels) for i in images],
    }


def blanks() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        png(np.zeros((512, 512))),
        png(np.ones((512, 512))),
        png(np.full((512, 512), 0.5)),
        png(rng.random((512, 512))),
        png(np.tile(np.linspace(0, 1, 512), (512, 1))),
    ]


def verdicts(studies: list, head: FindingsHead, gate: ChestGate) -> list[str | None]:
    """The gate's refusal code (None: passed) for each study (a file, or a (frontal,
    lateral) pair), loaded and screened as the service does."""
    out = []
    for sources in tqdm(studies, desc="screening", leave=False):
        study = study_from_sources(*sources) if isinstance(sources, tuple) else None
        study = study or Study([View(load_image(sources), "frontal")])
        out.append(screen_study(study, head, gate).refused)
    return out


def row(name: str, codes: list[str | None], must: str) -> dict:
    refused = sum(c is not None for c in codes)
    reasons: dict[str, int] = {}
    for code in codes:
        if code is not None:
            reasons[code] = reasons.get(code, 0) + 1
    return {
        "images": name,
        "count": len(codes),
        "must": must,
        "refused": refused,
        "share_refused": round(refused / max(len(codes), 1), 3),
        "reasons": reasons,
    }


def markdown_table(rows: list[dict]) -> str:
    """The table of docs/gate.md: each group of images, how many, what must happen, what did."""
    lines = ["| images | count | must | refused | by |", "|---|---:|---|---:|---|"]
    for r in rows:
        by = ", ".join(f"{code} {n}" for code, n in r["reasons"].items()) or "—"
        lines.append(
            f"| {r['images']} | {r['count']} | {r['must']} | {r['share_refused']:.1%} | {by} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="assets/checkpoints")
    parser.add_argument("--metrics", default="assets/gate_metrics.json")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="a new findings head: refit the feature statistics and distance threshold, "
        "keep the orientation net and its threshold",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    shared = Path(setting("MRG_SHARED_DATA"))
    nih = shared / "nih_cxr14"
    splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for entry in read_nih_labels(nih / "labels.csv"):
        path = nih / "images" / entry["image"]
        if path.is_file():
            splits[patient_split(entry["patient"])].append(path)
    log.info("NIH radiographs: %s", {k: len(v) for k, v in splits.items()})
    head = FindingsHead.from_pretrained(Path(args.checkpoints) / FINDINGS_FOLDER)
    size = head.config.image_size
    train, val = radiograph_tensors(splits["train"], size), radiograph_tensors(splits["val"], size)
    if args.features_only:
        kept = ChestGate.from_pretrained(Path(args.checkpoints) / GATE_FOLDER)
        gate = fit_features(kept, head, train, val)
    else:
        gate = fit_gate(head, train, val, epochs=args.epochs)
    gate.save_pretrained(Path(args.checkpoints) / GATE_FOLDER)
    log.info("thresholds: %s", gate.config.to_dict())

    from pydicom.data import get_testdata_file

    test_images = [load_image(p) for p in splits["test"]]
    openi = [(d / "0.png", d / "1.png") for d in sorted((shared / "iu_xray" / "images").iterdir())]
    examples = sorted(Path("assets/examples").glob("*.png"))
    dicoms = pydicom_images()
    must_pass = {
        "NIH ChestX-ray14 validation (thresholds chosen here)": splits["val"],
        "NIH ChestX-ray14 test": splits["test"],
        "OpenI (IU X-ray) studies, frontal + lateral": openi,
        "shipped examples": examples,
        "pydicom-data chest CR (RG1, 4 encodings)": [get_testdata_file(n) for n in CHEST_CR],
    }
    must_fail: dict[str, list] = {}
    for name, modality, data in dicoms:
        if name in CHEST_CR:
            continue
        group = "leg radiograph (CR, RG3)" if name.startswith("RG3") else f"DICOM {modality}"
        must_fail.setdefault(group, []).append(data)
    must_fail["scikit-image sample images"] = [data for _, data in skimage_images()]
    must_fail |= {f"NIH test {k}": v for k, v in transformed(test_images).items()}
    must_fail["blank, grey, noise, gradient"] = blanks()
    rows = [row(k, verdicts(v, head, gate), "pass") for k, v in must_pass.items()]
    rows += [row(k, verdicts(v, head, gate), "refuse") for k, v in must_fail.items()]
    metrics = {"thresholds": gate.config.to_dict(), "rows": rows}
    Path(args.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    for r in rows:
        log.info(
            "%-55s %4d  %s %.3f  %s",
            r["images"],
            r["count"],
            r["must"],
            r["share_refused"],
            r["reasons"],
        )


if __name__ == "__main__":
    main()
