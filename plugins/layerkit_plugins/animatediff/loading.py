"""Loaders for AnimateDiff's weight formats: a local diffusers SD 1.5 folder, and a motion
adapter as a diffusers folder or an original AnimateDiff motion-module file.

Original motion modules (``mm_sd_v15_v2.ckpt``, ``v3_sd15_mm.ckpt`` and their safetensors
conversions) name their layers ``...motion_modules.J.temporal_transformer.transformer_blocks.K
.attention_blocks.{0,1}``, ``norms.{0,1}``, ``ff_norm``; diffusers' ``MotionAdapter`` names the
same tensors ``...motion_modules.J.transformer_blocks.K.attn{1,2}``, ``norm{1,2,3}``. The
sinusoidal position tables (``pos_encoder.pe``) are not learned and are rebuilt by diffusers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError

#: original AnimateDiff name piece -> diffusers name piece (applied in this order)
_RENAMES = (
    (".temporal_transformer.", "."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
)


def original_to_diffusers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
    """Rename an original motion-module state dict; also return the position-table length."""
    out: dict[str, torch.Tensor] = {}
    max_len = None
    for key, value in state.items():
        key = key.removeprefix("module.")
        if ".pos_encoder." in key:
            max_len = int(value.shape[-2]) if value.dim() >= 2 else max_len
            continue
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out, max_len


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse renaming (used by tests to write an original-format motion module)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".pos_embed.pe"):
            key = key.replace(".pos_embed.pe", ".attention_blocks.0.pos_encoder.pe")
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        for old, new in _RENAMES[1:]:
            key = key.replace(new, old) if ".pos_encoder." not in key else key
        out[key] = value
    return out


def _adapter_config(state: dict[str, torch.Tensor], max_len: int | None) -> dict[str, Any]:
    """Infer a MotionAdapter config from converted original weights."""
    down = sorted({int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not down:
        raise LayerkitError("the motion-module file has no 'down_blocks.*.motion_modules' weights.")
    widths, layers = [], []
    for i in down:
        proj = state.get(f"down_blocks.{i}.motion_modules.0.proj_in.weight")
        if proj is None:
            raise LayerkitError(f"the motion-module file lacks down_blocks.{i}.motion_modules.0.proj_in.weight.")
        widths.append(int(proj.shape[0]))
        layers.append(len({int(m.group(1)) for k in state
                           if (m := re.match(rf"down_blocks\.{i}\.motion_modules\.(\d+)\.", k))}))
    if len(set(layers)) != 1:
        raise LayerkitError(f"motion modules per block differ across blocks ({layers}); not an AnimateDiff file.")
    return {
        "block_out_channels": tuple(widths),
        "motion_layers_per_block": layers[0],
        "motion_num_attention_heads": 8,  # AnimateDiff's; head count and norm groups are not in the weights
        "motion_norm_num_groups": 32,
        "motion_max_seq_length": max_len or 32,
        "use_motion_mid_block": any(k.startswith("mid_block.") for k in state),
        "conv_in_channels": None,
    }


def load_motion_adapter(source: str | Path, *, allow_pickle: bool = False, config: dict[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32):
    """A diffusers ``MotionAdapter`` from a diffusers folder or an original motion-module file.

    ``.ckpt``/``.pt`` files are read with ``torch.load(weights_only=True)`` and only when
    ``allow_pickle`` is set. ``config`` overrides the inferred adapter config (e.g.
    ``motion_num_attention_heads`` for a non-standard module).
    """
    from diffusers import MotionAdapter

    from layerkit.io.weights import load_weights

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LayerkitError(f"motion adapter folder '{path}' has no config.json (not a diffusers MotionAdapter).")
        return MotionAdapter.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    if not path.is_file():
        raise LayerkitError(f"motion adapter '{path}' does not exist (give a diffusers folder or a motion-module file).")
    state = load_weights(path, allow_pickle=allow_pickle)
    if any(".temporal_transformer." in k or ".attention_blocks." in k for k in state):
        state, max_len = original_to_diffusers(state)
    else:  # already diffusers names in a single file
        max_len = next((int(v.shape[-2]) for k, v in state.items() if k.endswith(".pos_embed.pe")), None)
        state = {k: v for k, v in state.items() if not k.endswith(".pos_embed.pe")}
    adapter = MotionAdapter(**{**_adapter_config(state, max_len), **(config or {})})
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".pos_embed.pe")]
    if missing or unexpected:
        raise LayerkitError(
            f"motion module '{path}' does not fit a MotionAdapter: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {unexpected[:3]} ({len(unexpected)})."
        )
    return adapter.to(dtype)


def load_sd15_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and the scheduler config of a local diffusers SD 1.5 folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    needed = ("unet", "vae", "text_encoder", "tokenizer")
    absent = [sub for sub in needed if not (root / sub).is_dir()]
    if absent:
        raise LayerkitError(
            f"'{root}' is not a diffusers Stable Diffusion 1.5 folder: it lacks {absent} "
            "(expected subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    kw = {"local_files_only": True}
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=dtype, **kw),
        "vae": AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype, **kw),
        "text_encoder": CLIPTextModel.from_pretrained(str(root), subfolder="text_encoder", torch_dtype=dtype, **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer", **kw),
        "scheduler_config": {},
    }
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        import json

        parts["scheduler_config"] = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
    return parts
