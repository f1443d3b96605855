"""Adapter of the example plugin; importing this module registers it.

VipLLaVA (`VipLlavaForConditionalGeneration`) is LLaVA-1.5 with a projector that reads several CLIP
blocks' patch features concatenated, `[I, N, D * len(vision_feature_layer)]`, and never the [CLS]
feature. Its parts sit where LLaVA's do (the default `Layout`), its features are packed as LLaVA's
(`Plain`), so the whole family is one record for tokenprune's engine. Its provider table adds the
plugin's own signal (`PatchHiddenNorm`) to the built-in ones.
"""

import tokenprune as tp
from tokenprune.adapters import Engine, Family
from tokenprune.adapters.packing import Plain
from tokenprune.adapters.providers import DECODER, QK_PROBE

from .signals import HIDDEN_NORM

VIPLLAVA = Family(
    model_classes=("VipLlavaForConditionalGeneration",),
    packing=Plain(),
    places=("vision", "projector", "llm"),
    ragged_places=("projector",),
    feature_keys=("vision_feature_layer",),
    keeps_cls=lambda config: False,  # the projector never reads the [CLS] feature
    providers=(QK_PROBE, DECODER, HIDDEN_NORM),
)


@tp.register_adapter("example-vipllava")
class VipLlavaAdapter(Engine):
    """VipLLaVA (plugin example): prunes inside the tower, before the projector and inside the LLM."""

    family = VIPLLAVA
