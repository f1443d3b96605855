"""DART inside the LLM against a loop reference built from the unpruned model's hidden states."""

import pytest
import torch
from conftest import images
from reference import topk_reference
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenprune as tp
from tokenprune.errors import SignalError


@torch.no_grad()
def dart_reference(
    model, inputs: dict, k: int, layer: int, pivots: int, text_pivots: int, text_first: bool = False
) -> list[int]:
    """Kept image-token indices for one unpadded prompt, with explicit loops."""
    lm = model.model.language_model
    hidden = model(**inputs, output_hidden_states=True).hidden_states  # [i]: the input of layer i
    attn = lm.layers[layer - 1].self_attn
    x = lm.layers[layer - 1].input_layernorm(hidden[layer - 1])
    keys = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, torch.arange(x.shape[1])[None])
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    l1 = keys.abs().sum(dim=(1, 3))[0].tolist()
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist()
    normed = lm.norm(hidden[layer])[0].double()
    p = min(pivots, k)
    image_pivots = topk_reference([l1[c] for c in image], p)
    after = [c for c in range(image[-1] + 1, len(l1))]
    text = sorted(sorted(after, key=lambda c: (-l1[c], c))[:text_pivots])
    states = [normed[image[i]] for i in image_pivots] + [normed[c] for c in text]
    if text_first:
        states = states[len(image_pivots) :] + states[: len(image_pivots)]
    chosen = set(image_pivots)
    for i, pivot in enumerate(states):
        share = (k - p) // len(states) + (i < (k - p) % len(states))
        sims = {
            j: float(torch.nn.functional.cosine_similarity(pivot, normed[image[j]], dim=0))
            for j in range(len(image))
            if j not in chosen
        }
        chosen.update(sorted(sims, key=lambda j: (sims[j], j))[:share])
    return sorted(chosen)


@pytest.mark.parametrize("order", ["image-first", "text-first"])
@pytest.mark.parametrize(("k", "pivots", "text_pivots"), [(6, 2, 2), (9, 4, 3), (3, 4, 1), (12, 1, 0)])
@torch.no_grad()
def test_kept_tokens_match_reference(tiny, k, pivots, text_pivots, order):
    for i, q in enumerate(["what colour is the square", "how many"]):
        inputs = tiny.inputs([q], images(2, seed=31)[i : i + 1])
        spec = f"dart+dart-dedup(pivots={pivots},text_pivots={text_pivots},pivot_order='{order}')@{k}@llm:2"
        with tp.apply(tiny.model, spec) as run:
            tiny.model(**inputs)
        expected = dart_reference(tiny.model, inputs, k, 2, pivots, text_pivots, text_first=order == "text-first")
        assert run.trace[0].stages[0].kept[0].tolist() == expected


def test_too_few_prompt_tokens_for_text_pivots(tiny):
    inputs = tiny.inputs(["how many"], images(1))
    with pytest.raises(SignalError, match="text pivots"), tp.apply(tiny.model, "dart+dart-dedup(text_pivots=40)@4"):
        tiny.model(**inputs)


def test_dart_is_refused_before_the_llm():
    with pytest.raises(tp.errors.PlaceError):
        tp.Pipeline.from_spec("dart@4@projector")
