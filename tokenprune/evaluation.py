"""Comparing pipelines on a set of (image, question[, answer]) samples.

Each pipeline is compared with the unpruned model on the same batches: accuracy, agreement with
the unpruned model and KL(unpruned || pruned) of the first answer token. Accuracy is the first
greedy token against the answer's token when every answer is one token (`first-token`), else the
greedy generation against the answer after `samples.normalise` (`exact-match`), and agreement
then compares the generated texts.

An `Evaluation` encodes each batch's images once and shares the tower's output and signals with
every pipeline whose stages run at the projector or later (`ModelAdapter.encode`/`reuse`), within a
memory budget; pipelines with stages inside the vision tower encode their own. On the CPU it also
records each batch's unpruned decoder-layer calls and reuses those a pipeline repeats exactly
(`tokenprune.layer_reuse`): keep-all rows and the layers before an `llm:K` stage cost no LLM time,
with results and reported latencies unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.base import Encoding, find_adapter
from .apply import Run, apply
from .distributed import Shard
from .flops import llm_flops
from .last_token import LastToken, per_token_modules
from .layer_reuse import LayerReuse, Reused
from .models import build_prompt
from .pipeline import Pipeline
from .samples import (
    EXACT_MATCH,
    FIRST_TOKEN,
    Sample,
    answer_metric,
    answer_tokens,
    demo_samples,
    jsonl_samples,
    normalise,
)

__all__ = [
    "BatchResult",
    "Evaluation",
    "Sample",
    "demo_samples",
    "evaluate",
    "jsonl_samples",
    "row_metrics",
    "sample_records",
]

CACHE_BYTES = 2 << 30
"""Default budget for the batches' processed inputs and shared encodings kept between rows."""


@dataclass(frozen=True)
class BatchResult:
    """One pipeline on one batch, reduced against the unpruned model on the same batch: small and
    picklable, so sharded processes gather these rather than logits.

    Attributes:
        batch: the batch's number in the whole sample list.
        pred: `[m]` greedy first token under the pipeline.
        reference: `[m]` the unpruned model's greedy first token.
        kl: `[m]` float32 KL(unpruned || pruned) of the first-token distributions.
        seconds: wall time of the forward (with the shared encoding's time, when one was reused).
        lengths: tokens each decoder layer saw in the prefill.
        kept: per image, the visual tokens it keeps after the last stage (`None` unpruned).
        texts: the greedy generations (`exact-match` only), and `reference_texts` the unpruned ones.
    """

    batch: int
    pred: torch.Tensor
    reference: torch.Tensor
    kl: torch.Tensor
    seconds: float
    lengths: list[int]
    kept: list[int] | None
    texts: list[str] | None = None
    reference_texts: list[str] | None = None


@dataclass(frozen=True)
class _Output:
    logprobs: torch.Tensor  # [m, V] float32, CPU: the first answer token's distribution
    seconds: float
    lengths: list[int]
    kept: list[int] | None  # per image
    texts: list[str] | None


def _decoder_layers(model: Any) -> nn.ModuleList | None:
    """The LLM's decoder layers (`None` where the model does not expose them as HF models do)."""
    layers = getattr(getattr(model, "get_decoder", lambda: None)(), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


class Evaluation:
    """Runs pipelines batch by batch against the unpruned model on this shard's batches of `samples`.

    The unpruned reference of each batch is computed once (`reference`), each pipeline's batches by
    `run`. Processed inputs and shared encodings of a batch are kept for the next pipeline while
    they fit in `cache_bytes`; beyond that they are recomputed.

    Args:
        pipelines: every pipeline that will run (their signals are captured by shared encodings).
        metric: `"first-token"`, `"exact-match"` or `None` (no answers: first token, no accuracy).
        share: reuse one encoding per batch where the adapter can (False: every pipeline encodes).
        reuse_layers: reuse the unpruned forward's decoder-layer calls that a pipeline repeats exactly
            (first-token metric on the CPU only: elsewhere every row runs in full).
        last_position: compute the modules after the last layer's attention for the last position
            only, the one the first-token metric reads, where that is bit-identical
            (`tokenprune.last_token`; first-token metric on the CPU only).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        samples: Sequence[Sample],
        pipelines: Sequence[Pipeline | None],
        batch_size: int,
        device: str,
        shard: Shard = Shard(),
        metric: str | None = FIRST_TOKEN,
        cache_bytes: int = CACHE_BYTES,
        share: bool = True,
        reuse_layers: bool = True,
        last_position: bool = True,
    ) -> None:
        self.model: Any = model
        self.processor, self.device, self.metric, self.share = processor, device, metric, share
        self.batches = list(batches(samples, batch_size))
        self.indices = shard.batch_indices(len(self.batches))
        self.pipelines = list(pipelines)
        self.adapter = find_adapter(model)
        self.cache_bytes = cache_bytes
        self._inputs: dict[int, dict[str, Any]] = {}
        self._encodings: dict[int, Encoding | None] = {}
        self._reference: dict[int, _Output] = {}
        self._cached = 0
        layers = _decoder_layers(model)
        cpu_first_token = metric != EXACT_MATCH and torch.device(device).type == "cpu"
        self.layers = (
            LayerReuse(layers, self._keep) if layers is not None and cpu_first_token and reuse_layers else None
        )
        self.last_token = (
            LastToken(per_token_modules(model, layers))
            if layers is not None and cpu_first_token and last_position
            else None
        )
        if metric == EXACT_MATCH:
            self.new_tokens = max(len(ids) for ids in answer_tokens(processor.tokenizer, samples)) + 4

    def samples_in_shard(self) -> int:
        return sum(len(self.batches[i]) for i in self.indices)

    def run(
        self,
        pipeline: Pipeline | None,
        progress: Callable[[int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[BatchResult]:
        """`pipeline` (`None`: unpruned) on this shard's batches, in batch order; `stop` is asked
        before each batch and ends the run early (its results so far are returned)."""
        out = []
        with self._attached(pipeline) as attached:
            for index in self.indices:
                if stop is not None and stop():
                    break
                ref = self.reference(index)
                got = ref if pipeline is None else self._forward(index, pipeline, attached)
                kl = (ref.logprobs.exp() * (ref.logprobs - got.logprobs)).sum(-1).clamp_min(0)
                out.append(
                    BatchResult(
                        index,
                        got.logprobs.argmax(-1),
                        ref.logprobs.argmax(-1),
                        kl,
                        got.seconds,
                        got.lengths,
                        got.kept,
                        got.texts,
                        ref.texts,
                    )
                )
                if progress is not None:
                    progress(len(self.batches[index]))
        return out

    @contextmanager
    def _attached(self, pipeline: Pipeline | None) -> Iterator[Run | None]:
        """`pipeline` applied once around all of this shard's batches when every batch's unpruned
        reference and shared encoding are at hand (so no unpruned forward has to run inside it);
        else `None`, and each batch applies it around its own forward."""
        ready = pipeline is not None and all(
            index in self._reference and (not self._shares(pipeline) or index in self._encodings)
            for index in self.indices
        )
        if pipeline is None or not ready:
            yield None
            return
        with apply(self.model, pipeline) as run:
            yield run

    def _shares(self, pipeline: Pipeline | None) -> bool:
        """Whether `pipeline` reads the batches' shared encodings (see `encoding`)."""
        return self.share and self.metric != EXACT_MATCH and self.adapter.shares_encoding(pipeline)

    def reference(self, index: int) -> _Output:
        """The unpruned model on batch `index` (computed once)."""
        if index not in self._reference:
            self._reference[index] = self._forward(index, None)
        return self._reference[index]

    def _keep(self, nbytes: int) -> bool:
        if self._cached + nbytes > self.cache_bytes:
            return False
        self._cached += nbytes
        return True

    def inputs(self, index: int) -> dict[str, Any]:
        """The processor's output for batch `index`, on the device."""
        if index in self._inputs:
            return self._inputs[index]
        batch = self.batches[index]
        prompts = [build_prompt(self.processor, s.question) for s in batch]
        images = [s.image for s in batch]
        inputs = dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device))
        if self._keep(sum(v.nbytes for v in inputs.values() if isinstance(v, torch.Tensor))):
            self._inputs[index] = inputs
        return inputs

    def encoding(self, index: int) -> Encoding | None:
        """Batch `index` through the vision tower once, for every pipeline that can share it."""
        if self.metric == EXACT_MATCH or not self.share:
            return None
        if index in self._encodings:
            return self._encodings[index]
        encoding = self.adapter.encode(self.inputs(index), self.pipelines)
        if encoding is None or self._keep(encoding.nbytes):
            self._encodings[index] = encoding
        return encoding

    def _forward(self, index: int, pipeline: Pipeline | None, attached: Run | None = None) -> _Output:
        """Batch `index` unpruned (`pipeline` None) or under `pipeline`, inside `attached` (its
        `apply`, open around every batch) or else inside an `apply` of its own."""
        inputs = self.inputs(index)
        shared = self.encoding(index) if self.adapter.shares_encoding(pipeline) else None
        reused = 0.0
        with torch.inference_mode():
            start = time.perf_counter()
            if pipeline is None:
                kwargs = self.adapter.reuse(shared, inputs, compress=False) if shared is not None else inputs
                with self.layers.record(index) if self.layers is not None else nullcontext():
                    logprobs, texts = self._call(kwargs)
                lengths = [inputs["input_ids"].shape[1]] * self.model.config.get_text_config().num_hidden_layers
                kept = None
            else:
                with (
                    nullcontext(attached) if attached is not None else apply(self.model, pipeline) as run,
                    self.layers.reuse(index) if self.layers is not None else nullcontext(Reused()) as layers,
                ):
                    kwargs = run.adapter.reuse(shared, inputs) if shared is not None else inputs
                    logprobs, texts = self._call(kwargs)
                record = run.trace[0]
                run.trace.clear()  # one forward's record at a time
                reused = layers.seconds
                lengths, kept = record.tokens_per_layer(), record.stages[-1].kept_per_image()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start + reused + (shared.seconds if shared is not None else 0.0)
        return _Output(logprobs, seconds, lengths, kept, texts)

    def _call(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, list[str] | None]:
        """First-token log-probabilities `[m, V]` (and, for exact-match, the greedy generations)."""
        if self.metric != EXACT_MATCH:
            with self.last_token.trimmed() if self.last_token is not None else nullcontext():
                logits = self.model(**kwargs, use_cache=False).logits[:, -1]
            return torch.log_softmax(logits.float(), dim=-1).cpu(), None
        out = self.model.generate(
            **kwargs,
            max_new_tokens=self.new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        start = kwargs["input_ids"].shape[1]
        texts = self.processor.tokenizer.batch_decode(out.sequences[:, start:], skip_special_tokens=True)
        return torch.log_softmax(out.logits[0].float(), dim=-1).cpu(), [t.strip() for t in texts]


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
    metric = answer_metric(processor.tokenizer, samples) or FIRST_TOKEN
    evaluation = Evaluation(model, processor, samples, pipelines, batch_size, device, shard, metric)
    return [evaluation.run(pipeline, progress) for pipeline in pipelines]


def sample_records(results: Sequence[BatchResult], samples: Sequence[Sample], batch_size: int) -> list[dict[str, Any]]:
    """One JSON-able record per sample of `results` (every batch, in batch order): its index and id,
    the greedy first token (and generation), the unpruned model's, and the KL."""
    records = []
    for result in results:
        chunk = samples[result.batch * batch_size : (result.batch + 1) * batch_size]
        for i, sample in enumerate(chunk):
            record: dict[str, Any] = {
                "index": sample.index,
                "id": sample.id,
                "pred": int(result.pred[i]),
                "reference": int(result.reference[i]),
                "kl": float(result.kl[i]),
            }
            if result.texts is not None and result.reference_texts is not None:
                record["text"], record["reference_text"] = result.texts[i], result.reference_texts[i]
            records.append(record)
    return records


def batch_records(results: Sequence[BatchResult]) -> list[dict[str, Any]]:
    """One JSON-able record per batch: its number, time, tokens per decoder layer and kept tokens."""
    return [{"batch": r.batch, "seconds": r.seconds, "lengths": r.lengths, "kept": r.kept} for r in results]


def row_metrics(
    records: Sequence[dict[str, Any]],
    batch_info: Sequence[dict[str, Any]],
    reference_batches: Sequence[dict[str, Any]],
    samples: Sequence[Sample],
    tokenizer: Any,
    metric: str | None,
    text_config: Any,
) -> dict[str, Any]:
    """Accuracy, agreement, KL and cost of one row from its `sample_records` and `batch_records`
    (and the unpruned row's batch records): the same numbers whether the row was just computed or
    read back from disk."""
    n = len(records)
    if metric == EXACT_MATCH:
        answers = {s.index: normalise(s.answer or "") for s in samples}
        correct = sum(normalise(r["text"]) == answers[r["index"]] for r in records)
        agree = sum(r["text"] == r["reference_text"] for r in records)
    else:
        firsts = (
            {s.index: ids[0] for s, ids in zip(samples, answer_tokens(tokenizer, samples), strict=True)}
            if metric
            else {}
        )
        correct = sum(r["pred"] == firsts[r["index"]] for r in records) if metric else 0
        agree = sum(r["pred"] == r["reference"] for r in records)
    layer_tokens = _mean_lengths(batch_info)
    cost = llm_flops(text_config, 0, [round(t) for t in layer_tokens])
    kept = [b["kept"] for b in batch_info]
    return {
        "metric": metric,
        "accuracy": correct / n if metric else None,
        "agreement": agree / n,
        "kl": sum(r["kl"] for r in records) / n,
        "flops_ratio": cost / llm_flops(text_config, 0, [round(t) for t in _mean_lengths(reference_batches)]),
        "seq_len": layer_tokens[0],
        "latency_ms": 1000 * sum(b["seconds"] for b in batch_info) / n,
        "kept": None if kept[0] is None else _mean([c for counts in kept for c in counts]),
    }


def _mean(values: list[int]) -> float | int:
    """The mean of `values`, an int when it is one (every image kept the same count)."""
    if not values:
        return 0
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def _mean_lengths(batch_info: Sequence[dict[str, Any]]) -> list[float]:
    """Mean over batches of the tokens each decoder layer saw."""
    return [sum(column) / len(column) for column in zip(*(b["lengths"] for b in batch_info), strict=False)]
