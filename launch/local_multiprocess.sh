#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own CPU devices, joined by jax.distributed
# (gloo collectives, coordinator on 127.0.0.1): a real multi-host run without a cluster.
#   launch/local_multiprocess.sh PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.KEY=VALUE ...] [--port=N]
#       [--distributed_timeout=S] [--dry-run]
# Process 0 prints to this terminal; process i > 0 logs to WORKDIR/logs/process_i.log. Exits
# non-zero when any process fails. The caller's XLA_FLAGS are kept, with the device count added.
# Options may come anywhere on the line, before, between or after the positional arguments.
set -euo pipefail

usage() { [ $# -eq 0 ] || echo "error: $*" >&2; echo "usage: $0 PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.KEY=VALUE ...] [--port=N] [--distributed_timeout=S] [--dry-run]" >&2; exit 2; }
show_help() { sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }  # the header above
dry_run=0 port=12355
positional=() overrides=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) show_help ;;
    --dry-run) dry_run=1 ;;
    --port=*) port=${arg#--port=} ;;
    --config.*=* | --distributed_timeout=*) overrides+=("$arg") ;;  # passed to danceopd_jax.main
    --*) echo "error: unknown option '$arg' (overrides look like --config.KEY=VALUE)" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[ ${#positional[@]} -eq 4 ] || usage "4 positional arguments expected, got ${#positional[@]}: ${positional[*]}"
processes=${positional[0]} devices=${positional[1]} config=${positional[2]} workdir=${positional[3]}
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || { echo "error: PROCESSES must be a positive integer, got '$processes'" >&2; exit 2; }
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICES_PER_PROCESS must be a positive integer, got '$devices'" >&2; exit 2; }
[ -f "$config" ] || { echo "error: config file '$config' not found" >&2; exit 2; }

command_of() {  # the command line of process $1
  printf '%q ' env JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" \
    python -m danceopd_jax.main --config "$config" --workdir "$workdir" "${overrides[@]}" \
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$processes" "--process_id=$1"
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < processes; i++)); do command_of "$i"; echo; done
  exit 0
fi
mkdir -p "$workdir/logs"
pids=()
for ((i = 1; i < processes; i++)); do
  eval "$(command_of "$i")" >"$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
eval "$(command_of 0)" || status=$?
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
