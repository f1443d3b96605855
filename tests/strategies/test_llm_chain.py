"""Several `llm:K` stages in one pipeline (FastV twice, FastV then VTW): logits and kept indices
against decoder layers run by hand, exact per-layer lengths and KV caches, generate() against a
manual decode loop, batch against single prompts, keep-all bit-identical."""

import pytest
import torch
from conftest import N_PATCHES, images
from reference import assert_generate_matches, layer_lengths, topk_reference
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenprune as tp
from tokenprune.compat import output_cache

QUESTIONS = ["what colour is the square", "how many"]
CHAINS = {"fastv@8@llm:1 > fastv@4@llm:2": [(1, 8), (2, 4)], "fastv@6@llm:1 > uniform@0@llm:2": [(1, 6), (2, 0)]}


def last_row_attention(layer, hidden, cos, sin) -> torch.Tensor:
    """`[n]` head-mean attention that the last token pays each column in `layer` (causal, eager)."""
    attn, n = layer.self_attn, hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(-1).mean(1)[0, -1]


@torch.no_grad()
def chain_reference(model, inputs: dict, chain: list[tuple[int, int]]):
    """Last-token logits `[V]` and kept patches per stage of one unpadded prompt: before layer `K`
    keep the `k` image tokens the last token attended to most at layer `K - 1` (`k = 0`: none)."""
    core, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    embeds = core.get_input_embeddings()(ids)
    features = core.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    image = (ids == model.config.image_token_id)[0]
    embeds = embeds.masked_scatter(image[None, :, None], torch.cat(list(features)).to(embeds.dtype))
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = lm.rotary_emb(embeds, positions)
    hidden, columns, patches, previous, kept = embeds, torch.arange(ids.shape[1]), torch.arange(N_PATCHES), None, []
    stages = dict(chain)
    for index, layer in enumerate(lm.layers):
        if index in stages:
            is_image = image[columns]
            if stages[index]:
                received = last_row_attention(lm.layers[index - 1], previous, cos[:, columns], sin[:, columns])
                chosen = torch.tensor(topk_reference(received[is_image].tolist(), stages[index]))
            else:
                chosen = torch.zeros(0, dtype=torch.long)
            patches = patches[chosen]
            kept.append(patches.tolist())
            keep = ~is_image
            keep[is_image.nonzero()[:, 0][chosen]] = True
            hidden, columns = hidden[:, keep], columns[keep]
        previous, n = hidden, len(columns)
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos[:, columns], sin[:, columns]),
            position_ids=positions[:, columns],
        )
    return model.lm_head(lm.norm(hidden))[0, -1], kept


@pytest.mark.parametrize("spec", CHAINS)
@torch.no_grad()
def test_chain_matches_layers_run_by_hand(tiny, spec):
    for i, q in enumerate(QUESTIONS):
        inputs = tiny.inputs([q], images(2, seed=31)[i : i + 1])
        with tp.apply(tiny.model, spec) as run:
            logits = tiny.model(**inputs).logits[0, -1]
        expected, kept = chain_reference(tiny.model, inputs, CHAINS[spec])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert [s.kept[0].tolist() for s in run.trace[0].stages] == kept


@torch.no_grad()
def test_each_layer_sees_its_stage_count_in_prefill_cache_and_decode(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(2), per_prompt=2)
    seq = inputs["input_ids"].shape[1]
    with layer_lengths(tiny.model) as seen, tp.apply(tiny.model, "fastv@8@llm:1 > fastv@4@llm:2") as run:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    first, second = seq - 2 * (N_PATCHES - 8), seq - 2 * (N_PATCHES - 4)
    assert seen == {0: [seq, 1, 1], 1: [first, 1, 1], 2: [second, 1, 1]}
    cache = output_cache(out)
    assert [cache.layers[i].get_seq_length() for i in range(3)] == [seq + 2, first + 2, second + 2]
    assert run.trace[0].layer_tokens == [seq, first, second]
    a, b = run.trace[0].stages
    assert (a.tokens_in, a.tokens_out, b.tokens_in, b.tokens_out) == (N_PATCHES, 8, 8, 4)
    assert all(set(y.tolist()) <= set(x.tolist()) for x, y in zip(a.kept, b.kept, strict=False))


@pytest.mark.parametrize("spec", [*CHAINS, "vtc-cls@12 > fastv@8@llm:1 > fastv@4@llm:2"])
def test_generate_equals_manual_loop_and_batch_equals_single(tiny, spec):
    run = assert_generate_matches(tiny, spec, QUESTIONS, images(2, seed=37))
    assert len(run.trace[0].stages) == spec.count(">") + 1


@torch.no_grad()
def test_keep_all_chain_is_bit_identical(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=41))
    reference = tiny.model(**inputs).logits
    with tp.apply(tiny.model, "fastv@1.0@llm:1 > fastv@1.0@llm:2"):
        assert torch.equal(tiny.model(**inputs).logits, reference)
    assert torch.equal(tiny.model(**inputs).logits, reference)
