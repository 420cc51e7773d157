"""``layered``: layers as sub-clips concatenated in time (LayerFlow sec. 3.1-3.2).

RGBA layout: [foreground, alpha, background, blended]; RGB layout: [foreground, background,
blended]; video layout: [blended] alone (text-to-video pretraining of a base, generate only). The
foreground is composited over mid-grey (fg * alpha in [-1, 1]), the alpha matte is repeated to
three channels and scaled to [-1, 1]. Layer-wise prompts carry an index prefix
("0, " foreground, "1, " background, "2, " blended).

Modes (LayerFlow's conditional variants, sec. 3.2) keep some layers given: decomposition
(blended), fg2bg (foreground and alpha), bg2fg (background); ``generate`` gives none. Given
frames are marked per frame in ``Packed.given``. ``auto`` (the default at sampling) takes the
mode from the files the user gives. ``train_modes`` trains one model for all of them: each
batch draws its mode; its given layers are kept clean and out of the loss.

``prepend_first_frame`` (a list of modes) puts a copy of the clip's first frame (the
foreground's) in front, as LayerFlow's released code does for fg2bg and bg2fg in the RGBA layout
(``sat/diffusion_video.py``): 65 frames, 17 latent frames through the causal 3-D VAE in one pass;
the copy is given when the foreground is (fg2bg) and generated otherwise (bg2fg). The layers keep
their order; the given ones are re-imposed at their own place. Because the prepended copy changes
the frame count, ``train_modes`` draws one mode per batch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError, expect_shape
from layerkit.layers import check_frame_counts
from layerkit.protocols import Packed, Segment, Task, given_per_frame
from layerkit_plugins.layered import FILE_KEYS, INPUT_KEYS, PROMPT_KEYS
from layerkit_plugins.layered.matting import fit_to_given

#: the sub-clips of each layout, in order; "video" is the blended scene alone: plain text-to-video, the
#: pretraining of the base a layered model fine-tunes (LayerFlow starts from a pretrained CogVideoX)
LAYOUTS = {"rgba": ("foreground", "alpha", "background", "blended"), "rgb": ("foreground", "background", "blended"),
           "video": ("blended",)}
GIVEN = {"generate": (), "decompose": ("blended",), "fg2bg": ("foreground", "alpha"), "bg2fg": ("background",)}
MODES = (*GIVEN, "auto")
#: the mode each given file selects
FILE_MODE = {"blended": "decompose", "foreground": "fg2bg", "alpha": "fg2bg", "background": "bg2fg"}
FIRST = "first_frame"


def read_latent_norm(spec: Any, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``task.latent_norm``: layer name -> {mean: [C], std: [C]}, or the path of a JSON file holding
    that mapping (``layerkit toy-layerflow-diagnose latent-stats`` writes one): those layers' latents
    are diffused per channel as (z - mean) / std (``Packed.latent_norm``). None or {}: none."""
    if spec is None or (hasattr(spec, "items") and not spec):
        return {}
    if isinstance(spec, str | Path):
        path = Path(spec)
        if not path.is_file():
            raise LayerkitError(f"task.latent_norm file {path} does not exist.")
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LayerkitError(f"task.latent_norm file {path} is not JSON ({err}).") from None
    if not hasattr(spec, "items"):
        raise LayerkitError(f"task.latent_norm must map layer names to {{mean: [...], std: [...]}} or name a JSON "
                            f"file that does; got {spec!r}.")
    out = {}
    for name, stats in spec.items():
        if name not in names:
            raise LayerkitError(f"task.latent_norm names the layer '{name}'; this layout's layers are {list(names)}.")
        try:
            mean, std = (torch.as_tensor([float(v) for v in stats[k]]) for k in ("mean", "std"))
        except (KeyError, TypeError, ValueError):
            raise LayerkitError(f"task.latent_norm.{name} must be {{mean: [numbers], std: [numbers]}}, one per "
                                f"latent channel; got {stats!r}.") from None
        if mean.numel() != std.numel() or not mean.numel():
            raise LayerkitError(f"task.latent_norm.{name} needs one mean and one std per latent channel; got "
                                f"{mean.numel()} means and {std.numel()} stds.")
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()) or bool((std <= 0).any()):
            raise LayerkitError(f"task.latent_norm.{name} needs finite means and finite stds > 0; got means "
                                f"{mean.tolist()} and stds {std.tolist()}.")
        out[str(name)] = (mean, std)
    return out


def read_latent_residual(spec: Any, names: tuple[str, ...]) -> dict[str, str]:
    """``task.latent_residual``: layer name -> base layer name, e.g. {background: blended}: that
    layer's latents are diffused as their difference from the base's (``Packed.latent_residual``).
    None or {}: none."""
    if spec is None or (hasattr(spec, "items") and not spec):
        return {}
    if not hasattr(spec, "items"):
        raise LayerkitError(f"task.latent_residual must map a layer to its base layer, e.g. {{background: blended}}; "
                            f"got {spec!r}.")
    out = {str(k): str(v) for k, v in spec.items()}
    for name, base in out.items():
        for layer in (name, base):
            if layer not in names:
                raise LayerkitError(f"task.latent_residual names the layer '{layer}'; this layout's layers are "
                                    f"{list(names)}.")
        if name == base:
            raise LayerkitError(f"task.latent_residual makes '{name}' its own base; name another layer.")
        if base in out:
            raise LayerkitError(f"task.latent_residual makes '{name}' a residual of '{base}', which is itself a "
                                f"residual; a base must be diffused as itself.")
    return out


class LayeredTask(Task):
    name = "layered"
    input_keys = INPUT_KEYS
    file_keys = FILE_KEYS
    marks_loss_region = True  # the sprite's matte (training batches that carry one)

    def __init__(self, mode: str = "auto", layout: str = "rgba", index_prefix: bool = True,
                 scale_from: dict[str, str] | None = None, default_seed: int = 0, num_samples: int = 1,
                 train_modes: dict[str, float] | None = None, prepend_first_frame: bool | list[str] = (),
                 shapes_world: dict[str, Any] | None = None, latent_norm: Any = None,
                 keep_given: bool = True, fit_to_given: float | None = 0.03, latent_residual: Any = None) -> None:
        if mode not in MODES:
            raise LayerkitError(f"unknown layered mode '{mode}'; modes are {', '.join(MODES)}.")
        if layout not in LAYOUTS:
            raise LayerkitError(f"unknown layout '{layout}'; layouts are {sorted(LAYOUTS)}.")
        self.mode, self.layout, self.index_prefix = mode, layout, index_prefix
        self.keep_given = bool(keep_given)
        if fit_to_given is not None and not (isinstance(fit_to_given, int | float) and not isinstance(fit_to_given, bool)
                                             and fit_to_given > 0):
            raise LayerkitError(f"task.fit_to_given must be a number > 0 (the decoded layers' weight against the "
                                f"given ones) or null (no fitting); got {fit_to_given!r}.")
        self.fit_to_given = None if fit_to_given is None else float(fit_to_given)
        self.scale_from = dict(scale_from or {})  # adapter name -> boolean sample key (e.g. is_static)
        self.default_seed, self.num_samples = default_seed, num_samples
        prepend = list(GIVEN) if prepend_first_frame is True else list(prepend_first_frame or [])
        if set(prepend) - set(GIVEN):
            raise LayerkitError(f"prepend_first_frame lists modes {sorted(set(prepend) - set(GIVEN))}, which do not "
                                f"exist; modes are {', '.join(GIVEN)}.")
        self.prepend_first_frame = set(prepend)
        # ShapesConfig fields of the held-out shapes-world clips sampled without inputs (e.g. sprite_size)
        if shapes_world is not None and not hasattr(shapes_world, "items"):
            raise LayerkitError(f"task.shapes_world must map ShapesConfig fields to values, e.g. "
                                f"{{sprite_size: [0.3, 0.45]}}; got {shapes_world!r}.")
        self.shapes_world = {str(k): tuple(v) if isinstance(v, list | tuple) else v
                             for k, v in (shapes_world or {}).items()}
        _world_config(self.shapes_world, 8, 32, 32)  # a wrong field or value: one sentence, now
        weights = {str(k): float(v) for k, v in (train_modes or {}).items()}
        if set(weights) - set(GIVEN) or any(v < 0 for v in weights.values()):
            raise LayerkitError(f"train_modes must map modes {sorted(GIVEN)} to weights >= 0; got {weights}.")
        self.train_modes = {k: v for k, v in weights.items() if v > 0}
        if layout == "video" and ({mode} | set(self.train_modes)) - {"generate", "auto"}:
            raise LayerkitError("task.layout=video is the blended scene alone (text-to-video): its only mode is "
                                f"generate; got mode {mode} and train_modes {sorted(self.train_modes)}.")
        self.latent_residual = read_latent_residual(latent_residual, LAYOUTS[layout])
        self.latent_norm = read_latent_norm(latent_norm, LAYOUTS[layout])
        if self.latent_norm and LAYOUTS[layout][0] in self.latent_norm:  # the frame-0 copy is that layer's frame
            self.latent_norm[FIRST] = self.latent_norm[LAYOUTS[layout][0]]

    @property
    def segment_names(self) -> tuple[str, ...]:
        """The layers of the layout, and the frame-0 copy when some mode prepends it."""
        return (*LAYOUTS[self.layout], *((FIRST,) if self.prepend_first_frame else ()))

    def given_names(self, mode: str) -> list[str]:
        return [n for n in GIVEN[mode] if n in LAYOUTS[self.layout]]

    # -- packing ----------------------------------------------------------------------------
    def layer_videos(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Batch tensors in [0, 1] -> sub-clips [B, F, 3, H, W] in [-1, 1] (None when absent)."""
        fg, alpha = batch.get("foreground_rgb"), batch.get("foreground_alpha")
        out: dict[str, torch.Tensor | None] = {}
        if fg is not None and alpha is not None:
            expect_shape("foreground_alpha", alpha, "[B, F, 1, H, W]", alpha.dim() == 5 and alpha.shape[2] == 1)
            out["foreground"] = (fg * 2 - 1) * alpha  # over mid-grey
            out["alpha"] = alpha.expand(-1, -1, 3, -1, -1) * 2 - 1
        else:
            out["foreground"] = out["alpha"] = None
        for key in ("background", "blended"):
            video = batch.get(key)
            out[key] = video * 2 - 1 if video is not None else None
        for name, video in out.items():
            if video is not None:
                expect_shape(name, video, "[B, F, 3, H, W]", video.dim() == 5 and video.shape[2] == 3)
        check_frame_counts({k: v for k, v in out.items() if v is not None}, frame_dim=1)
        return out

    def batch_mode(self, batch: dict[str, Any], *, training: bool) -> str:
        if training:
            if self.train_modes:
                return random.choices(list(self.train_modes), weights=list(self.train_modes.values()), k=1)[0]
            return "generate" if self.mode == "auto" else self.mode
        modes = batch.get("mode")
        if modes:
            chosen = set(modes if isinstance(modes, list | tuple) else [modes])
            if len(chosen) > 1:
                raise LayerkitError(f"one sampling batch mixes the modes {sorted(chosen)}; sample them separately.")
            return chosen.pop()
        return "generate" if self.mode == "auto" else self.mode

    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        videos = self.layer_videos(batch)
        present = [v for v in videos.values() if v is not None]
        if present:
            b, f, _, h, w = present[0].shape
        elif not training and all(k in batch for k in ("num_frames", "height", "width")):  # a prompt alone
            b = len(batch["prompt"]) if isinstance(batch.get("prompt"), list | tuple) else 1
            f, h, w = (_first(batch[k]) for k in ("num_frames", "height", "width"))
        else:
            raise LayerkitError(f"task '{self.name}' got a batch with no layer video.")
        mode = self.batch_mode(batch, training=training)
        given_names = self.given_names(mode)
        names = list(LAYOUTS[self.layout])
        if training:
            missing = [n for n in names if videos[n] is None]
            if missing:
                raise LayerkitError(f"task '{self.name}' needs training videos for {missing}.")
        else:
            missing = [n for n in given_names if videos[n] is None]
            if missing:
                raise LayerkitError(f"task '{self.name}' in mode {mode} needs the given layer(s) {missing} as input.")
        segments = [Segment(n, f, videos[n] if (training or n in given_names) else None) for n in names]
        seg_given = [n in given_names for n in names]
        if mode in self.prepend_first_frame:  # a copy of frame 0, given with the layer it copies
            source = videos[names[0]]
            segments.insert(0, Segment(FIRST, 1, source[:, :1] if source is not None else None))
            seg_given.insert(0, names[0] in given_names)
        given = given_per_frame(torch.tensor([seg_given] * b, dtype=torch.bool), [s.num_frames for s in segments])
        prompts = [self.prompt_blocks(batch, i) for i in range(b)]
        scales = {adapter: torch.as_tensor(batch[key], dtype=torch.float32).reshape(b)
                  for adapter, key in self.scale_from.items() if key in batch}
        return Packed(segments, given, prompts, h, w, scales=scales, extras={"mode": mode},
                      loss_region=self.loss_region(batch, segments) if training else None,
                      latent_norm=self.latent_norm or None,
                      latent_residual=self.residuals(given_names) or None)

    def residuals(self, given_names: list[str]) -> dict[str, str]:
        """``task.latent_residual`` as a batch of a mode with these given layers diffuses it: every pair
        but one whose layer is given and its base not (bg2fg's background: its value is given, its
        difference from a blended clip still to be generated is not; it is diffused as itself)."""
        return {name: base for name, base in (self.latent_residual or {}).items()
                if not (name in given_names and base not in given_names)}

    @staticmethod
    def loss_region(batch: dict[str, Any], segments: list[Segment]) -> torch.Tensor | None:
        """The sprite's matte [B, F, H, W] behind every packed segment (each layer's frame t, and the
        frame-0 copy, get matte frame t): where ``train.region_loss_weight`` weighs the loss more."""
        alpha = batch.get("foreground_alpha")
        if alpha is None:
            return None
        matte = alpha[:, :, 0].float().clamp(0, 1)
        return torch.cat([matte[:, : seg.num_frames] for seg in segments], dim=1)

    def prompt_blocks(self, batch: dict[str, Any], i: int) -> list[str]:
        texts = []
        for index, key in enumerate(PROMPT_KEYS):
            value = batch.get(key)
            if value is None:
                raise LayerkitError(f"task '{self.name}' needs '{key}' in every sample.")
            text = value[i] if isinstance(value, list | tuple) else str(value)
            texts.append(f"{index}, {text}" if self.index_prefix and text else text)  # "": no prompt (unconditional)
        return texts

    # -- sampling inputs ----------------------------------------------------------------------
    def resolve_mode(self, files: dict[str, str]) -> str:
        """The mode the given files select, checked against ``self.mode``."""
        chosen = {FILE_MODE[k] for k in files}
        if len(chosen) > 1:
            listed = ", ".join(f"inputs.{k} ({FILE_MODE[k]})" for k in files)
            raise LayerkitError(f"{listed} select different tasks; give the input(s) of one of them.")
        wanted = chosen.pop() if chosen else "generate"
        if self.layout == "video" and wanted != "generate":
            raise LayerkitError(f"task.layout=video is the blended scene alone (text-to-video) and takes no input "
                                f"file; {', '.join(f'inputs.{k}' for k in files)} selects {wanted}.")
        if self.mode not in ("auto", wanted):
            if files:
                key = next(iter(files))
                raise LayerkitError(f"inputs.{key} is the input of {wanted}, but task.mode is {self.mode}; run with "
                                    f"task.mode={wanted} (or task.mode=auto).")
            needs = {"decompose": "inputs.blended=VIDEO", "fg2bg": "inputs.foreground=RGBA_VIDEO",
                     "bg2fg": "inputs.background=VIDEO"}[self.mode]
            raise LayerkitError(f"task.mode={self.mode} needs {needs}.")
        return wanted

    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        """One sample per output (``num_samples``, different noise). With no input, held-out
        shapes-world samples (their prompts; their ground truth scores the result). With any input,
        only the user's: prompts left out are empty (said in the record), files select the mode."""
        n = int(inputs.get("num_samples", self.num_samples))
        if n < 1:
            raise LayerkitError(f"inputs.num_samples must be at least 1; got {n}.")
        files = {k: str(inputs[k]) for k in FILE_KEYS if inputs.get(k)}
        prompts = {k: str(inputs[k]) for k in PROMPT_KEYS if inputs.get(k) is not None and inputs.get(k) != ""}
        if not files and not prompts:
            return self._shapes_samples(n, int(inputs.get("seed", self.default_seed)), height, width, num_frames,
                                        str(inputs.get("split", "test")))
        mode = self.resolve_mode(files)
        notes = [f"mode {mode}, selected by " + (", ".join(f"inputs.{k}" for k in files) or "no input file")]
        videos = self._read_inputs(files, height, width, num_frames, str(inputs.get("fit", "crop")), notes) \
            if files else {}
        for key in PROMPT_KEYS:
            if key not in prompts:
                prompts[key] = ""
                notes.append(f"inputs.{key} not given: no prompt (the unconditional text, as training drops a prompt)")
        size = {"num_frames": num_frames, "height": height, "width": width}
        return [{**videos, **prompts, **size, "mode": mode, "notes": notes} for _ in range(n)]

    def _shapes_samples(self, n: int, seed: int, height: int, width: int, num_frames: int,
                        split: str = "test") -> list[dict[str, Any]]:
        """Held-out shapes-world samples: the ``test`` split (what records report), or ``val``
        (``inputs.split=val``: for choosing settings without looking at the test clips)."""
        from layerkit.data.shapes import held_out_seed, make_sample

        config = _world_config(self.shapes_world, num_frames, height, width)
        samples = [make_sample(held_out_seed(split, seed, i), config) for i in range(n)]
        mode = "generate" if self.mode == "auto" else self.mode
        out = []
        for sample in samples:
            sample["ground_truth"] = dict(sample)
            sample["mode"] = mode  # the shapes sample's own layers are the given ones
            out.append(sample)
        return out

    def _read_inputs(self, files: dict[str, str], height: int, width: int, num_frames: int, fit: str,
                     notes: list[str]) -> dict[str, Any]:
        from layerkit.io.video import fit_frames, read_video, unit_float

        out: dict[str, torch.Tensor] = {}
        for key, path in files.items():
            if not Path(path).exists():
                raise LayerkitError(f"input '{key}' file '{path}' does not exist.")
            video = read_video(path)
            if video.num_frames < num_frames:
                raise LayerkitError(f"input '{key}' video '{path}' has {video.num_frames} frames; this run needs "
                                    f"{num_frames} (sampler.num_frames).")
            if video.num_frames > num_frames:
                notes.append(f"inputs.{key}: the first {num_frames} of {video.num_frames} frames used")
            frames = torch.from_numpy(unit_float(video.frames[:num_frames])).permute(0, 3, 1, 2)
            frames, note = fit_frames(frames, height, width, fit, name=f"inputs.{key}")
            if note:
                notes.append(note)
            if key == "foreground":
                if frames.shape[1] == 4:
                    out["foreground_alpha"] = frames[:, 3:].clamp(0, 1)
                out["foreground_rgb"] = frames[:, :3].clamp(0, 1)
            elif key == "alpha":
                out["foreground_alpha"] = frames[:, :1].clamp(0, 1)
            else:
                out[key] = frames[:, :3].clamp(0, 1)
        if "foreground_rgb" in out and "foreground_alpha" not in out:
            raise LayerkitError("the foreground input has no alpha channel; give an RGBA video or an 'alpha' video.")
        if "foreground_alpha" in out and "foreground_rgb" not in out:
            raise LayerkitError("inputs.alpha needs inputs.foreground (the RGB or RGBA foreground video) too.")
        return out

    # -- outputs ------------------------------------------------------------------------------
    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per sample, the layers in [0, 1]: the foreground as RGBA [F, 4, H, W] (and its matte), the
        background and the blended scene [F, 3, H, W]. The layers the mode was given (decompose: the
        blended clip; fg2bg: the foreground and its matte; bg2fg: the background) come back as they
        were given (``keep_given``; false: as the VAE decodes them, i.e. their round trip). The
        generated ones are then fitted to them through the compositing equation, the matte fixed
        (``fit_to_given``: the prior weight of :func:`layered.matting.fit_to_given`; null: as
        decoded; nothing is fitted in generation, where nothing is given)."""
        given: dict[str, torch.Tensor] = {}
        if self.keep_given and "foreground" in decoded:
            videos = self.layer_videos(batch)
            given = {n: videos[n].to(decoded[n].device) for n in self.given_names(self.batch_mode(batch, training=False))
                     if n in decoded and videos.get(n) is not None}
            decoded = {**decoded, **given}
        fit = self.fit_to_given is not None and bool(given) and "alpha" in decoded
        outputs = []
        for i in range(next(iter(decoded.values())).shape[0]):
            layers: dict[str, torch.Tensor] = {}
            if "foreground" not in decoded:  # the video layout: the blended scene alone
                outputs.append({"blended": to_unit(decoded["blended"][i])})
                continue
            background, blended = to_unit(decoded["background"][i]), to_unit(decoded["blended"][i])
            if "alpha" in decoded:
                if "foreground" in given:  # the user's RGBA as read, not its packed form unpacked again
                    rgb, alpha = (batch[k][i].float().to(blended.device) for k in ("foreground_rgb", "foreground_alpha"))
                else:
                    rgb, alpha = unpack_foreground(decoded["foreground"][i], decoded["alpha"][i])
                if fit:
                    fitted = fit_to_given({"foreground": rgb, "background": background, "blended": blended}, alpha,
                                          set(given) - {"alpha"}, self.fit_to_given)
                    background, blended = fitted.get("background", background), fitted.get("blended", blended)
                    if "foreground" in fitted:  # as unpack_foreground leaves it where the matte is nearly 0
                        rgb = torch.where(alpha > 0.02, fitted["foreground"], torch.full_like(rgb, 0.5))
                layers["foreground"] = torch.cat([rgb, alpha], dim=1)
                layers["alpha"] = alpha
            else:
                layers["foreground"] = to_unit(decoded["foreground"][i])
            layers["background"], layers["blended"] = background, blended
            outputs.append(layers)
        return outputs

    def evaluate_samples(self, outputs: list[dict[str, torch.Tensor]],
                         batch: dict[str, Any]) -> list[dict[str, float]] | None:
        """Shapes-world metrics of each sample when the inputs came from the shapes world (their
        means: :meth:`Task.evaluate`).

        ``alpha_iou`` follows the mode (``layered.evaluate.evaluate_layered``): against the held-out
        clip's alpha where the given input fixes the sprite's place (decompose, fg2bg), against the
        matte the output composite implies where nothing does (generate, bg2fg: the prompt does not
        say where the sprite is); both are recorded as ``alpha_iou_heldout`` and ``alpha_iou_composite``."""
        truth = batch.get("ground_truth")
        if not truth or "alpha" not in outputs[0]:
            return None
        from layerkit_plugins.layered.evaluate import evaluate_layered

        modes = batch.get("mode") or []
        modes = [modes] * len(outputs) if isinstance(modes, str) else list(modes)
        rows = []
        for i, (out, sample) in enumerate(zip(outputs, truth, strict=True)):
            pred = {"foreground_rgb": out["foreground"][:, :3], "foreground_alpha": out["alpha"],
                    "background": out["background"], "blended": out["blended"]}
            mode = modes[i] if i < len(modes) else ("generate" if self.mode == "auto" else self.mode)
            rows.append(evaluate_layered(pred, sample, mode=mode))
        return rows


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """A decoded sub-clip in VAE units ([-1, 1]) as an image in [0, 1]."""
    return ((video.float() + 1) / 2).clamp(0, 1)


def unpack_foreground(foreground: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RGBA layer of the decoded foreground and alpha sub-clips ([F, 3, H, W], VAE units): the
    foreground is packed over mid-grey (fg x alpha + 0.5 x (1 - alpha)), the matte as grey; returns
    the un-premultiplied colour [F, 3, H, W] (0.5 where the matte is nearly 0) and the matte
    [F, 1, H, W], both in [0, 1]."""
    fg = to_unit(foreground)
    a = to_unit(alpha.float().mean(1, keepdim=True))
    rgb = ((fg - 0.5 * (1 - a)) / a.clamp_min(1e-3)).clamp(0, 1)
    return torch.where(a > 0.02, rgb, torch.full_like(rgb, 0.5)), a


def _first(value: Any) -> int:
    """An int from a collated field (int, list or tensor [B])."""
    if isinstance(value, torch.Tensor):
        return int(value.flatten()[0])
    if isinstance(value, list | tuple):
        return int(value[0])
    return int(value)


def _world_config(world: dict[str, Any], num_frames: int, height: int, width: int) -> Any:
    """The ShapesConfig of held-out clips: the sampler's size, then ``task.shapes_world``'s fields."""
    from dataclasses import fields

    from layerkit.data.shapes import ShapesConfig

    sampler_set = {"num_frames", "height", "width"}
    known = {f.name for f in fields(ShapesConfig)} - sampler_set
    if set(world) & sampler_set:
        raise LayerkitError(f"task.shapes_world sets {sorted(set(world) & sampler_set)}, which the sampler sets "
                            "(sampler.num_frames, sampler.height, sampler.width).")
    unknown = sorted(set(world) - known)
    if unknown:
        raise LayerkitError(f"task.shapes_world names {unknown}, which the shapes world does not have; "
                            f"its fields are {sorted(known)}.")
    try:
        config = ShapesConfig(num_frames=num_frames, height=height, width=width, **world)
        config.validate()
    except LayerkitError as error:
        message = str(error).split(" (got ")[0].removeprefix("ShapesConfig: ")
        raise LayerkitError(f"task.shapes_world {world} is not a shapes world: {message}.") from None
    except (TypeError, ValueError, IndexError):
        raise LayerkitError(f"task.shapes_world {world} has a value of the wrong type: sprite_size and speed are "
                            "ranges [low, high], the other fields numbers.") from None
    return config
