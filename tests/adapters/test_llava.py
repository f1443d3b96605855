"""The LLaVA-1.5 adapter: exact lengths, bit-identical keep-all, batching, generate, restoration."""

import os
import traceback

import pytest
import torch
from conftest import N_PATCHES, images
from reference import manual_greedy

import tokenprune as tp
from tokenprune.bench.compiled import static_cache
from tokenprune.compat import cache_kwarg
from tokenprune.errors import InputError

CACHE_KEYWORDS = [cache_kwarg()] + (["past_key_values"] if cache_kwarg() == "cache" else [])
"""The installed transformers' cache keyword, and its deprecated alias where it has one."""

QUESTIONS = ["what colour is the square", "how many"]  # different lengths: left padding


def llm_lengths(model):
    """Record the sequence length of every LLM forward."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return seen, handle


def hooks(model) -> dict:
    """Every module's forward (pre-)hook ids: HF installs its own lazily, so compare snapshots."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


@torch.no_grad()
def test_keep_all_is_bit_identical_and_model_restored(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2))
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    ref = tiny.model(**inputs).logits
    ref_gen = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    before = hooks(tiny.model)
    for spec in ("vtc-cls@1.0", f"vtc-cls@{N_PATCHES}", "uniform@1.0", "vtc-cls-ensemble@1.0"):
        with tp.apply(tiny.model, spec):
            assert torch.equal(tiny.model(**inputs).logits, ref)
            assert torch.equal(tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False), ref_gen)
    assert hooks(tiny.model) == before
    assert torch.equal(tiny.model(**inputs).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())


@torch.no_grad()
def test_restored_after_exception(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2))
    ref = tiny.model(**inputs).logits
    before = hooks(tiny.model)
    with pytest.raises(RuntimeError, match="boom"):
        with tp.apply(tiny.model, "vtc-cls@4"):
            tiny.model(**inputs)
            raise RuntimeError("boom")
    assert hooks(tiny.model) == before
    assert torch.equal(tiny.model(**inputs).logits, ref)


@pytest.mark.parametrize("k", [1, 4, 9])
@torch.no_grad()
def test_llm_sees_text_plus_k_per_image(tiny, k):
    inputs = tiny.inputs(["what colour is the square"], images(2), per_prompt=2)
    text = int((inputs["input_ids"] != tiny.model.config.image_token_id).sum())
    seen, handle = llm_lengths(tiny.model)
    try:
        with tp.apply(tiny.model, f"vtc-cls@{k}") as run:
            out = tiny.model(**inputs)
            tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert out.logits.shape[1] == text + 2 * k
    assert seen[0] == text + 2 * k and seen[1] == text + 2 * k  # forward, then generate's prefill
    assert seen[2:] == [1, 1]  # decode steps: one token each, on the shrunk cache
    record = run.trace[0]
    assert record.seq_len_in == inputs["input_ids"].shape[1] and record.seq_len_out == text + 2 * k
    assert [len(x) for x in record.stages[0].kept] == [k, k] and record.stages[0].image_sample == [0, 0]


@pytest.mark.parametrize("spec", ["vtc-cls@5", "vtc-cls-ensemble@0.25", "uniform@6", "random@3"])
@torch.no_grad()
def test_batch_with_padding_equals_each_sample_alone(tiny, spec):
    imgs = images(2, seed=5)
    batch = tiny.inputs(QUESTIONS, imgs)
    with tp.apply(tiny.model, spec) as run:
        gen = tiny.model.generate(**batch, max_new_tokens=5, do_sample=False)
        logits = tiny.model(**batch).logits[:, -1]
    width = batch["input_ids"].shape[1]
    for i, q in enumerate(QUESTIONS):
        alone = tiny.inputs([q], [imgs[i]])
        with tp.apply(tiny.model, spec) as run_alone:
            gen_alone = tiny.model.generate(**alone, max_new_tokens=5, do_sample=False)
            logits_alone = tiny.model(**alone).logits[:, -1]
        assert torch.equal(gen[i, width:], gen_alone[0, alone["input_ids"].shape[1] :])
        torch.testing.assert_close(logits[i], logits_alone[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(run.trace[0].stages[0].kept[i], run_alone.trace[0].stages[0].kept[0])


@pytest.mark.parametrize("positions", ["contiguous", "original"])
@torch.no_grad()
def test_generate_equals_manual_decode_loop(tiny, positions):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=7))
    steps = 5
    with tp.apply(tiny.model, "vtc-cls@6", positions=positions):
        gen = tiny.model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        manual = manual_greedy(tiny.model, inputs, steps)
    assert torch.equal(gen[:, inputs["input_ids"].shape[1] :], manual)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
@torch.no_grad()
def test_static_cache_decodes_as_dynamic(tiny, positions):
    """A static cache (generate's own, or one built up front as `bench --compile` passes it): generate
    hands 4D decode masks whose query row sits at the compressed cache length; every step's logits
    still equal the dynamic cache's, padded rows included."""
    inputs = tiny.inputs(QUESTIONS, images(2, seed=3))
    steps, width = 6, inputs["input_ids"].shape[1]
    kw = dict(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with tp.apply(tiny.model, "vtc-cls@5", positions=positions):
        dynamic = tiny.model.generate(**inputs, **kw)
        static = tiny.model.generate(**inputs, **kw, cache_implementation="static")
        built = tiny.model.generate(**inputs, **kw, **{cache_kwarg(): static_cache(tiny.model, 2, width + steps)})
    for out in (static, built):
        assert torch.equal(out.sequences, dynamic.sequences)
        for a, b in zip(out.logits, dynamic.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_llm_stage_refuses_static_cache(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2))
    with tp.apply(tiny.model, "fastv@4@llm:1"), pytest.raises(InputError, match="dynamic KV cache"):
        tiny.model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@torch.no_grad()
def test_sampling_runs_with_pruned_cache(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2))
    with tp.apply(tiny.model, "vtc-cls@3"):
        torch.manual_seed(0)
        a = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        torch.manual_seed(0)
        b = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 4


@torch.no_grad()
def test_text_only_prompt_is_untouched(tiny):
    enc = tiny.processor.tokenizer(["what colour is the square"], return_tensors="pt")
    ref = tiny.model(**enc).logits
    with tp.apply(tiny.model, "vtc-cls@4") as run:
        assert torch.equal(tiny.model(**enc).logits, ref)
    assert run.trace == []


@torch.no_grad()
def test_images_in_different_rows_with_different_counts(tiny):
    # row 0 holds two images, row 1 one: rows shrink by different amounts and are re-padded
    prompts = [
        tiny.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "what"}]}],
            add_generation_prompt=True,
        )
        for n in (2, 1)
    ]
    imgs = images(3, seed=9)
    batch = dict(tiny.processor(images=imgs, text=prompts, return_tensors="pt", padding=True))
    with tp.apply(tiny.model, "vtc-cls@4") as run:
        gen = tiny.model.generate(**batch, max_new_tokens=4, do_sample=False)
        alone = [
            dict(tiny.processor(images=imgs[:2], text=prompts[:1], return_tensors="pt")),
            dict(tiny.processor(images=imgs[2:], text=prompts[1:], return_tensors="pt")),
        ]
        gen_alone = [tiny.model.generate(**a, max_new_tokens=4, do_sample=False) for a in alone]
    assert run.trace[0].stages[0].image_sample == [0, 0, 1]
    width = batch["input_ids"].shape[1]
    for i, g in enumerate(gen_alone):
        assert torch.equal(gen[i, width:], g[0, alone[i]["input_ids"].shape[1] :])


@torch.no_grad()
def test_full_strategy_keeps_cls_feature(tiny_full):
    inputs = tiny_full.inputs(["what"], images(1))
    assert int((inputs["input_ids"] == tiny_full.model.config.image_token_id).sum()) == N_PATCHES + 1
    ref = tiny_full.model(**inputs).logits
    with tp.apply(tiny_full.model, "vtc-cls@1.0"):
        assert torch.equal(tiny_full.model(**inputs).logits, ref)
    with tp.apply(tiny_full.model, "vtc-cls@5") as run:
        out = tiny_full.model(**inputs)
    text = int((inputs["input_ids"] != tiny_full.model.config.image_token_id).sum())
    assert out.logits.shape[1] == text + 5 + 1
    assert run.trace[0].stages[0].tokens_in == N_PATCHES


def test_apply_refuses_nesting(tiny):
    before = hooks(tiny.model)
    with tp.apply(tiny.model, "vtc-cls@4"):
        with pytest.raises(tp.errors.InputError, match="already active"):
            with tp.apply(tiny.model, "vtc-cls@2"):
                pass
    assert hooks(tiny.model) == before


def test_labels_are_refused_inside_apply(tiny):
    inputs = tiny.inputs(["what"], images(1))
    with tp.apply(tiny.model, "vtc-cls@4"), pytest.raises(tp.errors.InputError, match="labels"):
        tiny.model(**inputs, labels=inputs["input_ids"])


def test_per_call_feature_layer_override_is_refused(tiny):
    inputs = tiny.inputs(["what"], images(1))
    with tp.apply(tiny.model, "vtc-cls@4"), pytest.raises(tp.errors.InputError, match="per-call overrides"):
        tiny.model(**inputs, vision_feature_layer=-1)


@torch.no_grad()
def test_position_modes(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=21))
    seen = []
    handle = tiny.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True
    )
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    try:
        for mode in ("original", "contiguous"):
            with tp.apply(tiny.model, "vtc-cls@4", positions=mode) as run:
                tiny.model(**inputs, position_ids=positions)
    finally:
        handle.remove()
    image = (inputs["input_ids"][0] == tiny.model.config.image_token_id).nonzero()[:, 0]
    kept = image[run.trace[0].stages[0].kept[0]]  # original columns of the kept image tokens
    keep = torch.ones_like(positions[0], dtype=torch.bool)
    keep[image] = False
    keep[kept] = True
    assert seen[0][0].tolist() == positions[0][keep].tolist()  # original ids, with gaps
    assert seen[1][0].tolist() == list(range(int(keep.sum())))  # renumbered without gaps


@torch.no_grad()
def test_causal_4d_mask_is_mapped_and_a_custom_one_refused(tiny):
    inputs = tiny.inputs(QUESTIONS, images(2, seed=9))
    key = inputs["attention_mask"].bool()
    n = key.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & key[:, None, None, :]
    with tp.apply(tiny.model, "vtc-cls@5"):
        ref = tiny.model(**inputs).logits[:, -1]
        mapped = tiny.model(**{**inputs, "attention_mask": causal}).logits[:, -1]
        custom = causal.clone()
        custom[0, 0, -1, -3] = False
        with pytest.raises(InputError, match="cannot be remapped"):
            tiny.model(**{**inputs, "attention_mask": custom})
    torch.testing.assert_close(mapped, ref)


@torch.no_grad()
def test_placeholders_that_do_not_fit_the_images_are_refused(tiny):
    """A missing placeholder, and placeholders moved so that an image runs across two rows."""
    inputs = tiny.inputs(QUESTIONS, images(2, seed=9))
    ids, image = inputs["input_ids"], tiny.model.config.image_token_id
    short = ids.clone()
    short[0, (short[0] == image).nonzero()[0, 0]] = 2
    moved = ids.clone()
    text = ((moved[0] != image) & inputs["attention_mask"][0].bool()).nonzero()[:, 0]
    moved[0, text[-2:]] = image  # row 0: two placeholders more, row 1: two fewer
    moved[1, (moved[1] == image).nonzero()[:2, 0]] = 2
    with tp.apply(tiny.model, "vtc-cls@4"):
        with pytest.raises(InputError, match=rf"holds {int((ids == image).sum()) - 1} image tokens but its 2 image"):
            tiny.model(**{**inputs, "input_ids": short})
        with pytest.raises(
            InputError, match="image 1's .* placeholder tokens start in batch row 0 and run past its end"
        ):
            tiny.model(**{**inputs, "input_ids": moved})


@torch.no_grad()
def test_selector_repeating_an_index_is_refused(tiny):
    """Two kept tokens naming one input token would leave a feature without a slot."""
    from tokenprune.reduction import Reduction
    from tokenprune.registry import REGISTRY

    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)

    @tp.register("first-twice")
    class FirstTwice(tp.Selector):
        def select(self, tokens, scores, k, grid=None):
            index = torch.arange(k).clamp(min=1).expand(tokens.shape[0], -1) - 1
            return Reduction.drop(tokens, index.contiguous())

    try:
        inputs = tiny.inputs(QUESTIONS, images(2, seed=9))
        with tp.apply(tiny.model, "vtc-cls+first-twice@4"):
            with pytest.raises(tp.errors.ScoreError, match="do not sit in distinct placeholder slots"):
                tiny.model(**inputs)
    finally:
        REGISTRY._strategies = saved


class HostReads(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that read values on the host from tokenprune's code (not HF's),
    under the current `window`."""

    READS = {
        torch.Tensor.tolist,
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
    }

    def __init__(self):
        super().__init__()
        self.window, self.seen = "before", []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            # the code that made the read: the innermost frame outside torch (and this method);
            # HF's own reads inside `generate` (wrapped by tokenprune's guard) are not tokenprune's
            caller = next(
                f for f in reversed(traceback.extract_stack()[:-1]) if f"{os.sep}torch{os.sep}" not in f.filename
            )
            if f"{os.sep}tokenprune{os.sep}" in caller.filename:
                self.seen.append((self.window, func.__name__))
        return func(*args, **(kwargs or {}))

    def reads(self, model, spec, call=None):
        """`(window, method)` of every host read tokenprune makes in one forward of `model` (or in
        `call(model)`) under `spec`; windows: `before` the tower, `tower` to the LLM, `llm` to the
        LM head, `after`."""
        core, self.window, self.seen = model.model, "before", []
        handles = [
            module.register_forward_pre_hook(lambda *a, w=window: setattr(self, "window", w))
            for module, window in ((core.vision_tower, "tower"), (core.language_model, "llm"), (model.lm_head, "after"))
        ]
        try:
            with tp.apply(model, spec), self:
                call(model) if call is not None else model(**self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        return self.seen


@pytest.mark.parametrize("spec", ["vtc-cls@4", "vtc-cls-ensemble@0.25", "pool@4", "tome@8@vision:1 > vtc-cls@4"])
@torch.no_grad()
def test_no_host_read_between_tower_and_lm_head(tiny, spec):
    """A batch's prefill reads the prompt before the tower runs and its checks after the LM head is
    launched: in between the host never waits for the device (on a GPU it queues the LLM behind
    the tower instead of idling the device while it rewrites the prompt)."""
    probe = HostReads()
    probe.inputs = tiny.inputs(QUESTIONS, images(2, seed=9))
    assert probe.reads(tiny.model, spec) == [("before", "tolist"), ("after", "tolist")]


@torch.no_grad()
def test_single_prompt_reads_nothing_before_the_lm_head_and_is_still_checked(tiny):
    """One prompt's placeholders are its images' blocks: the count, and a 4D mask's causality, are
    checked after the LM head is launched, and still refused before the forward returns."""
    probe = HostReads()
    probe.inputs = tiny.inputs(QUESTIONS[:1], images(1, seed=9))
    assert probe.reads(tiny.model, "vtc-cls@4") == [("after", "tolist")]
    inputs, image = probe.inputs, tiny.model.config.image_token_id
    short = inputs["input_ids"].clone()
    short[0, (short[0] == image).nonzero()[0, 0]] = 2
    n = short.shape[1]
    custom = torch.ones(n, n, dtype=torch.bool).tril()[None, None].clone()
    custom[0, 0, -1, -3] = False
    extra = inputs["input_ids"].clone()
    extra[0, (extra[0] != image).nonzero()[-2, 0]] = image  # more placeholders than slots: no overrun either
    with tp.apply(tiny.model, "vtc-cls@4"):
        for ids in (short, extra):
            with pytest.raises(InputError, match=rf"image tokens are not the {N_PATCHES} its 1 image\(s\) need"):
                tiny.model(**{**inputs, "input_ids": ids})
        with pytest.raises(InputError, match="cannot be remapped"):
            tiny.model(**{**inputs, "attention_mask": custom})
        assert tiny.model(**inputs).logits.shape[1] == n - N_PATCHES + 4


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_images_after_a_cached_chunk_are_refused(tiny, static, keyword):
    """A dynamic cache's length is on the host (refused at once), a static cache's on the device
    (refused after the LM head is launched, before the forward returns); under the cache keyword
    of the installed transformers and its deprecated alias."""
    from transformers import DynamicCache

    inputs = tiny.inputs(QUESTIONS[:1], images(1, seed=9))
    n = inputs["input_ids"].shape[1]
    cache = static_cache(tiny.model, 1, 2 * n) if static else DynamicCache(config=tiny.model.config)
    with tp.apply(tiny.model, "vtc-cls@4"):
        tiny.model(input_ids=inputs["input_ids"][:, :3], **{keyword: cache})  # a text chunk first
        with pytest.raises(InputError, match="after the first chunk of a cached prompt"):
            tiny.model(**inputs, **{keyword: cache})


@torch.no_grad()
def test_generate_on_a_static_cache_reads_nothing_between_tower_and_llm(tiny):
    """`generate` encodes the images before the forward; the prefill then reads neither the prompt
    (a single one) nor the static cache's length (a device count) before the LLM is launched."""
    probe = HostReads()
    probe.inputs = tiny.inputs(QUESTIONS[:1], images(1, seed=9))
    cache = static_cache(tiny.model, 1, probe.inputs["input_ids"].shape[1] + 1)
    reads = probe.reads(
        tiny.model, "vtc-cls@4", lambda m: m.generate(**probe.inputs, max_new_tokens=1, **{cache_kwarg(): cache})
    )
    assert reads == [("after", "tolist")]
