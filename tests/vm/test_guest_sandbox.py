"""Inside the guest, the host tree is read-only and the job folder is the one writable host path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.numa_vm


@pytest.fixture
def jobdir() -> Path:
    if os.environ.get("TIEREMU_IN_VM") != "1":
        pytest.skip("checks the guest's view of the host: runs only inside `tieremu vm run`")
    return Path(os.environ["TIEREMU_VM_JOBDIR"])


def test_host_tree_is_read_only(jobdir: Path) -> None:
    for target in (Path(__file__).with_name("written-by-guest"), jobdir.parent / "written-by-guest"):
        with pytest.raises(OSError) as info:
            target.write_text("x")
        assert info.value.errno == errno.EROFS, target


def test_job_folder_and_tmp_are_writable(jobdir: Path) -> None:
    for folder in (jobdir, Path("/tmp")):
        probe = folder / f"probe-{os.getpid()}"
        probe.write_text("written in the guest")
        assert probe.read_text() == "written in the guest"
        probe.unlink()
