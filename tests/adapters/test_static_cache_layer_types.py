"""Static caches on models whose LLM declares layer types (Qwen2: InternVL, LLaVA-OneVision, Qwen2-VL's
LLM): `generate` hands them a mapping of 4D masks by layer type, which the prompt rewrite reads through
`compat.full_attention_mask`. Keep-all equals the unpruned static-cache generate bit for bit; a pruned
static-cache generate equals the pruned dynamic-cache one."""

import pytest
import torch
from conftest import sized_images

import tokenprune as tp
from tokenprune.compat import full_attention_mask

SIZES = [(40, 70), (40, 70)]


@pytest.mark.parametrize(("fixture", "spec"), [("tiny_internvl", "vtc-cls@6"), ("tiny_onevision", "divprune@8")])
def test_static_cache_generate_with_a_mask_per_layer_type(request, fixture, spec):
    check_static_cache(request.getfixturevalue(fixture), spec)


def test_static_cache_generate_on_qwen2_vl(tiny_qwen):
    check_static_cache(tiny_qwen, "pool@4")


@torch.no_grad()
def check_static_cache(tiny, spec: str) -> None:
    model = tiny.model
    inputs = tiny.inputs(["what colour is the square", "how many"], sized_images(SIZES, seed=8))
    masks = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True
    )
    try:
        static = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
        reference = model.generate(**inputs, **static)
        assert isinstance(masks[0], dict) and "full_attention" in masks[0]  # what this test is about
        keep_all = spec.split("@")[0] + "@1.0"
        with tp.apply(model, keep_all):
            assert torch.equal(model.generate(**inputs, **static), reference)
        logits = dict(output_logits=True, return_dict_in_generate=True)
        with tp.apply(model, spec):
            pruned = model.generate(**inputs, **static, **logits)
            dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False, **logits)
    finally:
        hook.remove()
    assert torch.equal(pruned.sequences, dynamic.sequences)
    for a, b in zip(pruned.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_full_attention_mask():
    mask = torch.ones(1, 1, 2, 2)
    assert full_attention_mask({"full_attention": mask, "sliding_attention": None}) is mask
    assert full_attention_mask(mask) is mask and full_attention_mask(None) is None
