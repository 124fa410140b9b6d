#!/usr/bin/env bash
# A Ray cluster of emulated CPU hosts on this machine, for laptops and tests: each host is one
# HostWorker process with its own JAX devices, all joined into one multi-process JAX job.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/local_cluster.sh [options] [-- FAX_TRAIN_ARGS...]

Without --start/--stop: train on a throwaway local cluster that lives as long as the run
(`fax train --emulate-hosts N --devices-per-host K FAX_TRAIN_ARGS`).

Options:
  --hosts N      emulated hosts (default: 2)
  --devices K    emulated CPU devices per host (default: 4)
  --start        instead: start a lasting local Ray head offering N hosts (then run
                 `fax train --address auto --devices-per-host K ...` as often as you like)
  --stop         stop the head started by --start
  --temp DIR     Ray's files for --start/--stop (default: /tmp/fax-ray-$USER)
  --dry-run      print the commands instead of running them
  -h, --help     this help

Example: scripts/local_cluster.sh --hosts 2 --devices 4 -- model=gpt-tiny train.steps=20
USAGE
}

HOSTS=2 DEVICES=4 MODE=train TEMP="/tmp/fax-ray-${USER:-user}" DRY_RUN=0 TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --devices) DEVICES="$2"; shift 2 ;;
    --start) MODE=start; shift ;;
    --stop) MODE=stop; shift ;;
    --temp) TEMP="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "local_cluster.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

run() {
  if ((DRY_RUN)); then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

case "$MODE" in
  train) run fax train --emulate-hosts "$HOSTS" --devices-per-host "$DEVICES" "${TRAIN_ARGS[@]}" ;;
  start) run ray start --head --node-ip-address=127.0.0.1 --temp-dir="$TEMP" --include-dashboard=false \
           --resources="{\"fax_host\": $HOSTS}" ;;
  stop) run ray stop ;;
esac
