"""Qwen2-VL and Qwen2.5-VL: pruning the merged image tokens before the LLM keeps each kept token's original M-RoPE
position. Checked against the compressed prompt built by hand (kept features, positions from the
model's own `get_rope_index` over the full prompt), keep-all bit-identical, batch equals single
prompts, generate() equals a manual decode loop, and the refusals."""

from functools import partial

import pytest
import torch
from conftest import sized_images, with_video
from reference import greedy_with_logits, teacher_forced_logits

import tokenprune as tp

SIZES = [(40, 70), (64, 48)]  # merged grids 2x4 and 4x3
QUESTIONS = ["what colour is the square", "how many"]


@pytest.mark.parametrize(
    ("spec", "kept"), [("pool@4", (4, 4)), ("divprune@5", (5, 5)), ("tome@0.5", (4, 6)), ("uniform@3", (3, 3))]
)
@torch.no_grad()
def test_logits_equal_the_compressed_prompt_built_by_hand(tiny_qwen, spec, kept):
    model = tiny_qwen.model
    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(SIZES, seed=1))
    with tp.apply(model, spec) as run:
        got = model(**inputs).logits[:, -1]
    ids, mask, image = inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id
    positions, _ = model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
    )
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    ).pooler_output
    stage = run.trace[0].stages[0]
    rows, width = [], 0
    for b in range(2):  # one image per prompt: keep text and padding, and the kept image slots
        slots = (ids[b] == image).nonzero()[:, 0]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[slots] = False
        keep[slots[stage.kept[b]]] = True
        rows.append(keep)
        width = max(width, int(keep.sum()))
    for b in range(2):
        columns = rows[b].nonzero()[:, 0]
        embeds = model.model.get_input_embeddings()(ids[b, columns])
        is_image = ids[b, columns] == image
        if stage.weights is None:
            embeds[is_image] = features[b][stage.kept[b]]
        else:
            embeds[is_image] = stage.weights[b].to(features[b].dtype) @ features[b]
        out = model(
            inputs_embeds=embeds[None],
            attention_mask=mask[b, columns][None],
            position_ids=positions[:, b : b + 1, columns],
        ).logits[0, -1]
        torch.testing.assert_close(got[b], out, atol=1e-5, rtol=1e-5)
    assert stage.counts == [(8, kept[0]), (12, kept[1])]


@torch.no_grad()
def test_keep_all_is_bit_identical_and_the_model_is_restored(tiny_qwen):
    model = tiny_qwen.model
    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(SIZES, seed=2))
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tp.apply(model, "divprune@1.0") as run:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated)
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(model(**inputs).logits, reference)
    assert run.trace[0].stages[0].counts == [(8, 8), (12, 12)]


@pytest.mark.parametrize("spec", ["pool@4", "divprune@5", "random@6"])
@torch.no_grad()
def test_batch_equals_single_prompts_and_decode_logits_equal_a_manual_loop(tiny_qwen, spec):
    """Four decode steps' raw logits from generate() (its own M-RoPE position ids) equal a manual loop
    fed the same tokens without position ids (the adapter continues each row at its original next
    position plus its M-RoPE delta)."""
    model, imgs = tiny_qwen.model, sized_images(SIZES, seed=3)
    inputs = tiny_qwen.inputs(QUESTIONS, imgs)
    width = inputs["input_ids"].shape[1]
    with tp.apply(model, spec):
        batch = model(**inputs).logits[:, -1]
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        manual = teacher_forced_logits(model, inputs, new[:, :3], positions=False)
        singles = [model(**tiny_qwen.inputs([q], [imgs[i]])).logits[0, -1] for i, q in enumerate(QUESTIONS)]
    for step, logits in enumerate(manual):
        torch.testing.assert_close(generated.logits[step], logits, atol=1e-5, rtol=1e-5)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


def test_refusals_name_what_runs(tiny_qwen):
    with pytest.raises(tp.errors.SignalError, match="has no \\[CLS\\] token"):
        with tp.apply(tiny_qwen.model, "vtc-cls@4"):
            pass
    with pytest.raises(tp.errors.PlaceError, match="runs at vision:2, after block 1, whose output the projector"):
        with tp.apply(tiny_qwen.model, "tome@4@vision:2"):
            pass
    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(SIZES))  # 8 and 12 tokens reach the LLM
    with pytest.raises(tp.errors.InputError, match="same number of tokens, but they bring \\[8, 12\\]"):
        with torch.no_grad(), tp.apply(tiny_qwen.model, "fastv@0.5@llm:1"):
            tiny_qwen.model(**inputs)


EQUAL = [(40, 70), (40, 70)]  # both images 8 merged tokens


@pytest.mark.parametrize("k", [2, 5])
@torch.no_grad()
def test_fastv_keeps_the_top_k_of_the_unpruned_models_eager_attention(tiny_qwen, k):
    from reference import topk_reference
    from transformers import AutoModelForImageTextToText

    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(EQUAL, seed=5))
    with tp.apply(tiny_qwen.model, f"fastv@{k}@llm:1") as run:
        tiny_qwen.model(**inputs)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_qwen.path, attn_implementation="eager").eval()
    attention = eager(**inputs, output_attentions=True).attentions[0].mean(dim=1)  # layer K-1 = 0, [B, S, S]
    image = inputs["input_ids"] == tiny_qwen.model.config.image_token_id
    expected = [topk_reference(attention[b, -1][image[b]].tolist(), k) for b in range(2)]
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == expected
    width = inputs["input_ids"].shape[1]
    assert run.trace[0].layer_tokens == [width, width - (8 - k), width - (8 - k)]


@pytest.mark.parametrize("spec", ["fastv@4@llm:1", "pool@4 > fastv@2@llm:2", "fastv@4@llm:1 > uniform@0@llm:2"])
@torch.no_grad()
def test_llm_stages_decode_like_a_manual_loop(tiny_qwen, spec):
    model = tiny_qwen.model
    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(EQUAL, seed=6))
    width = inputs["input_ids"].shape[1]
    with tp.apply(model, spec):
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        manual = teacher_forced_logits(model, inputs, new[:, :3], positions=False)
    for step, logits in enumerate(manual):
        torch.testing.assert_close(generated.logits[step], logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_all_inside_the_llm_is_bit_identical(tiny_qwen):
    inputs = tiny_qwen.inputs(QUESTIONS, sized_images(EQUAL, seed=7))
    reference = tiny_qwen.model(**inputs).logits
    with tp.apply(tiny_qwen.model, "fastv@1.0@llm:1 > fastv@1.0@llm:2"):
        assert torch.equal(tiny_qwen.model(**inputs).logits, reference)


@torch.no_grad()
def test_videos_are_refused_also_when_generate_encodes_them(tiny_qwen):
    """`generate` encodes a video itself (`mm_encoder_outputs`): the core call has no `pixel_values_videos`,
    and is refused all the same (not an error inside the model's `get_rope_index`, nor video tokens
    left without their features)."""
    model = tiny_qwen.model
    inputs = with_video(tiny_qwen.inputs(QUESTIONS[:1], sized_images(SIZES[:1])), [1, 0])
    for call in (model, partial(model.generate, max_new_tokens=2, do_sample=False)):
        with pytest.raises(tp.errors.InputError, match="prunes images; videos are not supported yet"):
            with tp.apply(model, "pool@4"):
                call(**inputs)
