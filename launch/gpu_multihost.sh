#!/usr/bin/env bash
# Run a config over the GPUs of a SLURM allocation (call it inside sbatch/salloc): srun starts one
# process per GPU (default) or per host; every process joins jax.distributed with the job's first
# node as coordinator.
#   launch/gpu_multihost.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [--per=gpu|host] [--port=N] [--distributed_timeout=S] [--dry-run]
# WORKDIR must be on a filesystem every node sees (checkpoints are written by all processes).
# Options may come anywhere on the line, before, between or after CONFIG and WORKDIR.
set -euo pipefail

usage() { [ $# -eq 0 ] || echo "error: $*" >&2; echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...] [--per=gpu|host] [--port=N] [--distributed_timeout=S] [--dry-run]" >&2; exit 2; }
show_help() { sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }  # the header above
dry_run=0 per=gpu port=12355
positional=() overrides=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) show_help ;;
    --dry-run) dry_run=1 ;;
    --per=gpu | --per=host) per=${arg#--per=} ;;
    --port=*) port=${arg#--port=} ;;
    --config.*=* | --distributed_timeout=*) overrides+=("$arg") ;;  # passed to danceopd_jax.main
    --*) echo "error: unknown option '$arg' (overrides look like --config.KEY=VALUE)" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[ ${#positional[@]} -eq 2 ] || usage "2 positional arguments expected, got ${#positional[@]}: ${positional[*]}"
config=${positional[0]} workdir=${positional[1]}
[ -f "$config" ] || { echo "error: config file '$config' not found" >&2; exit 2; }
[ -n "${SLURM_JOB_NODELIST:-}" ] || { echo "error: no SLURM allocation (SLURM_JOB_NODELIST unset): run inside sbatch or salloc" >&2; exit 2; }

nodes=${SLURM_JOB_NUM_NODES:-1}
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$gpus_per_node" -ge 1 ] || { echo "error: no GPUs found on this node" >&2; exit 2; }
command -v scontrol >/dev/null || { echo "error: scontrol not found: run inside a SLURM allocation" >&2; exit 2; }
coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ "$per" = gpu ]; then
  tasks_per_node=$gpus_per_node gpus_per_task=1
else
  tasks_per_node=1 gpus_per_task=$gpus_per_node
fi
# Each task expands its own rank: the single quotes keep $SLURM_PROCID for the task's shell.
main=$(printf '%q ' python -m danceopd_jax.main --config "$config" --workdir "$workdir" "${overrides[@]}" \
  "--coordinator_address=$coordinator:$port" "--num_processes=$((nodes * tasks_per_node))")
cmd=(srun "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node" "--gpus-per-task=$gpus_per_task" \
  bash -c "exec $main--process_id=\$SLURM_PROCID")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
