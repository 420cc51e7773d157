"""Diagnostics behind the toy LayerFlow's model card (committed weights unless told otherwise).

    layerkit toy-layerflow-diagnose colours     # what the VAE does to sprite colours (one pass, packed clip)
    layerkit toy-layerflow-diagnose given       # does decomposition read the given clip?
    layerkit toy-layerflow-diagnose step-time   # VAE encoding's share of a stage-1 step
    layerkit toy-layerflow-diagnose rebase --out DIR --patch 1 --width 64 --layers 6 --scale 1.875 [--rope] [--snr-shift 1]   # another transformer
    layerkit toy-layerflow-diagnose heldout --base DIR --weights RUN/weights.safetensors   # held-out v-loss
    layerkit toy-layerflow-diagnose positions   # can the sincos table tell the 4x4 token positions apart?
    layerkit toy-layerflow-diagnose probe       # how local is decomposition in latent space?
    layerkit toy-layerflow-diagnose swap        # which layer's latents cost a decomposition its matte?
    layerkit toy-layerflow-diagnose shapes      # how far apart are the four shapes in latent space?
    layerkit toy-layerflow-diagnose implied [--base DIR]   # which decoded layer costs the composite-implied matte?
    layerkit toy-layerflow-diagnose x0 [--weights W] [--split val]   # at which noise level does the denoiser lose the shape?
    layerkit toy-layerflow-diagnose latent-stats --num 1024 --out F.json   # per-channel latent mean/std per layer
    layerkit toy-layerflow-diagnose prompts [--word shape|colour] [--weights W]   # does generation read the shape word?
    layerkit toy-layerflow-diagnose regions [--split val]   # where do the layers and the blended clip disagree?
    layerkit toy-layerflow-diagnose reach [--split val]     # how much of the latents does a sprite reach?
    layerkit toy-layerflow-diagnose compressed --num 16     # decomposing held-out clips given as H.264 files

- ``colours``: packed held-out test clips ([fg, alpha, bg, blended], one VAE pass) through the
  committed VAE; per true sprite colour, the mean decoded foreground RGB where the true alpha > 0.9.
- ``given``: stage-1 weights, decomposition inputs (the blended clip given) of held-out clips; the
  v-prediction loss on the generated parts at fixed timesteps with the right blended clip, with
  another sample's, and with it noised like the rest (nothing given).
- ``step-time``: one stage-1 training step of the toy (batch 8) against the VAE encoding inside
  it, median of a few repeats, with the torch threads of ``--threads``.
- ``rebase``: the committed base (VAE, T5, tokenizer, scheduler) with a seeded transformer of
  another patch size / width / depth, for measuring geometries
  (``layerkit train +experiment=toy_layerflow_stage1 backbone.path=DIR ...``).
- ``heldout``: the v-prediction loss of stage-1 weights on held-out test clips at fixed
  timesteps and noise, per task (generate, decompose), on the generated parts only: the figure
  that compares geometries trained for the same wall time.
- ``positions``: the cosine similarity of the transformer's sincos position embeddings between
  spatial neighbours (and the farthest pair) of one latent frame, for the committed
  ``spatial_interpolation_scale`` and CogVideoX-2B's 1.875 at the same width.
- ``probe``: decomposition inputs of train and held-out clips (the blended clip given, encoded as
  sampling encodes it); a ridge regression and a small MLP from the given blended latents around
  each latent pixel (1x1 and 3x3) to the foreground, alpha and background latents there, trained on
  the train clips; their held-out MSE against the targets' variance. What a model that lines up
  each layer's token with the blended token at the same place could reach. Then, on 32 held-out
  clips, the alpha IoU of the decoded matte for the true latents, the 3x3 MLP's prediction and the
  true latents plus Gaussian noise of a few MSEs: how precise the latents must be.
- ``swap``: the committed stages 1+2+3 decompose held-out test clips (``layerkit sample
  +inputs.num_samples=N task.mode=decompose``'s clips, sampler and noise); per layer, the MSE of
  its sampled latents against the true ones (the training targets: the packed clip in one pass,
  the given blended clip encoded as sampling encodes it) and their variance; then the alpha IoU
  of the decoded matte when the sampled latents of one layer replace the true ones (the others
  true), and of all sampled and all true. The VAE decodes the packed clip in one causal pass, so
  a layer's errors reach the layers decoded after it. Extra ``sample`` overrides after the
  command (e.g. ``backbone.path=DIR layerflow.stage1_weights=... weights=...``) swap in other stages.
- ``shapes``: how precise a layer's latents must be to carry the sprite's shape. Each held-out test
  clip's sprite is redrawn as each of the other three shapes (same path, size, colour and
  background), and moved 1 px right; every packed clip is encoded as training encodes it (one VAE
  pass). Per layer (foreground, alpha, and the blended clip decomposition reads): the latent MSE
  between the clip and its redrawings (the
  mean over the three other shapes, and the nearest one), and the 1 px shift, against the layer's
  latent variance: the figures to hold against ``swap``'s latent MSE of a sampled decomposition.
- ``implied``: the ceiling of a generation's ``alpha_iou`` (the decoded matte against the matte the
  decoded blended and background clips imply, ``layered.evaluate.composite_alpha``) through a VAE
  (``--base DIR``: DIR/vae; default: committed) on ``toy.train_vae``'s validation clips (``--num``
  per sprite colour), and the same with some layers true instead of decoded: which layer's
  reconstruction loses it; and where the disagreeing pixels lie (within 2 px of the true sprite or
  farther).
- ``latent-stats``: per layer (``--layers-of``, default foreground and alpha), the per-channel mean
  and std of its latents over ``--num`` train clips (stage 1's data, seed 0), packed and encoded
  as training encodes them: the JSON file ``task.latent_norm`` reads (those layers diffused at unit
  scale). Its ``foreground`` entry also serves fg2bg's and bg2fg's frame-0 copy, which the causal
  VAE encodes alone (not measured on its own).
- ``x0``: stage-1 weights (``--weights``, default the committed stage 1; ``--base DIR``: the
  backbone.path they run on),
  held-out clips (``--split``, ``--num``), per task (generate, decompose) and timestep t: the true
  packed latents noised to t (given layers clean, as training does), the denoiser's one-step
  prediction of the clean latents from them, decoded; its ``shape_correct`` and matte alpha IoU
  against the true matte, beside those of the noisy input itself decoded (x_t / sqrt(alpha_bar_t):
  what is left of the sprite at that noise), and the prediction's latent MSE on the generated
  frames (unguided: the conditional prediction alone). A sampler's last step returns such a
  prediction, guided and combined with the step before by the multistep DPM solver (CogVideoX's 25
  trailing DPM steps: from t = 39), so a shape the prediction loses at every t a sampler cannot return.
  Extra stage-1 train overrides after the command (e.g. ``task.latent_norm=FILE``) build the module
  those weights were trained in; with a latent normalisation the latent MSE is in its units.
- ``prompts``: does generation read its prompt's shape (``--word shape``) or colour (``--word
  colour``) word? Stage-1 weights as in ``x0``, generation inputs of held-out clips noised to each
  timestep as ``x0`` noises them; the one-step clean prediction with the clip's own prompts and
  with that word replaced, in the foreground and the blended prompt, by each of three others
  (the next shapes, or colours, in the vocabulary). Per t: how much the prediction moves when the
  word is replaced (latent MSE on the generated frames, beside the prediction's own error), the
  share of the decoded predictions whose shape (or colour) is the one their prompt names (own and
  replaced prompts together; chance 0.25 for shapes), and that share for the own prompt's
  prediction pushed away from the others' mean, x + s (x - mean others), for each ``--amplify``
  s: a word the denoiser reads weakly shows there; one it does not read stays at chance. First,
  under "text", how far the frozen T5's prompt embeddings move at the replaced word and elsewhere.
- ``regions``: where the compositing error (mean |blended - (fg x alpha + bg x (1 - alpha))|) sits.
  The held-out clips of ``layerkit sample +inputs.num_samples=N +inputs.split=S`` (``--num``,
  ``--split``); rows: the true layers through the VAE (one pass over the packed clip: the floor a
  perfect denoiser meets), stages 1+2+3 generating, decomposing (the blended clip given and
  returned as given, the layers fitted to it: ``task.fit_to_given``), decomposing with the layers
  as decoded (``task.fit_to_given=null``) and with every layer decoded (``task.keep_given=false``:
  the given clip's VAE round trip). Per region of the output matte (background: alpha < 0.05;
  interior: alpha > 0.95; edge: between), its share of the pixels, its mean error and its part
  of the overall error (the three parts sum to it). Extra sample overrides after the command
  (e.g. ``backbone.path=DIR``) apply to every row.
- ``reach``: how far a sprite reaches into the latents, and what that leaves a sampler. The
  held-out clips of ``regions``; a latent value is *reached* when its window (the 4 frames and the
  4x4 pixels behind it) holds a matte pixel over 0.05, or, dilated, when one of its 3x3
  neighbours' windows does. The true layers, encoded as training encodes them: the share of the
  blended clip's latent values the sprite reaches, undilated and dilated; the correlation of the
  background's and the blended clip's latents over all values and over those not reached; the
  RMS of their difference against the background's. Then the committed stages 1+2+3 generating
  those clips (``regions``' generate row, with the same correlation over the latent values the
  generated matte does not reach), and the same samples with the blended clip's latents
  set to the background's wherever the generated matte does not reach: the compositing error of
  exact agreement where the sprite is absent, a bound on what any sampler step that makes the two
  layers agree there can buy.
- ``compressed``: decomposition as a user runs it on a video file. ``--num`` held-out test clips
  of the toy's world (``--seed``; the committed test uses seed 3) written as H.264 (yuv420p, as
  ``layerkit.io.video.write_video`` writes RGB), each decomposed by ``layerkit sample
  task=layerflow_decompose +inputs.blended=FILE``; the alpha IoU of the written matte against the
  true one, per clip and their mean. ``--format h264-444`` gives the clips as H.264 of full colour
  resolution (yuv444p, the same quality), ``png`` as lossless PNG sequences: what chroma
  subsampling, and what the codec as a whole, cost. Extra sample overrides after the command apply
  to every run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

STAGE1 = ["+experiment=toy_layerflow_stage1", "weights=${pkg:layerkit_plugins.layerflow.toy/weights/stage1.safetensors}"]


def colours(num: int) -> dict[str, list[float]]:
    from layerkit.config import compose
    from layerkit.data.shapes import make_sample, seed_for
    from layerkit.pipeline import build_parts
    from layerkit.registry import get_registry
    from layerkit_plugins.layerflow.toy.model import FRAMES, toy_world
    from layerkit_plugins.layerflow.toy.train_vae import packed_clip

    registry = get_registry()
    backbone = build_parts(compose("sample", [], registry), registry, training=False).backbone.eval()
    config = toy_world()
    sums: dict[str, list] = {}
    with torch.no_grad():
        for i in range(num):
            sample = make_sample(seed_for("test", 0, i), config)
            clip = packed_clip(sample).permute(1, 0, 2, 3)[None]                   # [1, 4F, 3, H, W] in [-1, 1]
            decoded = backbone.decode_latents(backbone.encode_video(clip))[0, :FRAMES].float()  # the fg sub-clip
            inside = (sample["foreground_alpha"][:, 0] > 0.9).float()               # [F, H, W]
            rgb = ((decoded.clamp(-1, 1) + 1) / 2 * inside[:, None]).sum((0, 2, 3)) / inside.sum()
            entry = sums.setdefault(sample["meta"]["sprites"][0]["colour"], [torch.zeros(3), 0])
            entry[0] += rgb
            entry[1] += 1
    return {name: [round(v, 2) for v in (total / n).tolist()] + [n] for name, (total, n) in sorted(sums.items())}


def given(num: int, timesteps: list[int]) -> dict[int, dict[str, float]]:
    from layerkit.config import compose
    from layerkit.pipeline import encode_packed, frame_mask, make_step, predict, reimposed
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler
    from layerkit.training.weighting import prediction_target

    registry = get_registry()
    cfg = compose("sample", [*STAGE1, "task=layerflow_decompose", f"+inputs.num_samples={num}", "+inputs.seed=0"],
                  registry)
    sampler = build_sampler(cfg, registry)
    parts = sampler.parts
    batch = sampler.samples()
    scheduler = parts.backbone.make_scheduler("train")
    torch.manual_seed(0)
    out: dict[int, dict[str, float]] = {}
    with torch.no_grad():
        packed = parts.task.pack(batch, training=False)
        truth = parts.task.layer_videos(batch)  # every layer's true video, for the loss target
        for seg in packed.segments:
            seg.video = truth[seg.name]
        latents, layout = encode_packed(parts.backbone, packed, training=True)
        cond = parts.backbone.encode_conditions(packed, latents=latents)
        keep = frame_mask(reimposed(parts.backbone, layout), latents)
        given_frames = keep[0, 0, :, 0, 0]                                      # the blended sub-clip
        wrong = latents.clone()
        wrong[:, :, given_frames] = latents.roll(1, dims=0)[:, :, given_frames]
        weight = (~keep).float().expand_as(latents)
        for t in timesteps:
            ts = torch.full((num,), t)
            noise = torch.randn_like(latents)
            noisy = scheduler.add_noise(latents, noise, ts)
            target = prediction_target(scheduler, latents, noise, ts)
            row = {}
            for name, clean in (("right blended", latents), ("another sample's blended", wrong),
                                ("blended noised (nothing given)", None)):
                x = noisy if clean is None else torch.where(keep, clean, noisy)
                pred = predict(parts, packed, make_step(packed, x, ts, cond))
                row[name] = round((((pred - target) ** 2) * weight).sum().item() / weight.sum().item(), 4)
            out[t] = row
    return out


def step_time(repeats: int) -> dict[str, float]:
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts, encode_packed
    from layerkit.registry import get_registry
    from layerkit.training.data import LayerkitDataModule
    from layerkit.training.module import LayerkitModule

    registry = get_registry()
    cfg = compose("train", ["+experiment=toy_layerflow_stage1", "train.compile=false", "train.cache_latents=false"], registry)
    module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
    module.on_train_start()
    dataset = LayerkitDataModule(cfg, registry).dataset
    size = int(cfg.train.batch_size)
    steps, encodes = [], []
    for r in range(repeats + 1):
        batch = module.task.collate([dataset[r * size + i] for i in range(size)])
        start = time.perf_counter()
        with torch.no_grad():
            encode_packed(module.backbone, module.task.pack(batch, training=True), training=True,
                          given_latents=module.given_latents)  # as the training step encodes
        encode = time.perf_counter() - start
        start = time.perf_counter()
        module.diffusion_loss(batch).backward()
        step = time.perf_counter() - start
        if r:  # the first is a warm-up
            encodes.append(encode)
            steps.append(step)
    e, s = statistics.median(encodes), statistics.median(steps)
    return {"vae_encode_ms": round(e * 1e3, 1), "training_step_ms": round(s * 1e3, 1), "encode_share": round(e / s, 2)}


def rebase(out: str, patch: int, width: int, heads: int, layers: int, source: str | None = None,
           scale: float | None = None, rope: bool | None = None, snr_shift: float | None = None) -> int:
    """Write a base directory: ``source``'s (default: the committed) VAE, T5, tokenizer and scheduler
    with a seeded toy transformer of another geometry; returns its parameter count."""

    from layerkit_plugins.cogvideox.backbone import load_vae, save_components
    from layerkit_plugins.layerflow.toy.model import build_components

    src = Path(source) if source else Path(__file__).resolve().parent / "weights"
    vae = load_vae(src / "vae", torch.float32)
    changes: dict = {} if scale is None else {"spatial_interpolation_scale": scale}
    if rope is not None:  # 3D RoPE (CogVideoX-5B's) in place of the sincos table
        changes["use_rotary_positional_embeddings"] = rope
    components = build_components(0, vae=vae, patch_size=patch, num_attention_heads=heads,
                                  attention_head_dim=width // heads, num_layers=layers, **changes)
    if snr_shift is not None:  # the schedule's SNR shift (CogVideoX-2B: 3), for training and sampling alike
        scheduler = components["scheduler"]
        components["scheduler"] = type(scheduler).from_config({**scheduler.config, "snr_shift_scale": snr_shift})
    save_components(components, out)
    return sum(p.numel() for p in components["transformer"].parameters())


def stage1_module(base: str | None, weights: str, overrides: list[str] = ()) -> torch.nn.Module:
    """The toy's stage-1 training module (eager, no caches) on ``base`` (default: committed) with
    ``weights`` loaded, in eval mode."""
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts, load_trainable_state
    from layerkit.registry import get_registry
    from layerkit.training.module import LayerkitModule

    registry = get_registry()
    cfg = compose("train", ["+experiment=toy_layerflow_stage1", "train.compile=false", "train.cache_latents=false",
                            "train.cache_text=false", *overrides, *([f"backbone.path={base}"] if base else [])],
                  registry)
    module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg)).eval()
    load_trainable_state(module, weights, parts=module.parts)
    return module


def heldout(base: str | None, weights: str, num: int, timesteps: list[int],
            modes: tuple[str, ...] = ("generate", "decompose")) -> dict[str, dict[int, float]]:
    """Held-out (test split) v-loss on the generated parts of stage-1 weights, per mode and timestep."""
    from layerkit.data.shapes import ShapesDataset
    from layerkit_plugins.layerflow.toy.model import toy_world

    # the plain v-prediction loss, whatever stage 1 trains with
    module = stage1_module(base, weights, ["train.loss_weighting=none"])
    module.prompt_dropout = 0.0
    data = ShapesDataset(num, seed=0, config=toy_world(), split="test")
    batch = module.task.collate([data[i] for i in range(num)])
    out: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for mode in modes:
            module.task.train_modes = {mode: 1.0}
            out[mode] = {}
            for t in timesteps:
                generator = torch.Generator().manual_seed(t)
                loss = module.diffusion_loss(batch, timesteps=torch.full((num,), t), generator=generator)
                out[mode][t] = round(loss.item(), 4)
            out[mode]["mean"] = round(sum(out[mode].values()) / len(timesteps), 4)
    return out


def positions(scales: tuple[float, ...] = ()) -> dict[float, dict[str, float]]:
    """Cosine similarity of one latent frame's sincos position embeddings (committed width)."""

    from diffusers import CogVideoXTransformer3DModel

    config = CogVideoXTransformer3DModel.load_config(str(Path(__file__).resolve().parent / "weights" / "transformer"))
    out = {}
    for scale in (float(config["spatial_interpolation_scale"]), *scales):
        model = CogVideoXTransformer3DModel.from_config({**config, "spatial_interpolation_scale": scale,
                                                         "num_layers": 1})
        side = config["sample_height"] // config["patch_size"]
        table = model.patch_embed._get_positional_embeddings(config["sample_height"], config["sample_width"],
                                                              config["sample_frames"] * 4 - 3)[0, -side * side * 2:]
        frame = table[: side * side].float()                         # [side*side, width]
        cos = torch.nn.functional.cosine_similarity(frame[:, None], frame[None], dim=-1)
        out[scale] = {"neighbour": round(cos[0, 1].item(), 3), "farthest": round(cos[0, -1].item(), 3)}
    return out


def probe(num_train: int, num_test: int, steps: int = 3000, base: str | None = None) -> dict[str, float]:
    """Held-out MSE of per-place regressions from the given blended latents to the layers' latents."""
    from layerkit.config import compose
    from layerkit.data.shapes import ShapesDataset
    from layerkit.pipeline import build_parts, encode_packed
    from layerkit.registry import get_registry
    from layerkit_plugins.layerflow.toy.model import toy_world

    registry = get_registry()
    cfg = compose("train", ["+experiment=toy_layerflow_stage1", "train.compile=false", "train.cache_latents=false", "train.cache_text=false",
                            *([f"backbone.path={base}"] if base else [])], registry)
    parts = build_parts(cfg, registry, training=True)
    parts.task.train_modes = {"decompose": 1.0}
    config = toy_world()

    def latents(split: str, num: int) -> torch.Tensor:
        data = ShapesDataset(num, seed=0, config=config, split=split)
        out = []
        with torch.no_grad():
            for i in range(0, num, 32):
                batch = parts.task.collate([data[j] for j in range(i, min(num, i + 32))])
                out.append(encode_packed(parts.backbone, parts.task.pack(batch, training=True), training=True,
                                         given_latents="sampled")[0])
        return torch.cat(out)  # [B, C, 8, h, w]: fg 0-1, alpha 2-3, bg 4-5, blended 6-7 (given)

    def pairs(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, _, h, w = z.shape
        x = torch.nn.functional.pad(z[:, :, 6:8].reshape(b, c * 2, h, w), (k // 2,) * 4)
        x = torch.nn.functional.unfold(x, k).transpose(1, 2).reshape(b * h * w, -1)
        y = z[:, :, :6].reshape(b, c * 6, h * w).transpose(1, 2).reshape(b * h * w, -1)
        return x, y

    torch.manual_seed(0)
    train, test = latents("train", num_train), latents("test", num_test)
    out: dict[str, float] = {}
    for k in (1, 3):
        x, y = pairs(train, k)
        xt, yt = pairs(test, k)
        out["variance"] = round(((yt - y.mean(0)) ** 2).mean().item(), 4)
        ones = torch.ones(len(x), 1)
        design = torch.cat([x, ones], 1)
        solution = torch.linalg.solve(design.T @ design + 1e-2 * torch.eye(design.shape[1]), design.T @ y)
        out[f"linear {k}x{k}"] = round(((torch.cat([xt, torch.ones(len(xt), 1)], 1) @ solution - yt) ** 2).mean().item(), 4)
        mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                  torch.nn.GELU(), torch.nn.Linear(256, y.shape[1]))
        opt = torch.optim.Adam(mlp.parameters(), 1e-3)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (512,))
            loss = ((mlp(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out[f"mlp {k}x{k}"] = round(((mlp(xt) - yt) ** 2).mean().item(), 4)
    out.update(decoded_iou(parts, mlp, pairs, min(num_test, 32), out["mlp 3x3"]))
    return out


def decoded_iou(parts, mlp, pairs, num: int, probe_mse: float) -> dict[str, float]:
    """Held-out alpha IoU after decoding: the true latents, the 3x3 MLP probe's prediction of the
    layers (with the given blended latents), and the true latents plus Gaussian noise of a few
    mean squared errors (the probe's among them): how precise a decomposition's latents must be for
    the decoded matte to reach a given IoU."""
    from layerkit.pipeline import decode_packed, encode_packed
    from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

    samples = parts.task.sample_inputs({"num_samples": num, "split": "test"}, height=SIZE, width=SIZE,
                                       num_frames=FRAMES)
    batch = parts.task.collate(samples)
    packed = parts.task.pack(batch, training=True)
    generator = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    with torch.no_grad():
        z, layout = encode_packed(parts.backbone, packed, training=True, given_latents="sampled")
        b, c, _, h, w = z.shape
        x, _ = pairs(z, 3)
        predicted = z.clone()
        predicted[:, :, :6] = mlp(x).reshape(b, h * w, c * 6).transpose(1, 2).reshape(b, c, 6, h, w)
        rows = {"decoded alpha IoU: true latents": z,
                f"decoded alpha IoU: mlp 3x3 prediction (MSE {((predicted - z)[:, :, :6] ** 2).mean().item():.4f})":
                    predicted}
        for mse in sorted({0.005, 0.01, 0.02, probe_mse}):
            noisy = z.clone()
            noisy[:, :, :6] += mse ** 0.5 * torch.randn(z[:, :, :6].shape, generator=generator)
            rows[f"decoded alpha IoU: true latents + noise of MSE {mse}"] = noisy
        for name, latents in rows.items():
            decoded = {k: v.float() for k, v in decode_packed(parts.backbone, latents, packed, layout).items()}
            outputs = parts.task.unpack(decoded, batch)
            out[name] = round(parts.task.evaluate(outputs, batch)["alpha_iou_heldout"], 4)
    return out


def swap(num: int, seed: int = 0, extra: list[str] = ()) -> dict[str, float]:
    """Per layer: MSE of the sampled decomposition's latents against the true ones, and the decoded
    matte's alpha IoU with one layer's latents sampled and the rest true (see the module doc)."""
    from layerkit.config import compose
    from layerkit.pipeline import decode_packed, encode_packed
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    registry = get_registry()
    cfg = compose("sample", ["+experiment=toy_layerflow_stage3", "task.mode=decompose", f"+inputs.num_samples={num}",
                             f"+inputs.seed={seed}", "sampler.progress=false", *extra], registry)
    sampler = build_sampler(cfg, registry)
    result = sampler.run()
    task, backbone = sampler.parts.task, sampler.parts.backbone
    task.train_modes = {}  # pack as the task's mode (decompose) does, without drawing one
    packed = task.pack(result.batch, training=True)
    out: dict[str, float] = {}
    with torch.no_grad():
        true, layout = encode_packed(backbone, packed, training=True, given_latents="sampled")
        sampled = result.denoised.latents.to(true.dtype)
        if sampled.shape != true.shape:
            raise RuntimeError(f"sampled latents {tuple(sampled.shape)} and true ones {tuple(true.shape)} differ")
        bounds, start = {}, 0
        for seg, length in zip(packed.segments, layout.lengths, strict=True):
            bounds[seg.name] = slice(start, start + length)
            start += length
        rows = {"all true": true, "all sampled": sampled}
        for name, frames in bounds.items():
            if bool(layout.given[0, frames].all()):
                continue  # the given clip: the same latents in both
            err = (sampled[:, :, frames] - true[:, :, frames]).pow(2).mean().item()
            out[f"latent MSE: {name}"] = round(err, 4)
            out[f"latent variance: {name}"] = round(true[:, :, frames].var().item(), 4)
            mixed = true.clone()
            mixed[:, :, frames] = sampled[:, :, frames]
            rows[f"sampled {name}, the rest true"] = mixed
        for name, latents in rows.items():
            decoded = {k: v.float() for k, v in decode_packed(backbone, latents, packed, layout).items()}
            outputs = task.unpack(decoded, result.batch)
            out[f"decoded alpha IoU: {name}"] = round(task.evaluate(outputs, result.batch)["alpha_iou_heldout"], 4)
    return out


def redraw(sample: dict, shape: str, shift: float = 0.0) -> dict:
    """``sample`` (one sprite) with its sprite drawn as ``shape`` and moved ``shift`` px right: the
    same path, size, colour and background; the layers recomposited."""
    from layerkit.data.shapes import COLOURS, render_shape

    sprite = sample["meta"]["sprites"][0]
    frames, _, height, width = sample["foreground_alpha"].shape
    t = torch.arange(frames, dtype=torch.float32)
    cx = sprite["start"][0] + shift + sprite["velocity"][0] * t
    cy = sprite["start"][1] + sprite["velocity"][1] * t
    alpha = render_shape(shape, cx, cy, torch.full((frames,), float(sprite["size"])), height, width).unsqueeze(1)
    colour = torch.tensor(COLOURS[sprite["colour"]]).view(1, 3, 1, 1)
    fg_rgb = torch.where(alpha > 0, colour.expand(frames, 3, height, width), torch.full((frames, 3, height, width), 0.5))
    blended = colour * alpha + sample["background"] * (1 - alpha)
    return {**sample, "foreground_alpha": alpha, "foreground_rgb": fg_rgb, "blended": blended}


def shapes(num: int, extra: list[str] = ()) -> dict[str, float]:
    """Latent distances between each held-out clip and its sprite redrawn as the other shapes or
    moved 1 px, per layer, against the layer's latent variance (see the module doc)."""
    from layerkit.config import compose
    from layerkit.data.shapes import SHAPES
    from layerkit.pipeline import encode_packed
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler
    from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

    registry = get_registry()
    cfg = compose("sample", ["+experiment=toy_layerflow_stage3", f"+inputs.num_samples={num}", "task.mode=generate",
                             *extra], registry)
    sampler = build_sampler(cfg, registry)
    task, backbone = sampler.parts.task, sampler.parts.backbone
    task.train_modes = {}  # pack every layer as generation does: every latent frame from the whole clip
    samples = task.sample_inputs({"num_samples": num, "split": "test"}, height=SIZE, width=SIZE, num_frames=FRAMES)

    def encode(items: list[dict]) -> tuple[torch.Tensor, dict[str, slice]]:
        packed = task.pack(task.collate(items), training=True)
        with torch.no_grad():
            z, layout = encode_packed(backbone, packed, training=True)
        bounds, start = {}, 0
        for seg, length in zip(packed.segments, layout.lengths, strict=True):
            bounds[seg.name] = slice(start, start + length)
            start += length
        return z.float(), bounds

    true, bounds = encode(samples)
    sprite_shapes = [s["meta"]["sprites"][0]["shape"] for s in samples]
    moved, _ = encode([redraw(s, shape, 1.0) for s, shape in zip(samples, sprite_shapes, strict=True)])
    others = {k: encode([redraw(s, SHAPES[(SHAPES.index(shape) + k) % len(SHAPES)])
                         for s, shape in zip(samples, sprite_shapes, strict=True)])[0] for k in (1, 2, 3)}
    out: dict[str, float] = {}
    for name in ("foreground", "alpha", "blended"):  # the blended clip: what decomposition reads the shape from
        frames = bounds[name]
        per_clip = torch.stack([(z[:, :, frames] - true[:, :, frames]).pow(2).mean((1, 2, 3, 4))
                                for z in others.values()])  # [3, B]
        out[f"latent variance: {name}"] = round(true[:, :, frames].var().item(), 4)
        out[f"latent MSE, another shape (mean of three): {name}"] = round(per_clip.mean().item(), 4)
        out[f"latent MSE, the nearest other shape: {name}"] = round(per_clip.min(0).values.mean().item(), 4)
        out[f"latent MSE, moved 1 px: {name}"] = round((moved[:, :, frames] - true[:, :, frames]).pow(2).mean().item(), 4)
    return out


def latent_stats(base: str | None, num: int, layers: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per layer, the per-channel mean and std of its latents over ``num`` training clips (the
    train split of stage 1's data, seed 0), packed and encoded as training encodes them (one VAE
    pass): the ``task.latent_norm`` that diffuses those layers' latents at unit scale."""
    from layerkit.config import compose
    from layerkit.data.shapes import make_sample, seed_for
    from layerkit.pipeline import build_parts, encode_packed
    from layerkit.registry import get_registry
    from layerkit_plugins.layerflow.toy.model import toy_world

    torch.manual_seed(0)  # the VAE's posterior draws (its log-variance head is near zero: std ~3e-7)
    registry = get_registry()
    cfg = compose("train", ["+experiment=toy_layerflow_stage1", "task.latent_norm=null",
                            *([f"backbone.path={base}"] if base else [])], registry)
    parts = build_parts(cfg, registry, training=False)
    parts.task.train_modes = {}  # pack every layer as generation does (no frame-0 copy)
    config = toy_world(num_sprites=1)
    chunks = []
    for start in range(0, num, 32):
        items = [make_sample(seed_for("train", 0, i), config) for i in range(start, min(num, start + 32))]
        packed = parts.task.pack(parts.task.collate(items), training=True)
        with torch.no_grad():
            z, layout = encode_packed(parts.backbone, packed, training=True)
        chunks.append(z.float())
    z = torch.cat(chunks)
    out, start = {}, 0
    for seg, length in zip(packed.segments, layout.lengths, strict=True):
        if seg.name in layers:
            part = z[:, :, start : start + length].transpose(0, 1).reshape(z.shape[1], -1)
            out[seg.name] = {"mean": [round(v, 5) for v in part.mean(1).tolist()],
                             "std": [round(v, 5) for v in part.std(1).tolist()]}
        start += length
    return out


def implied(base: str | None = None, per_colour: int = 4) -> dict[str, float]:
    """See the module doc (``implied``)."""

    import torch.nn.functional as F

    from layerkit.data.evaluate import alpha_iou
    from layerkit_plugins.cogvideox.backbone import load_vae
    from layerkit_plugins.layered.evaluate import composite_alpha
    from layerkit_plugins.layered.task import to_unit, unpack_foreground
    from layerkit_plugins.layerflow.toy.model import FRAMES, toy_world
    from layerkit_plugins.layerflow.toy.train_vae import packed_clip, round_trip, validation_samples

    folder = Path(base) if base else Path(__file__).resolve().parent / "weights"
    vae = load_vae(folder / "vae", torch.float32).eval()
    samples = validation_samples(0, toy_world(), per_colour=per_colour)
    decoded = round_trip(vae, torch.stack([packed_clip(s) for s in samples]))
    rows: dict[str, list[float]] = {k: [] for k in ("all decoded (the ceiling)", "blended and background true",
                                                    "foreground and matte true", "decoded matte against the true matte")}
    near = far = union = 0
    for i, sample in enumerate(samples):
        fg, alpha, bg, blended = (decoded[i, :, k * FRAMES:(k + 1) * FRAMES].permute(1, 0, 2, 3) for k in range(4))
        rgb, a = unpack_foreground(fg, alpha)
        bg, blended = to_unit(bg), to_unit(blended)
        true_rgb, true_a = sample["foreground_rgb"], sample["foreground_alpha"]
        implied_matte = composite_alpha(rgb, a, bg, blended)
        rows["all decoded (the ceiling)"].append(alpha_iou(a, implied_matte))
        rows["blended and background true"].append(alpha_iou(a, composite_alpha(rgb, a, sample["background"],
                                                                                 sample["blended"])))
        rows["foreground and matte true"].append(alpha_iou(true_a, composite_alpha(true_rgb, true_a, bg, blended)))
        rows["decoded matte against the true matte"].append(alpha_iou(a, true_a))
        shown, matte = implied_matte >= 0.5, a >= 0.5
        ring = F.max_pool2d((true_a > 0.01).float(), 5, 1, 2) > 0  # within 2 px of the true sprite
        near += ((shown ^ matte) & ring).sum().item()
        far += ((shown ^ matte) & ~ring).sum().item()
        union += (shown | matte).sum().item()
    out = {f"alpha IoU, {k}": round(sum(v) / len(v), 4) for k, v in rows.items()}
    out["disagreeing pixels within 2 px of the sprite (share of the union)"] = round(near / max(union, 1), 4)
    out["disagreeing pixels farther (share of the union)"] = round(far / max(union, 1), 4)
    out["clips"] = len(samples)
    return out


def predicted_x0(scheduler, noisy: torch.Tensor, output: torch.Tensor, t: int) -> torch.Tensor:
    """The clean latents a denoiser's ``output`` at timestep ``t`` implies (epsilon, v or sample)."""
    a = scheduler.alphas_cumprod[t].to(noisy.dtype)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * output
    if kind == "epsilon":
        return (noisy - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "sample":
        return output
    raise ValueError(f"the scheduler's prediction_type '{kind}' is not one of epsilon, v_prediction, sample.")


def x0(weights: str | None, base: str | None, num: int, split: str, timesteps: list[int],
       modes: tuple[str, ...] = ("generate", "decompose"), overrides: list[str] = ()) -> dict[str, dict[int, dict[str, float]]]:
    """Per task and timestep: shape and matte of the one-step clean prediction and of the noisy input."""
    from layerkit.pipeline import decode_packed, encode_packed, frame_mask, make_step, predict, reimposed
    from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

    module = stage1_module(base, weights or str(Path(__file__).resolve().parent / "weights" / "stage1.safetensors"),
                           overrides)
    task, backbone, scheduler = module.task, module.backbone, module.scheduler
    batch = task.collate(task.sample_inputs({"num_samples": num, "split": split}, height=SIZE, width=SIZE,
                                            num_frames=FRAMES))

    def scored(latents: torch.Tensor, packed, layout) -> tuple[float, float]:
        decoded = {k: v.float() for k, v in decode_packed(backbone, latents, packed, layout).items()}
        figures = task.evaluate(task.unpack(decoded, batch), batch)
        return round(figures["shape_correct"], 4), round(figures["alpha_iou_heldout"], 4)

    out: dict[str, dict[int, dict[str, float]]] = {}
    with torch.no_grad():
        for mode in modes:
            task.train_modes = {mode: 1.0}
            packed = task.pack(batch, training=True)
            z, layout = encode_packed(backbone, packed, training=True, given_latents=module.given_latents)
            cond = backbone.encode_conditions(packed, latents=z, drop=None)
            keep = frame_mask(reimposed(backbone, layout), z)
            generated = ~layout.given[0]
            out[mode] = {}
            for t in timesteps:
                noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
                ts = torch.full((num,), t)
                noisy = torch.where(keep, z, scheduler.add_noise(z, noise, ts))
                clean = torch.where(keep, z, predicted_x0(scheduler, noisy, predict(module.parts, packed,
                                                                                  make_step(packed, noisy, ts, cond)), t))
                a = scheduler.alphas_cumprod[t]
                shape, iou = scored(clean, packed, layout)
                # the noisy input itself, rescaled to the clean latents' scale (nothing of it is left at a zero-SNR t)
                in_shape, in_iou = scored(torch.where(keep, z, noisy / a.sqrt()), packed, layout) if a > 0 else (None, None)
                out[mode][t] = {"snr": round(float(a / (1 - a)), 3), "shape_correct": shape, "alpha_iou": iou,
                                "input shape_correct": in_shape, "input alpha_iou": in_iou,
                                "latent MSE": round(((clean - z)[:, :, generated] ** 2).mean().item(), 4)}
    return out


def replace_word(prompt: str, old: str, new: str) -> str:
    """``prompt`` with the word ``old`` replaced by ``new`` where it stands as a word (not "red" in "reddish")."""
    return re.sub(rf"\b{re.escape(old)}\b", new, prompt)


def prompt_words(weights: str | None, base: str | None, num: int, split: str, timesteps: list[int],
                 word: str = "shape", amplify: tuple[float, ...] = (0.0, 20.0),
                 overrides: list[str] = ()) -> dict[Any, dict[str, float]]:
    """When the prompt's shape (or colour) word is replaced: under "text", how far the frozen T5's
    embeddings move; per timestep, how far generation's one-step prediction moves and whether its
    decoded sprite follows the prompt."""
    from layerkit.data.evaluate import classify_colour, classify_shape
    from layerkit.data.shapes import COLOURS, SHAPES
    from layerkit.pipeline import decode_packed, encode_packed, frame_mask, make_step, predict, reimposed
    from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

    if word not in ("shape", "colour"):
        raise ValueError(f"word must be 'shape' or 'colour', not {word!r}.")
    vocab = list(SHAPES) if word == "shape" else list(COLOURS)
    module = stage1_module(base, weights or str(Path(__file__).resolve().parent / "weights" / "stage1.safetensors"),
                           overrides)
    task, backbone, scheduler = module.task, module.backbone, module.scheduler
    batch = task.collate(task.sample_inputs({"num_samples": num, "split": split}, height=SIZE, width=SIZE,
                                            num_frames=FRAMES))
    own = [meta["sprites"][0][word] for meta in batch["meta"]]
    variants = [own] + [[vocab[(vocab.index(w) + k) % len(vocab)] for w in own] for k in (1, 2, 3)]
    task.train_modes = {"generate": 1.0}
    packs = []
    for words in variants:
        changed = dict(batch)
        for key in ("foreground_prompt", "prompt"):
            changed[key] = [replace_word(p, o, w) for p, o, w in zip(batch[key], own, words)]
        packs.append(task.pack(changed, training=True))

    def named(latents: torch.Tensor, packed, layout) -> list[str]:
        outputs = task.unpack({k: v.float() for k, v in decode_packed(backbone, latents, packed, layout).items()}, batch)
        if word == "shape":
            return [classify_shape(o["alpha"]) for o in outputs]
        return [classify_colour(o["foreground"][:, :3], o["alpha"]) for o in outputs]

    out: dict[Any, dict[str, float]] = {}
    with torch.no_grad():
        z, layout = encode_packed(backbone, packs[0], training=True, given_latents=module.given_latents)
        conds = [backbone.encode_conditions(p, latents=z, drop=None) for p in packs]
        # what the frozen T5 makes of the replaced word: per-token MSE of the prompt embeddings, the two
        # largest per clip (the word in the foreground and the blended prompt) against the largest elsewhere
        per_token = torch.stack([((c["prompt_embeds"] - conds[0]["prompt_embeds"]).float() ** 2).mean(-1)
                                 for c in conds[1:]]).sort(-1, descending=True).values  # [3, B, tokens]
        out["text"] = {"text embedding moves at the word (per-token MSE)": round(per_token[..., :2].mean().item(), 4),
                       "text embedding moves elsewhere (largest per-token MSE)": round(per_token[..., 2].max().item(), 4)}
        keep = frame_mask(reimposed(backbone, layout), z)
        generated = ~layout.given[0]
        for t in timesteps:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
            ts = torch.full((num,), t)
            noisy = torch.where(keep, z, scheduler.add_noise(z, noise, ts))
            preds = [torch.where(keep, z, predicted_x0(scheduler, noisy, predict(module.parts, p, make_step(p, noisy, ts, c)), t))
                     for p, c in zip(packs, conds)]
            follows = [n == w for pred, words in zip(preds, variants) for n, w in zip(named(pred, packs[0], layout), words)]
            others = torch.stack(preds[1:]).mean(0)
            row = {"snr": round(float(scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])), 3),
                   "prediction change, word replaced (latent MSE)": round(statistics.mean(
                       ((preds[0] - p)[:, :, generated] ** 2).mean().item() for p in preds[1:]), 5),
                   "prediction error (latent MSE)": round(((preds[0] - z)[:, :, generated] ** 2).mean().item(), 5),
                   f"{word} follows the prompt": round(sum(follows) / len(follows), 4)}
            for s in amplify:
                pushed = torch.where(keep, z, preds[0] + s * (preds[0] - others))
                row[f"{word} follows the prompt, pushed x{s:g}"] = round(
                    sum(n == w for n, w in zip(named(pushed, packs[0], layout), own)) / num, 4)
            out[t] = row
    return out


REGIONS = ("background", "edge", "interior")  # output matte < 0.05, 0.05-0.95, > 0.95


def region_errors(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The compositing error of unpacked layered outputs, overall and split by region of the output
    matte (``REGIONS``): per region its share of the pixels, mean error and part of the overall."""
    errors, mattes = [], []
    for out in outputs:
        a = out["alpha"].float()
        composite = out["foreground"][:, :3].float() * a + out["background"].float() * (1 - a)
        errors.append((out["blended"].float() - composite).abs().mean(1).flatten())
        mattes.append(a[:, 0].flatten())
    error, matte = torch.cat(errors), torch.cat(mattes)
    row = {"compositing_error": round(error.mean().item(), 4)}
    regions = dict(zip(REGIONS, (matte < 0.05, (matte >= 0.05) & (matte <= 0.95), matte > 0.95), strict=True))
    for name, inside in regions.items():
        share = inside.float().mean().item()
        row[f"{name}_share"] = round(share, 3)
        row[f"{name}_mean"] = round(error[inside].mean().item(), 4) if inside.any() else 0.0
        row[f"{name}_part"] = round(error[inside].sum().item() / error.numel(), 4)
    return row


def regions(num: int, split: str, extra: list[str] = ()) -> dict[str, dict[str, float]]:
    from layerkit.config import compose
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler
    from layerkit_plugins.layerflow.toy.evaluate import MODELS, true_layers

    registry = get_registry()
    inputs = [f"+inputs.num_samples={num}", "+inputs.seed=0", f"+inputs.split={split}", "sampler.progress=false"]
    rows = {"true layers, VAE round trip": region_errors(true_layers(num, 0, split=split, extra=list(extra))[0])}
    decompose = MODELS["stages 1+2+3, decompose"]
    for name, overrides in (("stages 1+2+3, generate", MODELS["stages 1+2+3, generate"]),
                            ("stages 1+2+3, decompose", decompose),
                            ("stages 1+2+3, decompose, layers as decoded", [*decompose, "task.fit_to_given=null"]),
                            ("stages 1+2+3, decompose, every layer decoded", [*decompose, "task.keep_given=false"])):
        cfg = compose("sample", [*overrides, *inputs, *extra], registry)
        rows[name] = region_errors(build_sampler(cfg, registry).run().outputs)
    return rows


def reached(alpha: torch.Tensor, windows: list[tuple[int, int]], start: int, latent_hw: tuple[int, ...],
            dilate: int = 0) -> torch.Tensor:
    """Matte ``alpha`` [B, F, H, W] in [0, 1] of a segment starting at pixel frame ``start`` ->
    [B, f, h, w] bool: the latent values of that segment whose window (``windows``, in the packed
    clip's frames) holds a matte pixel over 0.05, dilated by ``dilate`` latent values."""
    import torch.nn.functional as F

    from layerkit.training.weighting import latent_max

    frames = alpha.shape[1]
    mine = [(a - start, b - start) for a, b in windows if start <= a and b <= start + frames]
    pooled = latent_max(alpha, mine, (alpha.shape[0], 1, len(mine), *latent_hw))
    if dilate:
        pooled = F.max_pool2d(pooled, 2 * dilate + 1, stride=1, padding=dilate)
    return pooled > 0.05


def reach(num: int, split: str, extra: list[str] = ()) -> dict[str, dict[str, float]]:
    from layerkit.config import compose
    from layerkit.pipeline import decode_packed, encode_packed, normalised
    from layerkit.registry import get_registry
    from layerkit.sampling.loop import denoise
    from layerkit.sampling.run import build_sampler
    from layerkit_plugins.layerflow.toy.evaluate import MODELS

    registry = get_registry()
    inputs = [f"+inputs.num_samples={num}", "+inputs.seed=0", f"+inputs.split={split}", "sampler.progress=false"]
    sampler = build_sampler(compose("sample", [*MODELS["stages 1+2+3, generate"], *inputs, *extra], registry), registry)
    parts, backbone = sampler.parts, sampler.parts.backbone
    batch = sampler.samples()

    def split_latents(z: torch.Tensor, layout: Any, packed: Any) -> dict[str, tuple[torch.Tensor, int]]:
        out, start, frame = {}, 0, 0
        for seg, length in zip(packed.segments, layout.lengths, strict=True):
            out[seg.name] = (z[:, :, start:start + length], frame)
            start, frame = start + length, frame + seg.num_frames
        return out

    def matte(video: torch.Tensor) -> torch.Tensor:  # [B, F, C, H, W] in [-1, 1] -> [B, F, H, W] in [0, 1]
        return ((video.float().mean(2) + 1) / 2).clamp(0, 1)

    # the true layers, encoded as training encodes them
    train_modes, parts.task.train_modes = parts.task.train_modes, {}
    truth = parts.task.pack(batch, training=True)
    parts.task.train_modes = train_modes
    with torch.no_grad():
        z, layout = encode_packed(backbone, truth, training=True)
    z = normalised(z, truth, layout, inverse=True).float()
    seg = split_latents(z, layout, truth)
    true_alpha = matte(truth.segment("alpha").video)
    hw = tuple(z.shape[-2:])
    bg, blended = seg["background"][0], seg["blended"][0]
    free = ~reached(true_alpha, layout.windows, seg["blended"][1], hw)[:, None].expand_as(bg)
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])  # noqa: E731
    rows = {"true layers": {
        "reached": round(1 - free[:, 0].float().mean().item(), 3),
        "reached_dilated": round(reached(true_alpha, layout.windows, seg["blended"][1], hw, 1).float().mean().item(), 3),
        "correlation_all": round(corr(bg, blended), 3),
        "correlation_not_reached": round(corr(bg[free], blended[free]), 3),
        "difference_rms_over_background_rms": round(((bg - blended).pow(2).mean().sqrt()
                                                     / bg.pow(2).mean().sqrt()).item(), 3)}}

    # the committed generation, and the same with the two layers' latents made to agree where the sprite is absent
    packed = parts.task.pack(batch, training=False)
    generator = torch.Generator("cpu").manual_seed(int(sampler.cfg.seed))
    denoised = denoise(parts, packed, sampler.options, generator=generator)
    decoded = {k: v.float().cpu() for k, v in decode_packed(backbone, denoised.latents, packed, denoised.layout).items()}
    rows["stages 1+2+3, generate"] = region_errors(parts.task.unpack(decoded, batch))
    latents = normalised(denoised.latents, packed, denoised.layout, inverse=True).clone()
    seg = split_latents(latents, denoised.layout, packed)
    absent = ~reached(matte(decoded["alpha"]), denoised.layout.windows, seg["blended"][1], hw)[:, None]
    where = absent.to(latents.device).expand_as(seg["background"][0])
    rows["stages 1+2+3, generate"]["correlation_not_reached"] = round(
        corr(seg["background"][0][where].float(), seg["blended"][0][where].float()), 3)
    seg["blended"][0].copy_(torch.where(absent.to(latents.device), seg["background"][0], seg["blended"][0]))
    latents = normalised(latents, packed, denoised.layout)
    decoded = {k: v.float().cpu() for k, v in decode_packed(backbone, latents, packed, denoised.layout).items()}
    agreed = region_errors(parts.task.unpack(decoded, batch))
    rows["same, blended latents = background's where the matte does not reach"] = {
        **agreed, "not_reached": round(absent.float().mean().item(), 3)}
    return rows


#: ``compressed --format``: how the held-out clips are given (H.264 as users' files and ``write_video``
#: write them; H.264 keeping full colour resolution; a lossless PNG sequence)
GIVEN_FORMATS = ("h264", "h264-444", "png")


def _write_given(path: Path, frames, fmt: str) -> Path:
    """One held-out clip written as ``fmt`` (``GIVEN_FORMATS``) under ``path`` (no suffix)."""
    import dataclasses

    from layerkit.io.video import _CODECS, _encode_av, write_video

    if fmt == "png":
        return write_video(path, frames)  # a directory of PNG frames
    if fmt == "h264":
        return write_video(path.with_suffix(".mp4"), frames)
    # the same encoder and quality with 4:4:4 chroma: what chroma subsampling alone costs
    target = path.with_suffix(".mp4")
    _encode_av(target, frames, 8.0, dataclasses.replace(_CODECS[".mp4"], pix_fmt="yuv444p"))
    return target


def compressed(num: int, seed: int, extra: list[str] = (), fmt: str = "h264", prompts: bool = False) -> list[float]:
    import tempfile

    import numpy as np

    from layerkit.data.evaluate import alpha_iou
    from layerkit.data.shapes import make_sample, seed_for
    from layerkit.io.video import read_video
    from layerkit.registry import get_registry
    from layerkit.sampling.run import sample
    from layerkit_plugins.layered import PROMPT_KEYS
    from layerkit_plugins.layerflow.toy.model import toy_world

    registry, ious = get_registry(), []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(num):
            clip = make_sample(seed_for("test", seed, index), toy_world())
            path = _write_given(Path(tmp) / f"scene{index}",
                                (clip["blended"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), fmt)
            said = [f'+inputs.{key}="{clip[key]}"' for key in PROMPT_KEYS] if prompts else []
            out = sample(["task=layerflow_decompose", f"+inputs.blended={path}", f"output_dir={Path(tmp) / f'out{index}'}",
                          "sampler.progress=false", *said, *extra], registry=registry)
            matte = torch.from_numpy(read_video(out / "alpha.mp4").frames[..., :1]).float().div(255).permute(0, 3, 1, 2)
            ious.append(round(alpha_iou(matte, clip["foreground_alpha"]), 3))
    return ious


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["colours", "given", "step-time", "rebase", "heldout", "positions",
                                            "probe", "swap", "shapes", "implied", "x0", "latent-stats", "prompts",
                                            "regions", "reach", "compressed"])
    parser.add_argument("--num", type=int, default=16, help="held-out clips (colours, given, heldout); probe: 64x train "
                        "and 16x held-out clips; implied: val clips per sprite colour, 6 colours (the card: --num 4)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[200, 500, 800, 950])
    parser.add_argument("--seed", type=int, default=3, help="compressed: which held-out test clips")
    parser.add_argument("--prompts", action="store_true",
                        help="compressed: give each clip's three prompts too (a user giving only the file gives none)")
    parser.add_argument("--format", choices=GIVEN_FORMATS, default="h264",
                        help="compressed: how the clips are given: H.264 as users' files (yuv420p), H.264 of full "
                             "colour resolution (yuv444p), or lossless PNG sequences")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (step-time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="rebase: the new base directory; latent-stats: the JSON file to write")
    parser.add_argument("--layers-of", nargs="+", default=["foreground", "alpha"], dest="stat_layers",
                        choices=["foreground", "alpha", "background", "blended"],
                        help="latent-stats: the layers to measure (default: foreground alpha)")
    parser.add_argument("--source", default=None, help="rebase: the base whose VAE to take (default: committed)")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--scale", type=float, default=None,
                        help="rebase: spatial_interpolation_scale (default: the committed one)")
    parser.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                        help="rebase: 3D rotary positions (CogVideoX-5B's) instead of the sincos table, or not")
    parser.add_argument("--snr-shift", type=float, default=None,
                        help="rebase: the scheduler's snr_shift_scale (default: the committed 3.0)")
    parser.add_argument("--base", default=None, help="heldout, probe, implied, x0, latent-stats, prompts: backbone.path "
                        "(default: committed)")
    parser.add_argument("--weights", default=None, help="heldout, x0, prompts: stage-1 weights.safetensors (x0, prompts: "
                        "default the committed stage 1)")
    parser.add_argument("--split", default="test", choices=("val", "test"),
                        help="x0, prompts, regions, reach: held-out split")
    parser.add_argument("--word", default="shape", choices=("shape", "colour"), help="prompts: the word to replace")
    parser.add_argument("--amplify", type=float, nargs="+", default=[0.0, 20.0],
                        help="prompts: s in x + s (x - mean of the replaced prompts' predictions)")
    parser.add_argument("overrides", nargs="*", help="swap, shapes, regions, reach, compressed: extra sample overrides (e.g. backbone.path=DIR); "
                        "x0, prompts: extra stage-1 train overrides (e.g. task.latent_norm=FILE)")
    args = parser.parse_intermixed_args(argv)  # options before or after the overrides
    if args.overrides and args.what not in ("swap", "shapes", "x0", "prompts", "regions", "reach", "compressed"):
        parser.error(f"extra overrides are for swap, shapes, x0, prompts, regions, reach and compressed, not {args.what}")
    if (args.base is not None and args.what in ("heldout", "probe", "implied", "x0", "latent-stats", "prompts")
            and not (Path(args.base) / "vae" / "config.json").is_file()):
        parser.error(f"--base '{args.base}' is not a toy model folder (no vae/config.json there; e.g. "
                     "plugins/layerkit_plugins/layerflow/toy/weights or a toy-layerflow-vae --out folder).")
    if args.what in ("x0", "prompts"):  # stage-1 weights noised at training timesteps
        if args.weights is not None and not Path(args.weights).is_file():
            parser.error(f"--weights '{args.weights}' does not exist.")
        if any(not 0 <= t < 1000 for t in args.timesteps):
            parser.error(f"{args.what}: --timesteps must lie in 0..999 (the scheduler's training timesteps); "
                         f"got {args.timesteps}.")
    if args.num < 1:
        parser.error(f"--num must be at least 1; got {args.num}.")
    torch.set_num_threads(args.threads)
    if args.what == "colours":
        print("true colour -> mean decoded RGB inside the sprite, clips")
        for name, row in colours(args.num).items():
            print(f"{name:8s} {row[:3]}  ({row[3]} clips)")
    elif args.what == "given":
        print("timestep -> v-loss on the generated parts (stage 1, decomposition inputs)")
        for t, row in given(args.num, args.timesteps).items():
            print(t, json.dumps(row))
    elif args.what == "rebase":
        if not args.out:
            parser.error("rebase needs --out DIR")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"rebase: '{args.out}' is a file; --out names a folder to write the base into.")
        if out.exists() and any(out.iterdir()):
            parser.error(f"rebase: '{args.out}' exists and is not empty; choose a new folder.")
        count = rebase(args.out, args.patch, args.width, args.heads, args.layers, args.source, args.scale, args.rope,
                       args.snr_shift)
        print(f"wrote {args.out}: transformer patch {args.patch}, width {args.width}, {args.layers} blocks, "
              f"{count} parameters")
    elif args.what == "positions":
        print("spatial_interpolation_scale -> cosine similarity of one frame's position embeddings")
        for scale, row in positions((1.875,)).items():
            print(scale, json.dumps(row))
    elif args.what == "probe":
        print("held-out MSE, decomposition from the given blended latents around each latent pixel "
              f"({args.num * 64} train clips, {args.num * 16} held-out)")
        print(json.dumps(probe(args.num * 64, args.num * 16, base=args.base)))
    elif args.what == "swap":
        print(f"decomposition of {args.num} held-out test clips (stages 1+2+3): which layer's latents cost the matte")
        for name, value in swap(args.num, extra=args.overrides).items():
            print(f"{name}: {value}")
    elif args.what == "shapes":
        print(f"{args.num} held-out test clips, each sprite redrawn as the other shapes or moved 1 px: latent distances")
        for name, value in shapes(args.num, args.overrides).items():
            print(f"{name}: {value}")
    elif args.what == "implied":
        print(f"the composite-implied matte through the VAE, {args.num} val clips per sprite colour")
        for name, value in implied(args.base, args.num).items():
            print(f"{name}: {value}")
    elif args.what == "x0":
        print(f"one-step clean predictions of stage 1, {args.num} {args.split} clips: shape_correct and alpha IoU "
              "of the prediction and of the noisy input, decoded")
        for mode, rows in x0(args.weights, args.base, args.num, args.split, args.timesteps,
                             overrides=args.overrides).items():
            for t, row in rows.items():
                print(mode, t, json.dumps(row))
    elif args.what == "prompts":
        print(f"generation's one-step clean predictions, {args.num} {args.split} clips, the prompt's {args.word} word "
              "replaced by each of three others")
        for t, row in prompt_words(args.weights, args.base, args.num, args.split, args.timesteps, args.word,
                                   tuple(args.amplify), args.overrides).items():
            print(t, json.dumps(row))
    elif args.what == "regions":
        print(f"where the compositing error sits, {args.num} {args.split} clips (regions of the output matte: "
              "background < 0.05 <= edge <= 0.95 < interior)")
        for name, row in regions(args.num, args.split, args.overrides).items():
            print(name, json.dumps(row))
    elif args.what == "reach":
        print(f"how far the sprite reaches into the latents, {args.num} {args.split} clips; generation with the "
              "blended clip's latents set to the background's where the generated matte does not reach")
        for name, row in reach(args.num, args.split, args.overrides).items():
            print(name, json.dumps(row))
    elif args.what == "compressed":
        as_given = {"h264": "H.264 files (yuv420p)", "h264-444": "H.264 files of full colour resolution (yuv444p)",
                    "png": "lossless PNG sequences"}[args.format]
        print(f"decomposition of {args.num} held-out test clips (seed {args.seed}) given as {as_given}"
              f"{', with their prompts' if args.prompts else ', no prompt'}: alpha IoU of the matte against the true one")
        ious = compressed(args.num, args.seed, args.overrides, args.format, args.prompts)
        print(json.dumps({"alpha_iou": ious, "mean": round(sum(ious) / len(ious), 4)}))
    elif args.what == "latent-stats":
        if not args.out:
            parser.error("latent-stats needs --out FILE.json")
        if Path(args.out).exists():
            parser.error(f"latent-stats: '{args.out}' exists; choose a new file.")
        if not Path(args.out).resolve().parent.is_dir():
            parser.error(f"latent-stats: the folder of '{args.out}' does not exist.")
        if args.num < 2:
            parser.error("latent-stats: --num must be at least 2 clips.")
        stats = latent_stats(args.base, args.num, args.stat_layers)
        partial = Path(args.out).with_name(Path(args.out).name + ".partial")  # no half-written file
        partial.write_text(json.dumps(stats, indent=1) + "\n")
        partial.replace(args.out)
        for name, row in stats.items():
            print(name, json.dumps(row))
        print(f"wrote {args.out}")
    elif args.what == "heldout":
        if not args.weights:
            parser.error("heldout needs --weights FILE")
        print(json.dumps(heldout(args.base, args.weights, args.num, args.timesteps)))
    else:
        print(json.dumps(step_time(args.repeats)))


if __name__ == "__main__":
    main()
