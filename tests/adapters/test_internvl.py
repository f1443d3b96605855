"""InternVL (InternViT with [CLS], pixel shuffle, dynamic tiles plus a thumbnail): VTC-CLS against eager
per-tile [CLS] attention summed over each 2x2 unit by hand (with and without qk-norm), exact counts per
image across its tiles, keep-all bit-identical through generate with the model restored, batch equals
single prompts, generate() equals a manual decode loop, every strategy's contract, and the refusals."""

import json

import pytest
import torch
from conftest import IMAGE, INTERNVL_PATCH, TinyInternVL, build_tiny_internvl, sized_images
from reference import (
    assert_batch_matches_singles_and_loop,
    cls_attention_eager,
    greedy_with_logits,
    teacher_forced_logits,
    topk_reference,
)
from test_contract import STRATEGIES, check_contract

import tokenprune as tp

SIZES = [(40, 70), (64, 64)]  # 1x2 tiles + thumbnail (3 tiles), 2x2 tiles + thumbnail (5 tiles)
TILES = [3, 5]
U = 16  # units (LLM tokens) per tile: 8x8 patches shuffled 2x2
SIDE = IMAGE // INTERNVL_PATCH  # 8 patches per tile side
QUESTIONS = ["what colour is the square", "how many"]


def unit_scores_by_hand(row: list[float]) -> list[float]:
    """A tile's per-patch [CLS] attention (raster order) summed over each 2x2 unit (row-major units)."""
    half = SIDE // 2
    return [
        sum(row[(2 * r + i) * SIDE + 2 * c + j] for i in range(2) for j in range(2))
        for r in range(half)
        for c in range(half)
    ]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def qknorm(tmp_path_factory) -> TinyInternVL:
    from transformers import AutoModelForImageTextToText, GotOcr2ImageProcessorPil, PreTrainedTokenizerFast

    path = build_tiny_internvl(tmp_path_factory.mktemp("internvl-qknorm"), seed=12, use_qk_norm=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # RMSNorm weights start at one: make the qk-norm matter
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.weight.uniform_(0.2, 3.0)
            layer.attention.k_norm.weight.uniform_(0.2, 3.0)
    model.save_pretrained(path)
    return TinyInternVL(
        path, model, GotOcr2ImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


@pytest.mark.parametrize("k", [1, 7, 30])
@pytest.mark.parametrize("tower", ["plain", "qknorm"])
@torch.no_grad()
def test_vtc_cls_keeps_the_top_k_units_over_all_tiles_by_eager_cls_attention(tiny_internvl, qknorm, tower, k):
    tiny = tiny_internvl if tower == "plain" else qknorm
    model = tiny.model
    inputs = tiny.inputs(QUESTIONS, sized_images(SIZES, seed=1))
    assert inputs["pixel_values"].shape[0] == sum(TILES)
    with tp.apply(model, f"vtc-cls@{k}") as run:
        model(**inputs)
    rows = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[-2]  # [T, 64], block 2 of 4
    stage, first = run.trace[0].stages[0], 0
    for i, n in enumerate(TILES):
        scores = [s for t in range(first, first + n) for s in unit_scores_by_hand(rows[t].tolist())]
        assert stage.kept[i].tolist() == topk_reference(scores, k)
        torch.testing.assert_close(stage.scores[i], torch.tensor(scores), atol=1e-6, rtol=1e-5)
        first += n
    assert stage.counts == [(3 * U, k), (5 * U, k)]
    width = inputs["input_ids"].shape[1]
    assert run.trace[0].seq_len_in == width and run.trace[0].seq_len_out == max(width - 3 * U + k, width - 5 * U + k)


@torch.no_grad()
def test_ratio_budgets_are_per_image_across_its_tiles_and_several_images_share_a_prompt(tiny_internvl):
    model = tiny_internvl.model
    imgs = sized_images([(40, 70), (32, 32), (64, 64), (32, 100)], seed=2)  # 3, 1, 5 and 4 tiles
    inputs = tiny_internvl.inputs(QUESTIONS, imgs, per_prompt=2)
    with tp.apply(model, "vtc-cls@0.25") as run:
        model(**inputs)
    stage = run.trace[0].stages[0]
    assert stage.counts == [(48, 12), (16, 4), (80, 20), (64, 16)]
    assert stage.image_sample == [0, 0, 1, 1]
    assert [int(x.max()) < n for x, n in zip(stage.kept, [48, 16, 80, 64], strict=True)] == [True] * 4
    width = inputs["input_ids"].shape[1]
    assert run.trace[0].seq_len_out == max(width - 64 + 16, width - 144 + 36)  # padding columns stay


EQUAL = [(40, 70), (70, 40)]  # 3 tiles each: 48 units


@pytest.mark.parametrize(("sizes", "spec"), [(SIZES, "vtc-cls@1.0"), (EQUAL, "vtc-cls@1.0 > fastv@1.0@llm:1")])
@torch.no_grad()
def test_keep_all_is_bit_identical_through_generate_and_the_model_is_restored(tiny_internvl, sizes, spec):
    model = tiny_internvl.model
    inputs = tiny_internvl.inputs(QUESTIONS, sized_images(sizes, seed=3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hooks = hook_count(model)
    with tp.apply(model, spec) as run:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
    assert hook_count(model) == hooks
    assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert run.trace[0].seq_len_in == run.trace[0].seq_len_out
    assert [len(k) for k in run.trace[0].stages[0].kept] == ([48, 80] if sizes == SIZES else [48, 48])


@pytest.mark.parametrize(
    "spec", ["vtc-cls@6", "vtc-cls-ensemble@0.25", "fastervlm@5", "divprune@8", "tome@5", "vtc-cls@mass(0.5)"]
)
@torch.no_grad()
def test_batch_equals_single_prompts_and_generate_equals_manual_loop(tiny_internvl, spec):
    run = assert_batch_matches_singles_and_loop(tiny_internvl, spec, QUESTIONS, sized_images(SIZES, seed=4))
    stage = run.trace[0].stages[0]
    if spec == "vtc-cls@6":
        assert [len(k) for k in stage.kept] == [6, 6]
    if "mass" in spec:  # each image keeps the fewest units holding half its summed [CLS] attention
        for scores, kept in zip(stage.scores, stage.kept, strict=True):
            ranked = scores.sort(descending=True).values
            need = int((ranked.cumsum(0) < 0.5 * scores.sum()).sum()) + 1
            assert len(kept) == need


@pytest.mark.parametrize("spec", ["fastv@6@llm:1", "vtc-cls@12 > fastv@4@llm:2", "fastv@1.0@llm:1"])
@torch.no_grad()
def test_llm_stages_decode_like_a_manual_loop(tiny_internvl, spec):
    model = tiny_internvl.model
    inputs = tiny_internvl.inputs(QUESTIONS, sized_images(EQUAL, seed=5))
    width = inputs["input_ids"].shape[1]
    reference = model(**inputs).logits
    with tp.apply(model, spec) as run:
        if spec.startswith("fastv@1.0"):
            assert torch.equal(model(**inputs).logits, reference)
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        logits = teacher_forced_logits(model, inputs, new[:, :3], positions=False)  # as generate: none given
    for step, step_logits in enumerate(logits):
        torch.testing.assert_close(generated.logits[step], step_logits, atol=1e-5, rtol=1e-5)
    if spec == "fastv@6@llm:1":
        assert run.trace[0].layer_tokens == [width, width - 42, width - 42]


@pytest.mark.parametrize("k", [3, 10])
@torch.no_grad()
def test_fastv_keeps_the_top_k_units_of_the_unpruned_models_eager_attention(tiny_internvl, k):
    from transformers import AutoModelForImageTextToText

    inputs = tiny_internvl.inputs(QUESTIONS, sized_images(EQUAL, seed=6))
    with tp.apply(tiny_internvl.model, f"fastv@{k}@llm:1") as run:
        tiny_internvl.model(**inputs)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_internvl.path, attn_implementation="eager").eval()
    attention = eager(**inputs, output_attentions=True).attentions[0].mean(dim=1)  # layer K-1 = 0
    image = inputs["input_ids"] == tiny_internvl.model.config.image_token_id
    expected = [topk_reference(attention[b, -1][image[b]].tolist(), k) for b in range(2)]
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == expected


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_contract(tiny_internvl, name):
    """Every registered strategy on one-tile images (16 units each)."""
    check_contract(tiny_internvl, name)


def test_refusals_name_what_runs(tiny_internvl):
    model = tiny_internvl.model
    hooks = hook_count(model)
    with pytest.raises(tp.errors.PlaceError, match="'internvl' adapter does not support; supported places: projector"):
        with tp.apply(model, "tome@8@vision:1"):
            pass
    inputs = tiny_internvl.inputs(QUESTIONS, sized_images(SIZES))  # 48 and 80 units reach the LLM
    with pytest.raises(tp.errors.InputError, match="same number of tokens, but they bring \\[48, 80\\]"):
        with torch.no_grad(), tp.apply(model, "fastv@0.5@llm:1"):
            model(**inputs)
    short = dict(inputs, input_ids=inputs["input_ids"][:, 16:], attention_mask=inputs["attention_mask"][:, 16:])
    with pytest.raises(tp.errors.InputError, match="do not match the 8 tile\\(s\\) in pixel_values at 16 tokens"):
        with torch.no_grad(), tp.apply(model, "vtc-cls@4"):
            model(**short)
    assert hook_count(model) == hooks and "get_image_features" not in model.model.__dict__
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(tp.errors.InputError, match="needs vision_feature_select_strategy='default'"):
            with tp.apply(model, "vtc-cls@4"):
                pass
    finally:
        model.config.vision_feature_select_strategy = "default"


def test_list_shows_the_internvl_adapter_and_its_places():
    from typer.testing import CliRunner

    from tokenprune.cli.app import app

    result = CliRunner().invoke(app, ["list", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)["strategies"]}
    assert rows["internvl"]["supports"] == "InternVLForConditionalGeneration"
    assert rows["internvl"]["places"] == ["projector", "llm"] and rows["internvl"]["role"] == "adapter"
