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


def manual_greedy(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one prefill, then one cached forward per token, passing the
    attention mask and position ids as generate() builds them. Returns `[B, steps]` new tokens."""
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(**inputs, position_ids=positions, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)
