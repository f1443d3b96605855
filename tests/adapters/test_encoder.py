"""Stages inside the vision encoder (`vision:L`): ToMe with proportional attention against an
independent reference (merged tokens duplicated by their size, blocks run unmodified), drops against
blocks run on the kept tokens, composition with projector stages, token counts and FLOPs."""

import pytest
import torch
from conftest import N_PATCHES, images
from reference import cls_attention_eager, tome_reference, topk_reference
from test_contract import check_contract

import tokenprune as tp
from tokenprune.flops import layer_flops

FEATURE_BLOCK = 2  # the tiny tower has 4 blocks; LLaVA's vision_feature_layer=-2 reads block 2


def tower(model):
    return getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)


def blocks(model, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Run encoder blocks `start..stop-1` on `hidden` `[I, T, D]`, unmodified."""
    for layer in tower(model).encoder.layers[start:stop]:
        hidden = layer(hidden, None)
    return hidden


def projector_input(model, inputs: dict, spec: str):
    """The features reaching the projector, and the run, under `spec`."""
    seen = []
    with torch.no_grad(), tp.apply(model, spec) as run:
        handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            model(**inputs)
        finally:
            handle.remove()
    return seen[0], run


def embedded(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tower(model).pre_layrnorm(tower(model).embeddings(pixel_values))


@pytest.mark.parametrize(("block", "k"), [(0, 5), (1, 7), (2, 3), (1, N_PATCHES - 1)])
def test_tome_in_the_encoder_equals_duplicated_tokens_reference(tiny, block, k):
    """Proportional attention (+log size on each merged key) is exactly attention over `size`
    copies of the merged token; so the reference duplicates each merged token by its size, runs the
    remaining blocks unmodified, and keeps one copy per group."""
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=5))
    got, run = projector_input(tiny.model, inputs, f"tome@{k}@vision:{block}")
    with torch.no_grad():
        hidden = blocks(tiny.model, embedded(tiny.model, inputs["pixel_values"]), 0, block)
        for i in range(2):
            merged, index, sizes = tome_reference(hidden[i, 1:], k)
            copies = torch.cat([hidden[i, :1], merged.repeat_interleave(torch.tensor(sizes), dim=0)])[None]
            out = blocks(tiny.model, copies, block, FEATURE_BLOCK + 1)[0, 1:]
            first = torch.tensor([0] + sizes[:-1]).cumsum(0)
            torch.testing.assert_close(got[i], out[first], atol=2e-5, rtol=2e-5)
            assert run.trace[0].stages[0].kept[i].tolist() == index
    forward = run.trace[0]
    assert forward.stages[0].at == f"vision:{block}" and forward.stages[0].tokens_out == k
    assert forward.seq_len_in - forward.seq_len_out == N_PATCHES - k
    assert forward.vision_tokens == [N_PATCHES + 1] * block + [k + 1] * (4 - block)
    d, m = 32, 64
    assert forward.vision_flops()["pruned"] == sum(layer_flops(n, d, m) for n in forward.vision_tokens)
    assert forward.vision_flops()["unpruned"] == 4 * layer_flops(N_PATCHES + 1, d, m)


def test_a_drop_in_the_encoder_runs_later_blocks_on_the_kept_tokens(tiny):
    inputs = tiny.inputs(["how many"], images(1, seed=6))
    got, run = projector_input(tiny.model, inputs, "uniform@4@vision:1")
    kept = run.trace[0].stages[0].kept[0]
    with torch.no_grad():
        hidden = blocks(tiny.model, embedded(tiny.model, inputs["pixel_values"]), 0, 1)
        hidden = torch.cat([hidden[:, :1], hidden[:, 1:][:, kept]], dim=1)
        torch.testing.assert_close(got, blocks(tiny.model, hidden, 1, FEATURE_BLOCK + 1)[:, 1:], atol=1e-5, rtol=1e-5)


def test_encoder_then_projector_stage_composes_provenance(tiny):
    """`tome@8@vision:1 > vtc-cls@4`: the projector stage's [CLS] attention (block 2) is computed
    on the 8 merged tokens; its kept indices are the merged tokens' encoder patches."""
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=7))
    _, run = projector_input(tiny.model, inputs, "tome@8@vision:1 > vtc-cls@4")
    merge, drop = run.trace[0].stages
    assert (merge.tokens_in, merge.tokens_out, drop.tokens_in, drop.tokens_out) == (N_PATCHES, 8, 8, 4)
    for i in range(2):
        scores = drop.scores[i].tolist()
        chosen = topk_reference(scores, 4)
        assert drop.kept[i].tolist() == merge.kept[i][chosen].tolist()
    assert run.trace[0].seq_len_in - run.trace[0].seq_len_out == N_PATCHES - 4


def test_keep_all_in_the_encoder_is_bit_identical(tiny):
    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=8))
    with torch.no_grad():
        reference = tiny.model(**inputs).logits
        for spec in ("tome@1.0@vision:1", "uniform@1.0@vision:0"):
            with tp.apply(tiny.model, spec):
                assert torch.equal(tiny.model(**inputs).logits, reference)
        assert torch.equal(tiny.model(**inputs).logits, reference)


@pytest.mark.parametrize("name", ["tome", "pool", "uniform", "divprune"])
def test_encoder_stages_pass_the_contract(tiny, name):
    check_contract(tiny, name, at="vision:1")


def test_vtc_cls_inside_the_encoder_reads_an_earlier_block(tiny):
    """`vtc-cls(layer=0)@6@vision:1`: EViT-style pruning inside the tower by block 0's [CLS] row."""
    inputs = tiny.inputs(["what colour is the square"] * 2, images(2, seed=9))
    _, run = projector_input(tiny.model, inputs, "vtc-cls(layer=0)@6@vision:1")
    rows = cls_attention_eager(str(tiny.path), inputs["pixel_values"])[0]
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), 6) for r in rows]


def test_generate_with_an_encoder_stage_equals_manual_decoding(tiny):
    from reference import manual_greedy

    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=10))
    with torch.no_grad(), tp.apply(tiny.model, "tome@6@vision:1") as run:
        generated = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        manual = manual_greedy(tiny.model, inputs, 4)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1] :], manual)
    assert all(f.stages[0].tokens_out == 6 for f in run.trace)


@pytest.mark.parametrize("name", ["tome", "uniform"])
def test_encoder_stages_with_full_features_and_multi_layer_features(tiny_full, tiny_multilayer, name):
    """`full` keeps [CLS] before the projector (the stage acts on the patches); with features from
    blocks 1 and 2, a stage before block 1 shortens both."""
    check_contract(tiny_full, name, at="vision:2")
    check_contract(tiny_multilayer, name, at="vision:1")
    with pytest.raises(tp.errors.PlaceError, match="use vision:L with L <= 1"):
        with tp.apply(tiny_multilayer.model, f"{name}@4@vision:2"):
            pass
