"""Speed and memory of pipelines on full-size architectures with random weights, side by side with
reference rows measured in the same run:

* `unpruned`: the model as HF runs it;
* `oracle`: the LLM fed only k visual tokens per image, no scoring (the prompt holds k placeholders
  and the tower's features are cut to k before the projector) — the best any pruner can do;
* `official`: VTC-CLS as its official code computes it: the whole tower in eager attention with
  `output_attentions=True`, [CLS] row of the penultimate block, top-k, then the LLM on k tokens
  (LLaVA-1.5 architectures only: the official code targets LLaVA-1.5).

LLaVA-NeXT architectures (`llava-v1.6-vicuna-7b`) are benchmarked on one `image` (height, width) per
prompt, encoded with anyres; their oracle cuts each image's packed tokens to the first k. LLaVA-OneVision
(`llava-onevision-qwen2-7b`) takes the same path with its own packing (anyres_max_9). Qwen2-VL
architectures (`qwen2-vl-7b`) and Qwen3-VL ones (`qwen3-vl-8b`) encode one image of that size into
merged tokens; their oracle cuts them (and Qwen3-VL's DeepStack features) to k and gives the prompt k
placeholders with text-style positions (positions do not change the cost; the tower still encodes the
whole image). Gemma 3 architectures (`gemma-3-4b-it`,
`gemma-3-12b-it`) encode one square image into `mm_tokens_per_image` pooled soft tokens; their oracle
cuts the projector's output to the first k.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, StaticCache

from ..apply import apply
from ..compat import cache_kwarg
from ..errors import InputError
from ..flops import llm_flops
from ..pipeline import Pipeline
from .archs import (
    ARCHS,
    TEXT_TOKENS,
    budgeted,
    build,
    image_tokens,
    inputs,
    is_gemma3,
    is_next,
    is_qwen,
    load_checkpoint,
)
from .compiled import compile_model, static_cache


def timed(fn: Callable[[], Any], repeats: int, device: str, warmup: int = 1) -> float:
    """Median wall time in ms of `fn` over `repeats` runs after `warmup` runs."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@contextmanager
def features_cut_to(model: Any, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside, the projector receives `select(features)` (the oracle and official routes)."""
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: (select(a[0]),))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def packed_cut_to(model: Any, k: int) -> Iterator[None]:
    """Inside, the core's `get_image_features` returns each image's first k packed tokens (and, on
    Qwen3-VL, each DeepStack layer's first k) (the oracle: no scoring, the LLM sees k tokens per
    image); wrapped on the instance, removed on exit."""
    original = model.model.get_image_features

    @wraps(original)  # generate inspects its signature to pre-encode images
    def cut(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.pooler_output = [features[:k] for features in out.pooler_output]
        if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: each DeepStack layer's too
            out.deepstack_features = [[features[:k] for features in layer] for layer in out.deepstack_features]
        return out

    object.__setattr__(model.model, "get_image_features", cut)
    try:
        yield
    finally:
        model.model.__dict__.pop("get_image_features", None)


@contextmanager
def soft_tokens_cut_to(model: Any, k: int) -> Iterator[None]:
    """Inside, Gemma 3's projector returns each image's first k pooled soft tokens (the oracle)."""
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: out[:, :k])
    try:
        yield
    finally:
        handle.remove()


def oracle_route(model: Any, k: int) -> AbstractContextManager[None]:
    """The LLM on k image tokens per image, with no scoring (see the module docstring)."""
    if is_gemma3(model):
        return soft_tokens_cut_to(model, k)
    return packed_cut_to(model, k) if is_next(model) or is_qwen(model) else features_cut_to(model, lambda f: f[:, :k])


@contextmanager
def official_route(model: Any, k: int) -> Iterator[None]:
    """VTC-CLS as the official code runs it: eager tower with every attention map, then top-k.
    The tower runs uncompiled here (as in the official code) even when the model is compiled."""
    tower = model.model.vision_tower
    captured: dict[str, Any] = {}
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    compiled, tower._compiled_call_impl = tower._compiled_call_impl, None

    def with_attentions(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return args, {**kwargs, "output_attentions": True}

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        captured["cls"] = output.attentions[-2].mean(dim=1)[:, 0, 1:]

    def select(features: torch.Tensor) -> torch.Tensor:
        index = captured.pop("cls").topk(k, dim=1).indices.sort(dim=1).values
        return features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))

    handles = [
        tower.register_forward_pre_hook(with_attentions, with_kwargs=True),
        tower.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        with features_cut_to(model, select):
            yield
    finally:
        for handle in handles:
            handle.remove()
        tower.config._attn_implementation = previous
        tower._compiled_call_impl = compiled


@dataclass
class RowPlan:
    """One row to measure: a name, the inputs, and the context that installs its hooks."""

    name: str
    spec: str
    kept: int
    batch: int
    inputs: dict[str, torch.Tensor]
    enter: Callable[[], AbstractContextManager[Any]]
    layer_tokens: Callable[[Any], list[int]]  # from what `enter` yielded, after the timed runs


def clock(fn: Callable[[], Any], device: str) -> float:
    """Wall time in ms of one call of `fn`, device work included."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return 1000 * (time.perf_counter() - start)


def measure_rows(
    model: Any,
    plans: list[RowPlan],
    repeats: int,
    new_tokens: int,
    device: str,
    warmup: int,
    interleave: bool,
    compiled: bool,
) -> list[dict[str, Any]]:
    """Encode time, time to first token, decode rate and peak memory of every plan: medians of
    `repeats` runs. With `interleave`, each repeat runs every plan once in turn (after every plan's
    warm-up), each run in a context of its own, so drift in the machine's speed reaches all rows
    alike; otherwise plan after plan, each plan's runs in one context (as compiled runs need: hooks
    that come and go would retrigger compilation). Compiled rows' timed runs skip the guards that
    only decide whether to recompile (`skip_guard_eval_unsafe`): the same inputs and hooks as their
    warm-ups."""
    cuda = device.startswith("cuda")
    times: list[dict[str, list[float]]] = [{"encode": [], "ttft": [], "total": []} for _ in plans]
    peaks, handles = [0.0] * len(plans), [None] * len(plans)
    caches: dict[int, StaticCache] = {}  # compiled rows: one cache per row while it is measured

    def generate(index: int, n: int) -> Callable[[], Any]:
        """A call of `generate` for `n` tokens, its static cache (compiled rows) emptied beforehand:
        the emptying is not part of the time."""
        extra = {}
        if compiled:
            if index not in caches:  # allocated once per row: fixed addresses for CUDA graphs
                plan = plans[index]
                caches[index] = static_cache(model, plan.batch, plan.inputs["input_ids"].shape[1] + new_tokens)
            caches[index].reset()
            extra[cache_kwarg()] = caches[index]
        return lambda: model.generate(
            **plans[index].inputs, **extra, max_new_tokens=n, min_new_tokens=n, do_sample=False
        )

    def one(index: int, record: bool) -> None:
        """One measurement of plan `index`, inside its context."""
        plan = plans[index]
        with torch.inference_mode():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            images = {k: v for k, v in plan.inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
            encode = clock(lambda: model.model.get_image_features(**images), device)
            ttft = clock(generate(index, 1), device)
            total = clock(generate(index, new_tokens), device)
        if record:
            for key, value in (("encode", encode), ("ttft", ttft), ("total", total)):
                times[index][key].append(value)
            peaks[index] = max(peaks[index], torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)

    def entered(index: int, record: bool) -> None:
        """One measurement of plan `index` in a context of its own."""
        with plans[index].enter() as handles[index]:
            one(index, record)

    if interleave:
        for index in range(len(plans)):
            for _ in range(warmup):
                entered(index, record=False)
        for _ in range(repeats):
            for index in range(len(plans)):
                entered(index, record=True)
    else:
        for index in range(len(plans)):
            with plans[index].enter() as handles[index]:  # one context per row: its graphs stay valid
                for _ in range(warmup):
                    one(index, record=False)
                # the warm-ups compiled every graph this row runs: its timed runs only pick among them
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=compiled):
                    for _ in range(repeats):
                        one(index, record=True)
            caches.pop(index, None)  # free this row's KV cache before the next row's
    rows = []
    for plan, measured, peak, handle in zip(plans, times, peaks, handles, strict=False):
        ttft, total = statistics.median(measured["ttft"]), statistics.median(measured["total"])
        rows.append(
            {
                "row": plan.name,
                "spec": plan.spec,
                "kept": plan.kept,
                "batch": plan.batch,
                "encode_ms": statistics.median(measured["encode"]),
                "ttft_ms": ttft,
                "decode_tok_s": plan.batch * (new_tokens - 1) / max(total - ttft, 1e-9) * 1000,
                "peak_mem_gb": peak if cuda else None,
                "layer_tokens": plan.layer_tokens(handle),
            }
        )
    return rows


def run(
    arch: str,
    strategies: list[str],
    budgets: list[int],
    batches: list[int],
    device: str,
    dtype: torch.dtype,
    repeats: int,
    new_tokens: int,
    seed: int = 0,
    compile_mode: str | None = None,
    progress: Callable[[str], None] | None = None,
    model_path: str | None = None,
) -> list[dict[str, Any]]:
    """Every reference and strategy row, measured in one process on one model; the rows of one
    batch size are measured interleaved (see `measure_rows`), compiled runs row after row.

    `encode_ms` is the tower plus projector (`get_image_features`); `scoring_overhead_ms` is a
    row's `encode_ms` minus the oracle's at the same k and batch (both project k tokens). With
    `compile_mode`, every row (references too) runs the compiled model, after three warm-up runs
    (compilation, CUDA-graph recording). With `model_path`, the checkpoint's weights replace the
    random ones of `arch`.
    """
    if compile_mode is not None:
        in_llm = [
            s for s in strategies if any(st.place.kind == "llm" for st in Pipeline.from_spec(budgeted(s, 1)).stages)
        ]
        if in_llm:
            raise InputError(
                f"--compile runs on a static KV cache, which llm:K stages do not support: {', '.join(in_llm)}"
            )
        uncompiled = ("qwen", "internvl", "gemma3")  # families whose compiled static-cache path is not implemented
        if not model_path and any(family in ARCHS.get(arch, {}) for family in uncompiled):
            raise InputError(
                f"--compile is implemented for the LLaVA architectures, not {arch!r} "
                f"(known LLaVA ones: {', '.join(a for a, s in ARCHS.items() if not any(f in s for f in uncompiled))})"
            )
    model = load_checkpoint(model_path, dtype, device) if model_path else build(arch, dtype, device, seed)
    warmup = 1
    if compile_mode is not None:
        compile_model(model, compile_mode)
        warmup = 3
    text = model.config.text_config
    n = image_tokens(model)
    unpruned_flops = llm_flops(text, TEXT_TOKENS + n)
    layers = text.num_hidden_layers
    fixed = lambda count: lambda handle: [TEXT_TOKENS + count] * layers  # noqa: E731
    rows: list[dict[str, Any]] = []
    for batch in batches:
        full = inputs(model, batch, n, seed)
        plans = [RowPlan("unpruned", "", n, batch, full, nullcontext, fixed(n))]
        for k in budgets:
            short = {**inputs(model, batch, k, seed), "pixel_values": full["pixel_values"]}
            plans.append(RowPlan("oracle", "", k, batch, short, partial(oracle_route, model, k), fixed(k)))
            if isinstance(model, LlavaForConditionalGeneration):
                plans.append(
                    RowPlan(
                        "official",
                        "vtc-cls (official route)",
                        k,
                        batch,
                        short,
                        partial(official_route, model, k),
                        fixed(k),
                    )
                )
            for strategy in strategies:
                spec = budgeted(strategy, k)
                plans.append(
                    RowPlan(
                        strategy,
                        spec,
                        k,
                        batch,
                        full,
                        partial(apply, model, spec),
                        lambda handle: handle.trace[-1].tokens_per_layer(),
                    )
                )
        measured = measure_rows(
            model, plans, repeats, new_tokens, device, warmup, compile_mode is None, compile_mode is not None
        )
        oracle_encode = {r["kept"]: r["encode_ms"] for r in measured if r["row"] == "oracle"}
        for row in measured:
            flops = llm_flops(text, 0, row.pop("layer_tokens"))
            if row["row"] not in ("unpruned", "oracle"):
                row["scoring_overhead_ms"] = row["encode_ms"] - oracle_encode[row["kept"]]
            rows.append({**row, "llm_flops": flops, "flops_ratio": flops / unpruned_flops})
            if progress is not None:
                progress(
                    f"{row['row']} {row['spec'] or '-'} k={row['kept']} batch={batch}: TTFT {row['ttft_ms']:.1f} ms"
                )
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a markdown table, with TTFT speed-ups against the unpruned row of each batch."""
    base = {r["batch"]: r["ttft_ms"] for r in rows if r["row"] == "unpruned"}
    lines = [
        f"### {title}",
        "",
        "| row | spec | kept | batch | encode ms | scoring overhead ms | TTFT ms | TTFT speed-up | decode tok/s "
        "| peak GB | LLM FLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over = r.get("scoring_overhead_ms")
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(
            f"| {r['row']} | `{r['spec'] or '-'}` | {r['kept']} | {r['batch']} | {r['encode_ms']:.1f} | "
            f"{'-' if over is None else f'{over:.1f}'} | {r['ttft_ms']:.1f} | {base[r['batch']] / r['ttft_ms']:.2f}x | "
            f"{r['decode_tok_s']:.0f} | {mem} | {r['flops_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """TTFT speed-up over unpruned against kept tokens, one panel per batch size, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=False):
        group = [r for r in rows if r["batch"] == batch]
        base = next(r["ttft_ms"] for r in group if r["row"] == "unpruned")
        for name in dict.fromkeys(r["row"] for r in group if r["row"] != "unpruned"):
            points = sorted((r["kept"], base / r["ttft_ms"]) for r in group if r["row"] == name)
            style = "--" if name in ("oracle", "official") else "-"
            ax.plot(*zip(*points, strict=False), marker="o", label=name, linestyle=style)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xlabel="visual tokens kept per image", ylabel="TTFT speed-up vs unpruned", title=f"batch {batch}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
