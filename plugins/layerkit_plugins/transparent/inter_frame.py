"""``transparent.inter_frame_attention``: Layer-Animate's Inter-Frame Attention (seed 003, eq. 3).

Beside every spatial self-attention (``attn1`` of the spatial transformer blocks; the motion
modules are left alone) each frame i also attends to the reference (middle) frame m::

    Out' = softmax(Q'_i K_m^T / sqrt(d)) V_m W_O',   Q'_i = X_i W_Q',  K_m = X_m W_K,  V_m = X_m W_V

W_K and W_V are the frozen self-attention weights; W_Q' (initialised from W_Q) and W_O'
(zero-initialised, so the model starts exactly as AnimateDiff) are the only trainable
weights. Out' is added to the self-attention output.

The UNet folds frames into the batch: ``attn1`` sees X [B*F, L, D]; F comes from
``backbone.context.num_frames`` and m from ``context.extras["reference_frame"]`` (the task
sets it; default (F - 1) // 2, the 8th of 16 frames as in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone, StepContext


def reference_frame(num_frames: int) -> int:
    """The paper's middle frame: index 7 of 16 (the eighth frame)."""
    return (num_frames - 1) // 2


def spatial_self_attentions(denoiser: nn.Module) -> dict[str, nn.Module]:
    """``attn1`` of the spatial transformer blocks (not the motion modules), by module name."""
    from diffusers.models.attention_processor import Attention

    return {name: module for name, module in denoiser.named_modules()
            if isinstance(module, Attention) and name.endswith(".attn1") and ".attentions." in name
            and "motion_modules" not in name}


class InterFrameProcessor:
    """A diffusers attention processor: the wrapped processor's output plus Out'.

    A plain object (not an ``nn.Module``) so the trainable weights stay owned by the adapter
    and are not registered a second time inside the UNet.

    When nothing needs gradients and W_O' is exactly zero (a freshly attached adapter, before
    any training), Out' is exactly zero and is not computed; whether W_O' is zero is checked
    once per change of the weight (its version counter), not per call.
    """

    def __init__(self, base: Any, to_q: nn.Linear, to_out: nn.Linear, adapter: InterFrameAttention,
                 context: StepContext) -> None:
        self.base, self.to_q, self.to_out, self.adapter, self.context = base, to_q, to_out, adapter, context
        self._zero: tuple[tuple[int, int], bool] | None = None

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        ctx = self.context
        if not ctx.active or encoder_hidden_states is not None or self.adapter.scale == 0 or self.output_is_zero():
            return out
        return out + self.inter_frame(attn, hidden_states).to(out.dtype)

    def output_is_zero(self) -> bool:
        """True when Out' is exactly zero and no gradient could flow through it."""
        weight = self.to_out.weight
        if torch.is_grad_enabled() and (weight.requires_grad or self.to_q.weight.requires_grad):
            return False
        stamp = (weight.data_ptr(), weight._version)
        if self._zero is None or self._zero[0] != stamp:
            self._zero = (stamp, not bool(weight.detach().any()))
        return self._zero[1]

    def inter_frame(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [B*F, L, D] -> Out' [B*F, L, D_out]."""
        f = self.context.num_frames
        if x.dim() != 3 or f <= 0 or x.shape[0] % f:
            raise LayerkitError(
                f"inter-frame attention expects hidden states [B*F, L, D] with F={f}; got {tuple(x.shape)}."
            )
        b, length = x.shape[0] // f, x.shape[1]
        m = int(self.context.extras.get("reference_frame", reference_frame(f)))
        if not 0 <= m < f:
            raise LayerkitError(f"reference frame {m} is outside the {f} frames of this call.")
        x_m = x.unflatten(0, (b, f))[:, m]  # [B, L, D]
        key, value = attn.to_k(x_m), attn.to_v(x_m)  # frozen W_K, W_V: [B, L, inner]
        query = self.to_q(x)  # [B*F, L, inner]
        heads = attn.heads
        d = key.shape[-1] // heads
        # every frame's queries attend to the same L reference tokens: fold F into the queries
        q = query.reshape(b, f * length, heads, d).transpose(1, 2)  # [B, heads, F*L, d]
        k = key.view(b, length, heads, d).transpose(1, 2)
        v = value.view(b, length, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, heads, F*L, d]
        o = self.to_out(o.transpose(1, 2).reshape(b * f, length, heads * d))
        scale = self.context.scale_for(self.adapter.name, b * f, default=1.0)
        if isinstance(scale, torch.Tensor):
            return o * (scale.to(o.dtype).view(-1, 1, 1) * self.adapter.scale)
        scale = scale * self.adapter.scale
        return o if scale == 1 else o * scale


class InterFrameAttention(Adapter):
    """Trainable W_Q' and W_O' per spatial self-attention; everything else stays frozen."""

    def __init__(self, init_query: str = "copy", scale: float = 1.0, trainable: bool = True) -> None:
        super().__init__()
        if init_query not in ("copy", "random"):
            raise LayerkitError(f"init_query must be 'copy' (W_Q' = W_Q) or 'random'; got '{init_query}'.")
        self.init_query, self.scale, self.trainable = init_query, float(scale), bool(trainable)
        self.layers = nn.ModuleDict()
        self._originals: dict[str, tuple[nn.Module, Any]] = {}

    @staticmethod
    def key(module_name: str) -> str:
        return module_name.replace(".", "__")

    def attach(self, backbone: Backbone) -> None:
        if self.attached:
            raise LayerkitError(f"adapter '{self.name}' is already attached.")
        targets = spatial_self_attentions(backbone.denoiser)
        if not targets:
            raise LayerkitError(f"adapter '{self.name}' found no spatial self-attention (attn1) in the denoiser.")
        fresh = len(self.layers) == 0
        for name, attn in targets.items():
            key = self.key(name)
            if fresh:
                to_q = nn.Linear(attn.to_q.in_features, attn.to_q.out_features, bias=False)
                if self.init_query == "copy":
                    to_q.weight.data.copy_(attn.to_q.weight.data)
                to_out = nn.Linear(attn.to_q.out_features, attn.to_out[0].out_features, bias=False)
                nn.init.zeros_(to_out.weight)
                param = attn.to_q.weight
                self.layers[key] = nn.ModuleDict({"to_q": to_q, "to_out": to_out}).to(param.device, param.dtype)
            elif key not in self.layers:
                raise LayerkitError(f"adapter '{self.name}' has no weights for '{name}'; was it built for another UNet?")
            layer = self.layers[key]
            self._originals[name] = (attn, attn.processor)
            attn.set_processor(InterFrameProcessor(attn.processor, layer["to_q"], layer["to_out"], self,
                                                   backbone.context))
        self.layers.requires_grad_(self.trainable)
        self.attached = True

    def detach(self, backbone: Backbone) -> None:
        for attn, processor in self._originals.values():
            attn.set_processor(processor)
        self._originals.clear()
        self.attached = False
