#!/usr/bin/env bash
# Launch m2vla_jax training on a Cloud TPU VM pod slice.
#
#   ./launch_tpu.sh --name=m2vla-v5p --zone=us-east5-a --accelerator=v5p-64 \
#       --config=configs/oxe.py --workdir=gs://bucket/runs/oxe1 \
#       -- --config.init.checkpoint=gs://bucket/paligemma.npz --config.batch_size=1024
#
# Creates the TPU VM (or reuses it when it exists), copies this repository to every worker
# (--worker=all), installs the package there, and starts the same train command on all workers
# (jax.distributed.initialize() is auto-detected from the TPU environment). Arguments after `--` are
# passed to `python -m m2vla_jax.train`. --dry-run prints every command instead of running it.
set -euo pipefail

NAME="m2vla"
ZONE="us-central2-b"
ACCELERATOR="v4-8"
VERSION="tpu-ubuntu2204-base"
PROJECT=""
CONFIG="configs/oxe.py"
WORKDIR=""
SPOT=0
DRY_RUN=0
SESSION="m2vla_train"
EXTRA_ARGS=()

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF
Flags:
  --name=NAME              TPU VM name (default: $NAME)
  --zone=ZONE              GCE zone (default: $ZONE)
  --accelerator=TYPE       accelerator type, e.g. v4-8, v5p-64, v5litepod-16 (default: $ACCELERATOR)
  --version=VERSION        TPU software version / runtime (default: $VERSION)
  --project=PROJECT        GCP project (default: gcloud's configured project)
  --config=PATH[:ARGS]     training config (default: $CONFIG)
  --workdir=gs://...       run directory shared by all workers (required)
  --spot                   create a Spot (preemptible) VM; training resumes from checkpoints
  --dry-run                print the commands, run nothing
  -- ARGS...               extra arguments for python -m m2vla_jax.train
EOF
}

for arg in "$@"; do
  if [[ ${#EXTRA_ARGS[@]} -gt 0 || "$arg" == "--" ]]; then
    [[ "$arg" == "--" && ${#EXTRA_ARGS[@]} -eq 0 ]] && { EXTRA_ARGS=("--"); continue; }
    EXTRA_ARGS+=("$arg"); continue
  fi
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "launch_tpu.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
EXTRA_ARGS=("${EXTRA_ARGS[@]:1}")

if [[ -z "$WORKDIR" ]]; then
  echo "launch_tpu.sh: --workdir is required (a gs:// path every worker can reach)" >&2; exit 2
fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "launch_tpu.sh: --workdir must be a gs:// path on a multi-worker TPU VM, got '$WORKDIR'" >&2; exit 2
fi
if [[ ! "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  echo "launch_tpu.sh: --name '$NAME' must be lowercase letters, digits and dashes" >&2; exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

run() {
  # Print the command shell-quoted; run it unless --dry-run.
  local quoted; quoted=$(printf '%q ' "$@"); echo "+ ${quoted% }"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

REPO_DIR="$(cd "$(dirname "$0")" && pwd)"
REMOTE_DIR="m2vla_jax"
TRAIN_CMD="cd $REMOTE_DIR && . .venv/bin/activate && python -m m2vla_jax.train --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for a in "${EXTRA_ARGS[@]}"; do TRAIN_CMD+=" $(printf '%q' "$a")"; done
TRAIN_CMD+=" 2>&1 | tee -a \$HOME/m2vla_train.log"
INSTALL_CMD="cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip && pip install -q -e . && pip install -q 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# 1. Create the VM unless it exists (describe fails when it does not).
if [[ $DRY_RUN -eq 1 ]] || ! "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  [[ $DRY_RUN -eq 1 ]] && echo "# create the TPU VM unless '$NAME' exists (checked with: ${GCLOUD[*]} describe $NAME ${COMMON[*]})"
  CREATE=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
else
  echo "# reusing existing TPU VM '$NAME'"
fi

# 2. Copy the repository to every worker and install it.
run "${GCLOUD[@]}" scp --recurse "$REPO_DIR" "$NAME:~/$REMOTE_DIR" --worker=all "${COMMON[@]}"
run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${COMMON[@]}" --command="$INSTALL_CMD"

# 3. Start the same command on all workers, detached (tmux) so it survives the ssh session.
run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${COMMON[@]}" \
  --command="tmux kill-session -t $SESSION 2>/dev/null; tmux new-session -d -s $SESSION $(printf '%q' "$TRAIN_CMD")"
echo "# logs: ${GCLOUD[*]} ssh $NAME --worker=0 ${COMMON[*]} --command='tail -f ~/m2vla_train.log'"
