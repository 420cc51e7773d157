"""The toy LayerFlow's T5, pretrained contrastively on shapes-world layers and their prompts.

CogVideoX's T5-XXL reaches the DiT pretrained on text; the toy's T5 is random and frozen. It keeps
every word apart, but the toy's denoiser learnt from it what the colour and direction words ask
and nothing of what the shape words ask (``weights/MODEL_CARD.md``, "Does generation read its
prompt?"). As the toy transparent model pretrains its CLIP text tower (``transparent/toy/clip.py``),
this pretrains the toy T5 with CLIP's symmetric contrastive loss (Radford et al. 2021) against a
vision tower that reads a whole layer clip (its frames stacked as channels), on pairs of a layer's
prompt block and that layer's clip from the training split, as the layered task packs them:
"0, <foreground prompt>" with the foreground over grey, "1, <background prompt>" with the
background, "2, <prompt>" with the blended clip. T5 has no pooled token: its outputs are
mean-pooled over the prompt's tokens and projected. Only the T5 is kept, frozen from then on.

    layerkit toy-layerflow-text --out DIR [--steps 1500] [--base SRC]

DIR gets SRC's model folders (default: the committed toy) with this T5 in ``text_encoder/``, and
``text_training.json`` (losses, zero-shot retrieval on val clips, settings, time): a
``backbone.path`` for ``layerkit train +experiment=toy_layerflow_base`` and the stages.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
from layerkit.training.contrastive import contrastive_loss
from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

WEIGHTS = Path(__file__).resolve().parent / "weights"
FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
#: the vision tower: a layer's 8 RGB frames stacked as 24 channels, 4x4 patches of a 32x32 clip (with 8x8
#: patches it told the shapes apart in 0.60 of the val clips: the sprite spans one or two patches)
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=4)


def layer_pairs(sample: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(prompt block, layer clip [F*3, H, W] in [-1, 1]) of the foreground over grey, the
    background and the blended clip, the prompt blocks indexed as the layered task indexes them."""
    from layerkit_plugins.layerflow.toy.train_vae import packed_clip

    clip = packed_clip(sample)                                    # [3, 4F, H, W]: fg over grey, alpha, bg, blended
    frames = clip.shape[1] // 4
    layers = {0: clip[:, :frames], 1: clip[:, 2 * frames:3 * frames], 2: clip[:, 3 * frames:]}
    texts = {0: sample["foreground_prompt"], 1: sample["background_prompt"], 2: sample["prompt"]}
    return [(f"{k}, {texts[k]}", layers[k].permute(1, 0, 2, 3).flatten(0, 1)) for k in (0, 1, 2)]


class TextTower(torch.nn.Module):
    """The T5 encoder, its outputs mean-pooled over the prompt's tokens, projected."""

    def __init__(self, t5, dim: int = 32) -> None:
        super().__init__()
        self.t5 = t5
        self.proj = torch.nn.Linear(t5.config.d_model, dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.t5.config.pad_token_id).float()[..., None]
        hidden = self.t5(input_ids=ids).last_hidden_state
        return self.proj((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def vision_tower(frames: int, size: int, dim: int = 32, patch: int | None = None):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = {**VISION_CONFIG, **({"patch_size": patch} if patch else {})}
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config, image_size=size, num_channels=3 * frames,
                                                          projection_dim=dim))


def tokenize(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def batch_of(indices: list[int], split: str, config: ShapesConfig) -> tuple[list[str], torch.Tensor, list[dict]]:
    texts, clips, metas = [], [], []
    for i in indices:
        sample = make_sample(seed_for(split, 0, i), config)
        for k, (text, clip) in enumerate(layer_pairs(sample)):
            texts.append(text)
            clips.append(clip)
            metas.append({"layer": k, **sample["meta"]["sprites"][0]})
    return texts, torch.stack(clips), metas


@torch.no_grad()
def retrieval(tower: TextTower, vision, tokenizer, length: int, num: int, config: ShapesConfig) -> dict[str, float]:
    """Zero-shot on ``num`` val clips' foregrounds: each clip's nearest foreground prompt block among
    those of the clips; the share whose shape and colour words are the clip's."""
    tower.eval()
    vision.eval()
    texts, clips, metas = batch_of(list(range(num)), "val", config)
    fg = [j for j, m in enumerate(metas) if m["layer"] == 0]
    prompts = sorted({texts[j] for j in fg})
    text = F.normalize(tower(tokenize(tokenizer, prompts, length)), dim=-1)
    image = F.normalize(vision(pixel_values=clips[fg]).image_embeds, dim=-1)
    best = (image @ text.T).argmax(1)
    words = [prompts[int(b)].split() for b in best]
    return {f"{key} of the nearest prompt is the clip's": round(sum(metas[j][key] in w for j, w in zip(fg, words)) / len(fg), 4)
            for key in ("shape", "colour")} | {"clips": len(fg), "prompts": len(prompts)}


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (records name no machine paths)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def pretrain(base: Path, steps: int, batch: int, lr: float, seed: int, data_size: int,
             log_every: int = 50, vision_patch: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The T5 of ``base`` trained contrastively (returned frozen), and the training record."""
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE, num_sprites=1)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base / "tokenizer"))
    t5 = T5EncoderModel.from_pretrained(str(base / "text_encoder"), torch_dtype=torch.float32).train()
    length = int(json.loads((base / "transformer" / "config.json").read_text())["max_text_seq_length"])
    tower, vision = TextTower(t5), vision_tower(FRAMES, SIZE, patch=vision_patch)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*tower.parameters(), *vision.parameters()]
    decay = [p for p in params if p.ndim >= 2]          # weights; not biases, norms or the temperature
    rest = [p for p in params if p.ndim < 2] + [logit_scale]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    before = retrieval(tower, vision, tokenizer, length, 256, config)
    tower.train()
    vision.train()
    losses, start = [], time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / max(1, steps // 20))
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        texts, clips, _ = batch_of([rng.randrange(data_size) for _ in range(batch)], "train", config)
        distinct = sorted(set(texts))
        which = torch.tensor([distinct.index(t) for t in texts])
        text = tower(tokenize(tokenizer, distinct, length))[which]
        image = vision(pixel_values=clips).image_embeds
        loss = contrastive_loss(text, image, logit_scale.exp().clamp(max=100), which)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"[toy] T5 step {step + 1}/{steps}: contrastive loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"(uniform {math.log(3 * batch):.2f}), {time.time() - start:.0f} s", flush=True)
    after = retrieval(tower, vision, tokenizer, length, 256, config)
    t5.requires_grad_(False).eval()
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "data_size": data_size,
              "vision_patch": int(vision.config.patch_size),
              "minutes": round((time.time() - start) / 60, 2), "retrieval_before": before, "retrieval_after": after,
              "loss_every_50_steps": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4)
                                      for i in range(0, len(losses), 50)], "base": shown(base)}
    return t5, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder: the base with this T5")
    parser.add_argument("--base", type=Path, default=WEIGHTS, help="the model folders to start from (default: committed)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="training clips per step (three layers each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-size", type=int, default=8000, help="training clips drawn from (stage 1's set)")
    parser.add_argument("--vision-patch", type=int, choices=[4, 8], default=None,
                        help="the vision tower's patch size in pixels (default 4)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    missing = [name for name in FOLDERS if not (args.base / name).is_dir()]
    if missing:
        parser.error(f"--base '{args.base}' is not a toy model folder (no {', '.join(missing)} there).")
    if args.out.exists():
        parser.error(f"'{args.out}' exists; choose a new --out folder (nothing is overwritten).")
    if args.steps < 1 or args.batch < 2:
        parser.error("--steps must be at least 1 and --batch at least 2.")
    torch.set_num_threads(args.threads)
    t5, record = pretrain(args.base, args.steps, args.batch, args.lr, args.seed, args.data_size,
                          vision_patch=args.vision_patch)
    partial = args.out.with_name(args.out.name + ".partial")  # nothing half-written under --out
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for name in FOLDERS:
            if name != "text_encoder":
                shutil.copytree(args.base / name, partial / name)
        t5.save_pretrained(str(partial / "text_encoder"), safe_serialization=True)
        (partial / "text_training.json").write_text(json.dumps(record, indent=1) + "\n")
        partial.rename(args.out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(json.dumps({k: v for k, v in record.items() if k != "loss_every_50_steps"}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
