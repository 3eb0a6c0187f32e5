"""Guest layouts: the shipped files validate to the QEMU arguments they promise; bad files name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tieremu.errors import ConfigError
from tieremu.vm.qemu import GuestPlumbing, build_argv, kernel_cmdline, numa_args
from tieremu.vm.topology import load_topology

REPO = Path(__file__).resolve().parents[1]
CXL = REPO / "configs" / "vm" / "cxl-3node.yaml"
TWO_SOCKET = REPO / "configs" / "vm" / "two-socket.yaml"


def _options(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_cxl_3node_numa_arguments_are_exact() -> None:
    topo = load_topology(CXL)
    assert topo.cpuless_nodes == (1, 2)
    assert topo.vcpus == 2
    assert topo.memory_mib <= 3072
    args = numa_args(topo)
    assert _options(args, "-object") == [
        "memory-backend-ram,id=mem0,size=1024M",
        "memory-backend-ram,id=mem1,size=512M",
        "memory-backend-ram,id=mem2,size=512M",
    ]
    numa = _options(args, "-numa")
    assert [n for n in numa if n.startswith("node,")] == [
        "node,nodeid=0,cpus=0-1,memdev=mem0,initiator=0",
        "node,nodeid=1,memdev=mem1,initiator=0",
        "node,nodeid=2,memdev=mem2,initiator=0",
    ]
    assert [n for n in numa if n.startswith("dist,")] == [
        "dist,src=0,dst=1,val=20", "dist,src=0,dst=2,val=30",
        "dist,src=1,dst=0,val=20", "dist,src=1,dst=2,val=30",
        "dist,src=2,dst=0,val=30", "dist,src=2,dst=1,val=30",
    ]
    lb = "hmat-lb,initiator=0,target={},hierarchy=memory,data-type="
    assert [n for n in numa if n.startswith("hmat-lb,")] == [
        lb.format(0) + "access-latency,latency=100", lb.format(0) + "access-bandwidth,bandwidth=20480M",
        lb.format(1) + "access-latency,latency=220", lb.format(1) + "access-bandwidth,bandwidth=16384M",
        lb.format(2) + "access-latency,latency=300", lb.format(2) + "access-bandwidth,bandwidth=10240M",
    ]
    cxl, local, far = (topo.hmat_entry(0, t) for t in (1, 0, 2))
    assert 2.0 <= cxl.latency_ns / local.latency_ns <= 2.4
    assert far.latency_ns > cxl.latency_ns and far.bandwidth_mb_s < cxl.bandwidth_mb_s < local.bandwidth_mb_s


def test_two_socket_has_one_vcpu_per_node_and_four_hmat_pairs() -> None:
    topo = load_topology(TWO_SOCKET)
    assert [n.cpus for n in topo.nodes] == [(0,), (1,)]
    assert [n.initiator for n in topo.nodes] == [0, 1]
    numa = _options(numa_args(topo), "-numa")
    assert "node,nodeid=1,cpus=1,memdev=mem1,initiator=1" in numa
    assert sum(n.startswith("hmat-lb,") for n in numa) == 8
    assert "hmat-lb,initiator=1,target=0,hierarchy=memory,data-type=access-latency,latency=180" in numa


def test_full_argv_machine_shares_and_ports(tmp_path: Path) -> None:
    topo = load_topology(CXL)
    rundir = tmp_path / "run, with space"
    plumbing = GuestPlumbing(Path("/usr/bin/qemu-system-x86_64"), Path("/k/vmlinuz"), Path("/k/initrd"),
                             rundir, rundir / "job", 7, 9)
    argv = build_argv(topo, plumbing)
    assert _options(argv, "-machine") == ["pc,hmat=on"]
    assert _options(argv, "-accel") == ["tcg"]
    assert _options(argv, "-m") == ["2048M"]
    assert _options(argv, "-smp") == ["2,sockets=2,cores=1,threads=1"]
    assert _options(argv, "-pidfile") == [str(rundir / "qemu.pid")]
    fsdev = _options(argv, "-fsdev")
    assert fsdev[0] == "local,id=fs_root,path=/,security_model=none,readonly=on,multidevs=remap"
    # The writable share is the job folder only, with QEMU's comma escaping.
    assert fsdev[1] == f"local,id=fs_job,path={str(rundir).replace(',', ',,')}/job,security_model=none,multidevs=remap"
    assert "readonly" not in fsdev[1]
    chardevs = _options(argv, "-chardev")
    assert "file,id=tieremu_out,path=/proc/self/fd/7,append=on" in chardevs
    assert "file,id=tieremu_err,path=/proc/self/fd/9,append=on" in chardevs
    assert "-no-reboot" in argv and "-nodefaults" in argv
    append = _options(argv, "-append")[0]
    assert "panic=-1" in append
    assert "tieremu.run=" + str(rundir).replace(" ", "%20") in append
    assert " " not in kernel_cmdline(rundir).split("tieremu.run=")[1]
    with pytest.raises(ValueError, match="valid: tcg, kvm"):
        build_argv(topo, plumbing, accel="hvf")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _good() -> dict:
    return yaml.safe_load(CXL.read_text())


@pytest.mark.parametrize(("mutate", "key", "words"), [
    (lambda d: d.update(colour="blue"), "colour", "unknown key"),
    (lambda d: d["nodes"][1].update(memory_mib=500), "nodes[1].memory_mib", "multiple of 128"),
    (lambda d: d["nodes"][2].update(speed=3), "nodes[2].speed", "unknown key"),
    (lambda d: d["nodes"][1].update(id=5), "nodes[1].id", "valid here: 1"),
    (lambda d: d["nodes"][0].update(vcpus=0), "nodes", "vCPUs in total"),
    (lambda d: d["nodes"][0].update(vcpus="two"), "nodes[0].vcpus", "expected int"),
    (lambda d: d["nodes"][0].update(memory_mib=2560), "nodes", "at most 3072 MiB"),
    (lambda d: d["nodes"][1].update(initiator=2), "nodes[1].initiator", "not a node with vCPUs"),
    (lambda d: d["distances"][1].__setitem__(1, 20), "distances[1][1]", "must be 10"),
    (lambda d: d["distances"][0].__setitem__(2, 300), "distances[0][2]", "valid: 11 to 254"),
    (lambda d: d["distances"].pop(), "distances", "2 rows for 3 nodes"),
    (lambda d: d["hmat"].pop(), "hmat", "no entry for initiator->target 0->2"),
    (lambda d: d["hmat"][1].update(initiator=1), "hmat[1].initiator", "not a node with vCPUs; valid: 0"),
    (lambda d: d["hmat"][2].update(latency_ns=0), "hmat[2].latency_ns", "valid: 1 to 65535"),
    (lambda d: d["hmat"][2].update(bandwidth="fast"), "hmat[2].bandwidth", "unknown key"),
    (lambda d: d["hmat"].append(dict(d["hmat"][0])), "hmat[3].target", "second entry"),
    (lambda d: d.update(name="cxl 3node"), "name", "letters, digits"),
])
def test_bad_topology_names_key_value_and_what_is_valid(tmp_path: Path, mutate, key: str, words: str) -> None:
    data = _good()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_cpuless_node_initiator_defaults_to_nearest_cpu_node(tmp_path: Path) -> None:
    data = yaml.safe_load(TWO_SOCKET.read_text())
    data["nodes"].append({"id": 2, "memory_mib": 256})
    data["distances"] = [[10, 21, 40], [21, 10, 17], [40, 17, 10]]
    data["hmat"] += [{"initiator": i, "target": 2, "latency_ns": 250, "bandwidth_mb_s": 8192} for i in (0, 1)]
    topo = load_topology(_write(tmp_path, data))
    assert topo.nodes[2].initiator == 1
    assert "node,nodeid=2,memdev=mem2,initiator=1" in numa_args(topo)
