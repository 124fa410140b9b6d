#!/usr/bin/env bash
# Train fax on a Cloud TPU VM or pod slice: create it, install fax on every worker, start Ray
# (head on worker 0, the other workers join it), run `fax train --ray`, delete it.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/tpu_vm.sh [options] STEP... [-- FAX_TRAIN_ARGS...]

Steps (run in the order given; `all` = create install ray-up train down):
  create    gcloud compute tpus tpu-vm create (a single host or a pod slice)
  install   copy this checkout to every worker (--worker=all), pip install jax[tpu] and it
  ray-up    ray start --head on worker 0, ray start --address=HEAD:PORT on the others
  train     fax train --ray --address auto FAX_TRAIN_ARGS on worker 0
  down      delete the TPU VM (also done on exit by `all`, even after a failure)

Options:
  --name NAME        TPU VM name (default: fax-tpu)
  --zone ZONE        (default: us-central2-b)
  --type TYPE        accelerator type, e.g. v4-8, v4-32, v5litepod-16 (default: v4-8)
  --version VERSION  TPU software version (default: tpu-ubuntu2204-base)
  --project PROJECT  GCP project (default: gcloud's configured one)
  --spot             create a preemptible (spot) TPU VM
  --fax SPEC         install this pip requirement instead of copying the checkout
  --port PORT        Ray head port (default: 6379)
  --dry-run          print the commands instead of running them
  -h, --help         this help

Multi-host runs need a checkpoint path every worker sees, e.g.
  scripts/tpu_vm.sh --type v4-32 all -- model=llama-1b checkpoint.dir=gs://my-bucket/llama-1b
USAGE
}

NAME=fax-tpu ZONE=us-central2-b TYPE=v4-8 VERSION=tpu-ubuntu2204-base PROJECT="" SPOT=0
FAX_SPEC="" PORT=6379 DRY_RUN=0
STEPS=() TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --fax) FAX_SPEC="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    create|install|ray-up|train|down) STEPS+=("$1"); shift ;;
    all) STEPS+=(create install ray-up train down); shift ;;
    *) echo "tpu_vm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((${#STEPS[@]})) || { usage >&2; exit 2; }

run() {
  if ((DRY_RUN)); then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

on_workers() {  # on_workers WORKERS COMMAND: run a shell command on TPU workers (all, or an index)
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command "$2"
}

head_ip() {
  if ((DRY_RUN)); then echo HEAD_IP; return; fi
  "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[0].ipAddress)'
}

create() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION" "${extra[@]}"
}

install() {
  local spec="$FAX_SPEC"
  if [[ -z "$spec" ]]; then
    run "${TPU[@]}" scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$NAME:fax" "${WHERE[@]}" --worker=all
    spec="./fax"
  fi
  on_workers all "pip install -U 'jax[tpu]' && pip install -U '$spec'"
}

ray_up() {
  local ip
  ip="$(head_ip)"
  # Each worker learns its index from the metadata server; worker 0 is the head.
  on_workers all "n=\$(curl -s -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); ray stop --force >/dev/null 2>&1 || true; if [ \"\$n\" = 0 ]; then ray start --head --port=$PORT; else sleep 10; ray start --address=$ip:$PORT; fi"
}

train() {
  local args
  args="$(printf ' %q' "${TRAIN_ARGS[@]}")"
  on_workers 0 "fax train --ray --address auto$args"
}

down() {
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

for step in "${STEPS[@]}"; do
  if [[ "$step" == create && " ${STEPS[*]} " == *" down "* ]]; then
    trap down EXIT  # never leave a paid TPU VM behind when a later step fails
  fi
  case "$step" in
    create) create ;;
    install) install ;;
    ray-up) ray_up ;;
    train) train ;;
    down) trap - EXIT; down ;;
  esac
done
