"""LayerDiffuse's SD 1.5 transparent attention (``layer_sd15_transparent_attn.safetensors``).

The file is not a plain LoRA. It holds one *attention-sharing unit* per attention of the
SD 1.5 spatial transformer blocks (32 of them: ``attn1`` and ``attn2`` of the 16 transformer
blocks), written with ``frames=1`` and no control encoder. Its keys, for unit ``N``::

    hookers.layers.N.{to_q_lora,to_k_lora,to_v_lora,to_out_lora}.0.{down,up}.weight
    hookers.layers.N.temporal_{i,q,k,v,o}.{weight,bias}
    hookers.layers.N.temporal_n.{weight,bias}                       (LayerNorm, eps 1e-6)

Shapes: ``down`` [rank, in], ``up`` [out, rank] (rank 256 in the published file), the
``temporal_*`` layers [D, D] with D the attention's inner width. Units follow the original
LDM order: every ``input_blocks.*`` attention, then ``output_blocks.*``, then
``middle_block.1``, ``attn1`` before ``attn2`` (the diffusers names are
``down_blocks.*``, ``up_blocks.*``, ``mid_block``: :func:`attention_order`).

What a unit computes with ``frames=1``, for the attention's input ``h`` (the normed hidden
states) and context ``c`` (``h`` for ``attn1``, the text for ``attn2``)::

    a = Attention(h (W_q + up_q down_q), c (W_k + up_k down_k), c (W_v + up_v down_v)) (W_o + up_o down_o) + b_o
    x = (h + a) / rescale_output_factor
    out = x + temporal_o(temporal_v(temporal_i(temporal_n(x)))) - h

The last line is the unit's cross-frame attention over a single frame: attention over one
token returns its value, so ``temporal_q``/``temporal_k`` drop out (they are loaded all the
same, so the file loads strictly). The q/k/v/out deltas alone could be merged into the UNet;
the ``temporal_*`` branch cannot (LayerNorm), so the units run as attention processors. The
merged projection weights are cached per unit while the weights stay unchanged.

The same units serve the SD 1.5 ``UNet2DConditionModel`` (stage 1) and the spatial layers of
an AnimateDiff ``UNetMotionModel`` (same module names); ``enabled`` switches them off without
removing them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerkit.errors import LayerkitError

#: published file name, for messages
PUBLISHED_NAME = "layer_sd15_transparent_attn.safetensors"
_KEY = re.compile(r"^hookers\.layers\.(\d+)\.(.+)$")
_PROJECTIONS = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")
_TEMPORAL = ("temporal_i", "temporal_q", "temporal_k", "temporal_v", "temporal_o")


# ----------------------------------------------------------------------------------------
# where the units go
# ----------------------------------------------------------------------------------------
def attention_order(unet: nn.Module) -> list[str]:
    """Diffusers module names of the spatial attentions in the file's unit order.

    Down blocks, then up blocks, then the mid block; in each transformer block ``attn1``
    then ``attn2``. Works for ``UNet2DConditionModel`` and ``UNetMotionModel`` alike (the
    motion modules are not spatial attentions and are skipped).
    """
    names: list[str] = []

    def add(prefix: str, block: nn.Module) -> None:
        for j, transformer in enumerate(getattr(block, "attentions", None) or []):
            for k, _ in enumerate(getattr(transformer, "transformer_blocks", [])):
                base = f"{prefix}.attentions.{j}.transformer_blocks.{k}"
                names.extend((f"{base}.attn1", f"{base}.attn2"))

    for i, block in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", block)
    for i, block in enumerate(unet.up_blocks):
        add(f"up_blocks.{i}", block)
    if getattr(unet, "mid_block", None) is not None:
        add("mid_block", unet.mid_block)
    return names


def ldm_name(name: str, layers_per_block: int) -> str:
    """The original LDM (ComfyUI/Forge) name of a diffusers spatial attention, e.g.
    ``down_blocks.0.attentions.1.transformer_blocks.0.attn1`` ->
    ``input_blocks.2.1.transformer_blocks.0.attn1`` (SD 1.5: 2 layers per block)."""
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m:
        kind, level, layer, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "down_blocks":
            return f"input_blocks.{1 + level * (layers_per_block + 1) + layer}.1.{rest}"
        return f"output_blocks.{level * (layers_per_block + 1) + layer}.1.{rest}"
    m = re.match(r"^mid_block\.attentions\.(\d+)\.(.+)$", name)
    if m:
        return f"middle_block.{1 + 2 * int(m.group(1))}.{m.group(2)}"
    raise LayerkitError(f"'{name}' is not a spatial attention of an SD UNet.")


def _module(root: nn.Module, name: str) -> nn.Module:
    module = root
    for part in name.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


# ----------------------------------------------------------------------------------------
# the units (module names match the published file)
# ----------------------------------------------------------------------------------------
class LowRankDelta(nn.Module):
    """``up.weight @ down.weight``: a weight delta [out, in] of rank ``rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)  # a fresh delta changes nothing

    def delta(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight


class TransparentAttentionUnit(nn.Module):
    """One attention's share of the file: four weight deltas and the one-frame temporal branch."""

    def __init__(self, attn: nn.Module, rank: int) -> None:
        super().__init__()
        inner = attn.to_k.out_features
        if attn.to_q.in_features != inner or attn.to_out[0].out_features != inner:
            raise LayerkitError(
                "LayerDiffuse transparent attention needs attentions whose query and output width equal "
                f"their inner width; got query {attn.to_q.in_features}, inner {inner}."
            )
        projections = {"to_q_lora": attn.to_q, "to_k_lora": attn.to_k, "to_v_lora": attn.to_v,
                       "to_out_lora": attn.to_out[0]}
        for key, linear in projections.items():
            setattr(self, key, nn.ModuleList([LowRankDelta(linear.in_features, linear.out_features, rank)]))
        for key in _TEMPORAL:
            setattr(self, key, nn.Linear(inner, inner))
        self.temporal_n = nn.LayerNorm(inner, eps=1e-6)
        nn.init.zeros_(self.temporal_o.weight)
        nn.init.zeros_(self.temporal_o.bias)  # a fresh unit's temporal branch adds nothing
        self._cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    def weight(self, key: str, base: nn.Linear) -> torch.Tensor:
        """``base.weight + up @ down`` in the base's dtype, cached while nothing changes."""
        lora = getattr(self, key)[0]
        w, down, up = base.weight, lora.down.weight, lora.up.weight
        if w.requires_grad or down.requires_grad or up.requires_grad:
            return w + (up @ down).to(w.dtype)
        stamp = (w.data_ptr(), w._version, down.data_ptr(), down._version, up.data_ptr(), up._version,
                 w.dtype, w.device)
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                merged = w + (up.float() @ down.float()).to(w.device, w.dtype)
            hit = (stamp, merged)
            self._cache[key] = hit
        return hit[1]

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = hidden_states
        if h.dim() != 3:
            raise LayerkitError(f"transparent attention expects hidden states [B, L, C]; got {tuple(h.shape)}.")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise LayerkitError("transparent attention supports the plain attentions of SD transformer blocks only.")
        c = h if context is None else (attn.norm_encoder_hidden_states(context) if attn.norm_cross else context)
        b, length, _ = h.shape
        heads = attn.heads
        q = F.linear(h, self.weight("to_q_lora", attn.to_q), attn.to_q.bias)
        k = F.linear(c, self.weight("to_k_lora", attn.to_k), attn.to_k.bias)
        v = F.linear(c, self.weight("to_v_lora", attn.to_v), attn.to_v.bias)
        d = k.shape[-1] // heads
        q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b)
            mask = mask.view(b, heads, -1, mask.shape[-1])
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        a = a.transpose(1, 2).reshape(b, length, heads * d).to(h.dtype)
        a = attn.to_out[1](F.linear(a, self.weight("to_out_lora", attn.to_out[0]), attn.to_out[0].bias))
        x = (h + a) / attn.rescale_output_factor
        x = x + self.temporal_o(self.temporal_v(self.temporal_i(self.temporal_n(x))))  # one frame: value
        return x - h


class _Hookers(nn.Module):
    """Holds the units as ``layers`` so state-dict keys read ``hookers.layers.N.…``."""

    def __init__(self, units: list[TransparentAttentionUnit]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(units)


class TransparentAttnProcessor:
    """A diffusers attention processor running one unit; with the owner disabled it hands the
    call to the processor it replaced. A plain object, so the unit's weights stay registered
    once (in :class:`TransparentAttention`), never inside the UNet."""

    def __init__(self, base: Any, unit: TransparentAttentionUnit, owner: TransparentAttention) -> None:
        self.base, self.unit, self.owner = base, unit, owner

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if not self.owner.enabled:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self.unit(attn, hidden_states, encoder_hidden_states, attention_mask)


class TransparentAttention(nn.Module):
    """All units for one UNet, in file order; ``state_dict`` keys are the published ones."""

    def __init__(self, unet: nn.Module, rank: int = 256) -> None:
        super().__init__()
        self.names = attention_order(unet)
        if not self.names:
            raise LayerkitError("this UNet has no spatial transformer attentions for the transparent attention.")
        self.rank = int(rank)
        self.hookers = _Hookers([TransparentAttentionUnit(_module(unet, n), self.rank) for n in self.names])
        self.enabled = True
        self._installed: dict[str, tuple[nn.Module, Any]] = {}

    @property
    def units(self) -> nn.ModuleList:
        return self.hookers.layers

    def install(self, unet: nn.Module) -> None:
        """Set a :class:`TransparentAttnProcessor` on every attention (over whatever processor is there)."""
        if self._installed:
            raise LayerkitError("the transparent attention is already installed.")
        names = attention_order(unet)
        if names != self.names:
            raise LayerkitError(
                f"the transparent attention was built for {len(self.names)} attentions, this UNet has {len(names)}."
            )
        for name, unit in zip(names, self.units, strict=True):
            attn = _module(unet, name)
            self._installed[name] = (attn, attn.processor)
            attn.set_processor(TransparentAttnProcessor(attn.processor, unit, self))

    def uninstall(self) -> None:
        for attn, processor in self._installed.values():
            attn.set_processor(processor)
        self._installed.clear()

    @contextlib.contextmanager
    def switched(self, enabled: bool) -> Iterator[TransparentAttention]:
        saved, self.enabled = self.enabled, bool(enabled)
        try:
            yield self
        finally:
            self.enabled = saved


# ----------------------------------------------------------------------------------------
# loading the published file
# ----------------------------------------------------------------------------------------
def file_layout(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(units, frames, rank) of an attention-sharing state dict; a clear error otherwise."""
    units, frames = set(), set()
    for key in state:
        m = _KEY.match(key)
        if m is None:
            raise LayerkitError(
                f"not a LayerDiffuse attention file: key '{key}' is not 'hookers.layers.N.…' "
                f"(the layout of {PUBLISHED_NAME})."
            )
        units.add(int(m.group(1)))
        rest = m.group(2)
        if rest.startswith("control_convs"):
            raise LayerkitError(
                "this LayerDiffuse attention file has control convolutions (a conditional model such as "
                "layer_sd15_fg2bg / bg2fg); layerkit loads the unconditional transparent attention only."
            )
        p = re.match(r"^to_q_lora\.(\d+)\.", rest)
        if p:
            frames.add(int(p.group(1)))
    if not units:
        raise LayerkitError("the LayerDiffuse attention file is empty.")
    if len(frames) != 1:
        raise LayerkitError(
            f"this LayerDiffuse attention file shares attention across {len(frames)} images (e.g. layer_sd15_joint); "
            f"layerkit loads the one-image transparent attention ({PUBLISHED_NAME}) only."
        )
    down = state.get("hookers.layers.0.to_q_lora.0.down.weight")
    if down is None or down.dim() != 2:
        raise LayerkitError("the LayerDiffuse attention file lacks hookers.layers.0.to_q_lora.0.down.weight.")
    return max(units) + 1, len(frames), int(down.shape[0])


def load_transparent_attention(unet: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *,
                               allow_pickle: bool = False) -> TransparentAttention:
    """Build the units for ``unet`` and load ``source`` (a file or a state dict) strictly:
    every key, every shape. Not installed yet: call :meth:`TransparentAttention.install`."""
    if isinstance(source, Mapping):
        state, where = dict(source), "the given state dict"
    else:
        from layerkit.io.weights import load_weights

        state, where = load_weights(source, allow_pickle=allow_pickle), f"'{source}'"
    units, _, rank = file_layout(state)
    module = TransparentAttention(unet, rank=rank)
    if units != len(module.units):
        raise LayerkitError(
            f"{where} holds {units} attention units but this UNet has {len(module.units)} spatial attentions "
            "(SD 1.5 has 32): the file was made for another model."
        )
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = wrong[0] if wrong else None
        detail = f" ({first}: {tuple(state[first].shape)} in the file, {tuple(own[first].shape)} here)" if first else ""
        raise LayerkitError(
            f"{where} does not fit this UNet's transparent attention: {len(missing)} missing keys (first "
            f"{missing[:2]}), {len(unexpected)} unexpected (first {unexpected[:2]}), {len(wrong)} with another "
            f"shape{detail}."
        )
    param = next(unet.parameters())
    module.load_state_dict({k: v.to(param.dtype) for k, v in state.items()}, strict=True)
    return module.to(param.device)


def merged_unet_state(unet: nn.Module, module: TransparentAttention) -> dict[str, torch.Tensor]:
    """The UNet's state dict with the q/k/v/out deltas merged in (what the units compute when
    their temporal branch is zero); used by tests and for exporting a plain LoRA-free UNet."""
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    suffix = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
    for name, unit in zip(module.names, module.units, strict=True):
        for key, target in suffix.items():
            w = f"{name}.{target}.weight"
            state[w] = state[w] + getattr(unit, key)[0].delta().detach().to(state[w].dtype)
    return state
