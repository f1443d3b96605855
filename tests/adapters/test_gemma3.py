"""Gemma 3 (SigLIP without [CLS], soft tokens pooled 2x2 from an 8x8 patch grid, an LLM whose image
tokens attend to each other both ways and whose local layers slide an 8-token window): keep-all
bit-identical through generate and the model restored, exact counts, logits equal to the
unmodified model fed the kept tokens (and their token_type_ids) by hand, the mask its layers get
after pruning against an independent reference, batch equals single prompts, generate equals a
manual decode loop, FoPru against a loop reference over pooling windows, and the refusals."""

import pytest
import torch
from conftest import images
from reference import assert_batch_matches_singles_and_loop, block_qk_eager, topk_reference

import tokenprune as tp
from tokenprune.adapters.pooled import bidirectional_image_mask

T = 16  # soft tokens per image
EQUAL = ["what colour", "how many"]  # prompts of one length: no padding
PADDED = ["what colour is the square", "how"]


def kept_columns(inputs: dict, kept: list[torch.Tensor], image_token: int) -> list[torch.Tensor]:
    """Per row (one image each), the prompt columns left: text and padding, and the kept soft tokens' slots."""
    columns = []
    for b, tokens in enumerate(kept):
        slots = (inputs["input_ids"][b] == image_token).nonzero()[:, 0]
        keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
        keep[slots] = False
        keep[slots[tokens]] = True
        columns.append(keep.nonzero()[:, 0])
    return columns


@torch.no_grad()
def test_keep_all_is_bit_identical_through_generate_and_the_model_is_restored(tiny_gemma3):
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(PADDED, images(2, seed=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for spec in ["divprune@1.0", "fopru@16", "pool@1.0"]:
        with tp.apply(model, spec) as run:
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
        assert run.trace[0].seq_len_out == run.trace[0].seq_len_in == inputs["input_ids"].shape[1]
    assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("k", [1, 5, 16])
@torch.no_grad()
def test_counts_follow_the_budget(tiny_gemma3, k):
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(PADDED, images(2, seed=2))
    with tp.apply(model, f"fopru@{k}") as run:
        model(**inputs)
    record, stage = run.trace[0], run.trace[0].stages[0]
    assert (stage.tokens_in, stage.tokens_out) == (T, k)
    assert [len(kept) for kept in stage.kept] == [k, k] and stage.image_sample == [0, 1]
    assert record.seq_len_out == inputs["input_ids"].shape[1] - T + k
    assert record.vision_tokens == [64] * 3  # per block: the 8x8 patches, no [CLS]


@pytest.mark.parametrize("spec", ["pool@4", "uniform@4", "divprune@5", "fopru@6", "tome@0.5", "random@3"])
@pytest.mark.parametrize("positions", ["contiguous", "original"])
@torch.no_grad()
def test_logits_equal_the_unmodified_model_fed_the_kept_tokens_by_hand(tiny_gemma3, spec, positions):
    """Each row alone, through the plain model: the kept soft tokens (or their merges) at their slots,
    `token_type_ids` and mask of the kept columns: HF builds the bidirectional image mask itself."""
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(EQUAL, images(2, seed=3))
    with tp.apply(model, spec, positions=positions) as run:
        got = model(**inputs).logits[:, -1]
    stage = run.trace[0].stages[0]
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # [2, T, D]
    image = model.config.image_token_id
    for b, columns in enumerate(kept_columns(inputs, stage.kept, image)):
        ids = inputs["input_ids"][b, columns]
        embeds = model.model.get_input_embeddings()(ids)
        merged = features[b][stage.kept[b]] if stage.weights is None else stage.weights[b] @ features[b]
        embeds[ids == image] = merged
        extra = {"position_ids": columns[None]} if positions == "original" else {}
        out = model(
            inputs_embeds=embeds[None],
            attention_mask=inputs["attention_mask"][b, columns][None],
            token_type_ids=inputs["token_type_ids"][b, columns][None],
            **extra,
        ).logits[0, -1]
        torch.testing.assert_close(got[b], out, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_llm_mask_keeps_the_image_rule_over_the_kept_tokens(tiny_gemma3):
    """The masks Gemma's global and sliding layers receive after pruning (a padded batch, rows
    shortened and re-padded) equal `bidirectional_image_mask` of the kept columns' token types and
    key mask: kept image tokens see each other both ways, text stays causal, padding is never a key."""
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(PADDED, images(2, seed=4))
    seen: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(module, args, kwargs):
            seen[i] = kwargs["attention_mask"]

        return hook

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with tp.apply(model, "divprune@5") as run:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    columns = kept_columns(inputs, run.trace[0].stages[0].kept, model.config.image_token_id)
    width = max(len(c) for c in columns)
    types = torch.zeros(2, width, dtype=torch.long)
    keys = torch.zeros(2, width, dtype=torch.long)
    for b, cols in enumerate(columns):  # left-padded to the longest row, as the rewrite pads
        types[b, width - len(cols) :] = inputs["token_type_ids"][b, cols]
        keys[b, width - len(cols) :] = inputs["attention_mask"][b, cols]
    assert (types.sum(1) == 5).all()
    real = keys.bool()[:, :, None]
    window = model.config.text_config.sliding_window
    for i, kind in enumerate(model.config.text_config.layer_types):
        mask = seen[i][:, 0] if seen[i].dtype == torch.bool else seen[i][:, 0] == 0
        expected = bidirectional_image_mask(types, keys, window if kind == "sliding_attention" else None)
        assert torch.equal(mask & real, expected & real), kind


@pytest.mark.parametrize(("spec", "k"), [("divprune@6", 6), ("fopru@0.25", 4), ("tome@4", 4), ("random@5", 5)])
@torch.no_grad()
def test_batch_equals_single_prompts_and_generate_equals_manual_loop(tiny_gemma3, spec, k):
    run = assert_batch_matches_singles_and_loop(tiny_gemma3, spec, PADDED, images(2, seed=5))
    assert run.trace[0].stages[0].tokens_out == k


@pytest.mark.parametrize("k", [3, 8])
@torch.no_grad()
def test_fopru_keeps_the_reference_soft_tokens(tiny_gemma3, k):
    """FoPru's significance per patch (head-mean logits of the last tower block, recomputed from its
    q/k projections), averaged by loops over each soft token's 2x2 window, column or row mean by
    the larger variance over soft tokens, top-k."""
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(EQUAL, images(2, seed=6))
    with tp.apply(model, f"fopru@{k}") as run:
        model(**inputs)
    query, keys = block_qk_eager(str(tiny_gemma3.path), inputs["pixel_values"], -1)
    heads = model.config.vision_config.num_attention_heads
    d = query.shape[-1] // heads
    for b in range(2):
        logits = (
            torch.stack(
                [
                    query[b, :, h * d : (h + 1) * d].double() @ keys[b, :, h * d : (h + 1) * d].double().T
                    for h in range(heads)
                ]
            ).mean(0)
            / d**0.5
        )  # [64, 64] patch to patch
        means = {}
        for axis, per_patch in (("col", logits.mean(0)), ("row", logits.mean(1))):
            means[axis] = torch.tensor(
                [
                    sum(float(per_patch[(2 * i + a) * 8 + 2 * j + c]) for a in range(2) for c in range(2)) / 4
                    for i in range(4)
                    for j in range(4)
                ]
            )
        sig = means["col"] if means["col"].var() > means["row"].var() else means["row"]
        assert run.trace[0].stages[0].kept[b].tolist() == topk_reference(sig.tolist(), k)


@pytest.mark.parametrize("name", ["vtc-cls", "vtc-cls-ensemble", "fastervlm", "prumerge", "visionzip"])
def test_cls_scorers_are_refused_naming_what_runs_instead(tiny_gemma3, name):
    with pytest.raises(
        tp.errors.SignalError,
        match=f"'{name}' scores tokens by \\[CLS\\] attention, but this model's vision "
        "encoder has no \\[CLS\\] token; use a scorer that needs none",
    ):
        with tp.apply(tiny_gemma3.model, f"{name}@4"):
            pass


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("fastv@4@llm:2", "llm:K stages are not supported on Gemma 3: .* prune at the projector"),
        ("divprune@8 > uniform@4@llm:1", "llm:K stages are not supported on Gemma 3"),
        (
            "tome@32@vision:1",
            "runs at vision:1, which the 'gemma3' adapter does not support; supported places: projector",
        ),
    ],
)
@torch.no_grad()
def test_places_it_cannot_run_are_refused_before_any_hook(tiny_gemma3, spec, match):
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(EQUAL, images(2, seed=7))
    reference = model(**inputs).logits
    with pytest.raises(tp.errors.PlaceError, match=match):
        tp.check(model, spec)
    with pytest.raises(tp.errors.PlaceError, match=match):
        with tp.apply(model, spec):
            pass
    assert torch.equal(model(**inputs).logits, reference)


@torch.no_grad()
def test_features_encoded_outside_the_context(tiny_gemma3):
    """Soft tokens encoded before the context: a score-free selector prunes them as it would
    pixel_values; a scorer that reads tower signals cannot get them and is refused."""
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(EQUAL, images(2, seed=8))
    encoded = {"image": model.model.get_image_features(inputs["pixel_values"], return_dict=True)}
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with tp.apply(model, "divprune@5"):
        expected = model(**inputs).logits
        assert torch.equal(model(**text, mm_encoder_outputs=dict(encoded)).logits, expected)
    with pytest.raises(tp.errors.InputError, match="not encoded inside tokenprune.apply"):
        with tp.apply(model, "fopru@5"):
            model(**text, mm_encoder_outputs=dict(encoded))
    with pytest.raises(tp.errors.InputError, match="not encoded inside tokenprune.apply"):
        with tp.apply(model, "fopru@5"):
            model(**inputs)  # the probe now holds these images' signals: stale for the next prefill
            model(**text, mm_encoder_outputs=dict(encoded))


@torch.no_grad()
def test_a_budget_rule_lets_images_keep_different_counts(tiny_gemma3):
    """`fopru(scores='softmax')@mass(0.5)`: each image keeps the fewest soft tokens whose (positive)
    scores hold half its total, counted by a loop here (8 and 7 for these images); the rows shorten
    by their own counts (the shorter left-padded) and the batch's logits equal each prompt's alone."""
    model = tiny_gemma3.model
    imgs = images(2, seed=11)
    inputs = tiny_gemma3.inputs(EQUAL, imgs)
    with tp.apply(model, "fopru(scores='softmax')@mass(0.5)") as run:
        batch = model(**inputs).logits[:, -1]
        singles = [model(**tiny_gemma3.inputs([q], [imgs[i]])).logits[0, -1] for i, q in enumerate(EQUAL)]
    stage = run.trace[0].stages[0]
    kept = [len(k) for k in stage.kept]
    for count, scores in zip(kept, stage.scores, strict=True):
        ranked = sorted((max(float(x), 0.0) for x in scores.double()), reverse=True)
        held = [sum(ranked[: c + 1]) for c in range(T)]
        assert count == next(c + 1 for c in range(T) if held[c] >= 0.5 * held[-1])
    assert kept[0] != kept[1] and stage.counts == [(T, kept[0]), (T, kept[1])]
    assert run.trace[0].seq_len_out == inputs["input_ids"].shape[1] - T + max(kept)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_static_cache_is_refused_and_the_model_left_as_it_was(tiny_gemma3):
    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(PADDED, images(2, seed=9))
    reference = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(
        tp.errors.InputError, match="mapping of per-layer-type attention masks .* use the default dynamic cache"
    ):
        with tp.apply(model, "divprune@4"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), reference)


@torch.no_grad()
def test_two_images_in_one_prompt_keep_their_own_bidirectional_blocks(tiny_gemma3):
    """One prompt holding two images (two placeholder runs between `<eoi>` and `<boi>`): each keeps
    k soft tokens, and the logits equal the plain model fed the kept tokens and token types by hand
    (two image blocks, each bidirectional on its own)."""
    model, config = tiny_gemma3.model, tiny_gemma3.model.config
    pixels = tiny_gemma3.image_processor(images=images(2, seed=10), return_tensors="pt")["pixel_values"]
    block = [config.boi_token_id] + [config.image_token_id] * T + [config.eoi_token_id]
    ids = torch.tensor([[2, *block, *block, *tiny_gemma3.tokenizer("how many", add_special_tokens=False).input_ids]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": (ids == config.image_token_id).long(),
        "pixel_values": pixels,
    }
    with tp.apply(model, "divprune@3") as run:
        got = model(**inputs).logits[0, -1]
    stage = run.trace[0].stages[0]
    assert stage.image_sample == [0, 0] and [len(k) for k in stage.kept] == [3, 3]
    slots = (ids[0] == config.image_token_id).nonzero()[:, 0].view(2, T)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[slots.flatten()] = False
    for i in range(2):
        keep[slots[i][stage.kept[i]]] = True
    columns = keep.nonzero()[:, 0]
    features = model.model.get_image_features(pixels).pooler_output
    embeds = model.model.get_input_embeddings()(ids[0, columns])
    embeds[ids[0, columns] == config.image_token_id] = torch.cat([features[i][stage.kept[i]] for i in range(2)])
    out = model(
        inputs_embeds=embeds[None],
        attention_mask=inputs["attention_mask"][:, columns],
        token_type_ids=inputs["token_type_ids"][:, columns],
    ).logits[0, -1]
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    assert run.trace[0].seq_len_out == ids.shape[1] - 2 * (T - 3)
