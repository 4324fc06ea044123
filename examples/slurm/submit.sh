#!/bin/bash
# Submit a whole stage-1 run: the teacher array, then the merge once every task succeeded.
#   bash examples/slurm/submit.sh        (from the directory where logs/ should go)
set -euo pipefail

# --- edit these ----------------------------------------------------------------------------
MODEL="meta-llama/Llama-3.1-8B-Instruct"       # a hub name or a local model directory
DATA="/data/sft/train.jsonl"                    # anything `datasets` loads
TEMPLATE_ARGS="--messages-field messages"       # or: --prompt-field prompt --response-field response
TOP_K=64
CACHE_PARTS="/scratch/$USER/logitcache/llama8b-parts"  # the workers write part-*-of-* here
CACHE="/scratch/$USER/logitcache/llama8b"              # the merged cache (must not exist yet)
VENV="${VENV:-}"                                # a virtualenv to activate in the jobs, if any
# --------------------------------------------------------------------------------------------

export MODEL DATA TEMPLATE_ARGS TOP_K CACHE_PARTS CACHE VENV
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p logs

array_job=$(sbatch --parsable --export=ALL "$here/teacher_array.sbatch")
ARRAY_JOB_ID="${array_job%%;*}"  # --parsable prints "id" or "id;cluster"
merge_job=$(sbatch --parsable --export=ALL --dependency="afterok:$ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
    "$here/merge.sbatch")
MERGE_JOB_ID="${merge_job%%;*}"

echo "teacher array: job $ARRAY_JOB_ID (logs/teacher-${ARRAY_JOB_ID}_*.out)"
echo "merge:         job $MERGE_JOB_ID, starts when every task succeeded (logs/merge-$MERGE_JOB_ID.out)"
echo "a task failed or ran out of time? run this script again: finished parts are kept, the rest resumes."
