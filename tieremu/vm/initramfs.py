"""The guest's initramfs: busybox-static, the kernel modules that 9p needs, and an init that runs one job.

The archive is written here in the kernel's `newc` cpio format, so no cpio tool, root rights or device
nodes on the host are needed; modules are decompressed here because busybox's insmod cannot read `.ko.xz`.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tieremu.vm.errors import VmUnavailable

# Loaded in this order, each after its dependencies; built-in ones are skipped.
WANTED_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p")
ROOT_TAG = "hostroot"
JOB_TAG = "tieremu_job"
STDOUT_PORT = "tieremu.stdout"
STDERR_PORT = "tieremu.stderr"
EXIT_CODE_FILE = ".tieremu-exit-code"
# The kernel caps msize at what its virtio transport allows; larger requests mean fewer round trips.
MSIZE = 512 * 1024

INIT = r"""#!/bin/busybox sh
# PID 1 of the tieremu guest. It mounts the host's / read-only and the job folder writable, runs
# <run>/job.sh in a chroot with stdout and stderr sent to two virtio ports, writes the exit code into the
# job folder and powers off. On any failure it powers off without an exit code: the host reports a crash
# and shows this console's log.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "tieremu-init: $*"; }
fail() { say "FAILED: $*"; poweroff -f; }

for m in $(cat /modules.load); do insmod "/modules/$m" || fail "insmod $m"; done

run=
for arg in $(cat /proc/cmdline); do
    case "$arg" in tieremu.run=*) run="${arg#tieremu.run=}" ;; esac
done
[ -n "$run" ] || fail "no tieremu.run= on the kernel command line"
# The host percent-encodes the path so that spaces survive the kernel command line.
run=$(printf '%b' "$(echo "$run" | sed 's/%\([0-9A-Fa-f][0-9A-Fa-f]\)/\\x\1/g')")

R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@,cache=loose,ro @ROOT_TAG@ $R || fail "mount host /"
[ -f "$R$run/guest.env" ] || fail "$run/guest.env not visible in the guest"
. "$R$run/guest.env"
# Read now: a run folder under /tmp is hidden once the guest's own /tmp is mounted.
script=$(cat "$R$run/job.sh") || fail "cannot read $run/job.sh"

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
# The guest gets its own writable /tmp. A working folder under the host's /tmp (a CI checkout, say) would be
# hidden by it, so it is set aside first and bound back at the same path, still read-only.
case "$TIEREMU_CWD" in
    /tmp/*) mkdir -p /keep && mount -o bind "$R$TIEREMU_CWD" /keep || fail "bind $TIEREMU_CWD" ;;
esac
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
case "$TIEREMU_CWD" in
    /tmp/*) mkdir -p "$R$TIEREMU_CWD" && mount -o bind /keep "$R$TIEREMU_CWD" || fail "rebind $TIEREMU_CWD" ;;
esac
mount -t tmpfs -o mode=755 tmpfs $R/run
# After the tmpfs mounts, so that a job folder under /tmp is not hidden by the guest's own /tmp.
mkdir -p "$R$TIEREMU_JOBDIR" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@ @JOB_TAG@ "$R$TIEREMU_JOBDIR" || fail "mount job folder"

port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    return 1
}
# The ports appear when the host's control messages have been handled, which can trail the start of init.
tries=0
until out=$(port @STDOUT_PORT@) && err=$(port @STDERR_PORT@) && [ -c "$out" ] && [ -c "$err" ]; do
    tries=$((tries + 1))
    [ $tries -le 400 ] || fail "virtio ports @STDOUT_PORT@ and @STDERR_PORT@ did not appear"
    sleep 0.05
done

# Through FIFOs, so the command sees pipes (as on the host) and the ports are opened once each.
mkfifo /job.out /job.err
cat /job.out > "$out" & pout=$!
cat /job.err > "$err" & perr=$!
say "job start uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot $R /bin/sh -c "$script" < /dev/null > /job.out 2> /job.err
rc=$?
wait $pout $perr
say "job end uptime=$(cut -d' ' -f1 /proc/uptime) rc=$rc"
echo "$rc" > "$R$TIEREMU_JOBDIR/@EXIT_CODE_FILE@" || fail "cannot write the exit code"
sync
umount "$R$TIEREMU_JOBDIR"
poweroff -f
"""


def init_script() -> str:
    subs = {"@MSIZE@": str(MSIZE), "@ROOT_TAG@": ROOT_TAG, "@JOB_TAG@": JOB_TAG,
            "@STDOUT_PORT@": STDOUT_PORT, "@STDERR_PORT@": STDERR_PORT, "@EXIT_CODE_FILE@": EXIT_CODE_FILE}
    text = INIT
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int  # file type and permission bits, as in st_mode
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_newc(entries: list[CpioEntry], out: Path) -> None:
    """Write a `newc` (070701) archive, the format the kernel unpacks as an initramfs."""
    chunks = []
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1],
                  len(name), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        chunks += [header, name, b"\0" * _pad(len(header) + len(name)), entry.data, b"\0" * _pad(len(entry.data))]
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(chunks))
    os.replace(tmp, out)


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Module name (with '-' read as '_') → its file under lib/modules/<release>/kernel."""
    index = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko", 1)[0].replace("-", "_")
        index[name] = path
    return index


def builtin_modules(modules_dir: Path) -> set[str]:
    path = modules_dir / "modules.builtin"
    if not path.is_file():
        return set()
    return {Path(line.strip()).name.split(".ko", 1)[0].replace("-", "_") for line in path.read_text().splitlines()}


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise VmUnavailable(f"{path}: unsupported module compression (only .ko, .ko.xz and .ko.gz can be read)")


def modinfo(elf: bytes) -> dict[str, str]:
    """The `.modinfo` section of a module (key=value strings), read from the ELF64 section headers."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = elf[str_off + name_off:elf.index(b"\0", str_off + name_off)]
        if name == b".modinfo":
            info = {}
            for item in elf[offset:offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    return {}


def load_order(modules_dir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[tuple[str, bytes]]:
    """The modules to insmod, dependencies first, as (name, uncompressed ELF); built-in ones left out."""
    index = module_index(modules_dir)
    builtin = builtin_modules(modules_dir)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name not in index:
            raise VmUnavailable(f"kernel module {name} (needed by {' <- '.join(chain) or 'the guest init'}) is "
                                f"neither built in nor under {modules_dir}")
        seen.add(name)
        elf = read_module(index[name])
        for dep in filter(None, modinfo(elf).get("depends", "").split(",")):
            visit(dep, (name, *chain))
        order.append((name, elf))

    for name in wanted:
        visit(name, ())
    return order


def build_initramfs(busybox: Path, modules_dir: Path, out: Path) -> list[str]:
    """Write the initramfs to `out`; returns the module names it loads, in order."""
    modules = load_order(modules_dir)
    dir_mode, file_mode, exe_mode = 0o040755, 0o100644, 0o100755
    entries = [CpioEntry(d, dir_mode) for d in ("bin", "dev", "proc", "sys", "tmp", "newroot", "modules")]
    # The kernel opens /dev/console for init before any devtmpfs is mounted.
    entries.append(CpioEntry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", exe_mode, busybox.read_bytes()))
    entries.append(CpioEntry("init", exe_mode, init_script().encode()))
    entries += [CpioEntry(f"modules/{name}.ko", file_mode, elf) for name, elf in modules]
    entries.append(CpioEntry("modules.load", file_mode, "".join(f"{n}.ko\n" for n, _ in modules).encode()))
    write_newc(entries, out)
    return [name for name, _ in modules]
