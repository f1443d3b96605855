"""LLaVA-NeXT (anyres): the packed-token provenance against HF's own packing, VTC-CLS against eager
per-crop [CLS] attention, exact counts with the newline rule, keep-all bit-identical and the model
restored, batch equals single prompts, generate() equals a manual decode loop."""

import pytest
import torch
from conftest import PINPOINTS, sized_images
from reference import (
    assert_batch_matches_singles_and_loop,
    cls_attention_eager,
    greedy_with_logits,
    newlines_kept_by_hand,
    teacher_forced_logits,
    topk_reference,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokenprune as tp
from tokenprune.adapters.llava_next import LLAVA_NEXT, LlavaNextAdapter

SIZES = [(40, 70), (64, 48)]  # a 1x2 grid (unpadded rows) and a 2x2 grid (unpadded columns)
P = 16  # patches per 32-px crop


def inputs_for(tiny, sizes, seed=0, questions=None):
    questions = questions or ["what colour is the square"] * len(sizes)
    return tiny.inputs(questions, sized_images(sizes, seed))


def valid_crops(tiny, inputs) -> tuple[torch.Tensor, list[int]]:
    """`[C, 3, H, W]` every real crop of the batch (padding crops dropped), and crops per image."""
    crops = [
        image_size_to_num_patches(image_size=s, grid_pinpoints=PINPOINTS, patch_size=32)
        for s in inputs["image_sizes"].tolist()
    ]
    return torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], crops, strict=False)]), crops


@torch.no_grad()
def test_provenance_matches_hf_packing(tiny_next):
    """Gathering independently computed per-crop features by the layout reproduces HF's packed
    features token for token; newline positions hold `image_newline`."""
    model = tiny_next.model
    inputs = inputs_for(tiny_next, SIZES)
    pixels, crops = valid_crops(tiny_next, inputs)
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    per_crop = model.model.multi_modal_projector(hidden).flatten(0, 1)  # [C * P, D]
    packed = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
    ).pooler_output
    adapter = LlavaNextAdapter(model)
    for features, where in zip(
        packed, adapter.family.packing.layout(adapter, inputs["image_sizes"], crops), strict=False
    ):
        assert torch.equal(features[where >= 0], per_crop[where[where >= 0]])
        assert torch.equal(features[where < 0], model.model.image_newline.expand(int((where < 0).sum()), -1))
    assert (
        sorted(torch.cat(adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)).tolist())[-1]
        < sum(crops) * P
    )


@pytest.mark.parametrize("k", [1, 7, 20])
@torch.no_grad()
def test_vtc_cls_keeps_the_top_k_over_all_crops_and_rows_keep_their_newline(tiny_next, k):
    model = tiny_next.model
    inputs = inputs_for(tiny_next, SIZES, seed=1)
    with tp.apply(model, f"vtc-cls@{k}") as run:
        model(**inputs)
    pixels, crops = valid_crops(tiny_next, inputs)
    rows = cls_attention_eager(str(tiny_next.path), pixels)[-2].flatten()  # [C * P], block 2 of 4
    adapter = LlavaNextAdapter(model)
    stage, width = run.trace[0].stages[0], inputs["input_ids"].shape[1]
    row_lengths = []
    for i, where in enumerate(adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)):
        patch_ids = where[where >= 0]
        chosen = topk_reference(rows[patch_ids].tolist(), k)
        assert stage.kept[i].tolist() == patch_ids[chosen].tolist()
        positions = set((where >= 0).nonzero()[:, 0][chosen].tolist())
        kept = k + newlines_kept_by_hand(where.tolist(), positions, crops[i] > 1, P)
        row_lengths.append(width - len(where) + kept)  # text and padding columns stay
    assert stage.counts == [
        (len(w[w >= 0]), k) for w in adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)
    ]
    assert run.trace[0].seq_len_in == width and run.trace[0].seq_len_out == max(row_lengths)


@torch.no_grad()
def test_keep_all_is_bit_identical_and_the_model_is_restored(tiny_next):
    model = tiny_next.model
    inputs = inputs_for(tiny_next, SIZES, seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with tp.apply(model, "vtc-cls@1.0") as run:
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated)
        assert "get_image_features" in model.model.__dict__
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert run.trace[0].seq_len_in == run.trace[0].seq_len_out


@pytest.mark.parametrize("spec", ["vtc-cls@6", "vtc-cls-ensemble@0.25", "divprune@8", "tome@5"])
@torch.no_grad()
def test_batch_equals_single_prompts_and_generate_equals_manual_loop(tiny_next, spec):
    run = assert_batch_matches_singles_and_loop(
        tiny_next, spec, ["what colour is the square", "how many"], sized_images(SIZES, seed=3)
    )
    if spec == "vtc-cls@6":
        assert [len(k) for k in run.trace[0].stages[0].kept] == [6, 6]


def test_refusals_inside_the_tower_and_for_unequal_images_in_the_llm(tiny_next):
    with pytest.raises(
        tp.errors.PlaceError, match="'llava-next' adapter does not support; supported places: projector, llm"
    ):
        with tp.apply(tiny_next.model, "tome@8@vision:1"):
            pass
    inputs = inputs_for(tiny_next, SIZES)  # 48 and 64 patch tokens
    with pytest.raises(tp.errors.InputError, match="same number of patch tokens, but they bring \\[48, 64\\]"):
        with torch.no_grad(), tp.apply(tiny_next.model, "fastv@0.5@llm:1"):
            tiny_next.model(**inputs)


EQUAL = [(40, 70), (40, 70)]  # both 48 patch tokens, 4 grid rows


@pytest.mark.parametrize("k", [3, 10])
@torch.no_grad()
def test_fastv_keeps_the_top_k_patch_tokens_of_the_unpruned_models_eager_attention(tiny_next, k):
    from transformers import AutoModelForImageTextToText

    model = tiny_next.model
    inputs = inputs_for(tiny_next, EQUAL, seed=8)
    with tp.apply(model, f"fastv@{k}@llm:1") as run:
        model(**inputs)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_next.path, attn_implementation="eager").eval()
    attention = eager(**inputs, output_attentions=True).attentions[0].mean(dim=1)  # layer K-1 = 0
    adapter = LlavaNextAdapter(model)
    crops = adapter.family.packing.crops(adapter, inputs["image_sizes"], {})
    for b, where in enumerate(adapter.family.packing.layout(adapter, inputs["image_sizes"], crops)):
        columns = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0][where >= 0]  # patch columns
        chosen = topk_reference(attention[b, -1][columns].tolist(), k)
        assert run.trace[0].stages[0].kept[b].tolist() == where[where >= 0][chosen].tolist()


@pytest.mark.parametrize("spec", ["fastv@6@llm:1", "vtc-cls@12 > fastv@4@llm:2", "fastv@1.0@llm:1"])
@torch.no_grad()
def test_llm_stages_decode_like_a_manual_loop(tiny_next, spec):
    model = tiny_next.model
    inputs = inputs_for(tiny_next, EQUAL, seed=9, questions=["what colour is the square", "how many"])
    width = inputs["input_ids"].shape[1]
    reference = model(**inputs).logits
    with tp.apply(model, spec):
        if spec.startswith("fastv@1.0"):
            assert torch.equal(model(**inputs).logits, reference)
        generated = greedy_with_logits(model, inputs, 4)
        new = generated.sequences[:, width:]
        logits = teacher_forced_logits(model, inputs, new[:, :3])
    for step, step_logits in enumerate(logits):  # HF's own generate and forward differ by ~5e-4 here
        torch.testing.assert_close(generated.logits[step], step_logits, atol=2e-3, rtol=0)


def test_cli_runs_and_compares_on_a_saved_llava_next(tiny_next, tmp_path):
    import json

    from typer.testing import CliRunner

    from tokenprune.cli.app import app

    image = tmp_path / "wide.png"
    sized_images([(40, 70)])[0].save(image)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            str(tiny_next.path),
            "--image",
            str(image),
            "--prompt",
            "what colour",
            "--strategy",
            "vtc-cls@5",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stages"][0]["tokens_out"] == 5
    (tmp_path / "data.jsonl").write_text("\n".join([json.dumps({"image": "wide.png", "question": "what colour"})] * 2))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(tiny_next.path),
            "--data",
            str(tmp_path / "data.jsonl"),
            "--budgets",
            "0.5",
            "--json",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {"vtc-cls@0.5", "tome@0.5", "fastv@0.5"} <= {r["spec"] for r in rows}  # images of one size


@pytest.mark.parametrize("spec", ["vtc-cls@7", "tome@0.25"])
@torch.no_grad()
def test_images_of_one_size_pruned_together_equal_each_alone(tiny_next, spec):
    """Images of one size and crop count share a layout and are pruned as one batch."""
    model = tiny_next.model
    imgs = sized_images([(40, 70), (64, 48), (40, 70)], seed=6)
    questions = ["what colour is the square", "how many", "what colour"]
    inputs = tiny_next.inputs(questions, imgs)
    with tp.apply(model, spec) as run:
        batch = model(**inputs).logits[:, -1]
    crops = LLAVA_NEXT.packing.crops(LlavaNextAdapter(model), inputs["image_sizes"], {})
    for i, q in enumerate(questions):
        with tp.apply(model, spec) as alone:
            single = model(**tiny_next.inputs([q], [imgs[i]])).logits[0, -1]
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)
        first_crop = sum(crops[:i])  # the batch numbers crops across its images
        assert torch.equal(run.trace[0].stages[0].kept[i] - first_crop * P, alone.trace[0].stages[0].kept[0])
    counts = run.trace[0].stages[0].counts
    assert counts[0] == counts[2] != counts[1]
