"""Independent, slow, obvious reference implementations used by the tests."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration


def cls_attention_eager(path: str, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per block, `[I, N]` head-mean [CLS] attention over patches, from an eager-attention copy of
    the model run with `output_attentions=True` (the official VTC-CLS route)."""
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    return [a.mean(dim=1)[:, 0, 1:] for a in out.attentions]


def topk_reference(scores: list[float], k: int) -> list[int]:
    """The k best indices by (score descending, index ascending), returned ascending."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])
