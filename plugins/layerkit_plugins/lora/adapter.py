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
        """``diffusers`` (``<prefix>.<module>.lora_A.weight``, loads with ``load_lora_weights``)."""
        from layerkit.io.weights import save_weights

        written = []
        prefix = getattr(backbone, "lora_prefix", "transformer")
        state = {f"{prefix}.{k}": v.detach().float() for k, v in self.lora_parameters().items()}
        if "diffusers" in formats:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{self.name}.diffusers.safetensors")
            save_weights(path, state, metadata={"format": "pt", "lora_rank": self.rank, "lora_alpha": self.alpha})
            written.append(path)
        return written
