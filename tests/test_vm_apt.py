"""The backports source is derived from the host's own Debian source, and apt runs on private state only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tieremu.vm.apt import (
    AptSource,
    PrivateApt,
    derive_source,
    host_codename,
    host_source_entries,
    parse_deb822,
    parse_one_line,
)
from tieremu.vm.errors import VmUnavailable

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
"""

DISABLED_FIRST = """\
Types: deb
URIs: http://old.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb deb-src
URIs: http://new.example/debian http://second.example/debian
Suites: bookworm
Components: non-free main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL0BUBEADmW5NlOVjaxf+mDz0ZMn5ZFMOB1
 -----END PGP PUBLIC KEY BLOCK-----
"""


def test_backports_entry_comes_from_the_main_archive_of_a_deb822_file() -> None:
    source = derive_source(parse_deb822(DEB822), "bookworm", "bookworm-backports")
    assert source == AptSource("http://mirror.example/debian", "bookworm-backports", ("main",),
                               "/usr/share/keyrings/debian-archive-keyring.gpg")
    assert source.line() == ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                             "http://mirror.example/debian bookworm-backports main")


def test_disabled_entries_and_inline_keys_are_handled() -> None:
    entries = parse_deb822(DISABLED_FIRST)
    assert len(entries) == 1
    source = derive_source(entries, "bookworm", "bookworm")
    # The first URI of the enabled entry; an inline key block cannot go on a one-line source.
    assert source == AptSource("http://new.example/debian", "bookworm", ("main",), None)


def test_one_line_sources_list() -> None:
    text = ("# deb http://commented.example/debian bookworm main\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main non-free\n")
    entries = parse_one_line(text)
    assert len(entries) == 1
    assert derive_source(entries, "bookworm", "bookworm-backports").line() == \
        "deb [signed-by=/k.gpg] http://one.example/debian bookworm-backports main"


def test_no_source_for_the_release_is_a_clear_error() -> None:
    with pytest.raises(VmUnavailable, match="no apt source for Debian trixie"):
        derive_source(parse_deb822(DEB822), "trixie", "trixie-backports")


def test_host_files_are_read_from_the_given_places(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text("deb http://no.example/x bookworm main\n")
    entries = host_source_entries(tmp_path / "sources.list.d", tmp_path / "missing.list")
    assert [e.uris[0] for e in entries] == ["http://mirror.example/debian", "http://mirror.example/debian-security"]
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12"\nVERSION_CODENAME=bookworm\n')
    assert host_codename(tmp_path / "os-release") == "bookworm"
    (tmp_path / "os-release").write_text('NAME="Something"\n')
    with pytest.raises(VmUnavailable, match="VERSION_CODENAME"):
        host_codename(tmp_path / "os-release")


def test_private_apt_points_every_state_path_into_its_own_folder(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt", derive_source(parse_deb822(DEB822), "bookworm", "bookworm-backports"))
    options = apt._options()
    values = dict(options[i + 1].split("=", 1) for i, o in enumerate(options) if o == "-o")
    assert values["Dir::Etc::SourceList"] == str(tmp_path / "apt" / "sources.list")
    assert values["Dir::Etc::SourceParts"] == "/dev/null"
    for key in ("Dir::State::Lists", "Dir::State::status", "Dir::Cache"):
        assert values[key].startswith(str(tmp_path / "apt")), key
