"""Train the toy LayerAnimate's VAE on shapes-world frames and write the toy base folder.

    OMP_NUM_THREADS=1 nice -n 5 layerkit toy-layeranimate-vae --out runs/toy_layeranimate/base

The VAE (``toy.model.TOY_VAE``: diffusers ``AutoencoderKL``, 4x spatial compression, 4 latent
channels) encodes three kinds of 32 x 32 frames in LayerAnimate: whole frames (the clip and its
keyframes), layer regions (mask x keyframe, 0 in [-1, 1] outside the mask: ``layers.layer_regions``)
and per-layer sketches (dark lines on white; the all-white "no sketch" among them). It is trained
as a deterministic autoencoder on a mix of the three (L1 + MSE of the reconstruction from the
posterior mean, plus a small L2 on the latents); afterwards the log-variance rows of
``quant_conv`` are zeroed with bias -30 (std ~3e-7), so that training (a posterior draw) and
sampling (its mean) encode alike, and ``scaling_factor`` is set to 1 / std of held-out latents.
The folder then gets the seeded untrained toy UNet, the random frozen encoders and the Resampler
(``toy.model.build_components``): the base the diffusion stages start from, loaded with
``backbone.path=``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
from layerkit_plugins.layeranimate.toy.model import FRAMES, SIZE, build_components, build_vae

KINDS = ("frame", "region", "sketch")


def frames_of(sample: dict, kind: str, rng: random.Random) -> torch.Tensor:
    """[F, 3, H, W] in [-1, 1]: the clip, one layer's region on every frame, or one layer's sketch."""
    video = sample["blended"] * 2 - 1
    if kind == "frame":
        return video
    masks = sample["layer_masks"]  # [n, F, 1, H, W]
    layer = rng.randrange(masks.shape[0])
    if kind == "region":
        return video * masks[layer]
    region = F.max_pool2d(masks[layer], 3, stride=1, padding=1)  # as shapes.py cuts sketches
    lines = sample["sketches"][layer] * region
    if rng.random() < 0.1:
        lines = torch.zeros_like(lines)  # the "no sketch" frame: all white
    return ((1 - lines).clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)


def make_batch(rng: random.Random, split: str, seed: int, start: int, clips: int, config: ShapesConfig,
               weights: tuple[float, ...]) -> torch.Tensor:
    out = []
    for i in range(clips):
        sample = make_sample(seed_for(split, seed, start + i), config)
        kind = rng.choices(KINDS, weights=weights)[0]
        clip = frames_of(sample, kind, rng)
        if rng.random() < 0.5:
            clip = clip.flip(-1)
        out.append(clip)
    return torch.cat(out)


def make_deterministic(vae) -> None:
    """Zero the log-variance rows of ``quant_conv`` and set their bias to -30 (std ~3e-7)."""
    conv = vae.quant_conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


def evaluate(vae, config: ShapesConfig, seed: int, weights: tuple[float, ...]) -> dict[str, float]:
    """Held-out (val split) reconstruction L1 per kind, and the latents' std."""
    out, latents = {}, []
    with torch.no_grad():
        for k, kind in enumerate(KINDS):
            x = make_batch(random.Random(seed + 1 + k), "val", seed, 100 * k, 8, config,
                           tuple(float(kind == name) for name in KINDS))
            z = vae.encode(x).latent_dist.mode()
            out[f"val_l1_{kind}"] = round((vae.decode(z).sample - x).abs().mean().item(), 4)
            latents.append(z)
    out["latent_std"] = round(torch.cat(latents).std().item(), 4)
    return out


def train(out: Path, steps: int, seed: int, lr: float, clips_per_step: int, latent_weight: float,
          max_minutes: float, weights: tuple[float, ...]) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE, num_sprites=2)
    vae = build_vae(seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    started, log, done = time.perf_counter(), [], 0
    for step in range(steps):
        for group in opt.param_groups:  # 20-step warm-up, then cosine decay to 5% of lr
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = make_batch(rng, "train", seed, step * clips_per_step, clips_per_step, config, weights)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + (recon - x).pow(2).mean() + latent_weight * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "l1": round(l1.item(), 4), "s": round(time.perf_counter() - started, 1)})
            print(json.dumps(log[-1]), flush=True)
        if (time.perf_counter() - started) / 60 > max_minutes:
            print(f"stopping at step {done}: --max-minutes {max_minutes} reached", flush=True)
            break
    minutes = (time.perf_counter() - started) / 60
    vae.eval()
    make_deterministic(vae)
    figures = evaluate(vae, config, seed, weights)
    scaling = round(1.0 / figures["latent_std"], 6)
    vae.register_to_config(scaling_factor=scaling)
    from layerkit_plugins.tooncrafter.backbone import save_components

    out.mkdir(parents=True, exist_ok=True)
    save_components(build_components(seed, vae=vae), out)
    info = {"steps": done, "minutes": round(minutes, 2), "seed": seed, "lr": lr, "clips_per_step": clips_per_step,
            "frames_per_step": clips_per_step * FRAMES, "latent_weight": latent_weight, "kind_weights": list(weights),
            **figures, "scaling_factor": scaling, "log": log}
    (out / "vae_training.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="layerkit toy-layeranimate-vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_layeranimate/base"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clips-per-step", type=int, default=4, help="clips per step, 8 frames each")
    parser.add_argument("--latent-weight", type=float, default=1e-4, help="weight of the latent L2 term")
    parser.add_argument("--kind-weights", type=float, nargs=3, default=[2, 1, 1],
                        help="how often a clip is drawn as whole frames, one layer's region, one layer's sketch")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop early past this wall time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a machine shared with other jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = train(args.out, args.steps, args.seed, args.lr, args.clips_per_step, args.latent_weight,
                 args.max_minutes, tuple(args.kind_weights))
    print(json.dumps({k: v for k, v in info.items() if k != "log"}))


if __name__ == "__main__":
    main()
