#!/usr/bin/env bash
# Run a config on this host (all local accelerators), resuming when WORKDIR has checkpoints.
#   launch/single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]
set -euo pipefail

usage() { echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]" >&2; exit 2; }
[ $# -ge 2 ] || usage
config=$1 workdir=$2
shift 2
dry_run=0
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --config.*=*) overrides+=("$arg") ;;
    *) echo "error: unexpected argument '$arg' (overrides look like --config.KEY=VALUE)" >&2; exit 2 ;;
  esac
done
[ -f "$config" ] || { echo "error: config file '$config' not found" >&2; exit 2; }

cmd=(python -m danceopd_jax.main --config "$config" --workdir "$workdir" "${overrides[@]}")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$workdir"
exec "${cmd[@]}"
