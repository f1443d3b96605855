"""Pins each transformers name that `tokenprune.compat` maps against the installed release: a release
that renames one again fails here first, not in 24 generate tests."""

import inspect

import torch
from conftest import images
from transformers import Cache, LlamaModel, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from tokenprune.compat import CACHE_NAMES, cache_kwarg, cache_of, output_cache


def test_the_cache_keyword_is_the_forwards_own():
    for forward in (LlamaModel.forward, LlamaDecoderLayer.forward, LlavaForConditionalGeneration.forward):
        names = inspect.signature(forward).parameters
        assert cache_kwarg() in names, forward.__qualname__
        assert [n for n in CACHE_NAMES if n in names] == [cache_kwarg()]


def test_cache_of_reads_either_name_and_prefers_the_new_one():
    old, new = object(), object()
    assert cache_of({"past_key_values": old}) is old
    assert cache_of({"cache": new, "past_key_values": None}) is new
    assert cache_of({"cache": None}) is None and cache_of({}) is None


@torch.no_grad()
def test_hooks_see_the_cache_under_a_known_name_through_generate(tiny):
    """The contact points the adapters hook: the core and every decoder layer receive the KV cache,
    in prefill and decode, under a name `cache_of` reads; the output carries it where
    `output_cache` looks."""
    seen = []

    def record(module, args, kwargs):
        seen.append(isinstance(cache_of(kwargs), Cache))

    core = tiny.model.model
    handles = [core.register_forward_pre_hook(record, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in core.language_model.layers]
    inputs = tiny.inputs(["what colour is the square"], images(1))
    try:
        out = tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and all(seen)
    assert len(seen) == 2 * (1 + len(core.language_model.layers))
    assert isinstance(output_cache(out), Cache)
    assert isinstance(output_cache(tiny.model(**inputs, use_cache=True)), Cache)
