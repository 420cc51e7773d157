"""Train the toy transparent model from nothing on two CPU cores, then score Inter-Frame
Attention against the motion module applied directly and against fine-tuning it.

No pretrained SD 1.5, AnimateDiff or LayerDiffuse weights are available offline, so the toy
trains its own, built so that the mismatch Layer-Animate addresses exists: a motion module
trained on ordinary (opaque RGB) video, put under spatial layers that were fine-tuned on
transparent images.

A. latent transparency (LayerDiffuse's VAE side): the VAE, the offset encoder and the
   transparent decoder, jointly, on single transparent sprite frames (``--opaque-share`` mixes in
   opaque scenes; at 0.5 the round trip's shape correct fell from 1.0 to 0.25, so the committed
   run uses 0): the VAE reconstructs the frame composited on mid-grey, the transparent
   decoder returns [alpha, straight RGB] from the VAE's output and the adjusted latent (trained
   with a little latent noise so that imperfect generated latents still decode). The VAE's
   ``scaling_factor`` is then set so that the scaled latents have unit standard deviation, as
   SD 1.5's 0.18215 does.
T. the text encoder (CLIP's role): the toy CLIP text model trained contrastively, with a tower
   that reads whole clips, on the pool's clips (transparent and opaque) and their prompts
   (``clip.py``), then frozen as SD's is (``--steps-t 0`` keeps the random frozen encoder of the
   models committed before, which no model learned to read the direction word from).
B. the RGB video base (SD 1.5 + AnimateDiff's role), through ``layerkit train
   +experiment=toy_transparent_rgb_base``: the whole UNet (spatial layers and motion module) on
   opaque RGB clips (sprites over their moving backgrounds, alpha 1), every frame noised
   (``--reference-share-b S``: the middle frame given on a share S of the clips, image- and
   text-to-video in one model), prompts dropped 10% of the time, EMA of the weights.
C. the transparent image model (LayerDiffuse's role): the spatial layers of B's UNet (as an
   image UNet, no motion module) fine-tuned on single transparent sprite frames, EMA kept. The
   committed base is C's spatial layers with B's motion module: the motion module has never
   seen a transparent clip.
D. stage 2, image-to-video with the clean middle frame left out of the loss, twice with the
   same data order, steps, batch, learning rate and seed, through ``layerkit train``:
   ``toy_transparent`` (Inter-Frame Attention; only W_Q' and W_O' train) and
   ``toy_transparent_baseline`` (no Inter-Frame Attention; the motion module trains). The
   base with nothing trained (``toy_transparent_base``) is the motion module applied directly.

``--side-by-side`` runs the two arms at once, each a ``layerkit train`` process on one thread
(on two cores the pair takes about the longer arm's time); ``--loss-weighting-d`` sets their
``train.loss_weighting``.

Then the files are written where the experiments read them (``--install``: toy/weights) and
``evaluate.py`` prints the evaluator's table on held-out clips.

    python -m layerkit_plugins.transparent.toy.train --out runs/toy_transparent --side-by-side --threads 2 \\
        --reference-share-b 1.0 --steps-b 6000 --install

A stage whose output exists in ``--out`` is not run again (delete it to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.training.weighting import LOSS_WEIGHTINGS, prediction_target
from layerkit_plugins.transparent.toy.model import (
    FRAMES,
    SIZE,
    build_backbone,
    load_base,
    package_weights,
    save_base,
)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the side-by-side arms)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Wall and CPU seconds per stage (child processes included)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        out = fn(*args, **kwargs)
        self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                             "cpu_s": round(_cpu_seconds() - cpu, 1)}
        print(f"[toy] {name}: {self.stages[name]}", flush=True)
        return out


def lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------
# data: a fixed pool of training clips (train split, the same seeds as data=shapes_rgba)
# ----------------------------------------------------------------------------------------
def make_pool(num_clips: int, seed: int, opaque: bool = False) -> dict[str, Any]:
    from layerkit.data.shapes import ShapesConfig, seed_for
    from layerkit_plugins.transparent.data import make_rgba_sprite_clip

    cfg = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE)
    clips = [make_rgba_sprite_clip(seed_for("train", seed, i), cfg, opaque=opaque) for i in range(num_clips)]
    return {"rgba": torch.stack([c["rgba"] for c in clips]).half(), "prompt": [c["prompt"] for c in clips]}


# ----------------------------------------------------------------------------------------
# A. latent transparency: VAE + offset encoder + transparent decoder
# ----------------------------------------------------------------------------------------
def autoencoder_losses(backbone, x01: torch.Tensor, latent_noise: float) -> tuple[torch.Tensor, dict[str, float]]:
    """x01 [N, 4, H, W] straight RGBA in [0, 1] -> loss, parts."""
    from layerkit_plugins.animatediff.layerdiffuse import pad_rgb

    alpha = x01[:, 3:]
    grey = (x01[:, :3] * 2 - 1) * alpha  # RGB over mid-grey, in [-1, 1]
    posterior = backbone.vae.encode(grey).latent_dist
    offset = backbone.offset_encoder(torch.cat([alpha, pad_rgb(x01[:, :3], alpha)], dim=1))
    z = posterior.mean + posterior.std * offset
    if latent_noise > 0:
        z = z + latent_noise * z.detach().std() * torch.randn_like(z)
    pixel = backbone.vae.decode(z).sample
    y = backbone.transparent_decoder((pixel.clamp(-1, 1) + 1) / 2, z)
    # the sprite covers a tenth of a frame: errors inside it are also averaged over its own
    # alpha mass, or the trivial all-grey output is a strong local minimum for the colour
    near = F.max_pool2d(alpha, 5, stride=1, padding=2)  # the sprite and a 2-pixel band around it

    def inside(err: torch.Tensor, weight: torch.Tensor = alpha) -> torch.Tensor:
        mass = weight.sum((1, 2, 3)).clamp_min(1.0)
        return ((err.mean(1, keepdim=True) * weight).sum((1, 2, 3)) / mass).mean()

    parts = {
        "vae": F.mse_loss(pixel, grey),
        "vae_sprite": inside((pixel - grey).pow(2)),
        "alpha": F.mse_loss(y[:, :1], alpha),
        "alpha_edge": inside((y[:, :1] - alpha).pow(2), near),
        "colour": inside((y[:, 1:] - x01[:, :3]).pow(2)),
        "latent": z.pow(2).mean(),
    }
    loss = (parts["vae"] + parts["vae_sprite"] + 4 * parts["alpha"] + parts["alpha_edge"] + parts["colour"]
            + 1e-5 * parts["latent"])
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def train_autoencoder(backbone, frames: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int,
                      log_every: int = 100) -> dict[str, float]:
    modules = [backbone.vae, backbone.offset_encoder, backbone.transparent_decoder]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts: dict[str, float] = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x = frames[torch.randint(0, frames.shape[0], (batch,), generator=gen)].float()
        if torch.rand((), generator=gen) < 0.5:  # flips: the sprites' shapes are symmetric enough
            x = x.flip(-1)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-2)
        loss, parts = autoencoder_losses(backbone, x, latent_noise=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"[toy] A step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in parts.items()), flush=True)
    for m in modules:
        m.eval().requires_grad_(False)
    return parts


@torch.no_grad()
def set_scaling_factor(backbone, frames: torch.Tensor) -> float:
    """SD-style: scale the latents to unit standard deviation."""
    backbone.vae.register_to_config(scaling_factor=1.0)
    z = torch.cat([backbone.encode_rgba(x.float() * 2 - 1) for x in frames.split(256)])
    factor = float(1.0 / z.std())
    backbone.vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def round_trip(backbone, seed: int, num_clips: int = 32) -> dict[str, float]:
    """The evaluator on held-out (val split) clips encoded and decoded by the backbone."""
    from layerkit.data.shapes import ShapesConfig, seed_for
    from layerkit_plugins.transparent.data import make_rgba_sprite_clip
    from layerkit_plugins.transparent.evaluate import evaluate_rgba_video, summarise

    cfg = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE)
    clips = [make_rgba_sprite_clip(seed_for("val", seed, i), cfg) for i in range(num_clips)]
    video = backbone.decode_latents(backbone.encode_video(torch.stack([c["rgba"] for c in clips]) * 2 - 1))
    return summarise([evaluate_rgba_video(((v + 1) / 2).clamp(0, 1), c) for v, c in zip(video, clips)])


# ----------------------------------------------------------------------------------------
# T. the text encoder, pretrained contrastively (CLIP's role)
# ----------------------------------------------------------------------------------------
def train_text_encoder(stage_a: Path, out: Path, pool: dict[str, Any], *, steps: int, batch: int, lr: float,
                       seed: int, val_clips: int = 256) -> dict[str, Any]:
    """Stage A's folder with its text encoder trained by ``clip.pretrain_text_encoder`` on the
    pool's transparent clips and the same clips opaque, written to ``out``; returns the losses'
    summary and the zero-shot retrieval of ``val_clips`` validation clips (colour / shape /
    direction of the best of the training prompts)."""
    from layerkit.data.shapes import ShapesConfig, seed_for
    from layerkit_plugins.transparent.data import make_rgba_sprite_clip
    from layerkit_plugins.transparent.toy.clip import pretrain_text_encoder, retrieval

    backbone = load_base(stage_a)
    opaque = make_pool(len(pool["prompt"]), seed, opaque=True)
    rgba = torch.cat([pool["rgba"], opaque["rgba"]])
    result = pretrain_text_encoder(backbone.text_encoder, backbone.tokenizer, rgba,
                                   pool["prompt"] + opaque["prompt"], steps=steps, batch=batch, lr=lr, seed=seed)
    cfg = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE)
    val = [make_rgba_sprite_clip(seed_for("val", seed, i), cfg) for i in range(val_clips)]
    scores = retrieval(result["clip"], backbone.tokenizer, torch.stack([c["rgba"] for c in val]),
                       [c["meta"] for c in val], result["prompts"])
    partial = out.parent / f"{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_base(partial, backbone)
    partial.rename(out)
    losses = result["losses"]
    tail = losses[-min(100, len(losses)):]
    print(f"[toy] T: contrastive loss {sum(tail) / len(tail):.4f}, val retrieval {scores}", flush=True)
    return {"final_loss": round(sum(tail) / len(tail), 4), "val_retrieval": scores}


# ----------------------------------------------------------------------------------------
# B. the RGB video base, through layerkit train; C. the transparent image model
# ----------------------------------------------------------------------------------------
def trainer_overrides(accelerator: str) -> list[str]:
    """``layerkit train`` arguments that run a stage on ``accelerator`` ("cpu" or "gpu") with the
    same numerics as the CPU recipe: fp32 and no gradient clipping (``trainer=gpu`` alone would
    give bf16-mixed and a clip of 1)."""
    if accelerator == "cpu":
        return []
    if accelerator == "gpu":
        return ["trainer=gpu", "trainer.precision=32-true", "trainer.gradient_clip_val=null"]
    raise ValueError(f"accelerator is 'cpu' or 'gpu'; got {accelerator!r}.")


def train_rgb_base(stage_a: Path, out: Path, *, steps: int, seed: int, reference_share: float = 0.0,
                   accelerator: str = "cpu", threads: int = 1) -> Path:
    """``layerkit train +experiment=toy_transparent_rgb_base`` on stage A's folder, on ``threads``
    torch threads (``layerkit train``'s own ``threads=auto`` would take the cores less the load);
    then that folder with the run's (EMA) UNet written to ``out``."""
    from layerkit.io.weights import load_weights
    from layerkit_plugins.transparent.toy.model import load_base, save_base

    run = out.parent / f"{out.name}_run"
    if not (run / "weights.safetensors").is_file():
        _layerkit_train(["+experiment=toy_transparent_rgb_base", f"toy.base={stage_a.resolve()}",
                         f"output_dir={run}", f"seed={seed}", f"trainer.max_steps={steps}",
                         f"task.given_reference={reference_share}", f"threads={threads}",
                         *trainer_overrides(accelerator)])
    backbone = load_base(stage_a)
    state = load_weights(run / "weights.safetensors")
    prefix = "backbone.denoiser."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = backbone.denoiser.load_state_dict(own, strict=False)
    params = dict(backbone.denoiser.named_parameters())
    missing = [k for k in missing if k in params]  # buffers (positional tables) are not trained
    if missing or unexpected or len(own) != len(state):
        raise RuntimeError(f"the RGB base run's weights do not fit the UNet: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    save_base(out, backbone)
    return out


@torch.no_grad()
def encode_frames(backbone, pool: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents of every frame [N * F, 4, h, w], prompt embeddings of the distinct prompts
    [P, L, D] and the index of each frame's prompt [N * F] (index 0 is the empty prompt)."""
    rgba = pool["rgba"]
    n, f = rgba.shape[:2]
    latents = torch.cat([backbone.encode_video(x.float().flatten(0, 1)[:, None] * 2 - 1)[:, :, 0]
                         for x in rgba.split(32)])
    names = [""] + sorted(set(pool["prompt"]))
    embeds = backbone.encode_prompts(names)["prompt_embeds"]
    index = torch.tensor([names.index(p) for p in pool["prompt"]]).repeat_interleave(f)
    return latents, embeds, index


def train_image_model(backbone, latents: torch.Tensor, embeds: torch.Tensor, index: torch.Tensor, *, steps: int,
                      batch: int, lr: float, seed: int, prompt_dropout: float = 0.1, ema: float = 0.995,
                      log_every: int = 200, freeze_cross_attention: bool = False) -> float:
    """Fine-tune the spatial layers of ``backbone.denoiser`` as an image UNet (no motion module,
    LayerDiffuse's transparent image model) on single-frame latents; the EMA goes back into the
    motion UNet, whose motion modules stay as they were. ``freeze_cross_attention`` keeps the
    cross-attention layers (``attn2``, where the prompt enters) as the video base learnt them."""
    from layerkit_plugins.transparent.toy.model import split_unet

    unet, _ = split_unet(backbone.denoiser)
    unet.train().requires_grad_(True)
    if freeze_cross_attention:
        for name, param in unet.named_parameters():
            if ".attn2." in name:
                param.requires_grad_(False)
    params = [param for param in unet.parameters() if param.requires_grad]
    shadow = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = backbone.make_scheduler("train")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=100)
        idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
        x0 = latents[idx]
        prompt = torch.where(torch.rand(batch, generator=gen) < prompt_dropout, 0, index[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        out = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[prompt]).sample
        loss = F.mse_loss(out, prediction_target(scheduler, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for s, p in zip(shadow, params):
                s.lerp_(p.detach(), 1 - decay)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % log_every == 0 or step == steps - 1:
            print(f"[toy] C step {step}: loss {running:.4f}", flush=True)
    with torch.no_grad():
        for s, p in zip(shadow, params):
            p.copy_(s)
    spatial = unet.state_dict()
    missing, unexpected = backbone.denoiser.load_state_dict(spatial, strict=False)
    if unexpected or any("motion_modules" not in k for k in missing):
        raise RuntimeError(f"the image UNet does not fit the motion UNet: {unexpected[:3]} {missing[:3]}")
    backbone.denoiser.eval().requires_grad_(False)
    return float(running or 0.0)


def _layerkit_train(overrides: list[str]) -> None:
    from layerkit.runs import RUN_DIR_ENV
    from layerkit.training.run import train

    try:
        train(overrides)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


# ----------------------------------------------------------------------------------------
# D. stage 2 through layerkit train
# ----------------------------------------------------------------------------------------
STAGE_D = (("toy_transparent", "stage_d_inter_frame"), ("toy_transparent_baseline", "stage_d_baseline"))


def stage2_overrides(experiment: str, base: Path, out: Path, *, steps: int, seed: int,
                     loss_weighting: str = "none", accelerator: str = "cpu") -> list[str]:
    """The ``layerkit train`` arguments of one stage-D arm."""
    return [f"+experiment={experiment}", f"toy.base={base}", f"output_dir={out}", f"seed={seed}",
            f"trainer.max_steps={steps}", "train.checkpoint_every=100000", "export.formats=[]",
            f"train.loss_weighting={loss_weighting}", *trainer_overrides(accelerator)]


def train_stage2(experiment: str, base: Path, out: Path, *, steps: int, seed: int,
                 loss_weighting: str = "none", accelerator: str = "cpu", threads: int = 1) -> Path:
    from layerkit.training.run import WEIGHTS_NAME

    _layerkit_train([*stage2_overrides(experiment, base, out, steps=steps, seed=seed, loss_weighting=loss_weighting,
                                       accelerator=accelerator), f"threads={threads}"])
    return out / WEIGHTS_NAME


def train_stage2_side_by_side(runs: list[tuple[str, Path]], base: Path, *, steps: int, seed: int,
                              loss_weighting: str = "none", accelerator: str = "cpu") -> None:
    """The stage-D arms at once, each a ``layerkit train`` process on one thread (on two cores,
    the pair takes about the longer arm's time). Logs go beside each run folder; if one arm
    fails or this process is stopped, the other is stopped too (the next call restarts it: an
    interrupted run's folder holds only traces, see ``layerkit.runs.check_output_dir``)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERKIT_THREADS": "1"}
    procs: list[tuple[Path, Path, subprocess.Popen]] = []
    try:
        for experiment, out in runs:
            args = stage2_overrides(experiment, base, out, steps=steps, seed=seed, loss_weighting=loss_weighting,
                                    accelerator=accelerator)
            log = out.parent / f"{out.name}.log"
            with open(log, "a") as handle:
                procs.append((out, log, subprocess.Popen([sys.executable, "-m", "layerkit.cli", "train", *args],
                                                         stdout=handle, stderr=subprocess.STDOUT, env=env)))
        while any(proc.poll() is None for _, _, proc in procs):
            failed = [(out, log) for out, log, proc in procs if proc.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(2)
        failed = [(out, log) for out, log, proc in procs if proc.poll() not in (None, 0)]
        if failed:
            raise RuntimeError("stage D failed: " + "; ".join(f"{out} (see {log})" for out, log in failed))
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def check_stage2_run(run: Path, *, steps: int, seed: int, loss_weighting: str) -> None:
    """An arm found finished in ``--out`` must have been trained as asked; one sentence if not."""
    check_run(run, {"steps": steps, "seed": seed, "loss weighting": loss_weighting}, "delete it")


def check_base_run(run: Path, *, steps: int, seed: int, reference_share: float) -> None:
    """Stage B found in ``--out`` must have been trained as asked; one sentence if not."""
    check_run(run, {"steps": steps, "seed": seed, "reference share": float(reference_share)},
              f"delete it, {run.parent / 'base_rgb'} and what follows")


def check_run(run: Path, asked: dict[str, Any], remedy: str) -> None:
    """Refuse, in one sentence, a ``layerkit train`` run folder whose ``record.json`` says it was
    trained otherwise than ``asked`` (keys: steps, seed, loss weighting, reference share)."""
    record_file = run / "record.json"
    if not record_file.is_file():
        return
    config = json.loads(record_file.read_text()).get("config", {})
    recorded = {"steps": config.get("trainer", {}).get("max_steps"), "seed": config.get("seed"),
                "loss weighting": config.get("train", {}).get("loss_weighting", "none"),
                "reference share": float(config.get("task", {}).get("given_reference", False))}
    differ = [f"{k} {recorded[k]} (asked {v})" for k, v in asked.items() if recorded[k] != v]
    if differ:
        raise SystemExit(f"{run} was trained with {', '.join(differ)}; {remedy} or use another --out.")


def install(out: Path, target: Path, provenance: dict[str, Any]) -> None:
    """Copy the base folder and the two stage-2 files where the experiments read them, with
    metadata that names how they were made (not the run's absolute paths)."""
    from layerkit.io.weights import load_weights, save_weights

    target.mkdir(parents=True, exist_ok=True)
    if (target / "base").exists():
        shutil.rmtree(target / "base")
    shutil.copytree(out / "base", target / "base")
    for run, name in (("stage_d_inter_frame", "inter_frame_attention.safetensors"),
                      ("stage_d_baseline", "baseline_motion_module.safetensors")):
        state = load_weights(out / run / "weights.safetensors")
        save_weights(target / name, state, metadata={"layerkit_toy": {**provenance, "stage": run}})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the toy transparent model and its baseline")
    parser.add_argument("--out", default="runs/toy_transparent", help="run folder (stages resume from it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=2048,
                        help="training clips (train split) for stages A, T and C (T also takes as many opaque ones)")
    parser.add_argument("--steps-a", type=int, default=1500)
    parser.add_argument("--opaque-share", type=float, default=0.0,
                        help="share of opaque frames (alpha 1) in stage A's mix (0: transparent sprites only)")
    parser.add_argument("--batch-a", type=int, default=16, help="frames per step")
    parser.add_argument("--lr-a", type=float, default=2e-3)
    parser.add_argument("--steps-t", type=int, default=1500,
                        help="contrastive text encoder pretraining steps (0: keep the random text encoder)")
    parser.add_argument("--batch-t", type=int, default=256, help="clip-prompt pairs per step")
    parser.add_argument("--lr-t", type=float, default=2e-3)
    parser.add_argument("--steps-b", type=int, default=3000, help="RGB video base steps (8 clips each)")
    parser.add_argument("--reference-share-b", type=float, default=0.0,
                        help="share of stage B's clips given their middle frame (0: text-to-video only)")
    parser.add_argument("--steps-c", type=int, default=1500, help="transparent image model steps")
    parser.add_argument("--batch-c", type=int, default=32, help="frames per step")
    parser.add_argument("--lr-c", type=float, default=5e-4)
    parser.add_argument("--freeze-cross-attention-c", action="store_true",
                        help="stage C leaves the cross-attention layers (where the prompt enters) as stage B learnt them")
    parser.add_argument("--steps-d", type=int, default=2000, help="stage-2 steps, each of the two runs")
    parser.add_argument("--loss-weighting-d", default="none", choices=LOSS_WEIGHTINGS,
                        help="stage 2's train.loss_weighting")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run the two stage-D arms at once, one thread each")
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out test clips per row (0: skip)")
    parser.add_argument("--install", action="store_true", help="write the weights into the package (toy/weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="where the layerkit train stages (B and D) run; A, T and C run on the CPU")
    parser.add_argument("--until", choices=("A", "T", "B", "C", "D"), default="D", help="stop after this stage")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"'{args.out}' is a file; --out names the run folder (stages resume from it).")
    if not 0.0 <= args.reference_share_b <= 1.0:
        parser.error(f"--reference-share-b is a share of stage B's clips, between 0 and 1; got {args.reference_share_b}.")
    if args.threads < 1:
        parser.error(f"--threads is a number of torch threads, at least 1; got {args.threads}.")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs a CUDA device, and torch sees none here; leave it out to train on the CPU.")

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    summary_file = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary["args"] = vars(args)  # this call's; "calls" keeps every call's (a run resumed with other flags)
    summary.setdefault("calls", []).append({**vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    clock.stages = summary.setdefault("timings", {})

    pool_file = out / "pool.pt"
    if pool_file.is_file():
        pool = torch.load(pool_file, weights_only=True)
    else:
        pool = clock.run("data", make_pool, args.pool, args.seed)
        torch.save(pool, pool_file)

    stage_a = out / "stage_a"
    if not (stage_a / "sd15").is_dir():
        backbone = build_backbone(args.seed)
        frames = pool["rgba"].flatten(0, 1)
        extra = int(round(args.opaque_share / max(1e-9, 1 - args.opaque_share) * frames.shape[0]))
        if extra:  # opaque scenes (alpha 1), as many clips as the frames need
            opaque = make_pool(-(-extra // FRAMES), args.seed, opaque=True)
            frames = torch.cat([frames, opaque["rgba"].flatten(0, 1)[:extra]])
        summary["stage_a_losses"] = clock.run("A latent transparency", train_autoencoder, backbone, frames,
                                              steps=args.steps_a, batch=args.batch_a, lr=args.lr_a, seed=args.seed)
        summary["scaling_factor"] = set_scaling_factor(backbone, frames)
        summary["stage_a_val_round_trip"] = round_trip(backbone, args.seed)
        print(f"[toy] A: scaling factor {summary['scaling_factor']:.4f}, val round trip "
              f"{summary['stage_a_val_round_trip']}", flush=True)
        save_base(stage_a, backbone)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
    if args.until == "A":
        return 0

    stage_t = out / "stage_t"
    if args.steps_t > 0 and not (stage_t / "sd15").is_dir():
        summary["stage_t"] = clock.run("T text encoder (contrastive)", train_text_encoder, stage_a, stage_t, pool,
                                       steps=args.steps_t, batch=args.batch_t, lr=args.lr_t, seed=args.seed)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
    if args.until == "T":
        return 0

    base_rgb = out / "base_rgb"
    check_base_run(out / "base_rgb_run", steps=args.steps_b, seed=args.seed, reference_share=args.reference_share_b)
    if not (base_rgb / "sd15").is_dir():
        clock.run("B RGB video base (layerkit train)", train_rgb_base, stage_t if args.steps_t > 0 else stage_a,
                  base_rgb, steps=args.steps_b, seed=args.seed, reference_share=args.reference_share_b,
                  accelerator=args.accelerator, threads=args.threads)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
    if args.until == "B":
        return 0

    base = out / "base"
    asked_c = {"freeze_cross_attention": bool(args.freeze_cross_attention_c)}
    if (base / "sd15").is_dir() and summary.get("stage_c", asked_c) != asked_c:
        raise SystemExit(f"{base} was trained with {summary['stage_c']} (asked {asked_c}); delete it and what "
                         f"follows or use another --out.")
    if not (base / "sd15").is_dir():
        summary["stage_c"] = asked_c
        backbone = load_base(base_rgb)
        latents, embeds, index = clock.run("C encode", encode_frames, backbone, pool)
        summary["stage_c_loss"] = clock.run("C transparent image model", train_image_model, backbone, latents, embeds,
                                            index, steps=args.steps_c, batch=args.batch_c, lr=args.lr_c,
                                            seed=args.seed, freeze_cross_attention=args.freeze_cross_attention_c)
        save_base(base, backbone)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
    if args.until == "C":
        return 0

    todo = []
    for experiment, run in STAGE_D:
        if (out / run / "weights.safetensors").is_file():
            check_stage2_run(out / run, steps=args.steps_d, seed=args.seed, loss_weighting=args.loss_weighting_d)
        else:
            todo.append((experiment, out / run))
    if len(todo) > 1 and args.side_by_side:
        clock.run("D " + " + ".join(e for e, _ in todo) + " (side by side)", train_stage2_side_by_side, todo,
                  base.resolve(), steps=args.steps_d, seed=args.seed, loss_weighting=args.loss_weighting_d,
                  accelerator=args.accelerator)
    else:
        for experiment, run in todo:
            clock.run(f"D {experiment}", train_stage2, experiment, base.resolve(), run, steps=args.steps_d,
                      seed=args.seed, loss_weighting=args.loss_weighting_d, accelerator=args.accelerator,
                      threads=args.threads)

    summary["timings"] = clock.stages
    trained = [t for name, t in clock.stages.items() if name != "evaluate"]  # an earlier call's evaluation is no training
    summary["train_cpu_s"] = round(sum(t["cpu_s"] for t in trained), 1)
    summary["train_wall_s"] = round(sum(t["wall_s"] for t in trained), 1)
    if args.install:
        install(out, package_weights(), {"command": "python -m layerkit_plugins.transparent.toy.train --install",
                                         "args": vars(args)})
    if args.eval_samples > 0:
        from layerkit_plugins.transparent.toy.evaluate import evaluate, table

        weights_dir = None if args.install else str(out / "_weights")
        if weights_dir:
            Path(weights_dir).mkdir(exist_ok=True)
            shutil.copy(out / "stage_d_inter_frame" / "weights.safetensors",
                        Path(weights_dir) / "inter_frame_attention.safetensors")
            shutil.copy(out / "stage_d_baseline" / "weights.safetensors",
                        Path(weights_dir) / "baseline_motion_module.safetensors")
        results = clock.run("evaluate", evaluate, out / "eval", num_samples=args.eval_samples, seed=0,
                            base=None if args.install else str(base.resolve()), weights_dir=weights_dir)
        summary["results"] = results
        summary["table"] = table(results)
        print(summary["table"])
    summary_file.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
