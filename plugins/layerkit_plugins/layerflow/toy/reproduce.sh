#!/usr/bin/env bash
# Rebuild the toy LayerFlow from nothing and print its tables (CPU; run from the repo root). Every
# step is deterministic in its seed; each stage is exported into toy/weights (fp16) before the next
# stage trains from it, so the committed files are exactly what was evaluated. Timings in
# MODEL_CARD.md: one job at a time, 1 torch thread, on a 2-core machine shared with other jobs (stage 1
# and the VAE's decoder runs of this model: 2 threads, alone).
#   TRIED=1 plugins/layerkit_plugins/layerflow/toy/reproduce.sh   # also the runs behind "what was tried"
# The model before this one (the shapes world's own sprite sizes, 0.3-0.45 of the frame) and the
# runs tried on it are rebuilt by this script as it was at commit a0b0716 (weights/model_before/).
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export_=(python -m layerkit_plugins.layerflow.toy.export)
R=runs/toy_layerflow

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

# the VAE as it was built (seven runs; vae_training_{1,2,3,4_accept,5_decoder,6_latent_noise,7_composite}.json): 3000 steps with the alpha
# warm-up (colours right, alpha IoU 0.846 < 0.9: rejected), 1000 more with the matte weighted 3
# (0.874: rejected), 1200 more weighted 6 at lr 5e-4 (0.896 / 0.898: rejected), then accepted as it
# was at a 0.85 floor (no training; the 0.9 was not reached)
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
# an eighth run fine-tunes that decoder on the toy's world, sprites of 0.55-0.8 of the frame (the
# stages' data.sprite_size), with the composite term at 2 (the encoder unchanged: the base and the
# stages train on the same latents on either side of it): alpha IoU 0.942, compositing error 0.046,
# every colour right (vae_training_8_large_sprites.json); weights 3, 4 and 5 were tried: the layers
# composite better (0.036, 0.028, 0.021) but the colours and textures pale or wash out (TRIED=1 reruns them)
OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder \
    --steps 1500 --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight 2 \
    --sprite-size 0.55 0.8 --val-every 500 --max-minutes 35 --out $R/base10_large_sprites --threads 2
if [[ "${TRIED:-0}" == 1 ]]; then
  for w in 3 4 5; do
    OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder \
        --steps 1500 --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight $w \
        --sprite-size 0.55 0.8 --val-every 500 --max-minutes 35 --out $R/tried/base10_composite$w --threads 2
  done
fi
rm -rf $R/vae7 && cp -r plugins/layerkit_plugins/layerflow/toy/weights/vae $R/vae7   # the seventh decoder, compared below
if [[ "${TRIED:-0}" == 1 ]]; then
  # the composite term moving the decoded blended clip alone (--composite-to blended), from the eighth
  # decoder: the check fails (magenta 25-38%), compositing error 0.072 (tried_decoder_composite/)
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init $R/base10_large_sprites/vae --parts decoder \
      --steps 1500 --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight 4 \
      --composite-to blended --sprite-size 0.55 0.8 --out $R/tried/base10_composite4_blended --threads 2 || true
fi
"${export_[@]}" vae $R/base10_large_sprites
mv plugins/layerkit_plugins/layerflow/toy/weights/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/vae_training_8_large_sprites.json

# the base transformer pretrained on plain text-to-video (blended clips alone, task.layout=video), as
# LayerFlow fine-tunes a pretrained CogVideoX: its EMA replaces the seeded transformer/ (base_t2v.json)
layerkit train +experiment=toy_layerflow_base output_dir=$R/base_t2v
"${export_[@]}" pretrained $R/base_t2v

# stage 1 compiles the transformer (train.compile: true in its config; needs g++ or clang++), weighs
# the loss with Min-SNR-gamma 2 and the foreground's and matte's frames by 3, and runs alone with 2
# threads: 12000 steps of batch 6, 41.4 min on the machine that trained it (14000 of batch 8 took 63.6 min
# on a similar one before the latent cache shared its passes; the card's "Wall times"); the background is
# diffused as a residual of the blended clip (task.latent_residual in toy_layerflow_common.yaml)
OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 output_dir=$R/stage1
"${export_[@]}" stage1 $R/stage1

layerkit train +experiment=toy_layerflow_stage2 output_dir=$R/stage2
"${export_[@]}" stage2 $R/stage2

layerkit train +experiment=toy_layerflow_stage3 output_dir=$R/stage3
"${export_[@]}" stage3 $R/stage3

# the decoder widened (ninth run: 8 16 32 -> 16 32 64, net2net, so it starts as the eighth decodes;
# the encoder, the latents and so the stages unchanged), then its composite term raised (tenth run):
# the lowest weight whose generation composites within 0.05 on the 32 val clips, of 2 (the ninth
# run's own), 2.5 and 3 (the card's "The decoder"; vae_training_{9_wide_decoder,10_wide_composite25}.json)
OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init plugins/layerkit_plugins/layerflow/toy/weights/vae --parts decoder \
    --decoder-widths 16 32 64 --steps 3000 --lr 3e-4 --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 \
    --composite-weight 2 --sprite-size 0.55 0.8 --val-every 500 --max-minutes 45 --out $R/base11_wide --threads 2
for w in 2.5 3; do
  OMP_NUM_THREADS=2 layerkit toy-layerflow-vae --init $R/base11_wide/vae --parts decoder --steps 1500 --lr 3e-4 \
      --alpha-warmup 0 --layer-weights 1 6 1 1 --latent-noise 0.15 --composite-weight $w --sprite-size 0.55 0.8 \
      --val-every 500 --max-minutes 45 --out $R/base12_wide_composite$w --threads 2
done
D=$R/decoders
grid=(--grid '')
for run in base11_wide base12_wide_composite2.5 base12_wide_composite3; do
  mkdir -p $D/$run && cp -r plugins/layerkit_plugins/layerflow/toy/weights/{transformer,text_encoder,tokenizer,scheduler} $D/$run/
  rm -rf $D/$run/vae && cp -r $R/$run/vae $D/$run/vae
  grid+=(--grid "backbone.path=$D/$run")
done
layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, generate' \
    --rows 'stages 1+2+3, decompose' "${grid[@]}"
layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stages 1+2+3, generate' \
    --rows 'stages 1+2+3, decompose' "${grid[@]}"
cp $R/base11_wide/vae_training.json plugins/layerkit_plugins/layerflow/toy/weights/vae_training_9_wide_decoder.json
cp $R/base12_wide_composite3/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/tried_decoder_composite/vae_training_wide_composite3.json
"${export_[@]}" vae $R/base12_wide_composite2.5
mv plugins/layerkit_plugins/layerflow/toy/weights/vae_training.json \
    plugins/layerkit_plugins/layerflow/toy/weights/vae_training_10_wide_composite25.json

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
# The card's decoder, sampler, guidance-interval, fitting-prior, prompts, regions and reach tables were
# measured on the model committed before this one (every layer diffused as itself): these commands at
# commit d1ddf65. Here they run on the committed model, through the tenth decoder; the card's figures
# marked "through the eighth decoder" are this script at commit 7b1884a.
# stage 1 alone on the 32 val clips through the seventh decoder, the eighth (committed before the ninth and tenth runs) and the
# tried weights 3, 4 and 5 (each a copy of this folder with that vae/; the card's "The decoder")
D=$R/decoders
for run in vae7 base10_large_sprites tried/base10_composite3 tried/base10_composite4 tried/base10_composite5; do
  [[ -d $R/$run ]] || continue
  mkdir -p $D/$run && cp -r plugins/layerkit_plugins/layerflow/toy/weights/{transformer,text_encoder,tokenizer,scheduler} $D/$run/
  src=$R/$run/vae && [[ $run == vae7 ]] && src=$R/vae7
  rm -rf $D/$run/vae && cp -r $src $D/$run/vae
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "backbone.path=$D/$run" task.keep_given=false
done
# the sampler chosen again on the val split (the card's "Sampler": CFG 1.5 against 1, 2, 3 and 50 steps);
# task.keep_given=false here, in the decoder loop and in the pilot: their decompose figures were
# measured with every layer decoded, as decompositions were written then
layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, generate' \
    --rows 'stages 1+2+3, decompose' --grid 'sampler.guidance_scale=1.5' --grid 'sampler.guidance_scale=1.0' \
    --grid 'sampler.guidance_scale=2.0' --grid 'sampler.guidance_scale=3.0' --grid 'sampler.guidance_scale=1.5 sampler.steps=50' \
    task.keep_given=false
layerkit toy-layerflow-diagnose prompts --num 32 --split val --timesteps 39 200 400 600 800 --threads 2
# guidance only in a timestep interval (the card's "Sampler"), and a decomposition fitted to its clip
# at other prior weights, as decoded, and with every layer decoded; the conditional tasks as decoded
# (the card's "Evaluation" and "Fitting to the given layers")
layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, generate' \
    --grid '' --grid 'sampler.guidance_interval=[400,1000]' \
    --grid 'sampler.guidance_interval=[600,1000]' --grid 'sampler.guidance_interval=[200,1000]' \
    --grid 'sampler.guidance_interval=[400,1000] sampler.guidance_scale=2.0'
layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, decompose' \
    --grid 'task.fit_to_given=null' --grid 'task.fit_to_given=1.0' --grid 'task.fit_to_given=0.3' \
    --grid 'task.fit_to_given=0.1' --grid '' --grid 'task.fit_to_given=0.01' --grid 'task.keep_given=false'
layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stages 1+2+3, decompose' \
    --rows 'stages 1+2+3, fg2bg' --rows 'stages 1+2+3, bg2fg' \
    --grid 'task.fit_to_given=null' --grid 'task.keep_given=false'
# where the compositing error sits, and what a sampler could still buy there (the card's "Where the
# compositing error sits"); decomposing held-out clips given as H.264 files
layerkit toy-layerflow-diagnose regions --num 16 --threads 2
layerkit toy-layerflow-diagnose reach --num 16 --threads 2
layerkit toy-layerflow-diagnose reach --num 32 --split val --threads 2
layerkit toy-layerflow-diagnose compressed --num 16 --threads 2
# decomposing a user's file: lossless or H.264, with or without its prompts (the card's
# "Decomposing a user's file")
layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 --format png
layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 --prompts
layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 --format png --prompts
layerkit toy-layerflow-eval --num-samples 16 --seed 3 --rows 'stages 1+2+3, decompose' --grid ''
# the three stages of a tried recipe: "${RES[@]}" override the committed one, run folders under $T;
# W3 names their run files, F (after export_fp16) their fp16 copies
train_stages() {
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 "${RES[@]}" output_dir=$T/stage1
  layerkit train +experiment=toy_layerflow_stage2 "${RES[@]}" layerflow.stage1_weights=$T/stage1/weights.safetensors \
      output_dir=$T/stage2
  layerkit train +experiment=toy_layerflow_stage3 "${RES[@]}" layerflow.stage1_weights=$T/stage1/weights.safetensors \
      layerflow.stage2_weights=$T/stage2/weights.safetensors output_dir=$T/stage3
  W3="layerflow.stage1_weights=$T/stage1/weights.safetensors layerflow.stage2_weights=$T/stage2/weights.safetensors weights=$T/stage3/weights.safetensors"
}
export_fp16() {
  mkdir -p $T/fp16
  for n in 1 2 3; do "${export_[@]}" stage$n $T/stage$n --to $T/fp16; done
  F="layerflow.stage1_weights=$T/fp16/stage1.safetensors layerflow.stage2_weights=$T/fp16/stage2.safetensors weights=$T/fp16/stage3.safetensors"
}
if [[ "${TRIED:-0}" == 1 ]]; then
  # the committed recipe (the background diffused as a residual of the blended clip, now the config's
  # own) retrained and evaluated from its run files, as it was before it was committed (the card's
  # "Why the background is diffused as a residual"; its "before" column: this script at d1ddf65)
  RES=("task.latent_residual=null" "task.latent_residual={background: blended}")
  T=$R/tried/residual
  train_stages
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "weights=$T/stage1/weights.safetensors" "${RES[@]}"
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, generate' \
      --rows 'stages 1+2+3, decompose' --grid "$W3" "${RES[@]}"
  layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stages 1+2+3, generate' \
      --rows 'stages 1+2+3, decompose' --grid "$W3" --grid "$W3 sampler.guidance_scale=1.0" "${RES[@]}"
  layerkit toy-layerflow-eval --num-samples 16 --seed 3 --rows 'stages 1+2+3, decompose' --grid "$W3" "${RES[@]}"
  export_fp16
  layerkit toy-layerflow-diagnose regions --num 16 --threads 2 $F "${RES[@]}"
  layerkit toy-layerflow-diagnose reach --num 16 --threads 2 $F "${RES[@]}"
  layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 $W3 "${RES[@]}"
  layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 --prompts $W3 "${RES[@]}"
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stages 1+2+3, generate' \
      --rows 'stages 1+2+3, decompose' --grid "$F sampler.guidance_scale=1.0" --grid "$F sampler.guidance_scale=1.25" \
      --grid "$F sampler.guidance_scale=1.5" --grid "$F sampler.guidance_scale=2.0" "${RES[@]}"
fi
if [[ "${TRIED:-0}" == 1 ]]; then
  # the other way round, the blended clip diffused as a residual of the background (the same section
  # of the card): the committed recipe with task.latent_residual, test figures from the run files
  RES=("task.latent_residual=null" "task.latent_residual={blended: background}")  # null first: a dict merges
  T=$R/tried/residual_blended
  train_stages
  layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stages 1+2+3, generate' \
      --rows 'stages 1+2+3, decompose' --grid "$W3" "${RES[@]}"
  layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "weights=$T/stage1/weights.safetensors" "${RES[@]}"
  layerkit toy-layerflow-diagnose compressed --num 16 --threads 2 $W3 "${RES[@]}"
  export_fp16
  layerkit toy-layerflow-diagnose regions --num 16 --threads 2 $F "${RES[@]}"
fi
if [[ "${TRIED:-0}" == 1 ]]; then
  # the 3000-step pilot on the toy's world that chose this VAE over the 2x one (the card's "Why"),
  # sampled through the seventh decoder, as it was
  OMP_NUM_THREADS=2 layerkit train +experiment=toy_layerflow_stage1 trainer.max_steps=3000 data.size=4000 \
      output_dir=$R/tried/pilot3000
  layerkit toy-layerflow-eval --split val --num-samples 32 --rows 'stage 1 alone, generate' \
      --rows 'stage 1 alone, decompose' --grid "backbone.path=$D/vae7 weights=$R/tried/pilot3000/weights.safetensors" \
      task.keep_given=false
fi
# the same weights on the shapes world's own sprite sizes (the card's "What is left")
layerkit toy-layerflow-eval --num-samples 16 --seed 0 --rows 'stages 1+2+3, generate' \
    --rows 'stages 1+2+3, decompose' --grid 'task.shapes_world.sprite_size=[0.3,0.45]'
