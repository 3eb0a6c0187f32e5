#!/usr/bin/env bash
# Turn this server into a lab testbed: `scripts/setup-lab.sh PROFILE [--dry-run]`, as root (see lab.sh).
exec "$(dirname "$0")/lab.sh" apply "$@"
