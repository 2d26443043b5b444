"""Shared fixtures: a tiny random LLaMA (fast unit tests), the real SmolLM2 (integration), shared data."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(
    os.environ.get(
        "MRG_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)
REQUIRE_SHARED = os.environ.get("MRG_REQUIRE_SHARED") == "1"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; skip where absent, fail where CI requires it (MRG_REQUIRE_SHARED=1)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data not found at {path} (set MRG_SHARED_DATA or place ../shared/data beside the repo)"
        if REQUIRE_SHARED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from mrg.model.llm import smollm2_local_dir

    return smollm2_local_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llm(tokenizer):
    """A 2-layer, 128-wide random LLaMA with SmolLM2's vocabulary, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mrg.model.llm import freeze

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,  # wide enough for a frozen random LM to be steerable by its prefix
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return freeze(LlamaForCausalLM(config))


@pytest.fixture(scope="session")
def tiny_llm_dir(tiny_llm, tokenizer, tmp_path_factory) -> Path:
    """The tiny LLaMA and SmolLM2's tokenizer as a local Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tiny-llm")
    tiny_llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from mrg.config import LLMConfig
    from mrg.model.llm import load_frozen_llm

    return load_frozen_llm(LLMConfig())


def tiny_model_config(mode: str = "prompt-wise"):
    from mrg.config import CustomizerConfig, EncoderConfig, ModelConfig

    return ModelConfig(
        encoder=EncoderConfig(image_size=64, embed_dim=32, depth=1, num_heads=2, pool_grid=2),
        customizer=CustomizerConfig(mode=mode, prompt_length=4, book_size=4, hidden_dim=32),
        max_report_tokens=24,
    )


@pytest.fixture
def make_tiny_model(tiny_llm, tokenizer):
    from mrg.model import MRGModel

    def make(mode: str = "prompt-wise", seed: int = 0):
        torch.manual_seed(seed)
        return MRGModel(tiny_model_config(mode), tiny_llm, tokenizer)

    return make


def save_tiny_checkpoints(root: Path, llm, tokenizer) -> Path:
    """The tiny LLM as a local model directory and one checkpoint per customized mode: ``root/ckpt/<mode>``."""
    from mrg.model import MRGModel

    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    for mode in ("prompt-wise", "promptbook-wise"):
        config = tiny_model_config(mode)
        config.llm.source = str(root / "llm")
        torch.manual_seed(0)
        MRGModel(config, llm, tokenizer).save_pretrained(root / "ckpt" / mode)
    return root / "ckpt"


def random_batch(batch: int = 2, views: int = 2, size: int = 64, seed: int = 0):
    """Random ``Views`` of ``batch`` studies with ``views`` present views each."""
    from mrg.data.views import Views

    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, views, 1, size, size, generator=generator)
    view_ids = torch.tensor([[0, 1][:views]] * batch)
    view_mask = torch.ones(batch, views, dtype=torch.bool)
    return Views(images, view_ids, view_mask)


# ----------------------------------------------------------------------------- the app in a process

DICOM = get_testdata_file("RG1_UNCI.dcm")  # a real chest CR that pydicom-data ships
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, tiny_llm, tokenizer):
    root = tmp_path_factory.mktemp("app")
    save_tiny_checkpoints(root, tiny_llm, tokenizer)
    return root


class AppProcess:
    def __init__(
        self,
        checkpoints: Path,
        data_dir: Path,
        env: dict[str, str] | None = None,
        flags: Sequence[str] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", MRG_NUM_THREADS="1"
        ) | (env or {})
        where = f"--checkpoints {checkpoints} --data-dir {data_dir} --port {self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), *where.split(), "--max-upload-mb", "20", *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("app exited:\n" + self.process.stdout.read())
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("app did not start in 120 s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_idle(batcher, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if batcher.admitted == 0 and not batcher.rows:
            return True
        time.sleep(0.01)
    return False


def hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str | None = None) -> Path:
    """What ``huggingface_hub`` leaves in ``cache`` after downloading ``files`` (path in repo →
    local source) of ``repo_id`` at ``commit``: ``refs/main`` naming a snapshot of links."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(Path(source).resolve())
    return snapshot


# ----------------------------------------------------------------------------- process exit

_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's status once its report is written, skipping the
    interpreter's teardown: there PyTorch's static destructors can meet a thread still inside
    a kernel and abort ("terminate called without an active exception", exit 134) after every
    test passed. The threads still alive are named first, so one of ours would show."""
    import threading

    from mrg.batching.batcher import _stop_all

    _stop_all()  # the batchers' own exit handler, run now rather than after os._exit skips it
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        sys.stderr.write(f"threads alive at exit: {', '.join(sorted(alive))}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1] if _EXIT_STATUS else 0)
