#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice) from creation to teardown, with gcloud.
#   launch/tpu_vm.sh create  NAME --zone=Z [--type=v5litepod-8] [--version=IMAGE (default: the type's image)]
#   launch/tpu_vm.sh setup   NAME --zone=Z            copy this checkout to every worker, pip install -e '.[tpu]'
#   launch/tpu_vm.sh run     NAME --zone=Z CONFIG WORKDIR [--config.KEY=VALUE ...] [--distributed_timeout=S]   on --worker=all
#   launch/tpu_vm.sh delete  NAME --zone=Z
# Every subcommand takes --dry-run (print the gcloud commands, run nothing) and --slices=N (default 1).
# Options may come anywhere on the line, before, between or after ACTION, NAME, CONFIG and WORKDIR.
# N > 1 is a multislice job: one queued resource of N slices named NAME-0 .. NAME-<N-1>, set up and
# run on every slice at once; split the mesh over them with --config.dcn_mesh.data=N.
# Every worker runs the same command and joins jax.distributed (coordinator auto-detected on TPU);
# WORKDIR must be shared by the workers (a GCS FUSE or NFS mount).
set -euo pipefail

usage() { [ $# -eq 0 ] || echo "error: $*" >&2; sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
show_help() { sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }  # the header above
zone="" type=v5litepod-8 version="" dry_run=0 slices=1
positional=() overrides=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) show_help ;;
    --dry-run) dry_run=1 ;;
    --zone=*) zone=${arg#--zone=} ;;
    --type=*) type=${arg#--type=} ;;
    --version=*) version=${arg#--version=} ;;
    --slices=*) slices=${arg#--slices=} ;;
    --config.*=* | --distributed_timeout=*) overrides+=("$arg") ;;  # passed to danceopd_jax.main
    --*) echo "error: unknown option '$arg'" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[ ${#positional[@]} -ge 2 ] || usage "ACTION NAME (2 positional arguments) expected, got ${#positional[@]}: ${positional[*]}"
action=${positional[0]} name=${positional[1]}
case "$action" in
  create | setup | delete) expected=2 ;;
  run) expected=4 ;;  # ACTION NAME CONFIG WORKDIR
  *) echo "error: unknown action '$action'; valid: create, setup, run, delete" >&2; exit 2 ;;
esac
[ ${#positional[@]} -eq "$expected" ] || usage "$expected positional arguments expected, got ${#positional[@]}: ${positional[*]}"
[ -n "$zone" ] || { echo "error: --zone=ZONE is required" >&2; exit 2; }
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "error: --slices must be a positive integer, got '$slices'" >&2; exit 2; }
if [ -z "$version" ]; then  # the software image Cloud TPU documents for each generation
  case "$type" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "error: no default image for --type=$type: pass --version=IMAGE" >&2; exit 2 ;;
  esac
fi
remote_dir=danceopd_jax
tpu=(gcloud compute tpus tpu-vm)
queued=(gcloud compute tpus queued-resources)
nodes=("$name")
if [ "$slices" -gt 1 ]; then  # the node names a multislice queued resource gives its slices
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi

run() {  # print, or run, one command
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

ssh_all() {  # one command on every worker of every slice; slices at once, the launch fails if one does
  local node pids=()
  for node in "${nodes[@]}"; do
    if [ "$dry_run" = 1 ]; then run "${tpu[@]}" ssh "$node" "--zone=$zone" --worker=all "--command=$1"
    else "${tpu[@]}" ssh "$node" "--zone=$zone" --worker=all "--command=$1" & pids+=("$!"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

case "$action" in
  create)
    if [ "$slices" -eq 1 ]; then
      run "${tpu[@]}" create "$name" "--zone=$zone" "--accelerator-type=$type" "--version=$version"
    else
      run "${queued[@]}" create "$name" "--zone=$zone" "--accelerator-type=$type" "--runtime-version=$version" \
        "--node-count=$slices" "--node-prefix=$name"
    fi ;;
  setup)
    for node in "${nodes[@]}"; do
      run "${tpu[@]}" scp --recurse . "$node:$remote_dir" "--zone=$zone" --worker=all
    done
    ssh_all "cd $remote_dir && python3 -m pip install -q -e '.[tpu]'" ;;
  run)
    [ -f "${positional[2]}" ] || { echo "error: config file '${positional[2]}' not found" >&2; exit 2; }
    main=$(printf '%q ' python3 -m danceopd_jax.main --config "${positional[2]}" --workdir "${positional[3]}" \
      "${overrides[@]}" --distributed)
    ssh_all "cd $remote_dir && $main" ;;
  delete)
    if [ "$slices" -eq 1 ]; then
      run "${tpu[@]}" delete "$name" "--zone=$zone" --quiet
    else  # the queued resource and its slices
      run "${queued[@]}" delete "$name" "--zone=$zone" --force --quiet
    fi ;;
esac
