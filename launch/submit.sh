#!/usr/bin/env bash
# Submit an fl_llm run to a Ray cluster as a job, from the repository root or anywhere:
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh [CONFIG] [KEY=VALUE ...]
#   RAY_ADDRESS=http://127.0.0.1:8265 launch/submit.sh configs/default.yaml output_dir=/shared/runs/x
#
# The job's driver joins the cluster (ray.address=auto) and writes its run dir on the node it runs
# on: give output_dir a path on shared storage (an absolute path) to find it afterwards.
# Extra `ray job submit` flags go in SUBMIT_FLAGS (e.g. SUBMIT_FLAGS="--no-wait").
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-ray}"
# shellcheck disable=SC2086
exec "$RAY" job submit ${SUBMIT_FLAGS:-} --working-dir . --runtime-env launch/runtime_env.yaml \
  -- python -m fl_llm run "$@" ray.address=auto
