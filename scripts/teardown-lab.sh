#!/usr/bin/env bash
# Restore every knob a lab profile changed, from its journal: `scripts/teardown-lab.sh PROFILE`, as root.
exec "$(dirname "$0")/lab.sh" teardown "$@"
