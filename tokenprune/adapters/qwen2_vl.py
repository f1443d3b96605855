"""Qwen2-VL / Qwen2.5-VL: prunes each image's merged tokens (after the 2x2 patch merger) before the
LLM (`TowerMerged` packing); kept tokens keep their original 3D (M-RoPE) position ids (`MRope`).

* No [CLS] token: [CLS]-based scorers are refused (no substitute score is made up); score-free
  selectors (`divprune`, `tome`, `pool`, `uniform`) and `random` run. Grid selectors use each image's
  merged grid (`h/2 x w/2` for a single frame).
* Budget per image: `k` tokens, a ratio of the image's merged tokens, or a budget rule on its
  scores; images of one grid run as one batch.
* Positions: the model's M-RoPE rule for images over the full prompt, computed on the device
  (`mrope.rope_index`, equal to its `get_rope_index` without its host reads), gathered at the kept
  columns; later tokens continue at their original position plus the row's M-RoPE delta. The
  `positions` option of `tp.apply` does not apply. Videos are refused.
* Places: `vision:L`, `projector` and `llm:K` (the decoder layers get M-RoPE already combined into
  their rotary tables, so FastV, DART and VTW run as on LLaMA). Inside the tower (`qwen_tower`),
  stages keep or merge whole merge units before block `L`; the LLM gets the kept units at their
  original M-RoPE positions. Vision signals (attention received or given, keys, key norms, per
  merge unit) come from the tower blocks' fused `qkv` (`qwen_tower`); [CLS] signals are refused.
"""

from __future__ import annotations

from ..registry import register_adapter
from .engine import Engine
from .family import Family, Layout
from .mrope import MRope
from .providers import DECODER
from .qwen_tower import QWEN_TOWER, TowerMerged

QWEN2_VL = Family(
    model_classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    packing=TowerMerged(),
    layout=Layout(tower=("visual",), blocks=("blocks",), attention="attn", embeddings=(), feature_layer=None),
    positions=MRope(),
    places=("vision", "projector", "llm"),
    ragged_places=("projector",),
    providers=(QWEN_TOWER, DECODER),
    no_signals="use e.g. fopru, visionzip(dominant=received) or a score-free selector (divprune, tome, pool, uniform)",
    tower_stages=True,
)


@register_adapter("qwen2-vl")
class Qwen2VLAdapter(Engine):
    """Qwen2-VL and Qwen2.5-VL: prunes each image's merged tokens before the LLM, M-RoPE positions kept."""

    family = QWEN2_VL
