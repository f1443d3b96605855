"""`bench --compile`'s execution: which graph inputs stay in place, and compiled generate = eager."""

import pytest
import torch

import tokenprune as tp
from tokenprune.bench.archs import build, image_tokens, inputs
from tokenprune.bench.compiled import compile_model, static_cache, static_inputs
from tokenprune.compat import cache_kwarg
from tokenprune.errors import InputError


def test_static_inputs_are_weights_buffers_and_marked_tensors():
    layer = torch.nn.Linear(3, 3)
    layer.register_buffer("scale", torch.ones(3))
    marked, plain = torch.zeros(2), torch.zeros(2)
    torch._dynamo.mark_static_address(marked)
    weights = {id(t) for t in layer.parameters()} | {id(t) for t in layer.buffers()}
    graph_inputs = [plain, layer.weight, 7, marked, layer.scale, layer.bias, torch.zeros(1)]
    assert static_inputs(graph_inputs, weights) == [1, 3, 4, 5]


def test_static_cache_tensors_are_static_inputs():
    model = build("tiny", torch.float32, "cpu")
    cache = static_cache(model, 2, 40)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(tensors) == 2 * model.config.text_config.num_hidden_layers
    assert static_inputs(tensors, set()) == list(range(len(tensors)))


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(InputError, match="cudagraphs, reduce-overhead"):
        compile_model(build("tiny", torch.float32, "cpu"), "max-speed")


@torch.inference_mode()
def test_compiled_generate_equals_eager():
    """On the CPU the graph backend runs its traced graphs uncaptured: unpruned and pruned
    generations through the compiled tower and LLM on a static cache equal eager ones."""
    model = build("tiny", torch.float32, "cpu")
    batch = inputs(model, 2, image_tokens(model))
    steps, width = 3, batch["input_ids"].shape[1]
    kw = dict(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    eager = [model.generate(**batch, **kw)]
    with tp.apply(model, "vtc-cls@4"):
        eager.append(model.generate(**batch, **kw))
    compile_model(model, "cudagraphs")
    compiled = [model.generate(**batch, **kw, **{cache_kwarg(): static_cache(model, 2, width + steps)})]
    with tp.apply(model, "vtc-cls@4"):
        compiled.append(model.generate(**batch, **kw, **{cache_kwarg(): static_cache(model, 2, width + steps)}))
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert model.model.language_model._compiled_call_impl is not None


def test_compiled_bench_rows_skip_guards_after_the_warm_ups(tmp_path):
    """The whole `bench --compile` path on the CPU (dynamo around eager kernels): after the
    warm-ups, the timed runs of every row skip guard evaluation and must find a compiled graph
    for each call (transformers 5.24 installs its output-capturing hooks lazily, inside the first
    compiled call: compiled before they exist, the timed runs failed to recompile)."""
    from tokenprune.bench.measure import run

    rows = run("tiny", ["vtc-cls"], [4], [1], "cpu", torch.float32, 2, 2, compile_mode="eager")
    assert [r["row"] for r in rows][:2] == ["unpruned", "oracle"]
    assert all(r["ttft_ms"] > 0 for r in rows)
