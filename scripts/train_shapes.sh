#!/usr/bin/env bash
# Trains the embedded Shapes-world model from scratch, all eight stages in order, on this machine.
#   bash scripts/train_shapes.sh            # fresh run into runs/shapes/
#   bash scripts/train_shapes.sh --resume   # continue after an interruption (each stage resumes or is skipped)
#   bash scripts/train_shapes.sh --resume train.num_threads=1   # extra KEY=VALUE overrides go to every stage
#   STAGE_ARGS_understand="loss.edit_target_readout=1.0" bash scripts/train_shapes.sh   # overrides for one stage
# The result is runs/shapes/remix/final; `python scripts/package_default_model.py` copies it into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
resume=()
if [ "${1:-}" = "--resume" ]; then resume=(--resume); shift; fi
for stage in vae pretrain align joint understand sft answers remix; do
  if [ -f "runs/shapes/$stage/final/config.json" ] || [ -f "runs/shapes/$stage/vae.safetensors" ]; then
    echo "== $stage: already finished, skipped"
    continue
  fi
  # STAGE_ARGS_<stage>: space-separated KEY=VALUE overrides for that stage alone, after the shared ones.
  stage_args_name="STAGE_ARGS_$stage"
  read -r -a stage_args <<< "${!stage_args_name:-}"
  echo "== $stage: $(date -u +%H:%M:%S) ${stage_args[*]}"
  "${PYTHON:-python}" -m unipic train "${resume[@]}" "configs/shapes/$stage.yaml" log.progress=false "$@" \
    "${stage_args[@]}"
done
echo "== done: $(date -u +%H:%M:%S)"
