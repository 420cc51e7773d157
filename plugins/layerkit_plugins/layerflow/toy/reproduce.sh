#!/usr/bin/env bash
# Rebuild the toy LayerFlow from nothing and print its evaluation table (CPU; run from the repo
# root). Every step is deterministic in its seed; each stage is exported into toy/weights (fp16)
# before the next stage trains from it, so the committed files are exactly what was evaluated.
set -euo pipefail
# One torch thread: on a shared 2-core machine two threads per process thrash (5-8x slower).
export OMP_NUM_THREADS=1
export_=(python -m layerkit_plugins.layerflow.toy.export)

nice -n 5 python -m layerkit_plugins.layerflow.toy.train_vae --out runs/toy_layerflow/base
"${export_[@]}" base runs/toy_layerflow/base

nice -n 5 layerkit train +experiment=toy_layerflow_stage1 output_dir=runs/toy_layerflow/stage1
"${export_[@]}" stage1 runs/toy_layerflow/stage1

nice -n 5 layerkit train +experiment=toy_layerflow_stage2 output_dir=runs/toy_layerflow/stage2
"${export_[@]}" stage2 runs/toy_layerflow/stage2

nice -n 5 layerkit train +experiment=toy_layerflow_stage3 output_dir=runs/toy_layerflow/stage3
"${export_[@]}" stage3 runs/toy_layerflow/stage3

nice -n 5 python -m layerkit_plugins.layerflow.toy.evaluate --num-samples 16 --seed 0
