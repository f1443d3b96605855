"""`generate` as users call it inside `tp.apply`: beam search and several sequences per prompt (the
copies of a prompt share its kept image tokens), `use_cache=False`, and what stays refused (a
pre-filled prompt cache) is refused before any work, naming what is supported."""

import pytest
import torch
from conftest import TinyQwen, build_tiny_qwen, images, sized_images
from transformers import DynamicCache, GenerationConfig

import tokenprune as tp
from tokenprune.compat import cache_kwarg, output_cache
from tokenprune.errors import InputError
from tokenprune.generation import GenerateGuard, unsupported_settings

QUESTIONS = ["what colour is the square", "how many"]  # different lengths: left padding
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyQwen:
    """A tiny Qwen2-VL (the session's `tiny_qwen` is parametrized over two families, which a test
    picking its family by name cannot request)."""
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    path = build_tiny_qwen(tmp_path_factory.mktemp("qwen"), "qwen2-vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyQwen(
        path, model, Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


def family_inputs(request, name: str):
    """A model and a two-prompt batch (one image each) of the tiny family `name`, and its keep-all spec."""
    if name == "llava":
        tiny = request.getfixturevalue("tiny")
        return tiny.model, tiny.inputs(QUESTIONS, images(2, seed=4)), "vtc-cls@1.0"
    if name == "llava-next":
        tiny = request.getfixturevalue("tiny_next")
        return tiny.model, tiny.inputs(QUESTIONS, sized_images([(40, 64), (64, 40)], seed=4)), "vtc-cls@1.0"
    tiny = request.getfixturevalue("tiny_qwen2")
    return tiny.model, tiny.inputs(QUESTIONS, sized_images([(56, 56), (56, 56)], seed=4)), "divprune@1.0"


def repeated(inputs: dict, n: int) -> dict:
    """Each prompt (and its one image) `n` times in adjacent rows, as explicit inputs (Qwen's
    `pixel_values` hold every image's patches in one `[patches, C]` tensor: repeated image by image)."""
    out = {key: value.repeat_interleave(n, dim=0) for key, value in inputs.items()}
    if "image_grid_thw" in inputs:
        per_image = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
        out["pixel_values"] = torch.cat([p for p in per_image for _ in range(n)])
    return out


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen"])
@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 2, **GREEDY},
        {"num_beams": 3, "num_return_sequences": 2, **GREEDY},
        {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=3, do_sample=False)},
    ],
)
@torch.no_grad()
def test_beam_search_at_keep_all_equals_the_unpruned_model(request, family, settings):
    model, inputs, keep_all = family_inputs(request, family)
    plain = model.generate(**inputs, **settings)
    with tp.apply(model, keep_all) as run:
        got = model.generate(**inputs, **settings)
    assert torch.equal(got, plain)
    copies = max(settings.get("num_beams", 2), settings.get("num_return_sequences", 1))
    assert len(run.trace) == 1 and run.trace[0].stages[0].image_sample == [r for r in range(2 * copies)]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen"])
@torch.no_grad()
def test_returned_sequences_share_the_kept_tokens_of_their_prompt(request, family):
    """Sampling 2 sequences per prompt under pruning equals sampling one per row of the prompts
    repeated by hand (each copy then prunes its own copy of the image): same draws, same tokens."""
    model, inputs, _ = family_inputs(request, family)
    spec = "vtc-cls@6" if family != "qwen" else "divprune@5"
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True, "top_k": 5}
    with tp.apply(model, spec) as run:
        torch.manual_seed(0)
        shared = model.generate(**inputs, num_return_sequences=2, **settings)
        torch.manual_seed(0)
        explicit = model.generate(**repeated(inputs, 2), **settings)
    assert torch.equal(shared, explicit)
    stage, alone = run.trace[0].stages[0], run.trace[1].stages[0]
    assert [k.tolist() for k in stage.kept[::2]] == [k.tolist() for k in stage.kept[1::2]]
    if family != "llava-next":  # NeXT numbers crops across the batch: the explicit copies' crops count on
        assert [k.tolist() for k in stage.kept] == [k.tolist() for k in alone.kept]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen"])
@torch.no_grad()
def test_pruned_beam_scores_are_the_pruned_models_log_probabilities(request, family):
    """Each returned beam's score (length_penalty=0: the sum of its tokens' log-probabilities) equals
    a manual teacher-forced loop over the pruned model on that beam's tokens."""
    model, inputs, _ = family_inputs(request, family)
    spec = "vtc-cls@6" if family != "qwen" else "divprune@5"
    steps = 4
    with tp.apply(model, spec):
        out = model.generate(
            **inputs,
            num_beams=3,
            num_return_sequences=2,
            length_penalty=0.0,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[:, -steps:]
        expanded = repeated(inputs, 2)
        step_out = model(**expanded, use_cache=True)
        total = torch.zeros(tokens.shape[0])
        mask = expanded["attention_mask"]
        for step in range(steps):
            total += step_out.logits[:, -1].log_softmax(-1).gather(1, tokens[:, step : step + 1])[:, 0]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_out = model(
                input_ids=tokens[:, step : step + 1],
                attention_mask=mask,
                **{cache_kwarg(): output_cache(step_out)},
                use_cache=True,
            )
    torch.testing.assert_close(out.sequences_scores, total, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen"])
@torch.no_grad()
def test_generate_without_a_cache(request, family):
    """`use_cache=False`: every step is a full prefill of the longer prompt. Keep-all equals the
    unpruned model; under pruning it equals the cached generate and a manual loop of prefills."""
    model, inputs, keep_all = family_inputs(request, family)
    spec = "vtc-cls@6" if family != "qwen" else "divprune@5"
    plain = model.generate(**inputs, use_cache=False, **GREEDY)
    with tp.apply(model, keep_all):
        assert torch.equal(model.generate(**inputs, use_cache=False, **GREEDY), plain)
    with tp.apply(model, spec) as run:
        uncached = model.generate(**inputs, use_cache=False, **GREEDY)
        assert len(run.trace) == GREEDY["max_new_tokens"]
        cached = model.generate(**inputs, **GREEDY)
        manual, ids, mask = [], inputs["input_ids"], inputs["attention_mask"]
        eos = torch.tensor(model.generation_config.eos_token_id).reshape(-1)
        for _ in range(GREEDY["max_new_tokens"]):
            step = {**inputs, "input_ids": ids, "attention_mask": mask}
            if "mm_token_type_ids" in inputs:  # Qwen: generated tokens are text
                step["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
            logits = model(**step, use_cache=False).logits[:, -1]
            nxt = logits.index_fill(1, eos, float("-inf")).argmax(-1, keepdim=True)  # as min_new_tokens does
            manual.append(nxt)
            ids, mask = torch.cat([ids, nxt], dim=1), torch.cat([mask, torch.ones_like(nxt)], dim=1)
    assert torch.equal(uncached, cached)
    assert torch.equal(uncached[:, inputs["input_ids"].shape[1] :], torch.cat(manual, dim=1))


@torch.no_grad()
def test_a_prefilled_prompt_cache_is_refused_before_any_forward(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=5))
    prefix = tiny.model(input_ids=inputs["input_ids"][:, :2], use_cache=True)
    cache = output_cache(prefix)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 2
    forwards = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with tp.apply(tiny.model, "vtc-cls@6"):
            with pytest.raises(
                InputError,
                match=r"a pre-filled prompt cache \(2 tokens cached\)\) is not supported inside tokenprune.apply; "
                "supported: greedy, sampling and beam search",
            ):
                tiny.model.generate(**inputs, max_new_tokens=2, **{cache_kwarg(): cache})
        assert forwards == [] and "generate" not in vars(tiny.model)
    finally:
        handle.remove()


class NoCopies:
    """An adapter that cannot share a prompt's kept tokens between copies (a plugin's, say)."""

    shares_copies = False
    copies = 1


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"num_beams": 2}, "num_beams=2"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
        ({"generation_config": GenerationConfig(num_beams=3, max_new_tokens=2)}, "num_beams=3"),
    ],
)
@torch.no_grad()
def test_an_adapter_without_shared_copies_refuses_them_before_any_forward(tiny, settings, named):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=5))
    forwards = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    guard = GenerateGuard(tiny.model, NoCopies())  # type: ignore[arg-type]
    try:
        with pytest.raises(InputError, match=f"{named}.*not supported inside tokenprune.apply; supported: greedy or"):
            tiny.model.generate(**inputs, max_new_tokens=2, **settings)
    finally:
        guard.remove()
        handle.remove()
    assert forwards == [] and "generate" not in vars(tiny.model)
    assert unsupported_settings({"num_beams": 2}, None, expands=True) == []


def test_the_transformers_expansion_the_guard_stands_in_for_is_there():
    """The one transformers internal the guard touches: `generate` expands encoded images through
    `_expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size=, inputs_embeds=)`."""
    import inspect

    from transformers import GenerationMixin

    names = list(inspect.signature(GenerationMixin._expand_multimodal_outputs).parameters)
    assert names[1:] == ["input_ids", "mm_encoder_output", "expand_size", "inputs_embeds"]


@torch.no_grad()
def test_supported_settings_pass_through_the_guard(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=6))
    with tp.apply(tiny.model, "vtc-cls@6") as run:
        out = tiny.model.generate(**inputs, max_new_tokens=2, num_beams=1, use_cache=True, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and len(run.trace) == 1
