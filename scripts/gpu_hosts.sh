#!/usr/bin/env bash
# Train fax on a list of GPU hosts reachable over ssh: install fax on each, start Ray (head on the
# first host, the others join it with all their GPUs), run `fax train --ray`, stop Ray.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/gpu_hosts.sh --hosts FILE [options] STEP... [-- FAX_TRAIN_ARGS...]

FILE lists one ssh destination per line (user@host or an ~/.ssh/config alias); the first is the head.

Steps (run in the order given; `all` = install up train down):
  install   copy this checkout to every host (rsync) and pip install it with jax[cuda12]
  up        ray start --head on the first host, ray start --address=HEAD:PORT on the others
  train     fax train --ray --address auto FAX_TRAIN_ARGS on the head
  down      ray stop on every host (also done on exit by `all`, even after a failure)

Options:
  --hosts FILE       the host list (required)
  --gpus N           GPUs per host given to Ray (default: all that nvidia-smi lists)
  --port PORT        Ray head port (default: 6379)
  --dir DIR          where the checkout goes on each host (default: fax)
  --python PY        the Python on the hosts (default: python3)
  --dry-run          print the commands instead of running them
  -h, --help         this help

Checkpoints must go to a path every host sees (NFS, or gs:// / s3://), e.g.
  scripts/gpu_hosts.sh --hosts hosts.txt all -- model=llama-7b checkpoint.dir=/shared/ckpt/llama-7b
USAGE
}

HOSTS_FILE="" GPUS="" PORT=6379 DIR=fax PY=python3 DRY_RUN=0
STEPS=() TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --hosts) HOSTS_FILE="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    install|up|train|down) STEPS+=("$1"); shift ;;
    all) STEPS+=(install up train down); shift ;;
    *) echo "gpu_hosts.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((${#STEPS[@]})) || { usage >&2; exit 2; }
[[ -r "$HOSTS_FILE" ]] || { echo "gpu_hosts.sh: --hosts FILE is required and must be readable" >&2; exit 2; }
mapfile -t HOSTS < <(grep -v '^[[:space:]]*\(#\|$\)' "$HOSTS_FILE")
((${#HOSTS[@]})) || { echo "gpu_hosts.sh: $HOSTS_FILE lists no hosts" >&2; exit 2; }
HEAD="${HOSTS[0]}"

run() {
  if ((DRY_RUN)); then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

on() {  # on HOST COMMAND
  run ssh -o BatchMode=yes "$1" "$2"
}

gpus_flag() {
  if [[ -n "$GPUS" ]]; then echo "--num-gpus=$GPUS"; fi
}

install() {
  local src
  src="$(cd "$(dirname "$0")/.." && pwd)/"
  for host in "${HOSTS[@]}"; do
    run rsync -a --delete --exclude .git --exclude runs --exclude .cache "$src" "$host:$DIR/"
    on "$host" "$PY -m pip install -U 'jax[cuda12]' && $PY -m pip install -U ./$DIR"
  done
}

up() {
  local head_ip
  if ((DRY_RUN)); then head_ip=HEAD_IP; else head_ip="$(ssh -o BatchMode=yes "$HEAD" "hostname -I | cut -d' ' -f1")"; fi
  on "$HEAD" "ray start --head --port=$PORT $(gpus_flag)"
  for host in "${HOSTS[@]:1}"; do
    on "$host" "ray start --address=$head_ip:$PORT $(gpus_flag)"
  done
}

train() {
  local args
  args="$(printf ' %q' "${TRAIN_ARGS[@]}")"
  on "$HEAD" "fax train --ray --address auto$args"
}

down() {
  for host in "${HOSTS[@]}"; do
    on "$host" "ray stop" || true
  done
}

for step in "${STEPS[@]}"; do
  if [[ "$step" == up && " ${STEPS[*]} " == *" down "* ]]; then
    trap down EXIT
  fi
  case "$step" in
    install) install ;;
    up) up ;;
    train) train ;;
    down) trap - EXIT; down ;;
  esac
done
