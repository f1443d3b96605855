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


@dataclass
class Outcome:
    """First-token log-probabilities `[M, V]` and cost of one pipeline (or the unpruned model)."""

    logprobs: torch.Tensor
    seconds: float
    layer_tokens: list[float]  # mean tokens each decoder layer sees in the prefill
    kept: float | None  # mean visual tokens per image after the last stage


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


def first_token_logprobs(
    model: nn.Module, processor: Any, samples: Sequence[Sample], pipeline: Pipeline | None,
    batch_size: int, device: str, progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Run every sample once (prefill only) with `pipeline` applied (or none)."""
    layers = model.config.get_text_config().num_hidden_layers
    rows, seconds, lengths, kept = [], 0.0, [], []
    for batch in batches(samples, batch_size):
        prompts = [build_prompt(processor, s.question) for s in batch]
        inputs = processor(images=[s.image for s in batch], text=prompts, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            start = time.perf_counter()
            if pipeline is None:
                logits = model(**inputs).logits[:, -1]
                lengths.append([inputs["input_ids"].shape[1]] * layers)
            else:
                with apply(model, pipeline) as run:
                    logits = model(**inputs).logits[:, -1]
                forward = run.trace[-1]
                lengths.append(forward.tokens_per_layer())
                kept.append(forward.stages[-1].tokens_out)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        if progress is not None:
            progress(len(batch))
    return Outcome(
        logprobs=torch.cat(rows), seconds=seconds,
        layer_tokens=[sum(column) / len(column) for column in zip(*lengths)],
        kept=sum(kept) / len(kept) if kept else None,
    )


def answer_ids(processor: Any, samples: Sequence[Sample]) -> torch.Tensor | None:
    """`[M]` first token id of each answer, or `None` when any sample has no answer."""
    if any(s.answer is None for s in samples):
        return None
    tok = processor.tokenizer
    return torch.tensor([tok(s.answer, add_special_tokens=False).input_ids[0] for s in samples])


def flops(text_config: Any, outcome: Outcome) -> int:
    """LLM prefill FLOPs for the (rounded) mean tokens per layer of `outcome`."""
    return llm_flops(text_config, 0, [round(n) for n in outcome.layer_tokens])


def metrics(reference: Outcome, outcome: Outcome, answers: torch.Tensor | None, text_config: Any,
            n_samples: int) -> dict[str, Any]:
    """Accuracy, agreement, KL and cost of `outcome` against the unpruned `reference`."""
    pred = outcome.logprobs.argmax(-1)
    ref = reference.logprobs
    kl = (ref.exp() * (ref - outcome.logprobs)).sum(-1).clamp_min(0)
    return {
        "accuracy": None if answers is None else (pred == answers).float().mean().item(),
        "agreement": (pred == ref.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
        "flops_ratio": flops(text_config, outcome) / flops(text_config, reference),
        "seq_len": outcome.layer_tokens[0],
        "latency_ms": 1000 * outcome.seconds / n_samples,
    }
