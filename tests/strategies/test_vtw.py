"""VTW (arXiv 2405.05803) as a budget-0 stage inside the LLM: after layer K every visual token
leaves; checked against a hand-run forward of the decoder layers."""

import pytest
import torch
from conftest import images
from reference import manual_greedy

import tokenprune as tp
from tokenprune.errors import BudgetError, SpecError

QUESTIONS = ["what colour is the square", "how many"]


@torch.no_grad()
def vtw_reference(model, inputs: dict, k: int) -> torch.Tensor:
    """Last-token logits `[V]` of one unpadded prompt, layers run by hand: `0..K-1` on the whole
    sequence, `K..` on the text columns only (original positions, causal mask)."""
    core, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    embeds = core.get_input_embeddings()(ids)
    features = core.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image[..., None], torch.cat(list(features)).to(embeds.dtype))
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = lm.rotary_emb(embeds, positions)
    hidden, columns = embeds, torch.arange(ids.shape[1])
    for index, layer in enumerate(lm.layers):
        if index == k:
            columns = (~image[0]).nonzero()[:, 0]
            hidden = hidden[:, columns]
        n = len(columns)
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos[:, columns], sin[:, columns]),
            position_ids=positions[:, columns],
        )
    return model.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize("k", [1, 2])
@torch.no_grad()
def test_budget_zero_withdraws_every_visual_token(tiny, k):
    for i, q in enumerate(QUESTIONS):
        inputs = tiny.inputs([q], images(2, seed=23)[i : i + 1])
        with tp.apply(tiny.model, f"uniform@0@llm:{k}") as run:
            logits = tiny.model(**inputs).logits[0, -1]
        torch.testing.assert_close(logits, vtw_reference(tiny.model, inputs, k), atol=1e-5, rtol=1e-5)
        seq = inputs["input_ids"].shape[1]
        text = int((inputs["input_ids"] != tiny.model.config.image_token_id).sum())
        assert run.trace[0].layer_tokens == [seq] * k + [text] * (3 - k)
        assert run.trace[0].stages[-1].tokens_out == 0 and run.trace[0].stages[-1].kept[0].numel() == 0


@torch.no_grad()
def test_generate_after_withdrawal_equals_manual_loop(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=29))
    with tp.apply(tiny.model, "vtc-cls@6 > uniform@0@llm:2"):
        gen = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        manual = manual_greedy(tiny.model, inputs, 4)
    assert torch.equal(gen[:, inputs["input_ids"].shape[1] :], manual)


def test_budget_zero_only_inside_the_llm_and_last():
    with pytest.raises(BudgetError, match="inside the LLM only"):
        tp.Pipeline.from_spec("uniform@0")
    with pytest.raises(SpecError, match="must be the last stage"):
        tp.Pipeline.from_spec("uniform@0@llm:1 > fastv@2@llm:2")


@pytest.mark.parametrize("k", [1, 2])
@torch.no_grad()
def test_vtw_by_name_is_budget_zero(tiny, k):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=8))
    with tp.apply(tiny.model, f"uniform@0@llm:{k}"):
        expected = tiny.model(**inputs).logits
    with tp.apply(tiny.model, f"vtw@0@llm:{k}") as run:
        got = tiny.model(**inputs).logits
    assert torch.equal(got, expected)
    assert run.trace[0].stages[0].tokens_out == 0


def test_vtw_names_the_paper_setting():
    assert "vtw" in tp.list_strategies()
    assert tp.Pipeline.from_spec("vtw@0").stages[0].at == "llm:16"  # the paper's LLaVA-1.5 layer
    with pytest.raises(SpecError, match=r"budget is 0 \(e\.g\. vtw@0@llm:16\), not 0\.5"):
        tp.Pipeline.from_spec("vtw@0.5@llm:2")
