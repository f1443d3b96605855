"""FastV inside the LLM: kept indices against eager attention maps, exact per-layer lengths,
generate() against a manual decode loop, and composition with a projector stage."""

import pytest
import torch
from conftest import N_PATCHES, images
from reference import assert_generate_matches, layer_lengths, topk_reference
from transformers import LlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.compat import output_cache
from tokenprune.flops import layer_flops

QUESTIONS = ["what colour is the square", "how many"]


def attention_maps(path, inputs):
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions  # per layer [B, H, S, S]


@pytest.mark.parametrize("query", ["last", "mean"])
@pytest.mark.parametrize("layer", [1, 2])
def test_kept_indices_match_eager_attention(tiny, query, layer):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=13))
    with torch.no_grad(), tp.apply(tiny.model, f"fastv(query='{query}')@5@llm:{layer}") as run:
        tiny.model(**inputs)
    attn = attention_maps(str(tiny.path), inputs)[layer - 1].mean(dim=1)  # [B, S, S]
    image = inputs["input_ids"] == tiny.model.config.image_token_id
    mask = inputs["attention_mask"].bool()
    expected = []
    for b in range(2):
        if query == "last":
            received = attn[b, -1]
        else:
            received = attn[b][mask[b]].mean(dim=0)
        expected.append(topk_reference(received[image[b]].tolist(), 5))
    assert [k.tolist() for k in run.trace[0].stages[0].kept] == expected


@torch.no_grad()
def test_layers_see_exact_lengths_in_prefill_and_decode(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(2), per_prompt=2)
    seq = inputs["input_ids"].shape[1]
    with layer_lengths(tiny.model) as seen, tp.apply(tiny.model, "fastv@3@llm:2") as run:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    short = seq - 2 * (N_PATCHES - 3)
    assert seen[0] == seen[1] == [seq, 1, 1] and seen[2] == [short, 1, 1]
    cache = output_cache(out)
    assert [cache.layers[i].get_seq_length() for i in range(3)] == [seq + 2, seq + 2, short + 2]
    assert run.trace[0].layer_tokens == [seq, seq, short]
    d, m = 32, 64
    assert run.trace[0].llm_flops()["pruned"] == 2 * layer_flops(seq, d, m) + layer_flops(short, d, m)


@pytest.mark.parametrize("spec", ["fastv@4@llm:1", "fastv(query='mean')@0.5", "vtc-cls@9 > fastv@4@llm:2"])
def test_generate_equals_manual_loop_and_batch_equals_single(tiny, spec):
    assert_generate_matches(tiny, spec, QUESTIONS, images(2, seed=17))


@torch.no_grad()
def test_two_stage_pipeline_nests_provenance(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=19))
    with tp.apply(tiny.model, "vtc-cls@9 > fastv@4@llm:2") as run:
        tiny.model(**inputs)
    first, second = run.trace[0].stages
    assert (first.tokens_in, first.tokens_out, second.tokens_in, second.tokens_out) == (N_PATCHES, 9, 9, 4)
    for a, b in zip(first.kept, second.kept, strict=False):
        assert set(b.tolist()) <= set(a.tolist())
    assert run.trace[0].layer_tokens[:2] == [run.trace[0].seq_len_out] * 2
    assert run.trace[0].layer_tokens[2] == run.trace[0].seq_len_out - (9 - 4)


def test_fastv_place_errors(tiny):
    with pytest.raises(tp.errors.PlaceError, match="cannot run at projector"):
        tp.Pipeline.from_spec("fastv@4@projector")
    with pytest.raises(tp.errors.SignalError, match="K >= 1"):
        with tp.apply(tiny.model, "fastv@4@llm:0"):
            pass
    with pytest.raises(tp.errors.InputError, match="1 <= K < 3"):
        with tp.apply(tiny.model, "fastv@4@llm:3"):
            pass


def test_layer_flops_formula_by_hand():
    # n=2 tokens, d=3, m=5: 4*2*9 + 2*4*3 + 2*2*3*5 = 72 + 24 + 60
    assert layer_flops(2, 3, 5) == 156


@torch.no_grad()
def test_scoring_overhead_flops_by_hand(tiny):
    """[CLS] rows: 2 * (N + 1) * D_vision per block and image; FastV's last row: 2 * S * D_llm."""
    inputs = tiny.inputs(["what colour is the square"], images(2), per_prompt=2)
    seq = inputs["input_ids"].shape[1]
    with tp.apply(tiny.model, "vtc-cls-ensemble@6 > fastv@4@llm:2") as run:
        tiny.model(**inputs)
    flops = run.trace[0].llm_flops()
    blocks, images_per_row, d_vision, d_llm = 3, 2, 32, 32  # default start_layer=-4 on 4 blocks: 0, 1, 2
    shortened = seq - 2 * (N_PATCHES - 6)  # the LLM's input after the projector stage
    assert flops["scoring"] == blocks * 2 * (N_PATCHES + 1) * d_vision * images_per_row + 2 * shortened * d_llm
    assert flops["ratio_with_scoring"] == (flops["pruned"] + flops["scoring"]) / flops["unpruned"]
