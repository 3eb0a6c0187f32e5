"""Whether vLLM's CPU build is installed, said once for every vLLM test: under CI (scripts/test.sh installs it
through scripts/setup-vllm.sh) a missing vLLM is a failure; elsewhere the test is skipped with how to install it."""

from __future__ import annotations

import importlib.util
import os

import pytest


def need_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    reason = "vLLM's CPU build is not installed: run scripts/setup-vllm.sh (scripts/test.sh does)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI: {reason}")
    pytest.skip(reason)
