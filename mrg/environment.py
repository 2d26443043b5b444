"""Every environment variable mrg reads, with its default and meaning, in one place.

Where a flag exists too (``python app.py --checkpoints …``), the flag wins: the variable is
only the flag's default (``mrg.demo.parse_args``). Tests and CI set more (``MRG_REQUIRE_SHARED``,
``MRG_REQUIRE_BROWSER``: ``tests/conftest.py``); Hugging Face's own (``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``) are read by ``huggingface_hub``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root

# name: (default, other names read in order when it is unset, meaning)
VARIABLES: dict[str, tuple[str | None, tuple[str, ...], str]] = {
    "MRG_CHECKPOINTS": (None, (), "checkpoint folder or Hub repo id (default assets/checkpoints)"),
    "MRG_LLM": (None, (), "the frozen LLM: local directory or hub id (default: the checkpoints')"),
    "MRG_DEVICE": (None, (), "cpu | cuda (default: cuda when present)"),
    "MRG_QUANTIZATION": (
        "auto",
        (),
        "auto | none | int8-wo | int4-wo | nf4 | int8 (auto: measured on a CPU, else the checkpoint's)",
    ),
    "MRG_DTYPE": ("auto", (), "auto | float32 | bfloat16 | float16: the LLM's compute dtype"),
    "MRG_DATA_DIR": ("mrg-data", (), "where the review database is written"),
    "MRG_DATASET_ANNOTATION": (None, (), "annotation.json of a dataset to browse in the app"),
    "MRG_DATASET_IMAGES": (None, (), "the image root of that annotation; alone, a folder of cases"),
    "MRG_DATASET_SPLIT": ("test", (), "the split of that annotation to browse"),
    "MRG_SHARED_DATA": (str(ROOT.parent / "shared" / "data"), (), "the shared data folder"),
    "MRG_HOST": ("127.0.0.1", ("GRADIO_SERVER_NAME",), "the address the app listens on"),
    "MRG_PORT": ("7860", ("GRADIO_SERVER_PORT", "PORT"), "the port the app listens on"),
    "MRG_MAX_UPLOAD_MB": ("64", (), "the largest upload the app accepts"),
    "MRG_CACHE_DIR": (None, (), "converted SmolLM2 copy (default $XDG_CACHE_HOME/mrg)"),
    "XDG_CACHE_HOME": (str(Path.home() / ".cache"), (), "the user's cache folder"),
    "MRG_NUM_THREADS": (str(os.cpu_count() or 1), (), "torch threads of the mrg command"),
}


def setting(name: str) -> str | None:
    """The value of environment variable ``name`` (or of its older names), else its default."""
    default, aliases, _ = VARIABLES[name]
    for candidate in (name, *aliases):
        if os.environ.get(candidate):
            return os.environ[candidate]
    return default
