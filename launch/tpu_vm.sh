#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice) from creation to teardown, with gcloud.
#   launch/tpu_vm.sh create  NAME --zone=Z [--type=v5litepod-8] [--version=IMAGE (default: the type's image)]
#   launch/tpu_vm.sh setup   NAME --zone=Z            copy this checkout to every worker, pip install -e '.[tpu]'
#   launch/tpu_vm.sh run     NAME --zone=Z CONFIG WORKDIR [--config.KEY=VALUE ...]   on --worker=all
#   launch/tpu_vm.sh delete  NAME --zone=Z
# Every subcommand takes --dry-run (print the gcloud commands, run nothing). On a pod slice every
# worker runs the same command and joins jax.distributed (coordinator auto-detected on TPU);
# WORKDIR must be shared by the workers (a GCS FUSE or NFS mount).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 name=$2
shift 2
zone="" type=v5litepod-8 version="" dry_run=0
positional=() overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --zone=*) zone=${arg#--zone=} ;;
    --type=*) type=${arg#--type=} ;;
    --version=*) version=${arg#--version=} ;;
    --config.*=*) overrides+=("$arg") ;;
    --*) echo "error: unknown option '$arg'" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[ -n "$zone" ] || { echo "error: --zone=ZONE is required" >&2; exit 2; }
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

run() {  # print, or run, one command
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$action" in
  create)
    run "${tpu[@]}" create "$name" "--zone=$zone" "--accelerator-type=$type" "--version=$version" ;;
  setup)
    run "${tpu[@]}" scp --recurse . "$name:$remote_dir" "--zone=$zone" --worker=all
    run "${tpu[@]}" ssh "$name" "--zone=$zone" --worker=all \
      "--command=cd $remote_dir && python3 -m pip install -q -e '.[tpu]'" ;;
  run)
    [ ${#positional[@]} -eq 2 ] || { echo "error: run needs CONFIG WORKDIR" >&2; exit 2; }
    [ -f "${positional[0]}" ] || { echo "error: config file '${positional[0]}' not found" >&2; exit 2; }
    main=$(printf '%q ' python3 -m danceopd_jax.main --config "${positional[0]}" --workdir "${positional[1]}" \
      "${overrides[@]}" --distributed)
    run "${tpu[@]}" ssh "$name" "--zone=$zone" --worker=all "--command=cd $remote_dir && $main" ;;
  delete)
    run "${tpu[@]}" delete "$name" "--zone=$zone" --quiet ;;
  *) echo "error: unknown action '$action'; valid: create, setup, run, delete" >&2; exit 2 ;;
esac
