"""`tokenprune compare`: strategies x budgets on the demo model or your own data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import Progress

from .. import report
from ..adapters.base import find_adapter
from ..budget import format_budget
from ..errors import SpecError, TokenpruneError
from ..evaluation import answer_ids, demo_samples, first_token_logprobs, jsonl_samples, metrics
from ..models import DEMO, load
from ..pipeline import Pipeline
from ..registry import list_strategies
from ..spec import parse_budget, split_top_level
from ..versions import environment
from .common import print_json, user_errors


def default_strategies(model: Any) -> list[str]:
    """Every registered strategy that this model's adapter runs with its defaults (scorers with
    their default selector and place, and score-free selectors)."""
    adapter = find_adapter(model)
    names = []
    for name, entry in list_strategies().items():
        if entry.role == "selector" and entry.cls.needs_scores:
            continue
        try:
            adapter.check(Pipeline.from_spec(f"{name}@1.0"))
        except TokenpruneError:
            continue
        names.append(name)
    return names


def expand(strategies: list[str], budgets: list[int | float]) -> list[tuple[str, int | float, Pipeline]]:
    """`(strategy, budget, pipeline)` for each strategy crossed with each budget; a strategy that
    already carries `@budget` is used once as written."""
    out = []
    for item in strategies:
        if "@" in item:
            pipeline = Pipeline.from_spec(item)
            out.append((item, pipeline.stages[-1].budget, pipeline))
            continue
        for budget in budgets:
            out.append((item, budget, Pipeline.from_spec(f"{item}@{format_budget(budget)}")))
    return out


@user_errors
def compare_command(
    model: str = typer.Option(DEMO, help="'demo' (bundled), a checkpoint path or hub id."),
    strategies: str = typer.Option("", help="Comma-separated specs without budget (default: all that apply)."),
    budgets: str = typer.Option("1.0,0.5,0.25,0.125", help="Comma-separated budgets: ratios (0.25) or counts (36)."),
    limit: int = typer.Option(500, min=1, help="Number of samples."),
    data: Path = typer.Option(None, help="JSONL of {image, question, answer?}; default: the demo eval split."),
    out: Path = typer.Option(Path("tokenprune-results"), help="Output directory."),
    batch_size: int = typer.Option(50, min=1, help="Samples per forward."),
    device: str = typer.Option("cpu", help="Torch device."),
    seed: int = typer.Option(0, help="Torch seed (recorded in the results)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Compare strategies x budgets: accuracy, agreement and KL vs unpruned, FLOPs, latency.

    Example: tokenprune compare --strategies vtc-cls,random,uniform --budgets 0.25,0.125 --limit 200
    """
    torch.manual_seed(seed)
    budget_list = [parse_budget(b) for b in budgets.split(",") if b.strip()]
    if not budget_list:
        raise SpecError("--budgets is empty; give e.g. 1.0,0.5,0.25")
    hf_model, processor = load(model, device=device)
    names = [s.strip() for s in split_top_level(strategies, ",") if s.strip()] or default_strategies(hf_model)
    plan = expand(names, budget_list)
    adapter = find_adapter(hf_model)
    for _, _, pipeline in plan:
        adapter.check(pipeline)
    samples = jsonl_samples(data, limit) if data is not None else demo_samples(limit)
    answers = answer_ids(processor, samples)
    text_config = hf_model.config.get_text_config()
    rows: list[dict[str, Any]] = []
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("comparing", total=len(samples) * (len(plan) + 1))
        step = lambda n: progress.advance(task, n)  # noqa: E731
        reference = first_token_logprobs(hf_model, processor, samples, None, batch_size, device, step)
        base = metrics(reference, reference, answers, text_config, len(samples))
        rows.append({"strategy": "unpruned", "budget": None, "spec": "", "kept": None, **base})
        for name, budget, pipeline in plan:
            outcome = first_token_logprobs(hf_model, processor, samples, pipeline, batch_size, device, step)
            rows.append({"strategy": name, "budget": budget, "spec": pipeline.to_spec(),
                         "kept": outcome.kept, **metrics(reference, outcome, answers, text_config, len(samples))})
    meta = {"model": model, "data": str(data) if data else "demo:eval", "limit": len(samples),
            "seed": seed, "batch_size": batch_size, "budgets": budget_list, **environment()}
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", meta, rows)
    report.write_csv(out / "results.csv", rows)
    pruned = [r for r in rows if r["budget"] is not None]
    if answers is not None:
        report.plot(out / "accuracy.png", pruned, "accuracy", rows[0]["accuracy"])
    report.plot(out / "agreement.png", pruned, "agreement", 1.0)
    if json_out:
        print_json({"meta": meta, "rows": rows})
        return
    Console().print(report.table(rows, f"tokenprune compare: {model}, {len(samples)} samples"))
    console.print(f"results in {out}/ (results.json, results.csv, plots)")

