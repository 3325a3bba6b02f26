#!/usr/bin/env bash
# Submit an fl_llm run to a Ray cluster as a job, from the repository root or anywhere:
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh [CONFIG] [KEY=VALUE ...]
#   RAY_ADDRESS=http://127.0.0.1:8265 launch/submit.sh configs/default.yaml output_dir=/shared/runs/x
#
# The job's driver joins the cluster (ray.address=auto) and writes its run dir on the node it runs
# on: give output_dir a path on shared storage (an absolute path) to find it afterwards.
# Extra `ray job submit` flags go in SUBMIT_FLAGS (e.g. SUBMIT_FLAGS="--no-wait").
# Right after `ray start` the head may refuse jobs ("No available agent to submit job") until its
# job agent is up: nothing was submitted then, so this retries (SUBMIT_RETRIES times, 3 s apart).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-ray}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for attempt in $(seq 1 "${SUBMIT_RETRIES:-20}"); do
  set +e
  # shellcheck disable=SC2086
  "$RAY" job submit ${SUBMIT_FLAGS:-} --working-dir . --runtime-env launch/runtime_env.yaml \
    -- python -m fl_llm run "$@" ray.address=auto 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  set -e
  if [ "$code" -eq 0 ] || ! grep -q "No available agent to submit job" "$log"; then
    exit "$code"
  fi
  echo "submit.sh: the cluster's job agent is not up yet; retrying in 3 s (attempt $attempt)" >&2
  sleep 3
done
exit "$code"
