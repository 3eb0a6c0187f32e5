"""The qemu-system-x86_64 command line for a guest layout: NUMA nodes, SLIT, HMAT, shares and ports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tieremu.vm.initramfs import JOB_TAG, ROOT_TAG, STDERR_PORT, STDOUT_PORT
from tieremu.vm.topology import VmTopology

ACCELS = ("tcg", "kvm")


@dataclass(frozen=True)
class GuestPlumbing:
    """The host ends of one run: where the guest's pieces go and which inherited fds carry its output."""

    qemu: Path
    kernel: Path
    initramfs: Path
    rundir: Path  # readable by the guest through the root share: holds guest.env and job.sh
    jobdir: Path  # the one folder the guest may write
    stdout_fd: int
    stderr_fd: int

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.rundir / "qemu.pid"


def _opt(value: object) -> str:
    """A value inside a QEMU option list, where a literal comma is written twice."""
    return str(value).replace(",", ",,")


def _cpulist(cpus: tuple[int, ...]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])


def numa_args(topology: VmTopology) -> list[str]:
    """Memory backends, nodes, SLIT distances and HMAT latency/bandwidth entries."""
    args: list[str] = []
    for node in topology.nodes:
        args += ["-object", f"memory-backend-ram,id=mem{node.id},size={node.memory_mib}M"]
        cpus = f",cpus={_cpulist(node.cpus)}" if node.cpus else ""
        # With hmat=on QEMU requires every node to name its initiator, CPU-less ones included.
        args += ["-numa", f"node,nodeid={node.id}{cpus},memdev=mem{node.id},initiator={node.initiator}"]
    for src, row in enumerate(topology.distances):
        for dst, val in enumerate(row):
            if src != dst:
                args += ["-numa", f"dist,src={src},dst={dst},val={val}"]
    for e in topology.hmat:
        lb = f"hmat-lb,initiator={e.initiator},target={e.target},hierarchy=memory"
        args += ["-numa", f"{lb},data-type=access-latency,latency={e.latency_ns}"]
        args += ["-numa", f"{lb},data-type=access-bandwidth,bandwidth={e.bandwidth_mb_s}M"]
    return args


def kernel_cmdline(rundir: Path) -> str:
    return " ".join([
        "console=ttyS0",
        "loglevel=4",
        "panic=-1",  # with -no-reboot a panic ends QEMU at once instead of hanging until the timeout
        "rdinit=/init",
        # TCG makes every mitigation expensive and the guest runs only the host's own code.
        "mitigations=off",
        f"tieremu.run={quote(str(rundir), safe='/._-+~,@')}",
    ])


def build_argv(topology: VmTopology, plumbing: GuestPlumbing, accel: str = "tcg") -> list[str]:
    if accel not in ACCELS:
        raise ValueError(f"accelerator {accel!r}; valid: {', '.join(ACCELS)}")
    p = plumbing
    n = topology.vcpus
    return [
        str(p.qemu),
        "-name", f"tieremu-{topology.name}",
        "-machine", "pc,hmat=on",
        "-accel", accel,
        # TCG's "max" model has the AVX2 that numpy and torch wheels dispatch to.
        "-cpu", "max" if accel == "tcg" else "host",
        # One socket per vCPU, so that any split of vCPUs across nodes is a whole-socket split.
        "-smp", f"{n},sockets={n},cores=1,threads=1",
        "-m", f"{topology.memory_mib}M",
        *numa_args(topology),
        "-kernel", str(p.kernel),
        "-initrd", str(p.initramfs),
        "-append", kernel_cmdline(p.rundir),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-pidfile", str(p.pidfile),
        "-chardev", f"file,id=tieremu_console,path={_opt(p.console_log)}",
        "-serial", "chardev:tieremu_console",
        "-device", "virtio-serial-pci,id=tieremu_ports",
        # Reopening an inherited pipe through /proc/self/fd gives QEMU a writer without a named FIFO.
        "-chardev", f"file,id=tieremu_out,path=/proc/self/fd/{p.stdout_fd},append=on",
        "-device", f"virtserialport,bus=tieremu_ports.0,nr=1,chardev=tieremu_out,name={STDOUT_PORT}",
        "-chardev", f"file,id=tieremu_err,path=/proc/self/fd/{p.stderr_fd},append=on",
        "-device", f"virtserialport,bus=tieremu_ports.0,nr=2,chardev=tieremu_err,name={STDERR_PORT}",
        # The host's / read-only (multidevs=remap: it spans several filesystems), the job folder writable.
        "-fsdev", "local,id=fs_root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=fs_root,mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id=fs_job,path={_opt(p.jobdir)},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=fs_job,mount_tag={JOB_TAG}",
    ]
