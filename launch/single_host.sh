#!/usr/bin/env bash
# Run a config on this host (all local accelerators), resuming when WORKDIR has checkpoints.
#   launch/single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]
# Options may come anywhere on the line, before, between or after CONFIG and WORKDIR.
set -euo pipefail

usage() { [ $# -eq 0 ] || echo "error: $*" >&2; echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]" >&2; exit 2; }
show_help() { sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }  # the header above
dry_run=0
positional=() overrides=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) show_help ;;
    --dry-run) dry_run=1 ;;
    --config.*=*) overrides+=("$arg") ;;
    --*) echo "error: unknown option '$arg' (overrides look like --config.KEY=VALUE)" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[ ${#positional[@]} -eq 2 ] || usage "2 positional arguments expected, got ${#positional[@]}: ${positional[*]}"
config=${positional[0]} workdir=${positional[1]}
[ -f "$config" ] || { echo "error: config file '$config' not found" >&2; exit 2; }

cmd=(python -m danceopd_jax.main --config "$config" --workdir "$workdir" "${overrides[@]}")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$workdir"
exec "${cmd[@]}"
