"""`tokenprune compare`: strategies x budgets on the demo model or your own data.

Durable: `--out` is checked before any model work, each finished row (with its per-sample records)
is appended to `rows.jsonl` and fsync'd, the summary files are replaced atomically at the end and on
SIGINT/SIGTERM, and `--resume` continues an interrupted run (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import report
from ..adapters.base import find_adapter
from ..apply import check
from ..budget import Budget, BudgetRule, format_budget
from ..distributed import Shard, shard_from_env
from ..errors import SpecError, TokenpruneError
from ..evaluation import BatchResult, Evaluation, batch_records, row_metrics, sample_records
from ..interrupt import StopRequest, stop_on_signals
from ..models import DEMO, load, resolve
from ..pipeline import Pipeline
from ..registry import list_strategies
from ..rundir import prepare, read_rows, row_key, row_log
from ..samples import answer_metric, data_fingerprint, demo_samples, jsonl_samples
from ..spec import parse_budget, split_top_level
from ..versions import environment
from .common import SEED_MAX, SEED_MIN, check_device, print_json, user_errors

ADAPTIVE = ("vtc-cls@mass(0.9)",)
"""Rows with a budget rule that the default comparison adds, where the model's adapter runs them."""

VARIANTS = {"fopru(variant='row')": ("llava",)}
"""Named variants compared beside their strategy's defaults, with the adapters they run on (FoPru's
row variant needs one patch grid per image, which tiled crops do not give)."""

METRIC_FIELDS = ("metric", "accuracy", "agreement", "kl", "flops_ratio", "seq_len", "latency_ms", "kept")


def default_strategies(model: Any) -> list[str]:
    """Every registered strategy that this model's adapter runs with its defaults (scorers with
    their default selector and place, and score-free selectors), the `VARIANTS`, VTW at half the
    LLM's depth, then the `ADAPTIVE` rows. A scorer whose default selector picks its own count per
    image (PruMerge's IQR rule) is compared in its fixed-budget form, since images of one batch keep
    one count. Each row is validated by `tp.check`, exactly as `tp.apply` would."""
    adapter = find_adapter(model)
    names = []
    for name, entry in list_strategies().items():
        if entry.role == "selector" and getattr(entry.cls, "needs_scores", False):
            continue
        if entry.role == "scorer" and getattr(entry.cls, "withdraws", False):
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


def model_fingerprint(model: str, hf_model: Any) -> str:
    """SHA-256 of the model's config and, for a local checkpoint, its files' names and sizes: a
    resumed run must use the same model (cheap, so weights are not read)."""
    digest = hashlib.sha256(hf_model.config.to_json_string(use_diff=False).encode())
    path = Path(resolve(model))
    if path.is_dir():
        for item in sorted(path.iterdir()):
            if item.is_file():
                digest.update(f"{item.name}:{item.stat().st_size}".encode())
    return digest.hexdigest()


@user_errors
def compare_command(
    model: str = typer.Option(DEMO, help="'demo' (bundled), a checkpoint path or hub id."),
    strategies: str = typer.Option("", help="Comma-separated specs without budget (default: all that apply)."),
    budgets: str = typer.Option(
        "1.0,0.5,0.25,0.125", help="Comma-separated budgets: ratios (0.25), counts (36) or rules (mass(0.9))."
    ),
    limit: int = typer.Option(500, min=1, help="Number of samples."),
    data: Path = typer.Option(None, help="JSONL of {image, question, answer?}; default: the demo eval split."),
    out: Path = typer.Option(Path("tokenprune-results"), help="Output directory (must be empty, see --resume)."),
    resume: bool = typer.Option(False, help="Continue the run in --out, skipping its finished rows."),
    overwrite: bool = typer.Option(False, help="Replace the results already in --out."),
    batch_size: int = typer.Option(50, min=1, help="Samples per forward."),
    reuse_layers: bool = typer.Option(
        True, help="On the CPU, reuse the unpruned forward's decoder-layer calls a row repeats exactly (same results)."
    ),
    last_position: bool = typer.Option(
        True,
        "--last-position/--all-positions",
        help="On the CPU, run the last layer's MLP and output projections and the LM head on the last position "
        "only, the one the first-token metric reads (same results, checked per shape); --all-positions times "
        "the full prefill.",
    ),
    device: str = typer.Option("cpu", help="Torch device."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Torch seed (recorded in the results)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Compare strategies x budgets: accuracy, agreement and KL vs unpruned, FLOPs, latency.

    Under `torchrun --nproc_per_node N` or `accelerate launch --num_processes N`, the batches are
    shared among the processes and rank 0 writes one results file, identical to a one-process run's
    but for the timings.

    Each finished row is saved at once in OUT/rows.jsonl; after an interruption (Ctrl-C, SIGTERM),
    run the same command with --resume to finish.

    Example: tokenprune compare --strategies vtc-cls,random,uniform --budgets 0.25,0.125 --limit 200
    """
    check_device(device)
    with shard_from_env() as shard, stop_on_signals() as stop:
        _compare(
            shard,
            stop,
            strategies,
            budgets,
            out,
            resume,
            overwrite,
            shard.device(device),
            json_out,
            model=model,
            data=data,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            reuse_layers=reuse_layers,
            last_position=last_position,
        )


def _compare(
    shard: Shard,
    stop: StopRequest,
    strategies: str,
    budgets: str,
    out: Path,
    resume: bool,
    overwrite: bool,
    device: str,
    json_out: bool,
    *,
    model: str,
    data: Path | None,
    limit: int,
    batch_size: int,
    seed: int,
    reuse_layers: bool,
    last_position: bool,
) -> None:
    console = Console(stderr=True)
    if shard.is_main:
        prepare(out, resume, overwrite)
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
    samples = jsonl_samples(data, limit) if data is not None else demo_samples(limit)
    hf_model, processor = load(model, device=device)
    plan = expand(names or default_strategies(hf_model), budget_list)
    for _, _, planned in plan:
        check(hf_model, planned)
    metric = answer_metric(processor.tokenizer, samples, str(data) if data is not None else "demo:eval")
    meta = {
        "model": model,
        "model_fingerprint": model_fingerprint(model, hf_model),
        "data": str(data) if data else "demo:eval",
        "data_sha256": data_fingerprint(data),
        "limit": len(samples),
        "seed": seed,
        "batch_size": batch_size,
        "metric": metric,
        "budgets": [_reported(b) for b in budget_list],
        "processes": shard.world_size,
        **environment(),
    }
    done = shard.broadcast(read_rows(out, meta) if shard.is_main and resume else {})
    evaluation = Evaluation(
        hf_model,
        processor,
        samples,
        [None] + [p for _, _, p in plan],
        batch_size,
        device,
        shard,
        metric,
        reuse_layers=reuse_layers,
        last_position=last_position,
    )
    todo: list[tuple[str, int | float | str | None, Pipeline | None]] = [("unpruned", None, None), *plan]
    rows: list[dict[str, Any]] = []
    with row_log(out, meta) if shard.is_main else _nothing() as log:
        with _progress(console, shard, len(todo), evaluation.samples_in_shard()) as (progress, task):
            reference: list[BatchResult] = []
            for number, (name, budget, pipeline) in enumerate(todo):
                spec = "" if pipeline is None else pipeline.to_spec()
                key = row_key({"strategy": name, "spec": spec})
                if pipeline is not None and key in done:
                    rows.append(done[key]["row"])
                    progress.advance(task, evaluation.samples_in_shard())
                else:
                    results, error = _run_row(evaluation, pipeline, shard, stop, progress, task)
                    if results is None:  # interrupted in flight: dropped
                        break
                    if pipeline is None:
                        if error:
                            raise TokenpruneError(f"the unpruned model failed: {error}")
                        reference = results
                    if key in done:
                        rows.append(done[key]["row"])
                    elif shard.is_main:
                        row = _row(
                            name,
                            budget,
                            spec,
                            results,
                            reference,
                            error,
                            samples,
                            processor,
                            metric,
                            hf_model,
                            batch_size,
                        )
                        records = [] if error else sample_records(results, samples, batch_size)
                        log.append(row, records, batch_records(results))
                        rows.append(row)
                progress.update(task, rows=f"{number + 1}/{len(todo)} rows")
                if shard.world_size > 1 and shard.any(stop()):
                    stop.signal = stop.signal or 15
                if stop():
                    break
    if not shard.is_main:
        _exit_if_stopped(stop, None, out, rows, todo)
        return
    report.write_summary(out, meta, rows)
    _exit_if_stopped(stop, console, out, rows, todo)
    if json_out:
        print_json({"meta": meta, "rows": rows})
    else:
        Console().print(report.table(rows, f"tokenprune compare: {model}, {len(samples)} samples"))
        console.print(f"results in {out}/ (results.json, results.csv, rows.jsonl, plots)")
    failed = [r for r in rows if r.get("error")]
    if failed:
        console.print(
            f"{len(failed)} row(s) failed ({', '.join(r['spec'] for r in failed)}); their errors are in "
            f"{out}/results.json; --resume runs them again"
        )
        raise typer.Exit(code=1)


class _nothing:
    """A stand-in row log for processes other than rank 0."""

    def __enter__(self) -> _nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def append(self, *args: object) -> None:
        return None


def _progress(console: Console, shard: Shard, rows: int, per_row: int) -> Any:
    """A rich progress bar of samples done over every row, with rows done and an ETA."""
    from contextlib import contextmanager

    @contextmanager
    def bar() -> Any:
        columns = (
            TextColumn("[bold]comparing[/bold] {task.fields[rows]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True, disable=not shard.is_main) as progress:
            yield progress, progress.add_task("comparing", total=rows * per_row, rows=f"0/{rows} rows")

    return bar()


def _run_row(
    evaluation: Evaluation, pipeline: Pipeline | None, shard: Shard, stop: StopRequest, progress: Progress, task: Any
) -> tuple[list[BatchResult] | None, str | None]:
    """One row on every process: its results gathered in batch order and the first error any
    process met (`None, None`: interrupted, one process only, the row dropped)."""
    error = None
    single = shard.world_size == 1
    try:
        part = evaluation.run(pipeline, lambda n: progress.advance(task, n), stop if single else None)
    except Exception as exc:
        part, error = [], f"{type(exc).__name__}: {exc}"
    if single and stop() and len(part) < len(evaluation.indices) and error is None:
        return None, None
    gathered = shard.gather([(part, error)])
    errors = [e for _, e in gathered if e]
    results = sorted((r for p, _ in gathered for r in p), key=lambda r: r.batch)
    return results, errors[0] if errors else None


def _row(
    name: str,
    budget: Any,
    spec: str,
    results: list[BatchResult],
    reference: list[BatchResult],
    error: str | None,
    samples: list[Any],
    processor: Any,
    metric: str | None,
    hf_model: Any,
    batch_size: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {"strategy": name, "budget": budget, "spec": spec}
    if error:
        return row | dict.fromkeys(METRIC_FIELDS) | {"metric": metric, "error": error}
    metrics = row_metrics(
        sample_records(results, samples, batch_size),
        batch_records(results),
        batch_records(reference),
        samples,
        processor.tokenizer,
        metric,
        hf_model.config.get_text_config(),
    )
    return row | metrics | {"error": None}


def _exit_if_stopped(stop: StopRequest, console: Console | None, out: Path, rows: list, todo: list) -> None:
    """After an interruption: say where the finished rows are and exit 128 + the signal's number."""
    if not stop():
        return
    if console is not None:
        console.print(
            f"interrupted by {stop.name}: {len(rows)} of {len(todo)} rows done, saved in {out}/ "
            f"(rows.jsonl, results.json); run the same command with --resume to finish"
        )
    raise typer.Exit(code=stop.exit_code)
