#!/usr/bin/env bash
# Rebuild the toy LayerFlow from nothing and print its tables (CPU; run from the repo root). Every
# step is deterministic in its seed; each stage is exported into toy/weights (fp16) before the next
# stage trains from it, so the committed files are exactly what was evaluated. Timings in
# MODEL_CARD.md: one job at a time, 1 torch thread, on a 2-core machine shared with other jobs (stage 1
# and the sixth VAE run: 2 threads, alone).
#   TRIED=1 plugins/layerkit_plugins/layerflow/toy/reproduce.sh   # also the runs behind "what was tried"
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export_=(python -m layerkit_plugins.layerflow.toy.export)
R=runs/toy_layerflow
# every packed segment's loss weighs 1: the stage-1 recipes tried before the committed one, whose
# toy_layerflow_stage1.yaml weighs the foreground's and the matte's latent frames 3 (null, not {}:
# Hydra merges {} into those weights)
UNIT=(train.segment_loss_weights=null)

# the three stages in a copy T/weights of the committed base folder, stage 1 with the overrides given
# after T (the tried variants of stage 1; their stages 2 and 3 as committed)
stages_in_copy() {
  local T=$1; shift
  mkdir -p $T/weights && cp -r plugins/layerkit_plugins/layerflow/toy/weights/{transformer,vae,text_encoder,tokenizer,scheduler} $T/weights/
  layerkit train +experiment=toy_layerflow_stage1 backbone.path=$T/weights "$@" output_dir=$T/stage1
  "${export_[@]}" stage1 $T/stage1 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage2 backbone.path=$T/weights layerflow.stage1_weights=$T/weights/stage1.safetensors \
      output_dir=$T/stage2
  "${export_[@]}" stage2 $T/stage2 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage3 backbone.path=$T/weights layerflow.stage1_weights=$T/weights/stage1.safetensors \
      layerflow.stage2_weights=$T/weights/stage2.safetensors output_dir=$T/stage3
  "${export_[@]}" stage3 $T/stage3 --to $T/weights
}

if [[ "${TRIED:-0}" == 1 ]]; then
  # issue 12's finding, rerun on the recipe before it (single layers drawn 3:3:1:1, 9 frames):
  # alpha in the mix from step 0, then with the alpha weight at 0 for 300 steps (both fail the check)
  layerkit toy-layerflow-vae --packing single --frames 9 --clips-per-step 8 --layer-weights 3 3 1 1 \
      --alpha-warmup 0 --chroma-weight 0 --steps 500 --val-every 25 --no-write --out $R/tried/vae_single || true
  layerkit toy-layerflow-vae --packing single --frames 9 --clips-per-step 8 --layer-weights 3 3 1 1 \
      --alpha-warmup 300 --chroma-weight 0 --steps 500 --val-every 25 --no-write --out $R/tried/vae_single_warmup || true
  # packed clips, one pass: the warm-up alone, then with the colour-opponent L1 term (600 steps each)
  layerkit toy-layerflow-vae --steps 600 --val-every 50 --layer-weights 2 2 1 1 --alpha-warmup 300 \
      --chroma-weight 0 --no-write --out $R/tried/vae_packed_warmup || true
  layerkit toy-layerflow-vae --steps 600 --val-every 50 --layer-weights 2 2 1 1 --alpha-warmup 300 \
      --chroma-weight 1 --no-write --out $R/tried/vae_packed_warmup_chroma || true
fi

if [[ "${TRIED:-0}" == 1 ]]; then
  # the patch-1 denoiser (64 tokens per latent frame; benchmarks/bench_toy_geometry.py), its given
  # layers encoded as sampling encodes them (train.given_latents=sampled), after the VAE below:
  # weights/tried_patch1/{stage1,stage2,stage3,eval_p1}.json
  TRIED_AFTER_VAE=1  # (these now decode with the sixth decoder: their records were made with the fifth)
fi

# the VAE as it was built (seven runs; vae_training_{1,2,3,4_accept,5_decoder,6_latent_noise,7_composite}.json): 3000 steps with the alpha
# warm-up (colours right, alpha IoU 0.846 < 0.9: rejected), 1000 more with the matte weighted 3
# (0.874: rejected), 1200 more weighted 6 at lr 5e-4 (0.896 / 0.898: rejected), then accepted as it
# was at a 0.85 floor (no training; the issue's 0.9 was not reached)
layerkit toy-layerflow-vae --out $R/base --threads "$OMP_NUM_THREADS" || true
layerkit toy-layerflow-vae --init $R/base/rejected_vae --steps 1000 --lr 3e-4 --alpha-warmup 0 \
    --layer-weights 1 3 1 1 --val-every 250 --out $R/base2 --threads "$OMP_NUM_THREADS" || true
layerkit toy-layerflow-vae --init $R/base2/rejected_vae --steps 1200 --lr 5e-4 --alpha-warmup 0 \
    --layer-weights 1 6 1 1 --val-every 300 --out $R/base3 --threads "$OMP_NUM_THREADS" || true
layerkit toy-layerflow-vae --init $R/base3/rejected_vae --steps 0 --min-alpha-iou 0.85 --val-every 0 \
    --out $R/base4 --threads "$OMP_NUM_THREADS"
"${export_[@]}" base $R/base4
# a fifth run fine-tunes only the decoder of that (exported, fp16) VAE with the matte weighted 6: the
# latents and the scaling factor stay as they are, alpha IoU 0.904 / 0.907 >= 0.9 (vae_training_5_decoder.json);
# its folder also holds the seeded untrained transformer (model.TRANSFORMER_CONFIG) the base pretraining
# below starts from
layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder --steps 1500 \
    --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --max-minutes 35 --out $R/base5 --threads "$OMP_NUM_THREADS"
"${export_[@]}" base $R/base5
mv plugins/layerkit_plugins/layerflow/toy/weights/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/vae_training_5_decoder.json
# a sixth run fine-tunes that decoder again on latents plus Gaussian noise (std per clip from U(0, 0.15),
# scaled latent units), so that a denoiser's imprecise latents still decode to clean mattes (the encoder
# and so the latents unchanged: the stages train the same on either side of it; it was run after them): alpha IoU 0.905 / 0.908, and 0.866 with latent
# noise of MSE 0.02 (0.819 before); vae_training_6_latent_noise.json. (--latent-noise 0.3 was tried:
# 0.894 < 0.9, rejected; TRIED=1 reruns it)
layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder --steps 1500 \
    --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --val-every 500 --max-minutes 35 \
    --out $R/base8_latent_noise015 --threads "$OMP_NUM_THREADS"
if [[ "${TRIED:-0}" == 1 ]]; then
  layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder --steps 1500 \
      --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.3 --val-every 500 --max-minutes 35 \
      --out $R/tried/base7_latent_noise --threads "$OMP_NUM_THREADS" || true
fi
"${export_[@]}" base $R/base8_latent_noise015
mv plugins/layerkit_plugins/layerflow/toy/weights/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/vae_training_6_latent_noise.json
# a seventh run fine-tunes that decoder once more with an L1 term on blended - (fg over grey + bg x
# (1 - alpha)) of the decoded packed clip, so that the decoded layers composite (run after the stages;
# the encoder unchanged): alpha IoU 0.902, compositing error 0.047 -> 0.038 (vae_training_7_composite.json);
# weight 5 was tried: 0.880 < 0.9, rejected (TRIED=1 reruns it)
layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder --steps 1500 \
    --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight 1 --val-every 500 \
    --max-minutes 35 --out $R/base9_composite --threads "$OMP_NUM_THREADS"
if [[ "${TRIED:-0}" == 1 ]]; then
  layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder --steps 1500 \
      --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight 5 --val-every 500 \
      --max-minutes 35 --out $R/tried/base9_composite5 --threads "$OMP_NUM_THREADS" || true
fi
"${export_[@]}" base $R/base9_composite
mv plugins/layerkit_plugins/layerflow/toy/weights/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/vae_training_7_composite.json

if [[ "${TRIED_AFTER_VAE:-0}" == 1 ]]; then
  T=$R/tried/patch1
  python - "$T" <<'PY'
import sys
from pathlib import Path
import torch
from diffusers import AutoencoderKLCogVideoX
from layerkit_plugins.cogvideox.backbone import save_components
from layerkit_plugins.layerflow.toy.model import build_components
vae = AutoencoderKLCogVideoX.from_pretrained("plugins/layerkit_plugins/layerflow/toy/weights/vae", torch_dtype=torch.float32)
save_components(build_components(0, vae=vae, patch_size=1, attention_head_dim=16, spatial_interpolation_scale=1.875),
                Path(sys.argv[1]) / "base")
PY
  "${export_[@]}" base $T/base --to $T/weights
  layerkit train +experiment=toy_layerflow_stage1 backbone.path=$T/weights train.given_latents=sampled \
      trainer.max_steps=2600 train.compile=false train.loss_weighting=none "${UNIT[@]}" \
      output_dir=$T/stage1
  "${export_[@]}" stage1 $T/stage1 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage2 backbone.path=$T/weights train.given_latents=sampled \
      layerflow.stage1_weights=$T/weights/stage1.safetensors output_dir=$T/stage2
  "${export_[@]}" stage2 $T/stage2 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage3 backbone.path=$T/weights train.given_latents=sampled \
      layerflow.stage1_weights=$T/weights/stage1.safetensors layerflow.stage2_weights=$T/weights/stage2.safetensors \
      output_dir=$T/stage3
  "${export_[@]}" stage3 $T/stage3 --to $T/weights
  # its table: the committed files replaced by these (the evaluator reads the package's weights)
  # the model committed before (width 64, CogVideoX-2B's spatial_interpolation_scale 1.875, given
  # layers from the one pass, 12000 clips, 4000 steps): weights/tried_width64/stage{1,2,3}.json
  T=$R/tried/width64
  python - "$T" <<'PY'
import sys
from pathlib import Path
import torch
from diffusers import AutoencoderKLCogVideoX
from layerkit_plugins.cogvideox.backbone import save_components
from layerkit_plugins.layerflow.toy.model import build_components
vae = AutoencoderKLCogVideoX.from_pretrained("plugins/layerkit_plugins/layerflow/toy/weights/vae", torch_dtype=torch.float32)
save_components(build_components(0, vae=vae, attention_head_dim=16, spatial_interpolation_scale=1.875),
                Path(sys.argv[1]) / "base")
PY
  "${export_[@]}" base $T/base --to $T/weights
  W64=(backbone.path=$T/weights train.given_latents=clip)
  layerkit train +experiment=toy_layerflow_stage1 "${W64[@]}" trainer.max_steps=4000 train.compile=false data.size=12000 \
      train.loss_weighting=none "${UNIT[@]}" output_dir=$T/stage1
  "${export_[@]}" stage1 $T/stage1 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage2 "${W64[@]}" layerflow.stage1_weights=$T/weights/stage1.safetensors \
      output_dir=$T/stage2
  "${export_[@]}" stage2 $T/stage2 --to $T/weights
  layerkit train +experiment=toy_layerflow_stage3 "${W64[@]}" layerflow.stage1_weights=$T/weights/stage1.safetensors \
      layerflow.stage2_weights=$T/weights/stage2.safetensors output_dir=$T/stage3
  "${export_[@]}" stage3 $T/stage3 --to $T/weights
fi

if [[ "${TRIED:-0}" == 1 ]]; then
  # A 16-channel VAE (the card's "Tried and not kept: a 16-channel VAE"; records in weights/tried_vae16/).
  # (the composite-implied matte through the committed 8-channel VAE, and which decoded layer loses it:
  # `toy-layerflow-diagnose implied --num 4`, run with the diagnostics at the end)
  # 16 latent channels trained from scratch lose the colours (red and blue tied; with a 600-step
  # warm-up and the colour-opponent term, red and green): tried_vae16/vae_training_fresh.json
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --latent-channels 16 --steps 2400 --layer-weights 1 3 1 1 \
      --val-every 800 --max-minutes 30 --threads 2 --out $R/tried/vae16_fresh || true
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --latent-channels 16 --steps 3000 --layer-weights 1 3 1 1 \
      --alpha-warmup 600 --chroma-weight 1 --val-every 600 --max-minutes 30 --threads 2 \
      --out $R/tried/vae16_fresh_chroma || true   # stopped by hand at step 1550 (red and green tied at 1200)
  # grown from the committed VAE (train_vae.grow_latent_channels: it first encodes and decodes exactly as
  # the 8-channel one), every part trained, background and blended weighted 2: vae_training_grow16.json
  T=$R/tried/vae16
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae \
      --latent-channels 16 --steps 2000 --lr 5e-4 --alpha-warmup 0 --layer-weights 1 3 2 2 --val-every 500 \
      --max-minutes 15 --threads 2 --out $T/grow
  # the implied-matte term at weight 1 (vae_training_implied1.json) and 10 (vae_training_implied10.json:
  # the encoder the stages below were trained on)
  for w in 1 10; do
    OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init $T/grow/vae --steps 1000 --lr 3e-4 --alpha-warmup 0 \
        --layer-weights 1 3 2 2 --implied-weight $w --val-every 500 --max-minutes 10 --threads 2 --out $T/implied$w
  done
  # its base and three stages, as the committed recipe (base 25.4 min, stage 1 37.5 min: two threads, alone)
  mkdir -p $T/weights && "${export_[@]}" base $T/implied10 --to $T/weights
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_base backbone.path=$T/weights output_dir=$T/base_t2v
  "${export_[@]}" pretrained $T/base_t2v --to $T/weights
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 backbone.path=$T/weights output_dir=$T/stage1
  "${export_[@]}" stage1 $T/stage1 --to $T/weights
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage2 backbone.path=$T/weights \
      layerflow.stage1_weights=$T/weights/stage1.safetensors output_dir=$T/stage2
  "${export_[@]}" stage2 $T/stage2 --to $T/weights
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage3 backbone.path=$T/weights \
      layerflow.stage1_weights=$T/weights/stage1.safetensors layerflow.stage2_weights=$T/weights/stage2.safetensors \
      output_dir=$T/stage3
  "${export_[@]}" stage3 $T/stage3 --to $T/weights
  D=$T/weights
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "backbone.path=$D weights=$D/stage1.safetensors"
  layerkit toy-layerflow-eval --split val --num-samples 32 --grid "backbone.path=$D \
      layerflow.stage1_weights=$D/stage1.safetensors layerflow.stage2_weights=$D/stage2.safetensors weights=$D/stage3.safetensors"
  # the decoder alone once more (latent noise 0.15, composite 2, implied 10): alpha IoU 0.881 < 0.9, rejected
  # (vae_training_decoder_rejected.json); the stages sampled through its rejected_vae/ all the same
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init $T/implied10/vae --parts decoder --steps 1500 --lr 3e-4 \
      --alpha-warmup 0 --layer-weights 1 3 2 2 --latent-noise 0.15 --composite-weight 2 --implied-weight 10 \
      --val-every 500 --max-minutes 12 --threads 2 --out $T/decoder || true
  mkdir -p $T/weights_decoder && cp -r $D/* $T/weights_decoder/ && rm -rf $T/weights_decoder/vae \
      && cp -r $T/decoder/rejected_vae $T/weights_decoder/vae
  D=$T/weights_decoder
  layerkit toy-layerflow-eval --split val --num-samples 32 --grid "backbone.path=$D \
      layerflow.stage1_weights=$D/stage1.safetensors layerflow.stage2_weights=$D/stage2.safetensors weights=$D/stage3.safetensors"
  # the implied-matte term on the committed 8-channel decoder alone (the seventh run's recipe plus the
  # term): alpha IoU 0.893 < 0.9, rejected (vae_training_decoder8_implied.json); the committed stages
  # sampled through its rejected_vae/
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder \
      --steps 1500 --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight 1 \
      --implied-weight 10 --val-every 500 --max-minutes 12 --threads 2 --out $R/tried/vae8_implied || true
  D=$R/tried/vae8_implied/weights
  mkdir -p $D && cp -r plugins/layerkit_plugins/layerflow/toy/weights/{transformer,text_encoder,tokenizer,scheduler} $D/ \
      && cp -r $R/tried/vae8_implied/rejected_vae $D/vae
  layerkit toy-layerflow-eval --split val --num-samples 32 --grid "backbone.path=$D"
fi

# the base transformer pretrained on plain text-to-video (blended clips alone, task.layout=video), as
# LayerFlow fine-tunes a pretrained CogVideoX: its EMA replaces the seeded transformer/ (base_t2v.json)
layerkit train +experiment=toy_layerflow_base output_dir=$R/base_t2v
"${export_[@]}" pretrained $R/base_t2v
if [[ "${TRIED:-0}" == 1 ]]; then
  # (the tried stage-1 recipes below weigh the loss as v-prediction does, train.loss_weighting=none,
  # unless they say otherwise; the committed one uses Min-SNR-gamma)
  # stage 1 from the same base with the recipe before (6000 steps on 4000 clips), then its stages 2
  # and 3: weights/tried_pretrained_6000/stage{1,2,3}.json (worse on the val split than 14000 on 8000)
  stages_in_copy $R/tried/pretrained_6000 trainer.max_steps=6000 data.size=4000 train.compile=false \
      train.loss_weighting=none "${UNIT[@]}"
  # stage 1 for 14000 steps, eager (40.3 min), then stages 2 and 3: weights/tried_14000/stage{1,2,3}.json
  # (worse on the val split than 17000 compiled)
  stages_in_copy $R/tried/stage1_14000 trainer.max_steps=14000 train.compile=false train.loss_weighting=none "${UNIT[@]}"
  # the model committed before that one: 17000 steps compiled (44.7 min in its session), v-prediction's
  # weighting: weights/tried_17000/stage{1,2,3}.json (worse on the val split than Min-SNR)
  OMP_NUM_THREADS=2 stages_in_copy $R/tried/stage1_17000 trainer.max_steps=17000 train.loss_weighting=none "${UNIT[@]}"
  # Min-SNR-gamma 2 for 17000 steps: better on the val split than minsnr2_14000 below, but 49.9 min
  # (over the 45-minute budget on the machine of that session): weights/tried_minsnr2_17000/
  OMP_NUM_THREADS=2 stages_in_copy $R/tried/minsnr2_17000 trainer.max_steps=17000 "${UNIT[@]}"
  # the model committed before this one: Min-SNR-gamma 2, 14000 steps, every segment 1 (40.6 min):
  # weights/tried_minsnr2_14000/stage{1,2,3}.json (worse on the val split than the segment weights)
  OMP_NUM_THREADS=2 stages_in_copy $R/tried/minsnr2_14000 "${UNIT[@]}"
  # Min-SNR-gamma loss weighting against v-prediction's own, stage 1 alone at 6000 steps on 4000
  # clips (the card's "Measured for the next model"; the baseline is the pretrained_6000 stage 1)
  for gamma in 5 2; do
    OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=6000 data.size=4000 \
        train.loss_weighting=min_snr train.snr_gamma=$gamma "${UNIT[@]}" output_dir=$R/tried/minsnr${gamma}_6000
    layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
        --rows 'stage 1 alone, decompose' --grid "weights=$R/tried/minsnr${gamma}_6000/weights.safetensors sampler.guidance_scale=2.0"
  done
  # the segment weights at 6000 steps (foreground and matte 3 against the gamma-2 run above, whose
  # segments all weigh 1; the card's figures decode with the sixth decoder, these with the seventh)
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=6000 data.size=4000 \
      output_dir=$R/tried/seg33_minsnr2_6000
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "weights=$R/tried/seg33_minsnr2_6000/weights.safetensors sampler.guidance_scale=2.0"
  # foreground and matte weighted 6 instead of 3, 14000 steps, then stages 2 and 3 (the card's "Weights
  # of 6": decomposition +0.010, compositing errors +0.001-0.003 on the val split; not kept)
  OMP_NUM_THREADS=2 stages_in_copy $R/tried/seg66_14000 train.segment_loss_weights.foreground=6 \
      train.segment_loss_weights.alpha=6
  D=$R/tried/seg66_14000/weights
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "backbone.path=$D weights=$D/stage1.safetensors"
  layerkit toy-layerflow-eval --split val --num-samples 32 --grid "backbone.path=$D \
      layerflow.stage1_weights=$D/stage1.safetensors layerflow.stage2_weights=$D/stage2.safetensors weights=$D/stage3.safetensors"
fi

# stage 1 compiles the transformer (train.compile: true in its config; needs g++ or clang++), weighs
# the loss with Min-SNR-gamma 2 and the foreground's and matte's frames by 3, and runs alone with 2
# threads: 14000 steps in 41.1 min (with 1 thread a step takes 0.167 s, not 0.091)
OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 output_dir=$R/stage1
"${export_[@]}" stage1 $R/stage1

layerkit train +experiment=toy_layerflow_stage2 output_dir=$R/stage2
"${export_[@]}" stage2 $R/stage2

layerkit train +experiment=toy_layerflow_stage3 output_dir=$R/stage3
"${export_[@]}" stage3 $R/stage3

# the issue-12 targets as a user sees them (record.json of each run), then every table of the card
layerkit sample +inputs.num_samples=16 output_dir=$R/sample16 sampler.progress=false
layerkit sample +inputs.num_samples=16 task.mode=decompose output_dir=$R/sample16_decompose sampler.progress=false
layerkit toy-layerflow-eval --num-samples 16 --seed 0 --json $R/eval.json
layerkit toy-layerflow-diagnose colours
layerkit toy-layerflow-diagnose given
layerkit toy-layerflow-diagnose positions
layerkit toy-layerflow-diagnose probe
layerkit toy-layerflow-diagnose swap
layerkit toy-layerflow-diagnose shapes
layerkit toy-layerflow-diagnose implied --num 4
# the sampler chosen on the val split (the card's "Sampler": CFG 1.5 against 1, 2, 2.5, 3 and 50 steps)
layerkit toy-layerflow-eval --split val --num-samples 32 --grid 'sampler.guidance_scale=2.0' \
    --grid 'sampler.guidance_scale=1.0' --grid 'sampler.guidance_scale=1.5' --grid 'sampler.guidance_scale=2.5' \
    --grid 'sampler.guidance_scale=3.0' --grid 'sampler.guidance_scale=2.0 sampler.steps=50'
# the test figures with the guidance of the model before (CFG 2)
layerkit toy-layerflow-eval --num-samples 16 --seed 0 sampler.guidance_scale=2.0

if [[ "${TRIED:-0}" == 1 ]]; then
  # where the shape is lost (the card's "Where the shape is lost"): the committed stage 1's one-step
  # predictions of the clean latents at fixed noise levels, decoded and scored
  layerkit toy-layerflow-diagnose x0 --num 32 --split val --timesteps 39 200 400 600 800 950
  # what more steps buy: the committed stage 1 trained 14000 more steps at lr 3e-4 on decomposition
  # alone (30.3 min), then on all four tasks (38.0 min); neither is a recipe (each doubles stage 1's time)
  S1=plugins/layerkit_plugins/layerflow/toy/weights/stage1.safetensors
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 '~task.train_modes' +task.train_modes.decompose=1 \
      "init_from=[$S1]" optim.lr=3e-4 trainer.max_steps=14000 output_dir=$R/tried/more_decompose_14000
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 "init_from=[$S1]" optim.lr=3e-4 \
      trainer.max_steps=14000 output_dir=$R/tried/more_mixed_14000
  for run in more_decompose_14000 more_mixed_14000; do
    layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, decompose' \
        --rows 'stage 1 alone, generate' --grid "weights=$R/tried/$run/weights.safetensors"
    layerkit toy-layerflow-diagnose x0 --num 32 --split val --timesteps 39 200 400 600 800 950 \
        --weights $R/tried/$run/weights.safetensors
  done
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, decompose' \
      --rows 'stage 1 alone, generate' --grid ''
  # the sprite-weighted loss (train.region_loss_weight) at 6000 steps, against the committed recipe's
  # 6000-step run above (tried/seg33_minsnr2_6000), both sampled as committed (CFG 1.5)
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=6000 data.size=4000 \
      train.region_loss_weight=4 output_dir=$R/tried/region4_6000
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "weights=$R/tried/seg33_minsnr2_6000/weights.safetensors" \
      --grid "weights=$R/tried/region4_6000/weights.safetensors"
  # larger sprites (task.shapes_world): the "VAE ceiling" rows of the card's "Larger sprites"
  for size in '' '[0.45,0.6]' '[0.5,0.7]'; do  # '': the shapes world's own 0.3-0.45
    layerkit toy-layerflow-eval --split val --num-samples 32 ${size:+"+task.shapes_world.sprite_size=$size"}
  done
  # each layer's latents at unit scale (task.latent_norm; the card's "Tried and not kept: each layer's
  # latents at unit scale"): the per-channel statistics, then stage 1 alone with them (as committed;
  # with v-prediction's loss and every layer 1; with SNR shift 1), each evaluated and diagnosed
  mkdir -p $R/tried  # latent-stats refuses an existing file: a rerun keeps the first one
  [[ -f $R/tried/latent_stats_all.json ]] || layerkit toy-layerflow-diagnose latent-stats --num 1024 \
      --layers-of foreground alpha background blended --out $R/tried/latent_stats_all.json
  [[ -f $R/tried/latent_norm.json ]] || layerkit toy-layerflow-diagnose latent-stats --num 1024 \
      --out $R/tried/latent_norm.json
  NORM=$PWD/$R/tried/latent_norm.json
  mkdir -p $R/tried/base_shift1  # the committed base with the scheduler's SNR shift 1 instead of 3
  cp -r plugins/layerkit_plugins/layerflow/toy/weights/{transformer,vae,text_encoder,tokenizer,scheduler} $R/tried/base_shift1/
  sed -i 's/"snr_shift_scale": 3.0/"snr_shift_scale": 1.0/' $R/tried/base_shift1/scheduler/scheduler_config.json
  declare -A NORM_RUNS=([norm]="" [norm_v]="train.loss_weighting=none ${UNIT[*]}"
                        [norm_shift1]="backbone.path=$PWD/$R/tried/base_shift1")
  for run in norm norm_v norm_shift1; do
    # shellcheck disable=SC2086  # the overrides split into words
    OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 task.latent_norm=$NORM ${NORM_RUNS[$run]} \
        output_dir=$R/tried/$run
    base=$(echo "${NORM_RUNS[$run]}" | grep -o 'backbone.path=[^ ]*' || true)
    # shellcheck disable=SC2086
    layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, decompose' \
        --rows 'stage 1 alone, generate' --grid "weights=$PWD/$R/tried/$run/weights.safetensors task.latent_norm=$NORM $base"
    # shellcheck disable=SC2086
    layerkit toy-layerflow-diagnose x0 --num 32 --split val --timesteps 39 200 400 800 \
        --weights $R/tried/$run/weights.safetensors task.latent_norm=$NORM $base
  done
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, decompose' \
      --rows 'stage 1 alone, generate' --grid "weights=$PWD/$R/tried/norm/weights.safetensors task.latent_norm=$NORM \
sampler.guidance_scale=1.0" --grid "weights=$PWD/$R/tried/norm/weights.safetensors task.latent_norm=$NORM sampler.guidance_scale=3.0"
  layerkit toy-layerflow-diagnose shapes  # the blended row of "Why blobs"
  # does generation read its prompt? (the card's "Does generation read its prompt?"): the committed
  # stage 1 with the shape word, then the colour word, replaced; then stage 1 on larger sprites (3000
  # steps on 4000 clips), and the same continued 3000 steps on the shapes world's own sizes
  layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2
  layerkit toy-layerflow-diagnose prompts --word colour --num 32 --split val --timesteps 39 200 400 600 800 --threads 2
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=3000 data.size=4000 \
      '+data.sprite_size=[0.55,0.8]' output_dir=$R/tried/big3000
  layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
      --weights $R/tried/big3000/weights.safetensors '+task.shapes_world.sprite_size=[0.55,0.8]'
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=3000 data.size=4000 \
      "init_from=[$R/tried/big3000/weights.safetensors]" output_dir=$R/tried/big3000_then_normal3000
  layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
      --weights $R/tried/big3000_then_normal3000/weights.safetensors
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "weights=$R/tried/big3000_then_normal3000/weights.safetensors"
  # measured for the next model (the card's "Measured for the next model"): a VAE of 2x spatial
  # compression (weights/tried_vae2/vae_training.json), the true layers through it and through the
  # committed VAE, and how far apart the shapes lie in its latents
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --spatial-compression 2 --steps 3200 --layer-weights 1 3 1 1 \
      --val-every 800 --max-minutes 26 --threads 2 --out $R/tried/vae2
  for base in '' "backbone.path=$R/tried/vae2"; do
    # shellcheck disable=SC2086  # '' adds no override
    layerkit toy-layerflow-eval --vae-only --split val --num-samples 32 $base
    # shellcheck disable=SC2086
    layerkit toy-layerflow-eval --vae-only --num-samples 16 $base
  done
  layerkit toy-layerflow-diagnose shapes backbone.path=$R/tried/vae2
  # the toy T5 pretrained contrastively (vision patches of 8 px, then 4 px: weights/tried_t5c/), stage 1
  # on it and, for comparison, on the committed T5 (3000 steps on 4000 clips each), each read by `prompts`
  layerkit toy-layerflow-text --steps 1500 --batch 32 --vision-patch 8 --threads 2 --out $R/tried/t5c_patch8
  layerkit toy-layerflow-text --steps 2000 --batch 32 --threads 2 --out $R/tried/t5c
  for t5 in t5c committed; do
    base=$([[ $t5 == committed ]] && echo "" || echo "backbone.path=$R/tried/$t5")
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 $base trainer.max_steps=3000 data.size=4000 \
        output_dir=$R/tried/${t5}_s1_3000
    # shellcheck disable=SC2086
    layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
        --weights $R/tried/${t5}_s1_3000/weights.safetensors $base
    layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
        --rows 'stage 1 alone, decompose' --grid "$base weights=$R/tried/${t5}_s1_3000/weights.safetensors"
  done
  # the 2x VAE with patch 4 (tokens of 8x8 pixels; the card's "Tried and not kept: the 2x VAE with
  # tokens of 8x8 pixels"; weights/tried_vae2/{base_t2v,stage1,stage2}.json): the VAE run above exported
  # with the patch-4 transformer toy-layerflow-vae writes beside it, a base and stages 1 and 2 cut to this
  # geometry's steps (stage 3 not run), stage 1 alone on test, a sample, `prompts`, and larger sprites
  V=$R/tried/vae2_patch4/weights
  mkdir -p $V && "${export_[@]}" base $R/tried/vae2 --to $V
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_base backbone.path=$V trainer.max_steps=11000 \
      train.compile=true output_dir=$R/tried/vae2_patch4/base_t2v
  "${export_[@]}" pretrained $R/tried/vae2_patch4/base_t2v --to $V
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 backbone.path=$V trainer.max_steps=4800 \
      data.size=4000 output_dir=$R/tried/vae2_patch4/stage1
  "${export_[@]}" stage1 $R/tried/vae2_patch4/stage1 --to $V
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage2 backbone.path=$V \
      layerflow.stage1_weights=$V/stage1.safetensors output_dir=$R/tried/vae2_patch4/stage2
  "${export_[@]}" stage2 $R/tried/vae2_patch4/stage2 --to $V
  layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "backbone.path=$V weights=$V/stage1.safetensors"
  layerkit sample +experiment=toy_layerflow_stage1 backbone.path=$V weights=$V/stage1.safetensors \
      output_dir=$R/tried/vae2_patch4/sample sampler.progress=false
  layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
      --weights $V/stage1.safetensors backbone.path=$V
  # larger sprites on it (as "Larger sprites first" on the committed VAE: 0.55-0.8 of the frame, 3000 steps
  # on 4000 clips from the same base), read by `prompts` at those sizes, and the VAE's ceiling there
  BIG='[0.55,0.8]'
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 backbone.path=$V trainer.max_steps=3000 \
      data.size=4000 "+data.sprite_size=$BIG" output_dir=$R/tried/vae2_patch4/big3000
  layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
      --weights $R/tried/vae2_patch4/big3000/weights.safetensors backbone.path=$V "+task.shapes_world.sprite_size=$BIG"
  layerkit toy-layerflow-eval --vae-only --split val --num-samples 32 backbone.path=$V "+task.shapes_world.sprite_size=$BIG"
  layerkit toy-layerflow-eval --vae-only --split val --num-samples 32 "+task.shapes_world.sprite_size=$BIG"
  # continued 3000 steps twice (tried_vae2/stage1_big3000_more{3000,6000}.json); each run sampled on val
  # at those sizes
  for pair in big3000:big3000_more3000 big3000_more3000:big3000_more6000; do
    from=${pair%%:*} run=${pair##*:}
    OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 backbone.path=$V \
        "init_from=[$R/tried/vae2_patch4/$from/weights.safetensors]" optim.lr=5e-4 trainer.max_steps=3000 \
        data.size=4000 "+data.sprite_size=$BIG" output_dir=$R/tried/vae2_patch4/$run
    layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2 \
        --weights $R/tried/vae2_patch4/$run/weights.safetensors backbone.path=$V "+task.shapes_world.sprite_size=$BIG"
  done
  for run in big3000 big3000_more3000 big3000_more6000; do
    layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
        --rows 'stage 1 alone, decompose' \
        --grid "backbone.path=$V weights=$R/tried/vae2_patch4/$run/weights.safetensors +task.shapes_world.sprite_size=$BIG"
  done
fi
