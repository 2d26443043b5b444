"""The real default path: SmolLM2's GGUF converted into a clean cache, then nf4 on this CPU.

The converted copy must carry no GGUF ``quantization_config``: transformers then refuses every
bitsandbytes config ("The model is quantized with GgufConfig…"). A copy written by an earlier
version, which did carry it, is repaired where it is found.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DICOM

from mrg.cli import main
from mrg.model.llm import bitsandbytes_device, smollm2_local_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STALE_GGUF_STATE = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mrg-cache")
    smollm2_local_dir(cache)  # the conversion from the GGUF, as on a fresh machine
    return cache


def test_the_converted_copy_carries_no_gguf_state(clean_cache):
    config = json.loads((clean_cache / "smollm2-135m-instruct" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"


def test_a_copy_left_by_the_previous_version_is_repaired(clean_cache, tmp_path):
    stale = tmp_path / "smollm2-135m-instruct"
    shutil.copytree(clean_cache / "smollm2-135m-instruct", stale)
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(
        json.dumps({**config, "quantization_config": STALE_GGUF_STATE})
    )
    weights = (stale / "model.safetensors").stat().st_mtime_ns
    assert smollm2_local_dir(tmp_path) == stale
    assert "quantization_config" not in json.loads((stale / "config.json").read_text())
    assert (stale / "model.safetensors").stat().st_mtime_ns == weights  # repaired, not reconverted


@pytest.mark.skipif(bitsandbytes_device() is None, reason="bitsandbytes quantizes nowhere here")
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_generate_on_the_shipped_checkpoints_in_nf4_and_int8(
    clean_cache, quantization, monkeypatch, capsys
):
    monkeypatch.setenv("MRG_CACHE_DIR", str(clean_cache))
    torch.manual_seed(0)
    code = main(
        [
            "generate",
            DICOM,
            "--checkpoints",
            str(ROOT / "assets" / "checkpoints"),
            "--quantization",
            quantization,
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"] == quantization
    assert out["text"].startswith("FINDINGS: ") and "\nIMPRESSION: " in out["text"]
