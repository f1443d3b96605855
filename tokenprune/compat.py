"""The one place that knows how the supported transformers releases name things that moved.

transformers 5.24 renamed the KV-cache keyword of every model and decoder-layer forward from
`past_key_values` to `cache` (the old name is still accepted by the decorated forwards, with a
deprecation warning). A hook sees keyword arguments before that decorator renames them, so it may
meet either name, whatever release is installed: read the cache through `cache_of`.
`tests/test_compat.py` pins each name against the installed release.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")
"""The KV-cache keyword in forwards, newest name first."""


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a forward's keyword arguments under either name, or `None`."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


@cache
def cache_kwarg() -> str:
    """The name the installed transformers gives the KV cache in model forwards (`"cache"` from 5.24,
    `"past_key_values"` before); use it to pass a cache to a forward or to `generate`."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (`output.cache` from 5.24, `output.past_key_values` before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def full_attention_mask(mask: Any) -> Any:
    """A forward's attention mask as one tensor: `generate` with a static cache hands models whose
    decoder declares layer types (Qwen2, Qwen2-VL's LLM) a mapping of 4D masks by layer type; its
    full-attention mask describes the prompt's padding and causality like the single 4D mask of
    other models. Anything else is returned as it is."""
    return mask["full_attention"] if isinstance(mask, dict) and "full_attention" in mask else mask


def install_output_hooks(module: nn.Module) -> None:
    """Install now the output-capturing hooks transformers installs lazily, on the first forward
    that asks for hidden states (LLaVA's tower does, for its feature layer). Compile a module only
    after this: installed inside a compiled frame, the hooks change the module's hook guards after
    the warm-ups, and a run that skips guard evaluation (`bench --compile`) then fails to recompile
    (seen from transformers 5.24)."""
    from transformers import PreTrainedModel
    from transformers.utils import output_capturing

    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and output_capturing._CAN_RECORD_REGISTRY.get(sub):
            output_capturing.maybe_install_capturing_hooks(sub)
