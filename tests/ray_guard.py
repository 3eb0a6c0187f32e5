"""Whether Ray is importable, said once for every Ray test module: under CI (which installs the ray extra through
scripts/bootstrap.sh) a missing Ray is an error; elsewhere the module is skipped with how to install it."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def require_ray() -> ModuleType:
    """Ray (with ray.cluster_utils, for the tests that start a private cluster), or the module skip / CI error."""
    try:
        import ray
        import ray.cluster_utils
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            raise ImportError(f"CI=true and Ray cannot be imported ({exc}): scripts/bootstrap.sh installs the ray "
                              "extra") from exc
        pytest.skip(f"Ray cannot be imported ({exc}): pip install 'tieremu[ray]' (scripts/bootstrap.sh does)",
                    allow_module_level=True)
    return ray
