#!/bin/bash
# The vision-language demo of docs/vision.md, end to end and timed: generated data, the CLIP-style
# vision tower, the two recipes, held-out accuracy with real and with blank images.
#   bash scripts/vlm_demo.sh            # ~15 min on the shared 2-core machine at load 8
# OMP_NUM_THREADS=1: on a shared machine 2 threads spin-wait on each other (measured 13x slower under
# load 7); on an idle machine OMP_NUM_THREADS=2 is faster.
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
quiet() { grep --line-buffered -v "Writing model\|Loading weights\|torchvision" || true; }
rm -rf runs/clip_tower runs/vlm_lm runs/vlm_pretrain runs/vlm_sft
python scripts/build_vision_data.py
/usr/bin/time -f "clip tower wall %e s, cpu %U+%S s" python -m tinylm.posttrain.clip_train data/vision/clip_pairs.jsonl --out runs/clip_tower 2>&1 | quiet
# the demo's text LM: a random 128-wide, 4-layer tinylm (no pretrained text LM exists offline)
python -c "from tinylm.export.interop import init_model; init_model('tiny', 'runs/vlm_lm', hidden_size=128, intermediate_size=384)" 2>&1 | quiet
/usr/bin/time -f "pretrain wall %e s, cpu %U+%S s" tinylm train recipes/vlm_pretrain.yaml model=runs/vlm_lm vision.train_lm=all 2>&1 | quiet
/usr/bin/time -f "sft wall %e s, cpu %U+%S s" tinylm train recipes/vlm_sft.yaml 2>&1 | quiet
python -m tinylm.evaluation.vlm_eval runs/vlm_sft/final data/vision/heldout.jsonl --json runs/vlm_eval.json 2>&1 | quiet
python -m tinylm.evaluation.vlm_eval runs/vlm_sft/final data/vision/heldout.jsonl --blank data/vision/blank.png --json runs/vlm_eval_blank.json 2>&1 | quiet
python scripts/plot_vlm_curves.py runs/vlm_pretrain runs/vlm_sft --out docs/img/vlm_curves.png
uptime
