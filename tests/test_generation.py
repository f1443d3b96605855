"""`generate` settings that compressed generation does not support are refused before any work."""

import pytest
import torch
from conftest import images
from transformers import GenerationConfig

import tokenprune as tp
from tokenprune.errors import InputError


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"num_beams": 2}, "num_beams=2"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
        ({"use_cache": False}, "use_cache=False"),
        ({"generation_config": GenerationConfig(num_beams=3, max_new_tokens=2)}, "num_beams=3"),
    ],
)
@torch.no_grad()
def test_unsupported_generate_settings_are_refused_before_any_forward(tiny, settings, named):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=5))
    forwards = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with tp.apply(tiny.model, "vtc-cls@6"):
            with pytest.raises(InputError, match=f"{named}.*not supported inside tokenprune.apply; supported: greedy"):
                tiny.model.generate(**inputs, max_new_tokens=2, **settings)
        assert forwards == [] and "generate" not in vars(tiny.model)
        out = tiny.model.generate(**inputs, max_new_tokens=2, **settings)  # outside: plain transformers
    finally:
        handle.remove()
    assert forwards and out.shape[1] >= inputs["input_ids"].shape[1]


@torch.no_grad()
def test_supported_settings_pass_through_the_guard(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=6))
    with tp.apply(tiny.model, "vtc-cls@6") as run:
        out = tiny.model.generate(**inputs, max_new_tokens=2, num_beams=1, use_cache=True, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and len(run.trace) == 1
