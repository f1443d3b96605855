"""Compiled execution for `tokenprune bench --compile`: the vision tower and the LLM replayed as
CUDA graphs, `generate` on a static KV cache.

The `cudagraphs` mode uses `graph_backend`, a dynamo backend that replays the traced eager kernels
as CUDA graph trees and keeps the model's weights where they are. torch's own `cudagraphs` backend
counts as static only the parameters AOT autograd lifts; since dynamo inlines nn modules, every
weight reaches it as an ordinary graph input and is copied into the graph's input buffers on each
replay (about 10 ms of a 7B model's batch-1 prefill on an H100: the whole model read and written).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import StaticCache

from ..compat import install_output_hooks
from ..errors import InputError

COMPILE_MODES = ("cudagraphs", "reduce-overhead", "eager")


def static_inputs(inputs: Sequence[Any], weights: set[int]) -> list[int]:
    """Indices of the graph inputs whose storage never moves: the model's parameters and buffers
    (ids in `weights`) and tensors marked static (`torch._dynamo.mark_static_address`, as
    transformers marks a static KV cache)."""
    return [
        i
        for i, x in enumerate(inputs)
        if isinstance(x, Tensor) and (id(x) in weights or hasattr(x, "_dynamo_static_input_type"))
    ]


def graph_backend(model: nn.Module) -> Callable[[torch.fx.GraphModule, list[Any]], Any]:
    """A dynamo backend for `model`'s modules, for inference (the bench runs under
    `torch.inference_mode`): AOT-traced eager kernels recorded and replayed as CUDA graph trees,
    the static inputs (`static_inputs`) used in place. A graph that mutates any other input, or
    touches the CPU, runs uncaptured."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.cudagraphs import (
        boxed_nop,
        check_multiple_devices_or_any_cpu_nodes,
        find_input_mutations,
        get_device_index,
        get_device_node_mapping,
        get_first_incompatible_cudagraph_node,
        get_placeholder_info,
        get_stack_traces,
        log_cudagraph_skip_and_bump_counter,
    )
    from torch._inductor.cudagraph_trees import cudagraphify_impl

    weights = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        static = static_inputs(example_inputs, weights)

        def compiler(aot_graph: torch.fx.GraphModule, aot_inputs: list[Any]) -> Any:
            lifted = len(aot_inputs) - len(example_inputs)  # AOT-lifted parameters come first
            kept = [*range(lifted), *(lifted + i for i in static)]
            mutated = find_input_mutations(aot_graph.graph)
            eager = boxed_nop(aot_graph, aot_inputs)
            skip = check_multiple_devices_or_any_cpu_nodes(get_device_node_mapping(aot_graph))
            if skip is None and (node := get_first_incompatible_cudagraph_node(aot_graph)) is not None:
                skip = f"incompatible op ({node.name})"
            if skip is None and not set(mutated) <= set(kept):
                skip = "it mutates an input that is not static"
            if skip is not None:
                log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs: {skip}")
                return eager
            replay = cudagraphify_impl(
                eager,
                aot_inputs,
                kept,
                device_index=get_device_index(aot_graph),
                is_backward=False,
                is_inference=True,
                stack_traces=get_stack_traces(aot_graph),
                placeholders=get_placeholder_info(aot_graph.graph),
                mutated_input_idxs=mutated,
            )
            replay._boxed_call = True  # type: ignore[attr-defined]  # torch's boxed-call flag, set by its backends
            return replay

        return aot_autograd(fw_compiler=compiler, inference_compiler=compiler)(graph, example_inputs)

    return backend


def compile_model(model: nn.Module, mode: str) -> None:
    """Compile the vision tower and the LLM, each as one graph per input shape (`dynamic=False`):
    `cudagraphs` (the eager kernels captured as CUDA graphs by `graph_backend`, quick to compile),
    `reduce-overhead` (inductor kernels replayed as CUDA graphs, slower to compile) or `eager`
    (dynamo's capture and guards around eager kernels: no speed-up; it checks the compiled path on
    any device, the CPU included). Whole
    modules, not layers: CUDA graph trees would let one layer's replay overwrite the outputs of the
    previous layer. The scoring and sequence rewrite between tower and LLM stay eager
    (data-dependent shapes). `generate` runs on a pre-initialised static KV cache
    (`static_cache`), and its own whole-model compile is disabled."""
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    hf: Any = model  # an HF multimodal model: its config and submodules are read by name (untyped)
    config = torch._dynamo.config
    config.recompile_limit = config.accumulated_recompile_limit = 256  # one entry per shape and hook set
    config.skip_nnmodule_hook_guards = False  # pruning hooks come and go between rows
    hf.generation_config.disable_compile = True
    options: dict[str, Any] = {"mode": mode}
    if mode in ("cudagraphs", "eager"):
        options = {"backend": graph_backend(model) if mode == "cudagraphs" else "eager"}
    for module in (hf.model.vision_tower, hf.model.language_model):
        install_output_hooks(module)
        module.compile(dynamic=False, **options)


def static_cache(model: nn.Module, batch: int, length: int) -> StaticCache:
    """A static KV cache of `length` positions, allocated up front so its buffers have fixed
    addresses (CUDA graphs) and the compiled modules never see its lazy initialisation."""
    hf: Any = model  # an HF multimodal model: its config, dtype and device are read by name (untyped)
    text = hf.config.text_config
    cache = StaticCache(config=hf.config, max_cache_len=length)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache.early_initialization(batch, text.num_key_value_heads, head_dim, hf.dtype, hf.device)
    return cache
