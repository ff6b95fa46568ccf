"""The supported vLLM range is stated once in code (kvblend.vllm.compat) and matches pyproject.toml's `gpu` extra;
the installed vLLM (0.32 in `make test`, 0.26 in `make test-vllm026`) is inside it."""

import tomllib
from pathlib import Path

import pytest

from kvblend.vllm.compat import SUPPORTED_VLLM, unsupported_version


def test_gpu_extra_states_the_supported_range():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (low, high) = SUPPORTED_VLLM
    assert f"vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}" in project["optional-dependencies"]["gpu"]


def test_installed_vllm_is_supported():
    pytest.importorskip("vllm")
    assert unsupported_version() is None
