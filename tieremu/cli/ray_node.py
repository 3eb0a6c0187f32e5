"""`tieremu ray-node [--head | --address ADDR] [--resource NAME]... [--start]`: the `ray start` command that makes
this host a node of a tieremu Ray cluster, declaring what its runs may need (tieremu.runner.needs); printed, or
run with --start."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import click

from tieremu.runner.backend import ADDRESS_ENV


@click.command("ray-node")
@click.option("--head", is_flag=True, help="Start the cluster's head here (else join ADDR).")
@click.option("--address", default=None, metavar="ADDR", envvar=ADDRESS_ENV,
              help=f"The head to join, HOST:PORT (default: ${ADDRESS_ENV}).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="--head: the port the head listens on (Ray's default: 6379).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs Ray may use here (default: all): at most this many runs at once on this host.")
@click.option("--resource", "extra", multiple=True, metavar="NAME",
              help="Declare NAME as well (a spec's job `requires: [NAME]` then runs only on such hosts); repeatable.")
@click.option("--start", is_flag=True, help="Run the command instead of printing it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the command (argv) and the declared resources as JSON instead (with --start: run it).")
def ray_node(head: bool, address: str | None, port: int | None, num_cpus: int | None, extra: tuple[str, ...],
             start: bool, as_json: bool) -> None:
    """Print or start `ray start` for this host, declaring the resources tieremu's runs need (NUMA nodes, QEMU, lab
    profiles, your own names).

    Declared: each NUMA node with memory, QEMU if installed, each active lab profile, the whole-host token that timed
    runs take, and every --resource NAME (a spec's job `requires: [NAME]` runs only where it is declared)."""
    from tieremu.lab import active_profiles
    from tieremu.numa.topology import discover
    from tieremu.runner.needs import host_offer

    if not head and address is None:
        raise click.UsageError(f"give --head to start a cluster here, or --address HOST:PORT (or ${ADDRESS_ENV}) "
                               "to join one")
    profiles = [str(p["name"]) for p in active_profiles() if p.get("applied_utc") and p.get("name")]
    offer = host_offer(discover(), lab_profiles=profiles, extra=extra)
    cmd = offer.ray_start(head=head, address=address, num_cpus=num_cpus)
    if head and port is not None:
        cmd[3:3] = ["--port", str(port)]
    # Ray 2.60 clusters started by `ray start` use token authentication: every host and driver needs the head's token.
    click.echo("# token authentication: the head writes its token to ~/.ray/auth_token; copy it to every other host "
               "(or set RAY_AUTH_TOKEN), and run drivers with RAY_AUTH_MODE=token (tieremu run --backend ray "
               "--address HEAD:PORT)", err=True)
    if not start:
        if as_json:
            click.echo(json.dumps({"command": cmd, "resources": offer.resources}, indent=2))
        else:
            click.echo(shlex.join(cmd))
        return
    ray = shutil.which("ray", path=_venv_bin())
    if ray is None:
        raise click.ClickException("the `ray` command is not installed: pip install 'tieremu[ray]'")
    sys.exit(subprocess.run([ray, *cmd[1:]], check=False).returncode)


def _venv_bin() -> str:
    """This interpreter's bin folder first: the ray next to tieremu, not another one on PATH."""
    import os
    from pathlib import Path

    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
