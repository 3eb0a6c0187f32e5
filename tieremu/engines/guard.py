"""`python -m tieremu.engines.guard ARGV...`: ARGV run under a guard that leads ARGV's process group, so that the
whole group (ARGV and every process it starts: vLLM's API server, its engine core, their helpers) dies with the
tieremu that started it, however that one dies.

tieremu starts the guard in a session of its own with the read end of a pipe as its stdin and keeps the write end:
when tieremu exits, even killed outright with SIGKILL, the kernel closes the write end, the guard reads EOF and
kills its group (its PR_SET_PDEATHSIG, a SIGTERM it handles, does the same). A PR_SET_PDEATHSIG of SIGKILL on the
server alone would not do: it reaches only the direct child, and vLLM's engine core (a child of the API server) is
left running, or hung in its start-up handshake. When ARGV exits by itself the guard
exits with its code, and tieremu kills what is left of the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from tieremu.engines.procs import die_with_parent


def _kill_group() -> None:
    os.killpg(0, signal.SIGKILL)  # the guard goes with its group


def _watch_stdin() -> None:
    while os.read(0, 65536):
        pass
    _kill_group()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tieremu.engines.guard ARGV...", file=sys.stderr)
        return 2
    if os.getpgid(0) != os.getpid():
        print("tieremu-engine-error: the guard must lead its own process group (start_new_session)", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _kill_group())
    # Its parent's death is a SIGTERM (handled: the group is killed), not a SIGKILL that would leave the group.
    die_with_parent(signal.SIGTERM)
    # stdout and stderr are the guard's (the server's log); the server dies with the guard.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    threading.Thread(target=_watch_stdin, name="tieremu-guard", daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
