"""Train the toy VAE on shapes-world clips and write the toy base model (a diffusers-format dir).

    nice -n 5 python -m layerkit_plugins.layerflow.toy.train_vae --out runs/toy_layerflow/base

The VAE (``AutoencoderKLCogVideoX``, see ``toy.model``) is trained as a deterministic
reconstruction autoencoder (L1 + MSE on the decoded posterior mode + a small L2 on the latents;
the log-variance head is then zeroed to std ~3e-7, so training and sampling encode alike) on exactly the clips LayerFlow encodes: the foreground over
mid-grey, the alpha matte as RGB, the background and the blended video, 9 frames of 32x32, a
share of them frozen (one frame repeated, as stages 2-3 feed them). Its ``scaling_factor`` is
set to 1 / std of the latents, as CogVideoX's is. The directory then gets the seeded (untrained)
toy transformer, the T5 encoder, the offline tokenizer and the scheduler: the "pretrained base"
the LayerFlow stages start from.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE, build_components, build_vae


def layer_clips(sample: dict, static_frame: int | None = None) -> list[torch.Tensor]:
    """The four sub-clips LayerFlow packs, [3, F, H, W] in [-1, 1] (VAE layout)."""
    alpha = sample["foreground_alpha"]
    clips = [(sample["foreground_rgb"] * 2 - 1) * alpha, alpha.expand(-1, 3, -1, -1) * 2 - 1,
             sample["background"] * 2 - 1, sample["blended"] * 2 - 1]
    if static_frame is not None:
        clips = [c[static_frame:static_frame + 1].expand_as(c) for c in clips]
    return [c.permute(1, 0, 2, 3).contiguous() for c in clips]


def make_batch(rng: random.Random, split: str, seed: int, start: int, clips: int, static_prob: float,
               config: ShapesConfig, weights: tuple[float, ...] = (3, 3, 2, 2)) -> torch.Tensor:
    """``clips`` clips, each one layer of its own shapes-world sample, drawn with ``weights``
    (foreground, alpha, background, blended)."""
    out = []
    for i in range(clips):
        sample = make_sample(seed_for(split, seed, start + i), config)
        frame = rng.randrange(config.num_frames) if rng.random() < static_prob else None
        out.append(layer_clips(sample, frame)[rng.choices(range(4), weights=weights)[0]])
    return torch.stack(out)


def make_deterministic(vae) -> None:
    """Zero the posterior's log-variance head and set its bias to -30 (std ~3e-7): ``encode``
    then gives the same latents in training (``sample()``) as at inference (``mode()``)."""
    conv = vae.encoder.conv_out.conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


def train(out: Path, steps: int, seed: int, lr: float, clips_per_step: int, kl_weight: float,
          static_prob: float, max_minutes: float, norm_groups: int = 4, mse_weight: float = 1.0,
          layer_weights: tuple[float, ...] = (3, 3, 1, 1)) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE)
    vae = build_vae(seed, norm_num_groups=norm_groups).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    started, log = time.perf_counter(), []
    done = 0
    for step in range(steps):
        for group in opt.param_groups:  # short warm-up, then cosine decay to 5% of lr
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = make_batch(rng, "train", seed, step * clips_per_step, clips_per_step, static_prob, config, layer_weights)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        kl = z.pow(2).mean()  # keeps the latent scale in check (the encoder is deterministic, see below)
        loss = rec + mse_weight * (recon - x).pow(2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log.append({"step": step, "l1": round(rec.item(), 4), "z2": round(kl.item(), 3), "s": round(elapsed, 1)})
            print(json.dumps(log[-1]), flush=True)
        if (time.perf_counter() - started) / 60 > max_minutes:
            print(f"stopping at step {done}: --max-minutes {max_minutes} reached", flush=True)
            break
    minutes = (time.perf_counter() - started) / 60
    vae.eval()
    make_deterministic(vae)

    # scaling factor: 1 / std of the latent means on held-out (val) clips, as CogVideoX's 1.15258426
    with torch.no_grad():
        x = make_batch(random.Random(seed + 1), "val", seed, 0, 32, static_prob, config)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        val_l1 = (recon - x).abs().mean().item()
        scaling = 1.0 / z.std().item()
    vae.register_to_config(scaling_factor=round(scaling, 6))
    from layerkit_plugins.cogvideox.backbone import save_components

    save_components(build_components(seed, vae=vae), out)
    info = {"steps": done, "minutes": round(minutes, 2), "seed": seed, "lr": lr, "clips_per_step": clips_per_step,
            "kl_weight": kl_weight, "static_prob": static_prob, "norm_groups": norm_groups,
            "mse_weight": mse_weight, "layer_weights": list(layer_weights), "val_l1": round(val_l1, 4),
            "scaling_factor": round(scaling, 6), "log": log}
    (out / "vae_training.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_layerflow/base"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clips-per-step", type=int, default=8)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the latent L2 term")
    parser.add_argument("--static-prob", type=float, default=0.3)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop early past this wall time")
    parser.add_argument("--norm-groups", type=int, default=4, help="GroupNorm groups of the VAE")
    parser.add_argument("--mse-weight", type=float, default=1.0, help="weight of an MSE term beside the L1")
    parser.add_argument("--layer-weights", type=float, nargs=4, default=[3, 3, 1, 1],
                        help="how often each layer is drawn: foreground, alpha, background, blended")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (2 on an otherwise idle 2-core machine; use 1 when other jobs run:"
                             " two threads on a busy machine thrash, 5-8x slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = train(args.out, args.steps, args.seed, args.lr, args.clips_per_step, args.kl_weight,
                 args.static_prob, args.max_minutes, args.norm_groups, args.mse_weight, tuple(args.layer_weights))
    print(json.dumps({k: v for k, v in info.items() if k != "log"}))


if __name__ == "__main__":
    main()
