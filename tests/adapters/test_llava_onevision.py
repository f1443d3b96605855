"""LLaVA-OneVision (SigLIP, no [CLS]; anyres_max_9 downsampling of large images): provenance against
HF's packing, exact counts with the newline rule, keep-all bit-identical and the model restored,
batch equals single prompts, generate() equals a manual decode loop, [CLS] scorers refused."""

import pytest
import torch
from conftest import sized_images
from reference import (
    assert_batch_matches_singles_and_loop,
    divprune_reference,
    greedy_with_logits,
    newlines_kept_by_hand,
    teacher_forced_logits,
)

import tokenprune as tp
from tokenprune.adapters.llava_onevision import LlavaOnevisionAdapter

SIZES = [(40, 70), (128, 120)]  # a 2x3 grid, and a 4x4 grid that HF downsamples (anyres_max_9)
P = 16


def adapter_for(model) -> LlavaOnevisionAdapter:
    adapter = LlavaOnevisionAdapter(model)
    return adapter


@torch.no_grad()
def test_provenance_matches_hf_packing_and_downsampled_tokens_point_into_their_image(tiny_onevision):
    model = tiny_onevision.model
    inputs = tiny_onevision.inputs(["what colour"] * 2, sized_images(SIZES))
    adapter = adapter_for(model)
    crops = adapter.family.packing.crops(adapter, inputs["image_sizes"], {})
    assert crops == [7, 17]  # a 2x3 grid plus the base image; 4x4 plus the base
    pixels = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], crops, strict=False)])
    per_crop = model.model.multi_modal_projector(
        model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    ).flatten(0, 1)
    packed = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
    ).pooler_output
    small, large = adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)
    assert torch.equal(packed[0][small >= 0], per_crop[small[small >= 0]])  # no interpolation: exact
    assert [len(small), len(large)] == [len(p) for p in packed]
    assert bool(((large[large >= 0] >= 7 * P) & (large[large >= 0] < 24 * P)).all())  # nearest patch, own crops


@torch.no_grad()
def test_keep_all_is_bit_identical_and_the_model_is_restored(tiny_onevision):
    model = tiny_onevision.model
    inputs = tiny_onevision.inputs(["what colour", "how many"], sized_images(SIZES, seed=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tp.apply(model, "divprune@1.0"):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated)
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("k", [1, 9])
@torch.no_grad()
def test_counts_follow_the_budget_and_the_newline_rule(tiny_onevision, k):
    model = tiny_onevision.model
    inputs = tiny_onevision.inputs(["what colour"] * 2, sized_images(SIZES, seed=2))
    with tp.apply(model, f"divprune@{k}") as run:
        model(**inputs)
    adapter = adapter_for(model)
    crops = adapter.family.packing.crops(adapter, inputs["image_sizes"], {})
    stage, width, lengths = run.trace[0].stages[0], inputs["input_ids"].shape[1], []
    for i, where in enumerate(adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)):
        patch_positions = (where >= 0).nonzero()[:, 0]
        provenance = where[patch_positions].tolist()
        kept_positions = {int(patch_positions[provenance.index(v)]) for v in stage.kept[i].tolist()}
        lengths.append(width - len(where) + k + newlines_kept_by_hand(where.tolist(), kept_positions, crops[i] > 1, P))
    assert stage.counts == [
        (int((w >= 0).sum()), k) for w in adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)
    ]
    assert run.trace[0].seq_len_out == max(lengths)


@pytest.mark.parametrize("spec", ["divprune@6", "tome@0.25", "random@5"])
@torch.no_grad()
def test_batch_equals_single_prompts_and_generate_equals_manual_loop(tiny_onevision, spec):
    assert_batch_matches_singles_and_loop(
        tiny_onevision, spec, ["what colour", "how many"], sized_images(SIZES, seed=3)
    )


@pytest.mark.parametrize("name", ["vtc-cls", "vtc-cls-ensemble", "fastervlm", "prumerge", "visionzip"])
def test_cls_scorers_are_refused_naming_what_runs_instead(tiny_onevision, name):
    with pytest.raises(
        tp.errors.SignalError,
        match=f"'{name}' scores tokens by \\[CLS\\] attention, but this model's vision "
        "encoder has no \\[CLS\\] token; use a scorer that needs none",
    ):
        with tp.apply(tiny_onevision.model, f"{name}@4"):
            pass


@pytest.mark.parametrize("k", [3, 12])
@torch.no_grad()
def test_divprune_keeps_the_reference_subset_of_each_images_packed_tokens(tiny_onevision, k):
    """DivPrune runs on each image's packed non-newline tokens (the projected features the LLM
    would see); its kept tokens equal an explicit-loop max-min reference on those features."""
    model = tiny_onevision.model
    inputs = tiny_onevision.inputs(["what colour"] * 2, sized_images(SIZES, seed=4))
    with tp.apply(model, f"divprune@{k}") as run:
        model(**inputs)
    packed = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
    ).pooler_output
    adapter = adapter_for(model)
    for i, (features, where) in enumerate(
        zip(
            packed,
            adapter.family.packing.layout(
                adapter, inputs["image_sizes"], adapter.family.packing.crops(adapter, inputs["image_sizes"], {})
            ),
            strict=False,
        )
    ):
        chosen = divprune_reference(features[where >= 0], k)
        assert run.trace[0].stages[0].kept[i].tolist() == where[where >= 0][chosen].tolist()


@torch.no_grad()
def test_fastv_inside_its_qwen2_llm(tiny_onevision):
    """Two images of one size (88 patch tokens each, after the 2x3 grid's unpadding): keep-all is
    bit-identical; FastV leaves exactly k patch tokens per image in layers K..; decode steps agree."""
    model = tiny_onevision.model
    inputs = tiny_onevision.inputs(["what colour", "how many"], sized_images([(40, 70), (40, 70)], seed=5))
    width, reference = inputs["input_ids"].shape[1], model(**inputs).logits
    with tp.apply(model, "fastv@1.0@llm:1"):
        assert torch.equal(model(**inputs).logits, reference)
    with tp.apply(model, "fastv@6@llm:1") as run:
        generated = greedy_with_logits(model, inputs, 3)
        logits = teacher_forced_logits(model, inputs, generated.sequences[:, width : width + 2])
    layer_tokens = run.trace[0].layer_tokens
    assert layer_tokens[1:] == [layer_tokens[0] - (88 - 6)] * 2 and run.trace[0].stages[0].tokens_out == 6
    for step, step_logits in enumerate(logits):
        torch.testing.assert_close(generated.logits[step], step_logits, atol=2e-3, rtol=0)


@torch.no_grad()
def test_siglip_probe_gives_key_norms_and_attention_received(tiny_onevision):
    """On a tower without [CLS], the probe's `PatchKeyNorm` is the L2 norm of each patch's key and
    its softmax `PatchAttention` column the mean over all queries of the full attention map."""
    from tokenprune.adapters.vision import VisionProbe
    from tokenprune.signals import PatchAttention, PatchKeyNorm

    tower = tiny_onevision.model.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[1].self_attn
    pixels = torch.randn(
        3, 3, tower.config.image_size, tower.config.image_size, generator=torch.Generator().manual_seed(0)
    )
    signals = {PatchKeyNorm(layer=1), PatchAttention(layer=1, axis="col", scores="softmax")}
    probe = VisionProbe({1: attn}, signals, has_cls=False)
    seen = {}
    handles = [*probe.attach(), attn.q_proj.register_forward_hook(lambda m, a, out: seen.update(q=out))]
    handles.append(attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(k=out)))
    try:
        tower(pixels)
    finally:
        for handle in handles:
            handle.remove()
    got = probe.values()
    torch.testing.assert_close(got[PatchKeyNorm(layer=1)], seen["k"].norm(dim=-1))
    q, k = (x.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for x in (seen["q"], seen["k"]))
    full = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, H, N, N]
    torch.testing.assert_close(got[PatchAttention(layer=1, axis="col", scores="softmax")], full.mean(2).mean(1))
