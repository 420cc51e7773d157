"""Train the toy VAE on packed shapes-world clips and write the toy base model (a diffusers dir).

    OMP_NUM_THREADS=1 nice -n 5 layerkit toy-layerflow-vae --out runs/toy_layerflow/base --threads 1

The VAE (``AutoencoderKLCogVideoX``, see ``toy.model``) is trained as a deterministic
reconstruction autoencoder (L1 + MSE on the decoded posterior mode + a small L2 on the latents;
the log-variance head is then zeroed to std ~3e-7, so training and sampling encode alike) on
what LayerFlow feeds it: the packed clip [foreground over mid-grey, alpha matte as RGB,
background, blended], 8 frames of 32x32 each, 32 frames through the causal VAE in ONE pass
(``backbone.vae_pass=clip``), a share of them with a copy of frame 0 in front (33 frames, as
fg2bg and bg2fg pack them), frozen (one frame repeated, as stages 2-3 feed them) or copy-pasted
(the foreground over another clip's background, as ``layerflow.mixture``).

Colour: with the alpha mattes (grey) in the loss from step 0 the encoder loses red/green and
cyan/magenta (issue 12; ``--packing single`` reruns that finding on the old single-layer recipe).
The alpha sub-clip's loss weight is therefore 0 for the first ``--alpha-warmup`` steps. Every
``--val-every`` steps, and at the end, fixed validation clips (8 per sprite colour) go through the
VAE: the decoded foreground's colour per clip (mean decoded RGB where the true alpha > 0.9,
nearest palette colour), the red/green and cyan/magenta separations
((R - G of the decoded red or magenta - (R - G) of the decoded green or cyan) / 2: 1 faithful,
0 tied) and the alpha IoU (decoded matte >= 0.5 against the true one). The run FAILS (exit 1, no
model written) when a sprite colour (red, green, cyan and magenta above all) is classified right
on fewer than 90% of its clips or the alpha IoU is under ``--min-alpha-iou``.

Its ``scaling_factor`` is 1 / std of the latents (as CogVideoX's). The directory then gets the
seeded (untrained) toy transformer, the T5 encoder, the offline tokenizer and the scheduler: the
"pretrained base" the LayerFlow stages start from.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from layerkit.data.shapes import COLOURS, ShapesConfig, make_sample, seed_for
from layerkit.errors import LayerkitError
from layerkit_plugins.layerflow.toy.model import (
    FRAMES,
    SIZE,
    build_components,
    build_vae,
    compression_changes,
    vae_compression,
)

LAYERS = ("foreground", "alpha", "background", "blended")
CHECKED = tuple(COLOURS)  # every sprite colour: a collapsing VAE ties R with G (red/green, cyan/magenta) or G with B
_NAMES = list(COLOURS)
_TABLE = torch.tensor([COLOURS[c] for c in _NAMES])


def layer_clips(sample: dict, static_frame: int | None = None) -> list[torch.Tensor]:
    """The four sub-clips LayerFlow packs, [3, F, H, W] in [-1, 1] (VAE layout)."""
    alpha = sample["foreground_alpha"]
    clips = [(sample["foreground_rgb"] * 2 - 1) * alpha, alpha.expand(-1, 3, -1, -1) * 2 - 1,
             sample["background"] * 2 - 1, sample["blended"] * 2 - 1]
    if static_frame is not None:
        clips = [c[static_frame:static_frame + 1].expand_as(c) for c in clips]
    return [c.permute(1, 0, 2, 3).contiguous() for c in clips]


def copy_paste(sample: dict, other: dict) -> dict:
    """``sample``'s foreground over ``other``'s background (as ``layerflow.mixture``)."""
    alpha = sample["foreground_alpha"]
    return {**sample, "background": other["background"],
            "blended": sample["foreground_rgb"] * alpha + other["background"] * (1 - alpha)}


def packed_clip(sample: dict, first_frame: bool = False, static_frame: int | None = None) -> torch.Tensor:
    """[3, F', H, W]: the four sub-clips in time, with a copy of the foreground's frame 0 in front
    when ``first_frame`` (F' = 4F + 1), as the ``layerflow`` task packs fg2bg and bg2fg."""
    clips = layer_clips(sample, static_frame)
    if first_frame:
        clips.insert(0, clips[0][:, :1])
    return torch.cat(clips, dim=1)


def frame_weights(frames: int, first_frame: bool, weights: tuple[float, ...]) -> torch.Tensor:
    """Per-frame loss weights [F'] of a packed clip from per-layer weights (the copy: the foreground's)."""
    w = torch.tensor([float(x) for x in weights]).repeat_interleave(frames)
    return torch.cat([w[:1], w]) if first_frame else w


def make_batch(rng: random.Random, split: str, seed: int, start: int, clips: int, config: ShapesConfig, *,
               packing: str = "clip", first_frame: bool = False, static_prob: float = 0.3,
               copy_paste_prob: float = 0.3, weights: tuple[float, ...] = (1, 1, 1, 1)) -> torch.Tensor:
    """``clips`` training clips [N, 3, F', H, W] from consecutive items of a split.

    ``packing="clip"``: each a packed clip (``first_frame`` for all of them). ``"single"`` (the
    recipe before issue 12): each one layer of its own clip, drawn with ``weights``."""
    out = []
    for i in range(clips):
        sample = make_sample(seed_for(split, seed, start + i), config)
        frame = rng.randrange(config.num_frames) if rng.random() < static_prob else None
        if packing == "single":
            out.append(layer_clips(sample, frame)[rng.choices(range(4), weights=weights)[0]])
            continue
        if rng.random() < copy_paste_prob:
            sample = copy_paste(sample, make_sample(seed_for(split, seed ^ 0x5A5A, start + i), config))
        out.append(packed_clip(sample, first_frame, frame))
    return torch.stack(out)


def composite_residual(decoded: torch.Tensor, frames: int, first_frame: bool = False,
                       layers_fixed: bool = False) -> torch.Tensor:
    """blended - (foreground over grey + background x (1 - alpha)) of decoded packed clips
    [N, 3, F', H, W] (VAE units, [-1, 1]): zero wherever the four decoded sub-clips composite
    exactly (LayerFlow eq. 1, blended = fg x alpha + bg x (1 - alpha), written for the packed
    foreground (2 fg - 1) x alpha: blended = fg-over-grey + bg x (1 - alpha)). ``layers_fixed``:
    no gradient through the decoded foreground, alpha and background (a loss on it moves the
    decoded blended clip towards the composite of the decoded layers, never the layers)."""
    o = 1 if first_frame else 0
    fg, alpha, bg, blended = (decoded[:, :, o + k * frames:o + (k + 1) * frames] for k in range(4))
    if layers_fixed:
        fg, alpha, bg = fg.detach(), alpha.detach(), bg.detach()
    a = ((alpha.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
    return blended - (fg + bg * (1 - a))


def implied_matte_error(decoded: torch.Tensor, target: torch.Tensor, frames: int,
                        first_frame: bool = False) -> torch.Tensor:
    """|implied - true matte| [N, 1, F, H, W] of packed clips: the matte the decoded blended and
    background sub-clips imply for the true sprite colour (the evaluator's own
    ``layered.evaluate.composite_alpha``: how far blended has moved from the background towards the
    sprite's colour) against the true matte of ``target``. Zero when the decoded blended clip shows
    the sprite exactly where the matte is (the composite-implied matte a generation is scored by);
    the sprite's edges in the blended clip are where a VAE blurs, and where this term weighs."""
    from layerkit_plugins.layered.evaluate import composite_alpha
    from layerkit_plugins.layered.task import to_unit, unpack_foreground

    o = 1 if first_frame else 0

    def layer(clips: torch.Tensor, i: int, k: int) -> torch.Tensor:  # sub-clip k of clip i, [F, 3, H, W]
        return clips[i, :, o + k * frames:o + (k + 1) * frames].permute(1, 0, 2, 3)

    errors = []
    for i in range(decoded.shape[0]):
        rgb, alpha = unpack_foreground(layer(target, i, 0), layer(target, i, 1))
        implied = composite_alpha(rgb, alpha, to_unit(layer(decoded, i, 2)), to_unit(layer(decoded, i, 3)))
        errors.append((implied - alpha).abs().permute(1, 0, 2, 3))  # [1, F, H, W]
    return torch.stack(errors)


def chroma(video: torch.Tensor) -> torch.Tensor:
    """Colour-opponent channels of [N, 3, ...]: R - G and (R + G) / 2 - B (zero on grey, so on every matte)."""
    r, g, b = video[:, 0], video[:, 1], video[:, 2]
    return torch.stack([r - g, (r + g) / 2 - b], dim=1)


def make_deterministic(vae) -> None:
    """Zero the posterior's log-variance head and set its bias to -30 (std ~3e-7): ``encode``
    then gives the same latents in training (``sample()``) as at inference (``mode()``)."""
    conv = vae.encoder.conv_out.conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


# -- validation: sprite colours and mattes through the VAE -------------------------------------
#: latent MSEs (scaled units) at which the final check also measures the matte: a denoiser's error
#: (``toy-layerflow-diagnose probe``: the best local predictor of decomposition reaches 0.04)
NOISY_MSE = (0.01, 0.02, 0.04)


def validation_samples(seed: int, config: ShapesConfig, per_colour: int = 8) -> list[dict]:
    """The first ``per_colour`` val-split clips of each sprite colour (fixed for a seed)."""
    found: dict[str, list] = {c: [] for c in COLOURS}
    i = 0
    while any(len(v) < per_colour for v in found.values()):
        sample = make_sample(seed_for("val", seed, i), config)
        bucket = found[sample["meta"]["sprites"][0]["colour"]]
        if len(bucket) < per_colour:
            bucket.append(sample)
        i += 1
    return [s for c in COLOURS for s in found[c]]


@torch.no_grad()
def round_trip(vae, clips: torch.Tensor, batch: int = 8, latent_noise: float = 0.0) -> torch.Tensor:
    """Encode and decode; ``latent_noise``: Gaussian noise of this std, in the denoiser's (scaled)
    latent units, added to the latents before decoding (seeded: the same noise every call)."""
    out = []
    generator = torch.Generator().manual_seed(0)
    for chunk in clips.split(batch):
        z = vae.encode(chunk).latent_dist.mode()
        if latent_noise:
            z = z + latent_noise / float(vae.config.scaling_factor) * torch.randn(z.shape, generator=generator)
        out.append(vae.decode(z).sample)
    return torch.cat(out)


@torch.no_grad()
def validate(vae, samples: list[dict], packing: str = "clip", first_frame: bool = False,
             latent_noise: float = 0.0) -> dict:
    """Per colour: mean decoded RGB inside the sprite and the share of clips classified right;
    red/green and cyan/magenta separations; alpha IoU through the VAE (``latent_noise``: with
    Gaussian noise of this std added to the scaled latents, as a denoiser's error)."""
    n = samples[0]["foreground_alpha"].shape[0]
    if packing == "single":  # each layer through the VAE on its own
        fg = round_trip(vae, torch.stack([layer_clips(s)[0] for s in samples]), latent_noise=latent_noise)
        alpha = round_trip(vae, torch.stack([layer_clips(s)[1] for s in samples]), latent_noise=latent_noise)
    else:
        decoded = round_trip(vae, torch.stack([packed_clip(s, first_frame) for s in samples]),
                             latent_noise=latent_noise)
        offset = 1 if first_frame else 0
        fg, alpha = decoded[:, :, offset:offset + n], decoded[:, :, offset + n:offset + 2 * n]
    composite = {} if packing == "single" else composite_figures(decoded[:, :, offset:], samples, n)
    rgb: dict[str, list[torch.Tensor]] = {}
    right: dict[str, list[float]] = {}
    inter = union = 0
    for i, sample in enumerate(samples):
        colour = sample["meta"]["sprites"][0]["colour"]
        inside = (sample["foreground_alpha"][:, 0] > 0.9).float()                      # [F, H, W]
        frames = ((fg[i].clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3)                   # [F, 3, H, W]
        mean = (frames * inside[:, None]).sum((0, 2, 3)) / inside.sum().clamp_min(1)
        rgb.setdefault(colour, []).append(mean)
        right.setdefault(colour, []).append(float(_NAMES[int(torch.cdist(mean[None], _TABLE).argmin())] == colour))
        pred = (alpha[i].mean(0) + 1) / 2 >= 0.5                                        # [F, H, W]
        true = sample["foreground_alpha"][:, 0] >= 0.5
        inter += (pred & true).sum().item()
        union += (pred | true).sum().item()
    means = {c: torch.stack(v).mean(0) for c, v in rgb.items()}

    def separation(a: str, b: str) -> float:  # (R - G) of a minus (R - G) of b, halved: 1 faithful, 0 tied
        return round(float((means[a][0] - means[a][1]) - (means[b][0] - means[b][1])) / 2, 3)

    return {"rgb": {c: [round(x, 3) for x in m.tolist()] for c, m in means.items()},
            "colour_correct": {c: round(sum(v) / len(v), 3) for c, v in right.items()},
            "rg_separation": separation("red", "green"), "cm_separation": separation("magenta", "cyan"),
            "alpha_iou": round(inter / max(union, 1), 4), **composite}


def composite_figures(decoded: torch.Tensor, samples: list[dict], n: int) -> dict[str, float]:
    """What the evaluator (``layered.evaluate``) scores on the decoded sub-clips, unpacked as the
    ``layerflow`` task unpacks them: the compositing error and the IoU of the decoded matte with
    the one the decoded blended clip implies over the decoded background (the ceiling of a
    generation's ``alpha_iou``)."""
    from layerkit.data.evaluate import alpha_iou, compositing_error
    from layerkit_plugins.layered.evaluate import composite_alpha
    from layerkit_plugins.layered.task import to_unit, unpack_foreground

    errors, ious = [], []
    for i in range(len(samples)):
        fg, alpha, bg, blended = (decoded[i, :, k * n:(k + 1) * n].permute(1, 0, 2, 3) for k in range(4))
        rgb, a = unpack_foreground(fg, alpha)                                       # [F, 3 | 1, H, W] in [0, 1]
        bg, blended = to_unit(bg), to_unit(blended)
        errors.append(compositing_error(rgb, a, bg, blended))
        ious.append(alpha_iou(a, composite_alpha(rgb, a, bg, blended)))
    return {"compositing_error": round(sum(errors) / len(errors), 4),
            "alpha_iou_composite": round(sum(ious) / len(ious), 4)}


def grow_latent_channels(vae, channels: int, seed: int = 0):
    """A VAE with ``channels`` latent channels that encodes and decodes exactly as ``vae`` at first:
    the encoder's mean and log-variance outputs and every weight that reads the latents (the
    decoder's input convolution and its spatial norms) are copied into the first channels; the new
    mean channels keep their seeded initialisation, and the weights reading them start at zero, so
    training adds capacity without first unlearning what ``vae`` knows (its colours, above all).
    """
    from layerkit_plugins.cogvideox.backbone import DECODER_WIDTHS

    old_c = int(vae.config.latent_channels)
    if vae.config.get(DECODER_WIDTHS):
        raise SystemExit("--latent-channels grows a VAE whose decoder has the encoder's widths; this --init VAE's "
                         "decoder has its own (decoder_block_out_channels)")
    if channels < old_c:
        raise SystemExit(f"--latent-channels {channels} is fewer than the --init VAE's {old_c}: only growing is supported")
    with torch.random.fork_rng(devices=[]):  # the same config but the channels, seeded
        torch.manual_seed(seed)
        grown = type(vae).from_config({**dict(vae.config), "latent_channels": channels})
    old, new = vae.state_dict(), grown.state_dict()
    if set(old) != set(new):
        raise SystemExit(f"cannot grow this VAE: its weights {sorted(set(old) ^ set(new))[:4]} have no counterpart")
    with torch.no_grad():
        for key, value in new.items():
            source = old[key]
            if source.shape == value.shape:
                value.copy_(source)
            elif key.startswith("encoder.conv_out."):  # [mean | logvar] along the output channels
                value[:old_c].copy_(source[:old_c])
                value[channels:channels + old_c].copy_(source[old_c:])
            elif key.startswith("decoder.") and value.dim() >= 2 and value.shape[1] == channels:  # reads z
                value.zero_()
                value[:, :old_c].copy_(source)
            else:
                raise SystemExit(f"cannot grow '{key}' from {tuple(source.shape)} to {tuple(value.shape)}")
    grown.load_state_dict(new)
    grown.register_to_config(scaling_factor=float(vae.config.scaling_factor))
    return grown


def widen_decoder(vae, widths: tuple[int, ...], seed: int = 0, noise: float = 0.01):
    """``vae`` with a decoder of ``widths`` (the decoder's widths times one integer, the same for every
    block: a block whose input and output grew by different factors would gain or lose its shortcut
    convolution) that decodes as the old one at first (net2net widening: each channel repeated, the weights
    reading a repeated channel divided among its copies; the repeats of a channel fall in its GroupNorm
    group, whose statistics stay the same), plus seeded noise of ``noise`` x each weight's std so that
    the copies can part in training. The encoder, and so the latents, stay as they are."""
    from layerkit_plugins.cogvideox.backbone import with_decoder_widths

    old_widths = _decoder_widths(vae)
    widths = [int(w) for w in widths]
    factor = widths[0] // old_widths[0] if widths and widths[0] > 0 else 0
    if len(widths) != len(old_widths) or factor < 1 or widths != [factor * o for o in old_widths]:
        raise SystemExit(f"--decoder-widths {' '.join(map(str, widths))}: give one width per up block, the --init "
                         f"decoder's {' '.join(map(str, old_widths))} times one whole number (e.g. "
                         f"{' '.join(str(2 * o) for o in old_widths)})")
    old = {k: v.detach().clone() for k, v in vae.decoder.state_dict().items()}
    vae = with_decoder_widths(vae, widths)
    new = vae.decoder.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in new.items():
            source = old[key]
            for dim in range(source.dim()):
                k = value.shape[dim] // source.shape[dim]
                if k > 1:
                    source = source.repeat_interleave(k, dim=dim) / (k if dim == 1 else 1)
            if source.shape != value.shape:
                raise SystemExit(f"cannot widen '{key}' from {tuple(old[key].shape)} to {tuple(value.shape)}")
            if source.dim() > 1:
                source = source + noise * source.std() * torch.randn(source.shape, generator=generator)
            value.copy_(source)
    vae.decoder.load_state_dict(new)
    return vae


def _decoder_widths(vae) -> list[int]:
    from layerkit_plugins.cogvideox.backbone import DECODER_WIDTHS

    return [int(w) for w in (vae.config.get(DECODER_WIDTHS) or vae.config.block_out_channels)]


def check(result: dict, min_alpha_iou: float) -> list[str]:
    """What fails the run: a checked colour classified right on < 90% of its clips, or a low IoU."""
    failures = [f"{c} decodes as its own colour on {result['colour_correct'][c]:.0%} of the validation clips "
                f"(mean decoded RGB {result['rgb'][c]})" for c in CHECKED if result["colour_correct"][c] < 0.9]
    if result["alpha_iou"] < min_alpha_iou:
        failures.append(f"alpha IoU through the VAE {result['alpha_iou']:.3f} < {min_alpha_iou}")
    return failures


def train(out: Path, steps: int, seed: int, lr: float, clips_per_step: int, kl_weight: float, static_prob: float,
          max_minutes: float, *, packing: str = "clip", frames: int = FRAMES, first_frame_prob: float = 0.3,
          copy_paste_prob: float = 0.3, norm_groups: int = 4, mse_weight: float = 1.0,
          layer_weights: tuple[float, ...] = (1, 1, 1, 1), alpha_warmup: int = 300, val_every: int = 250,
          min_alpha_iou: float = 0.9, chroma_weight: float = 0.0, write: bool = True,
          init: Path | None = None, parts: str = "all", latent_noise: float = 0.0,
          composite_weight: float = 0.0, latent_channels: int | None = None, implied_weight: float = 0.0,
          spatial_compression: int | None = None, sprite_size: tuple[float, float] | None = None,
          composite_to: str = "layers", decoder_widths: tuple[int, ...] | None = None) -> dict:
    """Train (or, ``parts="decoder"``, fine-tune the decoder of ``init``) and check the toy VAE.
    ``latent_noise``: the decoder sees its latents plus Gaussian noise of a std drawn per clip from
    U(0, latent_noise), in the denoiser's (scaled) latent units: a decoder that turns imprecise
    latents (a denoiser's) into clean layers. ``composite_weight``: weight of an L1 term on
    :func:`composite_residual` (packed clips): decoded layers that composite into the decoded
    blended clip, as the true ones do; ``composite_to``: what that term moves, "layers" (all four
    decoded sub-clips) or "blended" (the decoded blended clip alone, towards the composite of the
    decoded layers: the layers keep their reconstruction). ``latent_channels``: a fresh VAE's (default: ``VAE_CONFIG``'s),
    or, with ``init``, the channels ``init`` grows to (:func:`grow_latent_channels`); the transformer
    written beside it takes and predicts that many channels. ``spatial_compression``: a fresh VAE's
    (2 or 4, default ``VAE_CONFIG``'s 4; :func:`model.compression_changes`: 2 is also 2x in time).
    ``sprite_size``: the training and validation clips' sprite sizes (a share of the frame, as
    ``ShapesConfig.sprite_size``; default the shapes world's), as the toy stages set ``data.sprite_size``.
    ``decoder_widths``: with ``init`` and ``parts="decoder"``, widen ``init``'s decoder to these
    widths first (:func:`widen_decoder`; the config records them, ``cogvideox.backbone.load_vae``)."""
    if implied_weight and packing != "clip":
        raise SystemExit("--implied-weight needs the packed clip (--packing clip): single clips have no four layers")
    if composite_to not in ("layers", "blended"):
        raise SystemExit(f"--composite-to is layers or blended; got {composite_to!r}")
    if composite_weight and packing != "clip":
        raise SystemExit("--composite-weight needs the packed clip (--packing clip): single clips have no four layers")
    if spatial_compression is not None and init is not None:
        raise SystemExit("--spatial-compression sets a fresh VAE's; an --init VAE keeps its own")
    if latent_channels is not None and parts == "decoder":
        raise SystemExit("--latent-channels changes the latent space; --parts decoder keeps it (train all parts)")
    if decoder_widths is not None and (init is None or parts != "decoder"):
        raise SystemExit("--decoder-widths widens the decoder of an --init VAE: use it with --parts decoder --init VAE")
    if latent_noise and parts != "decoder":
        raise SystemExit("--latent-noise is in the units of a trained VAE's scaling factor: use it with "
                         "--parts decoder --init VAE")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    world = {"sprite_size": tuple(sprite_size)} if sprite_size is not None else {}
    config = ShapesConfig(num_frames=frames, height=SIZE, width=SIZE, **world)
    val = validation_samples(seed, config)
    if init is not None:  # continue a VAE (e.g. a run's rejected_vae/) with this recipe
        from layerkit_plugins.cogvideox.backbone import load_vae

        vae = load_vae(init, torch.float32).train()
        if latent_channels is not None and latent_channels != vae.config.latent_channels:
            vae = grow_latent_channels(vae, latent_channels, seed).train()
        if decoder_widths is not None:
            vae = widen_decoder(vae, decoder_widths, seed).train()
    else:
        changes = {"latent_channels": latent_channels} if latent_channels is not None else {}
        if spatial_compression is not None:
            changes.update(compression_changes(spatial_compression))
        vae = build_vae(seed, norm_num_groups=norm_groups, **changes).train()
    if parts == "decoder":  # the latent space stays as it is: denoisers trained on it stay valid
        if init is None:
            raise SystemExit("--parts decoder fine-tunes the decoder of an --init VAE; give --init")
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    started, log, checks = time.perf_counter(), [], []
    done = 0
    for step in range(steps):
        for group in opt.param_groups:  # short warm-up, then cosine decay to 5% of lr
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        weights = tuple(layer_weights)
        if step < alpha_warmup:  # no matte in the loss (or, single: in the mix) until colour has settled
            weights = (weights[0], 0.0, *weights[2:])
        first = packing == "clip" and rng.random() < first_frame_prob
        x = make_batch(rng, "train", seed, step * clips_per_step, clips_per_step, config, packing=packing,
                       first_frame=first, static_prob=static_prob, copy_paste_prob=copy_paste_prob, weights=weights)
        z = vae.encode(x).latent_dist.mode()
        if latent_noise:
            std = latent_noise / float(vae.config.scaling_factor) * torch.rand(z.shape[0], 1, 1, 1, 1)
            recon = vae.decode(z + std * torch.randn_like(z)).sample
        else:
            recon = vae.decode(z).sample
        if packing == "single":
            w = torch.ones(x.shape[2])
        else:
            w = frame_weights(frames, first, weights)
        w = (w / w.mean()).view(1, 1, -1, 1, 1)
        rec = ((recon - x).abs() * w).mean()
        latent = z.pow(2).mean()  # keeps the latent scale in check (the encoder is deterministic, see below)
        loss = rec + mse_weight * ((recon - x).pow(2) * w).mean() + kl_weight * latent
        if chroma_weight:
            loss = loss + chroma_weight * ((chroma(recon) - chroma(x)).abs() * w).mean()
        if composite_weight:  # the decoded layers composite into the decoded blended clip
            loss = loss + composite_weight * composite_residual(recon, frames, first, layers_fixed=composite_to == "blended").abs().mean()
        if implied_weight:  # the decoded blended clip shows the sprite where the true matte is
            loss = loss + implied_weight * implied_matte_error(recon, x, frames, first).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        done = step + 1
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "l1": round(rec.item(), 4), "z2": round(latent.item(), 3),
                        "s": round(time.perf_counter() - started, 1)})
            print(json.dumps(log[-1]), flush=True)
        if val_every and done % val_every == 0:
            vae.eval()
            result = validate(vae, val, packing)
            vae.train()
            checks.append({"step": done, **{k: v for k, v in result.items() if k != "rgb"}})
            print(json.dumps(checks[-1]), flush=True)
        if (time.perf_counter() - started) / 60 > max_minutes:
            print(f"stopping at step {done}: --max-minutes {max_minutes} reached", flush=True)
            break
    minutes = (time.perf_counter() - started) / 60
    vae.eval()
    make_deterministic(vae)

    # scaling factor: 1 / std of the latent means on held-out (val) clips, as CogVideoX's 1.15258426
    with torch.no_grad():
        x = make_batch(random.Random(seed + 1), "val", seed, 1000, 16, config, packing=packing,
                       static_prob=static_prob)
        z = vae.encode(x).latent_dist.mode()
        val_l1 = (vae.decode(z).sample - x).abs().mean().item()
        scaling = 1.0 / z.std().item()
    if parts == "decoder":  # same encoder, same latents: keep the factor the denoiser was trained with
        scaling = float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=round(scaling, 6))  # the noisy check's units
    final = validate(vae, val, packing)
    print("final:", json.dumps(final), flush=True)
    noisy = {f"alpha_iou_latent_mse_{mse}": validate(vae, val, packing, latent_noise=mse ** 0.5)["alpha_iou"]
             for mse in NOISY_MSE}
    print("alpha IoU with Gaussian latent noise:", json.dumps(noisy), flush=True)
    if packing == "clip":
        final_first = validate(vae, val, packing, first_frame=True)
        print("final, frame-0 copy in front:", json.dumps(final_first), flush=True)
    else:
        final_first = None
    failures = check(final, min_alpha_iou) + (check(final_first, min_alpha_iou) if final_first else [])
    info = {"steps": done, "minutes": round(minutes, 2), "seed": seed, "lr": lr, "clips_per_step": clips_per_step,
            "packing": packing, "frames": frames, "first_frame_prob": first_frame_prob,
            "copy_paste_prob": copy_paste_prob, "kl_weight": kl_weight, "static_prob": static_prob,
            "norm_groups": norm_groups, "mse_weight": mse_weight, "layer_weights": list(layer_weights),
            "alpha_warmup": alpha_warmup, "chroma_weight": chroma_weight, "composite_weight": composite_weight,
            "composite_to": composite_to,
            "implied_weight": implied_weight, "latent_channels": int(vae.config.latent_channels),
            "spatial_compression": vae_compression(vae)[0], "sprite_size": list(config.sprite_size), "init": str(init) if init else None,
            "parts": parts, "decoder_widths": _decoder_widths(vae),
            "latent_noise": latent_noise, "validation_noisy_latents": noisy, "val_l1": round(val_l1, 4), "scaling_factor": round(scaling, 6),
            "validation": final, "validation_first_frame": final_first, "failures": failures,
            "validation_log": checks, "log": log}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_training.json").write_text(json.dumps(info, indent=1))
    if failures:
        if write:  # kept for inspection, never where the stages look for a base
            vae.save_pretrained(str(out / "rejected_vae"))
        raise SystemExit("toy VAE check FAILED, no model written (the VAE is in rejected_vae/):\n  "
                         + "\n  ".join(failures))
    if write:
        from layerkit_plugins.cogvideox.backbone import save_components

        save_components(build_components(seed, vae=vae), out)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_layerflow/base"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clips-per-step", type=int, default=2)
    parser.add_argument("--packing", choices=["clip", "single"], default="clip",
                        help="clip: the packed 4-layer clip in one pass (LayerFlow); single: one layer per clip "
                             "(the recipe before issue 12, for rerunning its finding)")
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per layer")
    parser.add_argument("--first-frame-prob", type=float, default=0.3,
                        help="share of steps whose clips get a copy of frame 0 in front (fg2bg, bg2fg)")
    parser.add_argument("--copy-paste-prob", type=float, default=0.3)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the latent L2 term")
    parser.add_argument("--static-prob", type=float, default=0.3)
    parser.add_argument("--max-minutes", type=float, default=40.0, help="stop early past this wall time")
    parser.add_argument("--norm-groups", type=int, default=4, help="GroupNorm groups of the VAE")
    parser.add_argument("--mse-weight", type=float, default=1.0, help="weight of an MSE term beside the L1")
    parser.add_argument("--layer-weights", type=float, nargs=4, default=[1, 1, 1, 1],
                        help="loss weight of each layer (single: how often each is drawn): foreground, alpha, "
                             "background, blended")
    parser.add_argument("--alpha-warmup", type=int, default=300, help="steps with the alpha weight at 0")
    parser.add_argument("--val-every", type=int, default=250, help="steps between colour checks (0: only at the end)")
    parser.add_argument("--min-alpha-iou", type=float, default=0.9)
    parser.add_argument("--chroma-weight", type=float, default=0.0,
                        help="weight of an L1 term on the colour-opponent channels (R - G, (R + G) / 2 - B)")
    parser.add_argument("--no-write", action="store_true", help="only the training record (experiments)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this VAE folder (e.g. an earlier run's rejected_vae/) instead of a seeded one")
    parser.add_argument("--parts", choices=["all", "decoder"], default="all",
                        help="decoder: fine-tune only the decoder of --init (latents, scaling factor and every "
                             "denoiser trained on them stay valid)")
    parser.add_argument("--latent-noise", type=float, default=0.0,
                        help="train the decoder on latents plus Gaussian noise, std per clip from U(0, this), "
                             "in scaled latent units (robust to a denoiser's errors)")
    parser.add_argument("--composite-weight", type=float, default=0.0,
                        help="weight of an L1 term on blended - (fg over grey + bg x (1 - alpha)) of the decoded "
                             "packed clip: decoded layers that composite into the decoded blended clip")
    parser.add_argument("--composite-to", choices=["layers", "blended"], default="layers",
                        help="what the composite term moves: every decoded layer (layers), or the decoded blended "
                             "clip alone towards the composite of the decoded layers (blended: the layers keep "
                             "their reconstruction)")
    parser.add_argument("--implied-weight", type=float, default=0.0,
                        help="weight of an L1 term on the matte the decoded blended and background clips "
                             "imply for the true sprite colour against the true matte (sprite edges in the blended clip)")
    parser.add_argument("--latent-channels", type=int, default=None,
                        help="latent channels of a fresh VAE (default 8; CogVideoX's own VAE has 16), "
                             "or, with --init, the channels the --init VAE grows to")
    parser.add_argument("--spatial-compression", type=int, choices=[2, 4], default=None,
                        help="a fresh VAE's spatial compression (default 4); diffusers' CogVideoX VAE compresses "
                             "time in the same blocks, so 2 is also 2x in time (16 latent frames of 16x16)")
    parser.add_argument("--sprite-size", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="sprite sizes of the training and validation clips, a share of the frame (default: "
                             "the shapes world's 0.3 0.45; the toy stages' data.sprite_size)")
    parser.add_argument("--decoder-widths", type=int, nargs="+", default=None, metavar="W",
                        help="with --parts decoder --init VAE: widen the decoder to these widths first (one per up "
                             "block, the --init decoder's times one whole number, e.g. 16 32 64 for the toy's 8 16 32), "
                             "decoding as before at first; the latents stay the encoder's")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a machine shared with other jobs: two threads there thrash)")
    args = parser.parse_args(argv)
    if args.latent_channels is not None and args.latent_channels < 1:
        parser.error(f"--latent-channels must be at least 1; got {args.latent_channels}.")
    if args.spatial_compression is not None and args.init is not None:
        parser.error("--spatial-compression sets a fresh VAE's; an --init VAE keeps its own (leave one out).")
    if args.init is not None and not (args.init / "config.json").is_file():
        parser.error(f"--init '{args.init}' is not a VAE folder (no config.json there; e.g. toy/weights/vae or a "
                     "run's rejected_vae/).")
    if args.decoder_widths is not None and (args.init is None or args.parts != "decoder"):
        parser.error("--decoder-widths widens the decoder of an --init VAE: use it with --parts decoder --init VAE.")
    if args.sprite_size is not None:  # the shapes world's own rule, said as this option
        try:
            ShapesConfig(sprite_size=tuple(args.sprite_size)).validate()
        except LayerkitError:
            parser.error(f"--sprite-size takes LOW HIGH, a share of the frame, as the shapes world's sprite_size: "
                         f"0 < LOW <= HIGH <= 0.9; got {args.sprite_size[0]} {args.sprite_size[1]}.")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"'{args.out}' is a file; --out names a folder to write the run into.")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"'{args.out}' exists and is not empty (an earlier run?); choose a new --out folder.")
    torch.set_num_threads(args.threads)
    info = train(args.out, args.steps, args.seed, args.lr, args.clips_per_step, args.kl_weight, args.static_prob,
                 args.max_minutes, packing=args.packing, frames=args.frames, first_frame_prob=args.first_frame_prob,
                 copy_paste_prob=args.copy_paste_prob, norm_groups=args.norm_groups, mse_weight=args.mse_weight,
                 layer_weights=tuple(args.layer_weights), alpha_warmup=args.alpha_warmup, val_every=args.val_every,
                 min_alpha_iou=args.min_alpha_iou, chroma_weight=args.chroma_weight, write=not args.no_write,
                 init=args.init, parts=args.parts, latent_noise=args.latent_noise,
                 composite_weight=args.composite_weight, latent_channels=args.latent_channels,
                 implied_weight=args.implied_weight, spatial_compression=args.spatial_compression,
                 sprite_size=args.sprite_size, composite_to=args.composite_to,
                 decoder_widths=tuple(args.decoder_widths) if args.decoder_widths else None)
    print(json.dumps({k: v for k, v in info.items() if k not in ("log", "validation_log")}))


if __name__ == "__main__":
    main()
