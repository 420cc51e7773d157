#!/usr/bin/env bash
# Rebuild the toy LayerFlow from nothing and print its evaluation table (CPU; run from the repo
# root). Every step is deterministic in its seed; each stage is exported into toy/weights (fp16)
# before the next stage trains from it, so the committed files are exactly what was evaluated.
# Timings in MODEL_CARD.md: one job at a time on an otherwise idle 2-core machine, 2 torch threads.
# On a machine shared with other jobs use OMP_NUM_THREADS=1 (two threads then thrash, 5-8x slower).
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export_=(python -m layerkit_plugins.layerflow.toy.export)

python -m layerkit_plugins.layerflow.toy.train_vae --out runs/toy_layerflow/base --threads "$OMP_NUM_THREADS"
"${export_[@]}" base runs/toy_layerflow/base

layerkit train +experiment=toy_layerflow_stage1 output_dir=runs/toy_layerflow/stage1
"${export_[@]}" stage1 runs/toy_layerflow/stage1

layerkit train +experiment=toy_layerflow_stage2 output_dir=runs/toy_layerflow/stage2
"${export_[@]}" stage2 runs/toy_layerflow/stage2

layerkit train +experiment=toy_layerflow_stage3 output_dir=runs/toy_layerflow/stage3
"${export_[@]}" stage3 runs/toy_layerflow/stage3

python -m layerkit_plugins.layerflow.toy.evaluate --num-samples 16 --seed 0
