"""A CLIP-style contrastive loss (Radford et al. 2021, sec. 2.3), for pretraining the text encoders
of toy models: the symmetric cross-entropy between text and image features, with every item of the
same prompt a positive (a batch of rendered clips repeats prompts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss"]


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor,
                     prompt_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy of ``text`` and ``image`` features [N, D] at logit ``scale``,
    with every item of the same ``prompt_ids`` [N] a positive (the targets spread evenly over them)."""
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = scale * text @ image.T
    same = (prompt_ids[:, None] == prompt_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
