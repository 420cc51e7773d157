"""LayerFlow LoRAs for other tools, from a finished stage's ``weights.safetensors``.

Training already writes ``export/<adapter>.<format>.safetensors`` (``export.formats``); this
module writes the same files later from a weights file alone (no model is built), and reads a
ComfyUI file back::

    python -m layerkit_plugins.layerflow.export runs/layerflow_stage3/weights.safetensors \\
        --adapter content_lora --out exported/ --formats diffusers comfyui

- ``diffusers``: loads with ``CogVideoXPipeline.load_lora_weights(out, weight_name=
  "content_lora.diffusers.safetensors")``; alpha/rank is folded into ``lora_B``.
- ``comfyui``: ComfyUI's generic LoRA layout on its native CogVideoX model
  (``diffusion_model.blocks.N.q.lora_down.weight`` / ``lora_up.weight`` / ``alpha``).

Layouts and names: ``layerkit_plugins.lora.adapter`` (``write_diffusers_lora``,
``write_comfyui_lora``, ``COMFYUI_MODULE_NAMES``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from layerkit.errors import LayerkitError

#: the diffusers class of each backbone whose LoRAs can be exported without building it
DENOISER_CLASSES = {"cogvideox": "CogVideoXTransformer3DModel"}
WEIGHTS_PREFIX = "backbone.denoiser."


def lora_from_weights(path: str | os.PathLike, adapter: str) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA ``adapter``'s weights in a layerkit ``weights.safetensors`` as ``<module>.lora_A.weight`` /
    ``lora_B.weight``, and its config (rank, alpha) plus the backbone name from the file's metadata."""
    from layerkit.io.weights import load_weights, read_metadata

    state = load_weights(path)
    config = read_metadata(path).get("layerkit_config")
    if not isinstance(config, dict):
        raise LayerkitError(f"weights file '{path}' has no layerkit_config metadata; it was not written by layerkit train.")
    adapters = config.get("adapters") or {}
    node = adapters.get(adapter)
    if not isinstance(node, dict) or node.get("name") != "lora":
        loras = sorted(k for k, v in adapters.items() if isinstance(v, dict) and v.get("name") == "lora")
        raise LayerkitError(f"weights file '{path}' has no LoRA adapter '{adapter}'; its LoRA adapters are {loras}.")
    lora = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{adapter}."
            if key.startswith(WEIGHTS_PREFIX) and tag in key:
                lora[key[len(WEIGHTS_PREFIX):].replace(tag, f".{part}.")] = value.float()
    if not lora:
        raise LayerkitError(f"weights file '{path}' holds no weights of LoRA '{adapter}' (it was frozen in that stage; "
                            "export it from the stage that trained it).")
    rank = int(node.get("rank", 8))
    alpha = float(node["alpha"]) if node.get("alpha") is not None else float(rank)
    backbone = (config.get("backbone") or {}).get("name")
    return lora, {"rank": rank, "alpha": alpha, "backbone": backbone}


def export_lora(weights: str | os.PathLike, adapter: str, directory: str | os.PathLike,
                formats: Sequence[str] = ("diffusers", "comfyui")) -> list[str]:
    """Write ``<adapter>.<format>.safetensors`` into ``directory`` from a stage's weights file."""
    from layerkit_plugins.lora.adapter import EXPORT_FORMATS, write_comfyui_lora, write_diffusers_lora

    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise LayerkitError(f"unknown LoRA export format(s) {unknown}; choose from {list(EXPORT_FORMATS)}.")
    lora, info = lora_from_weights(weights, adapter)
    model = DENOISER_CLASSES.get(str(info["backbone"]))
    if model is None:
        raise LayerkitError(f"LoRAs of backbone '{info['backbone']}' cannot be exported from a weights file; "
                            f"backbones: {sorted(DENOISER_CLASSES)}.")
    meta = {"layerkit_adapter": adapter, "layerkit_source": str(weights)}
    written = []
    if "diffusers" in formats:
        path = os.path.join(str(directory), f"{adapter}.diffusers.safetensors")
        written.append(write_diffusers_lora(path, lora, rank=info["rank"], alpha=info["alpha"], prefix="transformer",
                                            metadata=meta))
    if "comfyui" in formats:
        path = os.path.join(str(directory), f"{adapter}.comfyui.safetensors")
        written.append(write_comfyui_lora(path, lora, alpha=info["alpha"], model=model, metadata=meta))
    return written


def comfyui_to_diffusers(path: str | os.PathLike, model: str = "CogVideoXTransformer3DModel",
                         prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """A ComfyUI LoRA file -> diffusers keys with alpha/rank folded into ``lora_B`` (what the
    ``diffusers`` export writes)."""
    from layerkit.io.weights import load_weights
    from layerkit_plugins.lora.adapter import read_comfyui_lora

    lora, alphas = read_comfyui_lora(load_weights(path), model)
    out = {}
    for key, value in lora.items():
        module, part = key.rsplit(".lora_", 1)
        if part.startswith("B"):
            rank = lora[f"{module}.lora_A.weight"].shape[0]
            value = value * (alphas.get(module, rank) / rank)
        out[f"{prefix}.{key}"] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerkit_plugins.layerflow.export",
                                     description="Export a LayerFlow LoRA from a stage's weights.safetensors.")
    parser.add_argument("weights", help="weights.safetensors of the stage that trained the LoRA")
    parser.add_argument("--adapter", default="content_lora", help="adapter name (default: content_lora)")
    parser.add_argument("--out", default=None, help="output directory (default: <weights dir>/export)")
    parser.add_argument("--formats", nargs="+", default=["diffusers", "comfyui"], help="diffusers and/or comfyui")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.weights).resolve().parent / "export")
    try:
        for path in export_lora(args.weights, args.adapter, out, args.formats):
            print(path)
    except LayerkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
