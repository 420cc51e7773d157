"""``lora``: peft LoRA layers injected into the denoiser, with a scale per sample.

LayerFlow's Motion LoRA is trained with scale 1 on static samples and 0 on dynamic ones in
the same batch (LayerFlow sec. 3.3); peft computes ``lora_B(lora_A(x)) * scaling`` and the
scaling here becomes a per-row tensor for the call, read from the step context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def select_targets(denoiser: nn.Module, targets: Sequence[str], block_pattern: str | None,
                   every: int | None, offset: int) -> list[str]:
    """Names of ``nn.Linear`` modules ending in one of ``targets``; optionally only inside
    blocks ``<block_pattern>.<i>`` with ``i % every == offset`` (LayerFlow: every sixth block)."""
    from peft.tuners.lora import LoraLayer

    names = []
    block_re = re.compile(rf"(^|\.){re.escape(block_pattern)}\.(\d+)\.") if block_pattern else None
    for name, module in denoiser.named_modules():
        if name.endswith(".base_layer"):
            continue
        # a layer already wrapped by another LoRA (Motion LoRA under Content LoRA) takes a second adapter
        if not isinstance(module, nn.Linear | LoraLayer) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if block_re is not None:
            m = block_re.search(name)
            if m is None or (every and int(m.group(2)) % every != offset):
                continue
        names.append(name)
    return names


class LoRAAdapter(Adapter):
    def __init__(self, rank: int = 8, alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS,
                 blocks: str | None = None, every: int | None = None, offset: int = 0, dropout: float = 0.0,
                 trainable: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.targets, self.blocks, self.every, self.offset = tuple(targets), blocks, every, int(offset)
        self.dropout, self.trainable, self.scale = float(dropout), bool(trainable), float(scale)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._layers: list[nn.Module] = []
        self.__dict__["_denoiser"] = None

    def attach(self, backbone: Backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        denoiser = backbone.denoiser
        names = select_targets(denoiser, self.targets, self.blocks, self.every, self.offset)
        if not names:
            raise LayerkitError(f"adapter '{self.name}' found no layer matching targets {list(self.targets)}.")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=names,
                            lora_dropout=self.dropout, init_lora_weights=True)
        inject_adapter_in_model(config, denoiser, adapter_name=self.name)
        context = backbone.context
        self._layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and self.name in m.lora_A]
        for layer in self._layers:
            layer.set_adapter(list(layer.lora_A.keys()))  # every attached LoRA active together
            base = layer.scaling[self.name]
            self._hooks.append(layer.register_forward_pre_hook(self._scaler(context, base)))
        self._fix_requires_grad(denoiser)
        self.__dict__["_denoiser"] = denoiser  # a reference, not a submodule (no duplicate weights)
        self.attached = True

    def _scaler(self, context, base: float):
        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0]
            s = context.scale_for(self.name, x.shape[0], default=1.0) if context.active else 1.0
            if isinstance(s, torch.Tensor):
                s = s.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            layer.scaling[self.name] = base * self.scale * s

        return hook

    def _fix_requires_grad(self, denoiser: nn.Module) -> None:
        # peft's set_adapter opens every active adapter; keep each adapter's own choice.
        flags = getattr(denoiser, "_layerkit_lora_trainable", {})
        flags[self.name] = self.trainable
        denoiser._layerkit_lora_trainable = flags
        for pname, param in denoiser.named_parameters():
            for adapter_name, flag in flags.items():
                if f".lora_A.{adapter_name}." in pname or f".lora_B.{adapter_name}." in pname:
                    param.requires_grad_(flag)

    def detach(self, backbone: Backbone) -> None:
        from peft.tuners.lora import LoraLayer

        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        denoiser = backbone.denoiser
        for parent in list(denoiser.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer) and self.name in child.lora_A:
                    child.delete_adapter(self.name)
                    if not child.lora_A:
                        setattr(parent, child_name, child.get_base_layer())
        getattr(denoiser, "_layerkit_lora_trainable", {}).pop(self.name, None)
        self._layers = []
        self.attached = False

    def owns_key(self, key: str) -> bool:
        """This LoRA's matrices live inside the denoiser, named ``...lora_A.<name>.weight``."""
        return f".lora_A.{self.name}." in key or f".lora_B.{self.name}." in key or super().owns_key(key)

    def map_key(self, key: str, own) -> str | None:
        """A layer peft wrapped keeps its weight as ``<layer>.base_layer.<weight>``: an earlier
        stage's weight of that layer (saved before the wrap) goes there."""
        stem, _, leaf = key.rpartition(".")
        wrapped = f"{stem}.base_layer.{leaf}"
        return wrapped if wrapped in own else None

    def lora_parameters(self) -> dict[str, torch.Tensor]:
        """The LoRA weights of this adapter, named as in the denoiser without the adapter name."""
        assert self._denoiser is not None
        out = {}
        for pname, param in self._denoiser.named_parameters():
            for part in ("lora_A", "lora_B"):
                tag = f".{part}.{self.name}."
                if tag in pname:
                    out[pname.replace(tag, f".{part}.")] = param
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.lora_parameters().values() if p.requires_grad]

    def export(self, backbone: Backbone, directory: str, formats: Sequence[str]) -> list[str]:
        """Write this LoRA for other tools; ``formats`` from :data:`EXPORT_FORMATS`:

        - ``diffusers``: ``<name>.diffusers.safetensors``, keys ``<prefix>.<module>.lora_A.weight`` /
          ``lora_B.weight``; alpha/rank is folded into ``lora_B`` (diffusers reads a file without
          alphas as alpha = rank, scale 1), so ``pipe.load_lora_weights(dir, weight_name=...)`` at
          scale 1 reproduces this adapter at scale 1.
        - ``comfyui``: ``<name>.comfyui.safetensors`` in ComfyUI's generic LoRA layout,
          ``diffusion_model.<ComfyUI module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``,
          under the module names of ComfyUI's own model (:data:`COMFYUI_MODULE_NAMES`); ComfyUI
          scales by alpha / rank itself. Denoisers without a known ComfyUI model are skipped
          with a warning.

        The adapter's own ``scale`` is not folded in (set the strength in the loading tool).
        """
        import warnings

        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if unknown:
            raise LayerkitError(f"unknown LoRA export format(s) {unknown}; export.formats takes {list(EXPORT_FORMATS)}.")
        lora = {k: v.detach().float().cpu() for k, v in self.lora_parameters().items()}
        meta = {"layerkit_adapter": self.name}
        written = []
        if "diffusers" in formats:
            path = os.path.join(directory, f"{self.name}.diffusers.safetensors")
            write_diffusers_lora(path, lora, rank=self.rank, alpha=self.alpha,
                                 prefix=getattr(backbone, "lora_prefix", "transformer"), metadata=meta)
            written.append(path)
        if "comfyui" in formats:
            model = type(backbone.denoiser).__name__
            if model in COMFYUI_MODULE_NAMES:
                path = os.path.join(directory, f"{self.name}.comfyui.safetensors")
                write_comfyui_lora(path, lora, alpha=self.alpha, model=model, metadata=meta)
                written.append(path)
            else:
                warnings.warn(f"LoRA '{self.name}' was not exported for ComfyUI: layerkit knows ComfyUI's module names "
                              f"for {sorted(COMFYUI_MODULE_NAMES)}, not {model}.", stacklevel=2)
        return written


# ----------------------------------------------------------------------------------------
# export helpers
# ----------------------------------------------------------------------------------------
#: what ``export.formats`` may list
EXPORT_FORMATS = ("diffusers", "comfyui")

#: diffusers module name -> the module name in ComfyUI's own implementation of the model, per
#: diffusers denoiser class ("{i}" stands for a number). CogVideoX: comfy/ldm/cogvideo/model.py
#: (``blocks.N.q/k/v/attn_out/ff_proj/ff_out``, ``time_embedding_linear_1``, ...).
COMFYUI_MODULE_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "CogVideoXTransformer3DModel": (
        ("transformer_blocks.{i}.attn1.to_q", "blocks.{i}.q"),
        ("transformer_blocks.{i}.attn1.to_k", "blocks.{i}.k"),
        ("transformer_blocks.{i}.attn1.to_v", "blocks.{i}.v"),
        ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn_out"),
        ("transformer_blocks.{i}.ff.net.0.proj", "blocks.{i}.ff_proj"),
        ("transformer_blocks.{i}.ff.net.2", "blocks.{i}.ff_out"),
        ("transformer_blocks.{i}.norm1.linear", "blocks.{i}.norm1.linear"),
        ("transformer_blocks.{i}.norm2.linear", "blocks.{i}.norm2.linear"),
        ("time_embedding.linear_{i}", "time_embedding_linear_{i}"),
        ("ofs_embedding.linear_{i}", "ofs_embedding_linear_{i}"),
        ("patch_embed.proj", "patch_embed.proj"),
        ("patch_embed.text_proj", "patch_embed.text_proj"),
        ("norm_out.linear", "norm_out.linear"),
        ("proj_out", "proj_out"),
    ),
}
COMFYUI_PREFIX = "diffusion_model."


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def rename_module(name: str, model: str, *, to_comfyui: bool = True) -> str:
    """A module name of ``model`` in diffusers' naming -> ComfyUI's (or back, ``to_comfyui=False``)."""
    for diffusers_name, comfy_name in COMFYUI_MODULE_NAMES[model]:
        source, target = (diffusers_name, comfy_name) if to_comfyui else (comfy_name, diffusers_name)
        m = _template_regex(source).match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    side = "ComfyUI" if to_comfyui else "diffusers"
    raise LayerkitError(f"module '{name}' of {model} has no known {side} name, so this LoRA cannot be exported for {side}.")


def _split_lora(lora: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``<module>.lora_A.weight`` / ``lora_B.weight`` -> module -> (A [r, in], B [out, r])."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    out = {}
    for module in modules:
        a, b = lora.get(f"{module}.lora_A.weight"), lora.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise LayerkitError(f"LoRA module '{module}' lacks its lora_A or lora_B weight.")
        out[module] = (a, b)
    return out


def write_diffusers_lora(path: str, lora: dict[str, torch.Tensor], *, rank: int, alpha: float, prefix: str,
                         metadata: dict | None = None) -> str:
    """diffusers/peft keys with alpha/rank folded into ``lora_B`` (the file means alpha = rank)."""
    from layerkit.io.weights import save_weights

    scale = float(alpha) / float(rank)
    state = {}
    for module, (a, b) in _split_lora(lora).items():
        state[f"{prefix}.{module}.lora_A.weight"] = a
        state[f"{prefix}.{module}.lora_B.weight"] = b * scale
    meta = {"format": "pt", "layerkit_lora_rank": int(rank), "layerkit_lora_alpha": float(alpha),
            "layerkit_lora_B_scaled_by": scale, **(metadata or {})}
    save_weights(path, state, metadata=meta)
    return path


def write_comfyui_lora(path: str, lora: dict[str, torch.Tensor], *, alpha: float, model: str,
                       metadata: dict | None = None) -> str:
    """ComfyUI's generic layout: ``diffusion_model.<module>.lora_down.weight`` (A), ``lora_up.weight``
    (B) and ``alpha`` (a scalar; ComfyUI scales by alpha / rank), under ComfyUI's module names."""
    from layerkit.io.weights import save_weights

    state = {}
    for module, (a, b) in _split_lora(lora).items():
        key = COMFYUI_PREFIX + rename_module(module, model)
        state[f"{key}.lora_down.weight"] = a
        state[f"{key}.lora_up.weight"] = b
        state[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_weights(path, state, metadata={"format": "pt", "layerkit_lora_alpha": float(alpha), **(metadata or {})})
    return path


def read_comfyui_lora(state: dict[str, torch.Tensor], model: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A ComfyUI LoRA state dict (``write_comfyui_lora``'s layout) -> diffusers-named raw weights
    ``<module>.lora_A.weight`` / ``lora_B.weight`` and each module's alpha."""
    lora, alphas = {}, {}
    for key, value in state.items():
        if not key.startswith(COMFYUI_PREFIX):
            raise LayerkitError(f"ComfyUI LoRA key '{key}' does not start with '{COMFYUI_PREFIX}'.")
        for suffix, part in ((".lora_down.weight", "lora_A"), (".lora_up.weight", "lora_B"), (".alpha", None)):
            if key.endswith(suffix):
                module = rename_module(key[len(COMFYUI_PREFIX) : -len(suffix)], model, to_comfyui=False)
                if part is None:
                    alphas[module] = float(value)
                else:
                    lora[f"{module}.{part}.weight"] = value
                break
        else:
            raise LayerkitError(f"ComfyUI LoRA key '{key}' is not a lora_down/lora_up weight or an alpha.")
    return lora, alphas
