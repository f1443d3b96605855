"""`tokenprune.bench.archs`: the full-size entries build the published models."""

import torch

from tokenprune.bench.archs import build, image_tokens, inputs


def test_full_size_gemma3_shapes_match_the_published_sizes():
    """The Gemma 3 entries build the published models: 4.30B and 12.2B parameters, 256 soft tokens
    pooled 4x4 from SigLIP's 64x64 patches (built on the meta device: no memory)."""
    for arch, billions in (("gemma-3-4b-it", 4.30), ("gemma-3-12b-it", 12.19)):
        model = build(arch, torch.bfloat16, "meta")
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
        assert image_tokens(model) == 256 and model.model.multi_modal_projector.kernel_size == 4


def test_qwen3_vl_8b_shapes_build_the_published_model_size():
    """Built on the meta device (no memory): Qwen3-VL-8B-Instruct's 8.77B parameters (its model card),
    576 merged tokens for the 768x768 bench image, DeepStack after LLM layers 0-2."""
    model = build("qwen3-vl-8b", torch.bfloat16, "meta")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.77
    assert image_tokens(model) == 576 == len(inputs(model, 1, 576)["pixel_values"]) // 4
    assert model.config.vision_config.deepstack_visual_indexes == [8, 16, 24]
