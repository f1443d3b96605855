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
from ..apply import check
from ..budget import Budget, BudgetRule, format_budget
from ..distributed import Shard, shard_from_env
from ..errors import SpecError, TokenpruneError
from ..evaluation import answer_ids, demo_samples, evaluate, jsonl_samples, metrics
from ..models import DEMO, load
from ..pipeline import Pipeline
from ..registry import list_strategies
from ..spec import parse_budget, split_top_level
from ..versions import environment
from .common import SEED_MAX, SEED_MIN, check_device, print_json, user_errors

ADAPTIVE = ("vtc-cls@mass(0.9)",)
"""Rows with a budget rule that the default comparison adds, where the model's adapter runs them."""

VARIANTS = {"fopru(variant='row')": ("llava",)}
"""Named variants compared beside their strategy's defaults, with the adapters they run on (FoPru's
row variant needs one patch grid per image, which tiled crops do not give)."""


def default_strategies(model: Any) -> list[str]:
    """Every registered strategy that this model's adapter runs with its defaults (scorers with
    their default selector and place, and score-free selectors), the `VARIANTS`, VTW at half the
    LLM's depth, then the `ADAPTIVE` rows. A scorer whose default selector picks its own count per
    image (PruMerge's IQR rule) is compared in its fixed-budget form, since images of one batch keep
    one count. Each row is validated by `tp.check`, exactly as `tp.apply` would."""
    adapter = find_adapter(model)
    names = []
    for name, entry in list_strategies().items():
        if entry.role == "selector" and entry.cls.needs_scores or entry.role == "scorer" and entry.cls.withdraws:
            continue
        try:
            pipeline = check(model, f"{name}@1.0")
        except TokenpruneError:
            continue
        selector = pipeline.stages[0].selector
        adaptive = entry.role == "scorer" and selector is not None and not selector.keeps_exactly_k()
        names.append(f"{name}+{selector.name}(adaptive=False)" if adaptive and selector is not None else name)
        names += [v for v, on in VARIANTS.items() if v.split("(")[0] == name and adapter.name in on]
    layers = adapter.info().llm_layers
    if layers and layers > 1 and "vtw" in list_strategies():
        names.append(f"vtw@0@llm:{layers // 2}")
    for spec in ADAPTIVE:
        try:
            check(model, spec)
        except TokenpruneError:
            continue
        names.append(spec)
    return names


def expand(strategies: list[str], budgets: list[Budget]) -> list[tuple[str, int | float | str, Pipeline]]:
    """`(strategy, budget, pipeline)` for each strategy crossed with each budget; a strategy that
    already carries `@budget` is used once as written. A budget rule is reported in spec form."""
    out: list[tuple[str, int | float | str, Pipeline]] = []
    for item in strategies:
        if "@" in item:
            pipeline = Pipeline.from_spec(item)
            out.append((item, _reported(pipeline.stages[-1].budget), pipeline))
            continue
        for budget in budgets:
            out.append((item, _reported(budget), Pipeline.from_spec(f"{item}@{format_budget(budget)}")))
    return out


def _reported(budget: Budget) -> int | float | str:
    """A budget as results files hold it: the number, or a rule's spec form (`mass(0.9)`)."""
    return format_budget(budget) if isinstance(budget, BudgetRule) else budget


@user_errors
def compare_command(
    model: str = typer.Option(DEMO, help="'demo' (bundled), a checkpoint path or hub id."),
    strategies: str = typer.Option("", help="Comma-separated specs without budget (default: all that apply)."),
    budgets: str = typer.Option(
        "1.0,0.5,0.25,0.125", help="Comma-separated budgets: ratios (0.25), counts (36) or rules (mass(0.9))."
    ),
    limit: int = typer.Option(500, min=1, help="Number of samples."),
    data: Path = typer.Option(None, help="JSONL of {image, question, answer?}; default: the demo eval split."),
    out: Path = typer.Option(Path("tokenprune-results"), help="Output directory."),
    batch_size: int = typer.Option(50, min=1, help="Samples per forward."),
    device: str = typer.Option("cpu", help="Torch device."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Torch seed (recorded in the results)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Compare strategies x budgets: accuracy, agreement and KL vs unpruned, FLOPs, latency.

    Under `torchrun --nproc_per_node N` or `accelerate launch --num_processes N`, the batches are
    shared among the processes and rank 0 writes one results file, identical to a one-process run's
    but for the timings.

    Example: tokenprune compare --strategies vtc-cls,random,uniform --budgets 0.25,0.125 --limit 200
    """
    check_device(device)
    with shard_from_env() as shard:
        _compare(shard, model, strategies, budgets, limit, data, out, batch_size, shard.device(device), seed, json_out)


def _compare(
    shard: Shard,
    model: str,
    strategies: str,
    budgets: str,
    limit: int,
    data: Path | None,
    out: Path,
    batch_size: int,
    device: str,
    seed: int,
    json_out: bool,
) -> None:
    torch.manual_seed(seed)
    budget_list = [parse_budget(b) for b in split_top_level(budgets, ",") if b.strip()]
    if not budget_list:
        raise SpecError("--budgets is empty; give e.g. 1.0,0.5,0.25")
    names = [s.strip() for s in split_top_level(strategies, ",") if s.strip()]
    if strategies.strip() and not names:
        raise SpecError(
            f"--strategies {strategies!r} lists no strategy; leave it out to compare every one that applies"
        )
    expand(names, budget_list)  # a bad spec is refused before anything loads
    hf_model, processor = load(model, device=device)
    plan = expand(names or default_strategies(hf_model), budget_list)
    adapter = find_adapter(hf_model)
    for _, _, pipeline in plan:
        adapter.check(pipeline)
    samples = jsonl_samples(data, limit) if data is not None else demo_samples(limit)
    answers = answer_ids(processor, samples)
    text_config = hf_model.config.get_text_config()
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not shard.is_main) as progress:
        mine = len(shard.batch_indices(-(-len(samples) // batch_size)))
        task = progress.add_task("comparing", total=min(len(samples), mine * batch_size) * (len(plan) + 1))
        local = evaluate(
            hf_model,
            processor,
            samples,
            [None] + [p for _, _, p in plan],
            batch_size,
            device,
            shard,
            lambda n: progress.advance(task, n),
        )
    results = [sorted(shard.gather(part), key=lambda r: r.batch) for part in local]
    if not shard.is_main:
        return
    rows: list[dict[str, Any]] = [
        {"strategy": "unpruned", "budget": None, "spec": "", **metrics(results[0], results[0], answers, text_config)}
    ]
    for (name, budget, pipeline), result in zip(plan, results[1:], strict=False):
        rows.append(
            {
                "strategy": name,
                "budget": budget,
                "spec": pipeline.to_spec(),
                **metrics(result, results[0], answers, text_config),
            }
        )
    meta = {
        "model": model,
        "data": str(data) if data else "demo:eval",
        "limit": len(samples),
        "seed": seed,
        "batch_size": batch_size,
        "budgets": [_reported(b) for b in budget_list],
        "processes": shard.world_size,
        **environment(),
    }
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
