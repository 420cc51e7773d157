"""``layerflow.layer_embedding``: LayerFlow's layer embedder (sec. 3.1).

Each prompt block k (0 foreground, 1 background, 2 blended) is encoded on its own and the blocks
are concatenated along tokens. A learnable ``Linear(1 -> D)`` followed by ``LayerNorm(D)`` maps
the scalar index k to a vector that is added to every projected text token of block k, i.e. to
the output of ``patch_embed.text_proj`` of a diffusers CogVideoX transformer [B, K*L, D]. Video
tokens are untouched. At initialisation the added vector is ``LayerNorm(W k + b)`` with PyTorch's
default init, as in the released code (``Basic3DPositionEmbeddingMixin.txt_embedder``).

The block index [1, K*L] comes from ``Backbone.encode_prompt_blocks`` through ``cond``; the
CogVideoX backbone publishes it in ``StepContext.extras["prompt_block_index"]`` for the call.
A backbone that does not publish it can still be used with ``num_blocks`` (equal blocks).
Earlier stages' embeddings load through ``init_from`` like every other weight.
"""

from __future__ import annotations

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone


class LayerEmbedding(Adapter):
    def __init__(self, hidden: int | None = None, trainable: bool = True, num_blocks: int | None = None,
                 scale: float = 1.0, weights: str | None = None) -> None:
        super().__init__()
        if weights is not None:
            raise LayerkitError("adapters.<name>.weights was replaced by init_from: [PATH, ...] (earlier stages' "
                                "weights.safetensors, loaded in order into the model and its adapters).")
        self.trainable, self.num_blocks, self.scale = bool(trainable), num_blocks, float(scale)
        self.embed: nn.Sequential | None = self._make(hidden) if hidden else None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _make(self, hidden: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(1, hidden), nn.LayerNorm(hidden))

    def attach(self, backbone: Backbone) -> None:
        proj = getattr(getattr(backbone.denoiser, "patch_embed", None), "text_proj", None)
        if not isinstance(proj, nn.Linear):
            raise LayerkitError(f"adapter '{self.name}' needs a denoiser with patch_embed.text_proj (CogVideoX); "
                                f"{type(backbone.denoiser).__name__} has none.")
        if self.embed is None:
            self.embed = self._make(proj.out_features)
        if self.embed[0].out_features != proj.out_features:
            raise LayerkitError(f"adapter '{self.name}' has width {self.embed[0].out_features}; the text tokens have "
                                f"{proj.out_features}.")
        self.embed.to(proj.weight.device)  # weights stay in their own dtype; the output is cast to the tokens'
        self.embed.requires_grad_(self.trainable)
        self._handle = proj.register_forward_hook(self._hook(backbone))
        self.attached = True

    def detach(self, backbone: Backbone) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.attached = False

    def block_index(self, backbone: Backbone, tokens: int, device: torch.device) -> torch.Tensor:
        """The prompt block of each text token: [T] or [B, T]."""
        index = backbone.context.extras.get("prompt_block_index")
        if index is None:
            if not self.num_blocks or tokens % self.num_blocks:
                raise LayerkitError(
                    f"adapter '{self.name}' got no prompt_block_index from the backbone; set num_blocks (the prompt "
                    f"blocks, dividing the {tokens} text tokens) for a backbone that does not publish it."
                )
            index = torch.arange(self.num_blocks, device=device).repeat_interleave(tokens // self.num_blocks)
        if index.shape[-1] != tokens:
            raise LayerkitError(f"adapter '{self.name}': prompt_block_index covers {index.shape[-1]} tokens, "
                                f"the text has {tokens}.")
        return index.to(device)

    def layer_embedding(self, index: torch.Tensor) -> torch.Tensor:
        """Block indices [...] -> embeddings [..., D]."""
        weight = self.embed[0].weight
        return self.embed(index.to(weight.device, weight.dtype).unsqueeze(-1))

    def _hook(self, backbone: Backbone):
        context = backbone.context

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            emb = self.layer_embedding(self.block_index(backbone, output.shape[1], output.device))
            emb = emb.to(output.device, output.dtype)  # under CPU offload the embedding may sit elsewhere
            s = context.scale_for(self.name, output.shape[0], default=self.scale) if context.active else self.scale
            if isinstance(s, torch.Tensor):
                s = s.to(output.device, output.dtype).view(-1, 1, 1)
            return output + s * emb

        return hook
