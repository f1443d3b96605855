"""`tokenprune bench`: speed and memory on full-size architectures with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from ..bench.archs import ARCHS, budgeted
from ..bench.compiled import COMPILE_MODES
from ..errors import InputError, SpecError, TokenpruneError
from ..models import resolve
from ..pipeline import Pipeline
from ..places import Place
from ..spec import split_top_level
from ..versions import environment
from .common import SEED_MAX, SEED_MIN, check_device, positive_int, split_values, user_errors

DTYPES = ("bfloat16", "float16", "float32")


def is_place(text: str) -> bool:
    """Whether `text` names a place (`projector`, `vision:L`, `llm:K`)."""
    try:
        Place.parse(text)
    except TokenpruneError:
        return False
    return True


@user_errors
def bench_command(
    arch: str = typer.Option("llava-1.5-7b", help=f"Architecture: {', '.join(ARCHS)}."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --arch (the default)."),
    model: str = typer.Option(
        None, "--model", help="A LLaVA-1.5 checkpoint (path or hub id) instead of random weights."
    ),
    strategies: str = typer.Option(
        "vtc-cls", help="Comma-separated specs without budget, each optionally with a place (divprune@vision:8)."
    ),
    budgets: str = typer.Option("576,192,128,64", help="Comma-separated token counts per image."),
    batch: str = typer.Option("1,16", help="Comma-separated batch sizes."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Torch device."),
    dtype: str = typer.Option("bfloat16", help=f"Weights and activations dtype: {', '.join(DTYPES)}."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats per measurement (median)."),
    new_tokens: int = typer.Option(16, min=2, help="Tokens generated for the decode rate."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Seed for weights and inputs."),
    compile: bool = typer.Option(False, "--compile", help="Static KV cache; tower and LLM compiled (CUDA graphs)."),
    compile_mode: str = typer.Option("cudagraphs", help=f"With --compile: {', '.join(COMPILE_MODES)}."),
    out: Path = typer.Option(Path("tokenprune-bench"), help="Output directory."),
) -> None:
    """Time unpruned, oracle, official-route and strategy rows side by side (random weights).

    Example: tokenprune bench --arch llava-1.5-7b --strategies vtc-cls,fastv --budgets 576,64 --batch 1,16
    """
    names = [s.strip() for s in split_top_level(strategies, ",") if s.strip()]
    if not names:
        raise SpecError(f"--strategies {strategies!r} lists no strategy; give e.g. vtc-cls,fastv")
    counts = split_values("--budgets", budgets, positive_int, "a token count >= 1")
    sizes = split_values("--batch", batch, positive_int, "a batch size >= 1")
    for name in names:
        place = name.partition("@")[2]
        if place and not is_place(place):
            raise SpecError(
                f"--strategies takes specs without a budget (--budgets gives them), optionally with a place "
                f"(e.g. divprune@vision:8), got {name!r}"
            )
        Pipeline.from_spec(budgeted(name, 1))
    if model and random_weights:
        raise SpecError("--random-weights and --model exclude each other: give one")
    if not model and arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if compile and compile_mode not in COMPILE_MODES:
        raise InputError(f"unknown --compile-mode {compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    from ..bench.measure import markdown, plot, run  # the timing machinery loads only for this command

    device = check_device(device)
    checkpoint = resolve(model) if model else None
    mode = compile_mode if compile else None
    rows = run(
        arch,
        names,
        counts,
        sizes,
        device,
        getattr(torch, dtype),
        repeats,
        new_tokens,
        seed,
        mode,
        progress=lambda line: typer.echo(line, err=True),
        model_path=checkpoint,
    )
    meta = {
        "arch": arch if model is None else None,
        "model": model,
        "dtype": dtype,
        "seed": seed,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "compile": mode,
        **environment(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    title = f"{model or arch}, {dtype}, {meta['device']}" + (f", compiled ({mode})" if mode else "")
    table = markdown(rows, title)
    (out / "bench.md").write_text(table)
    plot(rows, out / "bench.png", title)
    typer.echo(table)
