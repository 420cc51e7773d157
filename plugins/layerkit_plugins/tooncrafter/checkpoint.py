"""Reading ToonCrafter's ``model.ckpt`` and splitting it into components.

The released file is a pickled Lightning checkpoint whose ``state_dict`` holds every part of
``LatentVisualDiffusion`` (LayerAnimate notes 1.4):

============================  =================  ====================================================
prefix                        component          module here
============================  =================  ====================================================
``model.diffusion_model.``    ``unet``           ``ToonCrafterUNet`` (``convert.tooncrafter_to_unet``)
``first_stage_model.``        ``vae``            :class:`~.vae.DualRefAutoencoderKL` (and, approximately,
                                                 the SD VAE: :func:`~.vae.sd_vae_state_from_dual_ref`)
``cond_stage_model.model.``   ``text_encoder``   OpenCLIP text tower -> ``CLIPTextModel`` (penultimate)
``embedder.model.``           ``image_encoder``  OpenCLIP vision tower -> ``CLIPVisionModel``
``image_proj_model.``         ``image_projector``  ``Resampler`` (``convert.tooncrafter_to_resampler``)
============================  =================  ====================================================

plus 13 DDPM schedule buffers at the top level, which are ignored (the scheduler is rebuilt from
its config). Anything else is an error naming the key. The file is read only through
:func:`layerkit.io.weights.load_weights` (``torch.load(weights_only=True)`` for the pickle, or a
safetensors conversion of it); keys prefixed by DeepSpeed (``_forward_module.`` or ``module.``) are
accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError

#: component name -> key prefix in ``model.ckpt``
PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.model.",
    "image_encoder": "embedder.model.",
    "image_projector": "image_proj_model.",
}
#: ``LatentDiffusion`` schedule buffers stored at the top level (ToonCrafterSimple ``remap_state_dict``)
DDPM_BUFFERS: tuple[str, ...] = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "scale_arr",
)
#: whole-state prefixes added by DeepSpeed / DDP wrappers
WRAPPER_PREFIXES: tuple[str, ...] = ("_forward_module.", "module.")
#: a key every ToonCrafter/DynamiCrafter video UNet has and image UNets (SD 1.x/2.x) do not
_TEMPORAL_MARK = ".temopral_conv."


def strip_wrapper_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a DeepSpeed ``_forward_module.`` (or DDP ``module.``) prefix shared by every key."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def tooncrafter_problem(state: Mapping[str, Any]) -> str | None:
    """Why ``state`` is not a ToonCrafter checkpoint (a clause for a sentence), or ``None``."""
    state = strip_wrapper_prefix(state)
    unet = PREFIXES["unet"]
    if not any(k.startswith(unet) for k in state):
        sample = ", ".join(f"'{k}'" for k in list(state)[:2]) or "no keys at all"
        return f"it has no {unet}* keys (it starts with {sample})"
    if not any(k.startswith(unet) and _TEMPORAL_MARK in k for k in state):
        return (f"its {unet}* UNet has no temporal layers (no '{_TEMPORAL_MARK.strip('.')}' keys), "
                "as in an image model such as Stable Diffusion")
    absent = [p + "*" for name, p in PREFIXES.items() if name != "unet" and not any(k.startswith(p) for k in state)]
    if absent:
        return f"it has no {', '.join(absent)} keys"
    return None


def is_tooncrafter_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` (a flat state dict) has ToonCrafter's layout."""
    return tooncrafter_problem(state) is None


def check_tooncrafter_checkpoint(state: Mapping[str, Any], source: str = "the state dict") -> None:
    """Raise one LayerkitError sentence when ``state`` is not a ToonCrafter checkpoint."""
    problem = tooncrafter_problem(state)
    if problem is not None:
        raise LayerkitError(f"{source} is not a ToonCrafter checkpoint: {problem} (expected ToonCrafter's model.ckpt "
                            f"with {', '.join(p + '*' for p in PREFIXES.values())} keys).")


def split_tooncrafter_checkpoint(state: Mapping[str, Any], source: str = "the state dict") -> dict[str, dict[str, torch.Tensor]]:
    """``{component: state dict with its prefix removed}`` for the five components of :data:`PREFIXES`.

    The 13 :data:`DDPM_BUFFERS` are dropped; any other key outside the five prefixes is an error
    naming it. Tensors are shared with ``state`` (no copy)."""
    check_tooncrafter_checkpoint(state, source)
    state = strip_wrapper_prefix(state)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    for key, value in state.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            if key not in DDPM_BUFFERS:
                raise LayerkitError(f"{source} has unexpected key '{key}' (a ToonCrafter checkpoint holds only "
                                    f"{', '.join(p + '*' for p in PREFIXES.values())} and the 13 DDPM buffers).")
    return parts


def read_tooncrafter_checkpoint(path: str | Path, *, allow_pickle: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``model.ckpt`` (or a safetensors conversion of it) and split it by component.

    The pickle goes through ``load_weights(path, allow_pickle=True)``, i.e. ``torch.load`` with
    ``weights_only=True``; a missing, truncated or unsafe file is one LayerkitError sentence."""
    from layerkit.io.weights import load_weights

    path = Path(path)
    state = load_weights(path, allow_pickle=allow_pickle and path.suffix != ".safetensors")
    return split_tooncrafter_checkpoint(state, source=f"'{path}'")


def unet_and_projector_states(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": ToonCrafterUNet names, "image_projector": Resampler names}`` from split parts,
    through ``convert.tooncrafter_to_unet`` / ``convert.tooncrafter_to_resampler``."""
    from layerkit_plugins.tooncrafter import convert

    unet = convert.tooncrafter_to_unet({PREFIXES["unet"] + k: v for k, v in parts["unet"].items()})
    projector = convert.tooncrafter_to_resampler(
        {PREFIXES["image_projector"] + k: v for k, v in parts["image_projector"].items()})
    return {"unet": unet, "image_projector": projector}


_BUILDERS = ("vae", "sd_vae", "text_encoder", "image_encoder")


def build_components(parts: Mapping[str, Mapping[str, torch.Tensor]], components: Iterable[str] = _BUILDERS,
                     *, dtype: torch.dtype | None = None, source: str = "the checkpoint") -> dict[str, Any]:
    """Modules for the VAE/encoder parts of a split checkpoint: ``vae`` (DualRefAutoencoderKL),
    ``sd_vae`` (diffusers AutoencoderKL: encoder + the video decoder's spatial part, see
    :func:`~.vae.sd_vae_state_from_dual_ref`), ``text_encoder`` (CLIPTextModel, penultimate layer) and
    ``image_encoder`` (CLIPVisionModel). The UNet and image projector: :func:`unet_and_projector_states`."""
    from layerkit_plugins.tooncrafter import encoders, vae

    out: dict[str, Any] = {}
    for name in components:
        if name == "vae":
            out[name] = vae.load_dual_ref_vae(parts["vae"], dtype=dtype)
        elif name == "sd_vae":
            out[name] = vae.load_sd_vae(vae.sd_vae_state_from_dual_ref(parts["vae"]), dtype=dtype)
        elif name == "text_encoder":
            out[name] = encoders.text_encoder_from_openclip(parts["text_encoder"], dtype=dtype,
                                                            source=f"{source} cond_stage_model.model.*")
        elif name == "image_encoder":
            out[name] = encoders.image_encoder_from_openclip(parts["image_encoder"], dtype=dtype,
                                                             source=f"{source} embedder.model.*")
        else:
            raise LayerkitError(f"unknown ToonCrafter component '{name}', expected one of {', '.join(_BUILDERS)}.")
    return out
