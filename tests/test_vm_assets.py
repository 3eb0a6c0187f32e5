"""Which kernel the guest boots: backports when it can be had, else the distribution's, said and recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tieremu.vm import assets
from tieremu.vm.assets import KernelInfo, prepare
from tieremu.vm.errors import VmUnavailable

RELEASES = {"bookworm-backports": "6.12.95+deb12-amd64", "bookworm": "6.1.0-50-amd64"}


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """prepare() with the archive replaced: `state["reachable"]` says which suites can be fetched."""
    state: dict[str, object] = {"reachable": {"bookworm-backports", "bookworm"}, "fetched": []}
    monkeypatch.setenv("TIEREMU_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(assets, "find_qemu", lambda: (Path("/usr/bin/qemu-system-x86_64"), "7.2.22"))
    monkeypatch.setattr(assets, "find_busybox", lambda: Path("/bin/busybox"))
    monkeypatch.setattr(assets.apt, "host_codename", lambda: "bookworm")
    monkeypatch.setattr(assets, "_initramfs", lambda cache, kernel, busybox, actions: cache / "initramfs.cpio")

    def fetch(cache: Path, suite: str, actions: list[str]) -> KernelInfo:
        if suite not in state["reachable"]:  # type: ignore[operator]
            raise VmUnavailable(f"apt-get update failed for {suite}")
        release = RELEASES[suite]
        info = KernelInfo(release, f"linux-image-{release}", "1", suite, False, cache / "kernels" / release)
        info.vmlinuz.parent.mkdir(parents=True, exist_ok=True)
        info.vmlinuz.write_bytes(b"kernel")
        info.modules_dir.mkdir(parents=True, exist_ok=True)
        state["fetched"].append(suite)  # type: ignore[attr-defined]
        actions.append(f"downloaded {suite}")
        return info

    monkeypatch.setattr(assets, "_fetch_kernel", fetch)
    return state


def test_backports_kernel_is_preferred_and_cached(offline: dict[str, object]) -> None:
    first = prepare()
    assert first.assets.kernel.release == "6.12.95+deb12-amd64"
    assert first.assets.kernel.hmat_memory_tiers and not first.assets.kernel.fallback
    assert first.actions == ["downloaded bookworm-backports"] and first.notes == []
    second = prepare()
    assert second.actions == [] and second.assets.kernel == first.assets.kernel
    assert offline["fetched"] == ["bookworm-backports"]


def test_unreachable_backports_falls_back_with_a_note_and_a_record(offline: dict[str, object]) -> None:
    offline["reachable"] = {"bookworm"}
    report = prepare()
    kernel = report.assets.kernel
    assert (kernel.release, kernel.suite, kernel.fallback, kernel.hmat_memory_tiers) == \
        ("6.1.0-50-amd64", "bookworm", True, False)
    assert len(report.notes) == 1 and "memory-tier and demotion checks will be skipped" in report.notes[0]
    # The record a run reads back says the same.
    assert assets.current_kernel(assets.cache_dir()) == kernel
    # A run boots what is selected without going back to the archive...
    assert prepare(keep_current=True).assets.kernel == kernel
    assert offline["fetched"] == ["bookworm"]
    # ...while prepare tries backports again, and switches once it is reachable.
    offline["reachable"] = {"bookworm", "bookworm-backports"}
    again = prepare()
    assert again.assets.kernel.suite == "bookworm-backports" and not again.assets.kernel.fallback
    assert again.notes == []


def test_explicit_choices(offline: dict[str, object]) -> None:
    distribution = prepare("distribution")
    assert distribution.assets.kernel.suite == "bookworm" and not distribution.assets.kernel.fallback
    assert "as selected" in distribution.notes[0]
    # `vm run` keeps the explicit choice rather than switching back.
    assert prepare(keep_current=True).assets.kernel.suite == "bookworm"
    offline["reachable"] = {"bookworm"}
    with pytest.raises(VmUnavailable, match="bookworm-backports"):
        prepare("backports")
    with pytest.raises(ValueError, match="valid: auto, backports, distribution"):
        prepare("newest")


def test_nothing_reachable_is_unavailable(offline: dict[str, object]) -> None:
    offline["reachable"] = set()
    with pytest.raises(VmUnavailable, match="apt-get update failed for bookworm"):
        prepare()
