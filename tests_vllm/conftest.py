"""The vLLM plugin's tests (run in the vLLM venv: ``.ci/vllm_venv.sh``, then ``.venv-vllm/bin/python -m pytest
tests_vllm -o addopts=""``; docs/vllm.md).

vLLM leaves sockets and ``vllm_dist_*`` files in the temporary folder and a cache in ``~/.cache/vllm``: both go to a
scratch folder. Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one per module, so that the tests
can read the served model's last selection (``LLM.apply_model``); the server test runs vLLM's own processes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="vlprune-vllm-tests-"))
os.environ["TMPDIR"] = str(_SCRATCH)
os.environ.setdefault("VLLM_CACHE_ROOT", str(_SCRATCH / "cache"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
tempfile.tempdir = None  # re-read TMPDIR

import pytest  # noqa: E402

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (.ci/vllm_venv.sh)")

from vlprune.testing.vllm_models import (  # noqa: E402
    build_vllm_llava,
    build_vllm_qwen2_5_vl,
    build_vllm_qwen2_vl,
    save_for_vllm,
)


@pytest.fixture(scope="session")
def scratch() -> Path:
    return _SCRATCH


@pytest.fixture(scope="session")
def llava(scratch: Path) -> tuple:
    """(HF model, processor, folder) of the tiny LLaVA-1.5 vLLM loads."""
    model, processor = build_vllm_llava()
    return model, processor, save_for_vllm(model, processor, scratch / "llava")


@pytest.fixture(scope="session")
def qwen(scratch: Path) -> tuple:
    """(HF model, processor, folder) of the tiny Qwen2.5-VL vLLM loads."""
    model, processor = build_vllm_qwen2_5_vl()
    return model, processor, save_for_vllm(model, processor, scratch / "qwen")


@pytest.fixture(scope="session")
def qwen2(scratch: Path) -> tuple:
    """(HF model, processor, folder) of the tiny Qwen2-VL vLLM loads."""
    model, processor = build_vllm_qwen2_vl()
    return model, processor, save_for_vllm(model, processor, scratch / "qwen2")
