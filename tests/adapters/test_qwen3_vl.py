"""Qwen3-VL: pruning the merged image tokens before the LLM prunes each DeepStack layer's features
with the same kept units, and kept tokens keep their original M-RoPE positions. Checked against
the unmodified model fed the kept tokens by hand (its own features and DeepStack features at the
kept units, through its `mm_encoder_outputs` input, with the kept columns' original positions),
keep-all bit-identical, batch equals single prompts, generate() equals a manual decode loop,
FastV against the eager attention of a QK-normed decoder, and the refusals."""

from functools import partial
from typing import ClassVar

import pytest
import torch
from conftest import sized_images, with_video
from reference import greedy_with_logits, teacher_forced_logits, topk_reference
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import tokenprune as tp
from tokenprune.adapters.qwen3_vl import deepstack_kept
from tokenprune.budget import parse_rule

SIZES = [(40, 70), (64, 48)]  # merged grids 2x4 and 4x3
EQUAL = [(40, 70), (40, 70)]  # both images 8 merged tokens
QUESTIONS = ["what colour is the square", "how many"]


def fed_by_hand(model, inputs, kept, weights, deepstack=True):
    """Last-token logits `[B, V]` of the unmodified model, each prompt alone, fed only its image's kept
    units (`kept[b]` `[k]`, merged by `weights[b]` `[k, N]` when not None): the prompt keeps text and the
    kept placeholders, the image features and (with `deepstack`) each DeepStack layer's features go in
    through `mm_encoder_outputs`, positions are the full prompt's M-RoPE ids at the kept columns."""
    ids, mask, image = inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id
    positions, _ = model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
    )
    encoded = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    )
    out = []
    for b in range(ids.shape[0]):  # one image per prompt
        slots = (ids[b] == image).nonzero()[:, 0]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[slots] = False
        keep[slots[kept[b]]] = True
        columns = keep.nonzero()[:, 0]

        def at_kept(features, b=b):
            return features[kept[b]] if weights[b] is None else weights[b].to(features.dtype) @ features

        layers = encoded.deepstack_features if deepstack else [[torch.zeros_like(f) for f in encoded.pooler_output]]
        image_outputs = BaseModelOutputWithDeepstackFeatures(
            pooler_output=(at_kept(encoded.pooler_output[b]),),
            deepstack_features=[(at_kept(layer[b]),) for layer in layers],
        )
        logits = model(
            input_ids=ids[b, columns][None],
            attention_mask=mask[b, columns][None],
            position_ids=positions[:, b : b + 1, columns],
            mm_encoder_outputs={"image": image_outputs},
        ).logits
        out.append(logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("spec", "kept"), [("pool@4", (4, 4)), ("divprune@5", (5, 5)), ("tome@0.5", (4, 6)), ("uniform@3", (3, 3))]
)
@torch.no_grad()
def test_logits_equal_the_unmodified_model_fed_the_kept_tokens_by_hand(tiny_qwen3, spec, kept):
    model = tiny_qwen3.model
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(SIZES, seed=1))
    with tp.apply(model, spec) as run:
        got = model(**inputs).logits[:, -1]
    stage = run.trace[0].stages[0]
    assert stage.counts == [(8, kept[0]), (12, kept[1])]
    weights = stage.weights if stage.weights is not None else [None, None]
    expected = fed_by_hand(model, inputs, stage.kept, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the DeepStack features matter here: without them the logits differ (so the test above can fail)
    without = fed_by_hand(model, inputs, stage.kept, weights, deepstack=False)
    assert (without - expected).abs().max() > 1e-3


class FeatureNorm(tp.ScoringStrategy):
    """A scorer that needs no [CLS] (unregistered, for this test): each token's feature norm."""

    name: ClassVar[str] = "test-qwen3-feature-norm"

    def score(self, ctx):
        return ctx.tokens.float().norm(dim=-1)


@torch.no_grad()
def test_a_budget_rule_keeps_different_counts_per_image_and_their_own_deepstack_features(tiny_qwen3):
    model = tiny_qwen3.model
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(SIZES, seed=9))
    pipe = tp.Pipeline([tp.Stage(scorer=FeatureNorm(), budget=parse_rule("mass(0.5)"))])
    with tp.apply(model, pipe) as run:
        got = model(**inputs).logits[:, -1]
    stage = run.trace[0].stages[0]
    assert stage.counts is not None and [c[0] for c in stage.counts] == [8, 12]
    assert len(set(stage.kept_per_image())) > 1
    torch.testing.assert_close(got, fed_by_hand(model, inputs, stage.kept, [None, None]), atol=1e-5, rtol=1e-5)


def test_deepstack_kept_gathers_a_dropped_image_and_merges_a_merged_one():
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)) for _ in range(2)]
    merge = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0.25, 0.75]])
    out = deepstack_kept(layers, [torch.tensor([1, 3]), torch.tensor([0, 5])], [None, merge])
    for (first, second), features in zip(layers, out, strict=True):
        expected = [first[1], first[3], 0.5 * second[0] + 0.5 * second[1], 0.25 * second[4] + 0.75 * second[5]]
        torch.testing.assert_close(features, torch.stack(expected))


@torch.no_grad()
def test_keep_all_is_bit_identical_and_the_model_is_restored(tiny_qwen3):
    model = tiny_qwen3.model
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(SIZES, seed=2))
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tp.apply(model, "divprune@1.0") as run:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated)
    assert "get_image_features" not in model.model.__dict__
    assert not any(layer._forward_hooks for layer in model.model.language_model.layers)
    assert torch.equal(model(**inputs).logits, reference)
    assert run.trace[0].stages[0].counts == [(8, 8), (12, 12)]


@pytest.mark.parametrize("spec", ["pool@4", "divprune@5", "random@6"])
@torch.no_grad()
def test_batch_equals_single_prompts_and_decode_logits_equal_a_manual_loop(tiny_qwen3, spec):
    """Four decode steps' raw logits from generate() (its own M-RoPE position ids) equal a manual loop
    fed the same tokens without position ids; each prompt of the batch equals it run alone."""
    model, imgs = tiny_qwen3.model, sized_images(SIZES, seed=3)
    inputs = tiny_qwen3.inputs(QUESTIONS, imgs)
    width = inputs["input_ids"].shape[1]
    with tp.apply(model, spec):
        batch = model(**inputs).logits[:, -1]
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        manual = teacher_forced_logits(model, inputs, new[:, :3], positions=False)
        singles = [model(**tiny_qwen3.inputs([q], [imgs[i]])).logits[0, -1] for i, q in enumerate(QUESTIONS)]
    for step, logits in enumerate(manual):
        torch.testing.assert_close(generated.logits[step], logits, atol=1e-5, rtol=1e-5)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


def test_refusals_name_what_runs(tiny_qwen3):
    model = tiny_qwen3.model
    with pytest.raises(tp.errors.SignalError, match="has no \\[CLS\\] token"):
        with tp.apply(model, "vtc-cls@4"):
            pass
    with pytest.raises(
        tp.errors.PlaceError, match="'qwen3-vl' adapter does not support; supported places: projector, llm"
    ):
        with tp.apply(model, "tome@4@vision:1"):
            pass
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(SIZES))  # 8 and 12 tokens reach the LLM
    with pytest.raises(tp.errors.InputError, match="same number of tokens, but they bring \\[8, 12\\]"):
        with torch.no_grad(), tp.apply(model, "fastv@0.5@llm:1"):
            model(**inputs)


def layers_by_hand(model, inputs, kept, weights, at):
    """Last-token logits `[V]` of one prompt (one image, no padding) through the model's own decoder
    layers called one by one: DeepStack layer `i`'s features added at the image columns after layer
    `i`, and before layer `at` the sequence cut to the text and the image tokens `kept` `[k]` (their
    rotary tables at the kept columns; their hidden states and DeepStack features gathered there, or
    merged by `weights` `[k, N]`)."""
    core, lm = model.model, model.model.language_model
    ids, image_id = inputs["input_ids"], model.config.image_token_id
    encoded = core.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    )
    positions, _ = core.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    image = ids[0] == image_id
    hidden = lm.embed_tokens(ids)
    hidden[0, image] = encoded.pooler_output[0]
    deepstack = [layer[0] for layer in encoded.deepstack_features]
    cos, sin = lm.rotary_emb(hidden, positions)

    def reduce(tokens):  # [N, D] -> [k, D]
        return tokens[kept] if weights is None else weights.to(tokens.dtype) @ tokens

    for index, layer in enumerate(lm.layers):
        if index == at:
            slots = image.nonzero()[:, 0]
            keep = ~image
            keep[slots[kept]] = True
            merged = reduce(hidden[0, image])
            hidden, cos, sin, image = hidden[:, keep], cos[:, keep], sin[:, keep], image[keep]
            hidden[0, image] = merged
            deepstack = [reduce(features) for features in deepstack]
        hidden = layer(hidden, position_embeddings=(cos, sin), attention_mask=None)
        if index < len(deepstack):
            hidden[0, image] = hidden[0, image] + deepstack[index]
    return model.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize(
    ("spec", "k", "at"),
    [
        ("fastv@3@llm:1", 3, 1),
        ("fastv+group-merge@3@llm:1", 3, 1),
        ("fastv+divprune@5@llm:1", 5, 1),
        ("fastv@4@llm:2", 4, 2),
    ],
)
@torch.no_grad()
def test_an_llm_stage_inside_the_deepstack_layers_equals_the_layers_run_by_hand(tiny_qwen3, spec, k, at):
    """DeepStack adds features after layers 0 and 1: a stage at llm:1 prunes (or merges) between the
    two additions, and the second adds each kept token's own features (merged alike) at its new
    column; at llm:2 the stage runs after both."""
    model, imgs = tiny_qwen3.model, sized_images(SIZES, seed=8)
    for i, question in enumerate(QUESTIONS):
        inputs = tiny_qwen3.inputs([question], [imgs[i]])
        with tp.apply(model, spec) as run:
            got = model(**inputs).logits[0, -1]
        stage = run.trace[0].stages[0]
        assert len(stage.kept[0]) == k
        assert run.trace[0].layer_tokens[at:] == [inputs["input_ids"].shape[1] - (8, 12)[i] + k] * (4 - at)
        weights = None if stage.weights is None else stage.weights[0]
        assert (weights is not None) == ("merge" in spec)
        torch.testing.assert_close(got, layers_by_hand(model, inputs, stage.kept[0], weights, at), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 5])
@torch.no_grad()
def test_fastv_keeps_the_top_k_of_the_unpruned_models_eager_attention(tiny_qwen3, k):
    """Qwen3's decoder norms queries and keys per head before the rotary embedding: FastV's scores
    read the normed ones, as the model's own eager attention does (layer 1 here, after a DeepStack
    addition)."""
    from transformers import AutoModelForImageTextToText

    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(EQUAL, seed=5))
    with tp.apply(tiny_qwen3.model, f"fastv@{k}@llm:2") as run:
        tiny_qwen3.model(**inputs)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_qwen3.path, attn_implementation="eager").eval()
    attention = eager(**inputs, output_attentions=True).attentions[1].mean(dim=1)  # layer K-1 = 1, [B, S, S]
    image = inputs["input_ids"] == tiny_qwen3.model.config.image_token_id
    expected = [topk_reference(attention[b, -1][image[b]].tolist(), k) for b in range(2)]
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == expected
    width = inputs["input_ids"].shape[1]
    assert run.trace[0].layer_tokens == [width, width, width - (8 - k), width - (8 - k)]


@pytest.mark.parametrize("spec", ["fastv@4@llm:1", "pool@4 > fastv@2@llm:3", "fastv@4@llm:1 > uniform@0@llm:2"])
@torch.no_grad()
def test_llm_stages_decode_like_a_manual_loop(tiny_qwen3, spec):
    model = tiny_qwen3.model
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(EQUAL, seed=6))
    width = inputs["input_ids"].shape[1]
    with tp.apply(model, spec):
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        manual = teacher_forced_logits(model, inputs, new[:, :3], positions=False)
    for step, logits in enumerate(manual):
        torch.testing.assert_close(generated.logits[step], logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_all_inside_the_llm_is_bit_identical(tiny_qwen3):
    inputs = tiny_qwen3.inputs(QUESTIONS, sized_images(EQUAL, seed=7))
    reference = tiny_qwen3.model(**inputs).logits
    with tp.apply(tiny_qwen3.model, "fastv@1.0@llm:1 > fastv@1.0@llm:2"):
        assert torch.equal(tiny_qwen3.model(**inputs).logits, reference)


@torch.no_grad()
def test_videos_are_refused_also_when_generate_encodes_them(tiny_qwen3):
    """As on Qwen2-VL (its frames apart, as Qwen3-VL's `get_rope_index` wants them inside `generate`)."""
    model = tiny_qwen3.model
    inputs = with_video(tiny_qwen3.inputs(QUESTIONS[:1], sized_images(SIZES[:1])), [1, 1])
    for call in (model, partial(model.generate, max_new_tokens=2, do_sample=False)):
        with pytest.raises(tp.errors.InputError, match="prunes images; videos are not supported yet"):
            with tp.apply(model, "pool@4"):
                call(**inputs)
