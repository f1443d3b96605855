"""Comparing pipelines on a set of (image, question[, answer]) samples.

Each pipeline's first-answer-token distribution is compared with the unpruned model's on the same
batches: accuracy (first token against the answer's first token), agreement (same greedy token)
and KL(unpruned || pruned). Single-word answers, as in the demo task, make the first token the
whole answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .apply import apply
from .distributed import Shard
from .errors import InputError
from .flops import llm_flops
from .models import build_prompt
from .pipeline import Pipeline


@dataclass(frozen=True)
class Sample:
    """One evaluation item."""

    image: Image.Image
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """One pipeline on one batch, reduced against the unpruned model on the same batch: small and
    picklable, so sharded processes gather these rather than logits.

    Attributes:
        batch: the batch's number in the whole sample list.
        pred: `[m]` greedy first token under the pipeline.
        reference: `[m]` the unpruned model's greedy first token.
        kl: `[m]` float32 KL(unpruned || pruned) of the first-token distributions.
        seconds: wall time of the forward.
        lengths: tokens each decoder layer saw in the prefill.
        kept: per image, the visual tokens it keeps after the last stage (`None` unpruned).
    """

    batch: int
    pred: torch.Tensor
    reference: torch.Tensor
    kl: torch.Tensor
    seconds: float
    lengths: list[int]
    kept: list[int] | None


def demo_samples(limit: int) -> list[Sample]:
    """The first `limit` samples of the demo evaluation split."""
    from .demo.scenes import sample

    out = []
    for i in range(limit):
        scene, q = sample("eval", i)
        out.append(Sample(Image.fromarray(scene.render()), q.text, q.answer))
    return out


def jsonl_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    """Samples from a JSONL file of `{"image": path, "question": str, "answer"?: str}` lines;
    image paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Image.open(path.parent / row["image"]).convert("RGB")
            samples.append(Sample(image, row["question"], row.get("answer")))
        except (KeyError, json.JSONDecodeError, OSError) as exc:
            raise InputError(f"{path}:{number}: each line needs 'image' and 'question' ({exc})") from None
        if limit is not None and len(samples) >= limit:
            break
    return samples


def batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def prefill(
    model: nn.Module, processor: Any, batch: Sequence[Sample], pipeline: Pipeline | None, device: str
) -> tuple[torch.Tensor, float, list[int], list[int] | None]:
    """One prefill of `batch` with `pipeline` applied (or none).

    Returns:
        first-token log-probabilities `[m, V]` (float32, CPU), seconds, tokens per decoder layer,
        and per image the visual tokens it keeps after the last stage (`None` unpruned).
    """
    prompts = [build_prompt(processor, s.question) for s in batch]
    inputs = processor(images=[s.image for s in batch], text=prompts, return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        start = time.perf_counter()
        if pipeline is None:
            logits = model(**inputs).logits[:, -1]
            lengths, kept = [inputs["input_ids"].shape[1]] * model.config.get_text_config().num_hidden_layers, None
        else:
            with apply(model, pipeline) as run:
                logits = model(**inputs).logits[:, -1]
            lengths, kept = run.trace[-1].tokens_per_layer(), run.trace[-1].stages[-1].kept_per_image()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return torch.log_softmax(logits.float(), dim=-1).cpu(), seconds, lengths, kept


def evaluate(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    pipelines: Sequence[Pipeline | None],
    batch_size: int,
    device: str,
    shard: Shard = Shard(),
    progress: Callable[[int], None] | None = None,
) -> list[list[BatchResult]]:
    """Run this shard's batches of `samples` through each of `pipelines` (`None`: unpruned, which
    reuses the reference forward) and reduce each against the unpruned model on the same batch.

    Returns:
        per pipeline, this shard's `BatchResult`s in batch order.
    """
    all_batches = list(batches(samples, batch_size))
    results: list[list[BatchResult]] = [[] for _ in pipelines]
    for index in shard.batch_indices(len(all_batches)):
        batch = all_batches[index]
        reference = prefill(model, processor, batch, None, device)
        for slot, pipeline in enumerate(pipelines):
            logprobs, seconds, lengths, kept = (
                reference if pipeline is None else prefill(model, processor, batch, pipeline, device)
            )
            ref = reference[0]
            kl = (ref.exp() * (ref - logprobs)).sum(-1).clamp_min(0)
            results[slot].append(BatchResult(index, logprobs.argmax(-1), ref.argmax(-1), kl, seconds, lengths, kept))
            if progress is not None:
                progress(len(batch))
    return results


def answer_ids(processor: Any, samples: Sequence[Sample]) -> torch.Tensor | None:
    """`[M]` first token id of each answer, or `None` when any sample has no answer."""
    if any(s.answer is None for s in samples):
        return None
    tok = processor.tokenizer
    return torch.tensor([tok(s.answer, add_special_tokens=False).input_ids[0] for s in samples])


def metrics(
    results: Sequence[BatchResult], reference: Sequence[BatchResult], answers: torch.Tensor | None, text_config: Any
) -> dict[str, Any]:
    """Accuracy, agreement, KL and cost of one pipeline's `results` (every batch, in batch order)
    against the unpruned model's `reference` results."""
    pred = torch.cat([r.pred for r in results])
    layer_tokens = _mean_lengths(results)
    cost = llm_flops(text_config, 0, [round(n) for n in layer_tokens])
    return {
        "accuracy": None if answers is None else (pred == answers).float().mean().item(),
        "agreement": (pred == torch.cat([r.reference for r in results])).float().mean().item(),
        "kl": torch.cat([r.kl for r in results]).mean().item(),
        "flops_ratio": cost / llm_flops(text_config, 0, [round(n) for n in _mean_lengths(reference)]),
        "seq_len": layer_tokens[0],
        "latency_ms": 1000 * sum(r.seconds for r in results) / len(pred),
        "kept": None if results[0].kept is None else _mean([n for r in results for n in r.kept or []]),
    }


def _mean(values: list[int]) -> float | int:
    """The mean of `values`, an int when it is one (every image kept the same count)."""
    if not values:
        return 0
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def _mean_lengths(results: Sequence[BatchResult]) -> list[float]:
    """Mean over batches of the tokens each decoder layer saw."""
    return [sum(column) / len(column) for column in zip(*(r.lengths for r in results), strict=False)]
