"""`PrunedLMM`: lmms-eval's model API (`generate_until`, `loglikelihood`) for any model tokenprune
supports, with any pipeline applied. It needs no lmms-eval import, so it is tested on its own;
`tokenprune.integrations.lmms_eval` subclasses it for lmms-eval.

Requests are lmms-eval `Instance`s, read through `.args`:

* `generate_until`: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`;
* `loglikelihood`: `(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`;

where `doc_to_visual(self.task_dict[task][split][doc_id])` gives the request's PIL images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from PIL import Image

from ..apply import apply, check
from ..distributed import Shard
from ..errors import InputError, SpecError
from ..models import DEMO, build_prompt, load
from ..pipeline import Pipeline
from ..spec import split_top_level

GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams")


def parse_arg_string(text: str) -> dict[str, Any]:
    """`key=value,...` as lmms-eval's `--model_args` writes them: commas inside brackets, braces or
    quotes do not split (`spec.split_top_level`); `true`/`false` and numbers are converted.

    Raises:
        InputError: a part that is not `key=value`, or a bracket or quote left unbalanced.
    """
    try:
        parts = split_top_level(text.strip(), ",", what="model arguments")
    except SpecError as exc:
        raise InputError(str(exc)) from None
    out: dict[str, Any] = {}
    for part in filter(str.strip, parts):
        if "=" not in part:
            raise InputError(f"model argument {part!r} is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = _convert(value.strip("\"'"))
    return out


def _convert(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


class PrunedLMM:
    """A supported Hugging Face MLLM with a tokenprune pipeline, answering lmms-eval's requests.

    Args:
        pretrained: `"demo"`, a checkpoint path or a hub id.
        pipeline: a spec string (`"vtc-cls@64"`, `"vtc-cls@192 > fastv@64@llm:2"`); none runs the
            model unpruned (the baseline row of a comparison).
        pipeline_file: a JSON/YAML pipeline config, for specs whose commas `--model_args` would split.
        device: torch device; `"cuda"` becomes `cuda:LOCAL_RANK` under a multi-process launcher.
        batch_size: requests per `generate()` call (left-padded batches).
        max_new_tokens: default generation length when a task sets none.
        dtype: torch dtype name (`"bfloat16"`); default float32 on CPU, the checkpoint's on GPU.
        positions: `"contiguous"` or `"original"` position ids for kept tokens.
    """

    def __init__(
        self,
        pretrained: str = DEMO,
        pipeline: str | None = None,
        pipeline_file: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_new_tokens: int = 32,
        dtype: str | None = None,
        positions: str = "contiguous",
        **unknown: Any,
    ) -> None:
        unknown.pop("max_batch_size", None)  # lmms-eval passes it to every model
        if unknown:
            allowed = "pretrained, pipeline, pipeline_file, device, batch_size, max_new_tokens, dtype, positions"
            raise InputError(f"unknown model argument(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        if pipeline is not None and pipeline_file is not None:
            raise InputError("give pipeline= or pipeline_file=, not both")
        self._shard = Shard.from_env()
        self._rank, self._world_size = self._shard.rank, self._shard.world_size
        self._device = self._shard.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load(pretrained, device=self._device, dtype=dtype)
        self.processor.tokenizer.padding_side = "left"
        self.pipeline = (
            Pipeline.from_spec(pipeline)
            if pipeline is not None
            else Pipeline.from_file(pipeline_file)
            if pipeline_file is not None
            else None
        )
        if self.pipeline is not None:
            check(self.model, self.pipeline, positions=positions)
        self.positions = positions
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else 1
        self.max_new_tokens = max_new_tokens
        self.task_dict: dict[str, Any] = {}
        self.traces: list[Any] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> PrunedLMM:
        """Build from lmms-eval's `--model_args` string plus its `batch_size`/`device` settings
        (`--model_args` win where both name one)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | parse_arg_string(arg_string)))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    def _compressed(self) -> Any:
        """The pipeline applied to the model (its run's trace kept), or nothing for the baseline."""
        if self.pipeline is None:
            return nullcontext()
        return apply(self.model, self.pipeline, positions=self.positions)

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else doc_to_visual
        flat = list(_flatten(visuals or []))
        if not all(isinstance(v, Image.Image) for v in flat):
            kinds = sorted({type(v).__name__ for v in flat if not isinstance(v, Image.Image)})
            raise InputError(
                f"tokenprune evaluates image tasks; task {task!r} gives visuals of type {', '.join(kinds)}"
            )
        return [v.convert("RGB") for v in flat]

    def _inputs(self, contexts: Sequence[str], visuals: Sequence[list[Image.Image]]) -> dict[str, torch.Tensor]:
        prompts = [
            build_prompt(self.processor, context, len(images))
            for context, images in zip(contexts, visuals, strict=False)
        ]
        images = [image for group in visuals for image in group]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        return dict(inputs.to(self._device))

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuations (sampled when `temperature > 0`, as lmms-eval's own models decide),
        cut at the first `until` string; requests with equal generation settings run together in
        batches of `batch_size`."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            unknown = sorted(set(settings) - set(GENERATION_KEYS))
            beams = 1 if settings.get("num_beams") is None else settings["num_beams"]
            if unknown or isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
                raise InputError(
                    f"unsupported generation settings {unknown or {'num_beams': beams}}; "
                    f"supported: {', '.join(GENERATION_KEYS)}, num_beams a positive integer"
                )
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(settings.get("temperature", 0) or 0)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": settings.get("top_p") or 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                args = [requests[i].args for i in chunk]
                inputs = self._inputs([a[0] for a in args], [self._visuals(*a[2:6]) for a in args])
                with torch.inference_mode(), self._compressed() as run:
                    ids = self.model.generate(
                        **inputs,
                        max_new_tokens=int(settings.get("max_new_tokens", self.max_new_tokens)),
                        pad_token_id=self.processor.tokenizer.pad_token_id,
                        num_beams=beams,
                        **sampling,
                    )
                self._keep_trace(run)
                texts = self.processor.tokenizer.batch_decode(
                    ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for i, text in zip(chunk, texts, strict=False):
                    out[i] = _cut(text, until)
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """`(log p(continuation | context, images), whether greedy decoding yields it)` per request;
        the continuation's tokens follow the prompt (tokenized on their own)."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            inputs = self._inputs([context], [self._visuals(doc_to_visual, doc_id, task, split)])
            tail = self.processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
            if tail.shape[1] == 0:
                raise InputError(f"continuation {continuation!r} has no tokens")
            tail = tail.to(self._device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
            with torch.inference_mode(), self._compressed() as run:
                logits = self.model(**inputs).logits[:, -tail.shape[1] - 1 : -1].float()
            self._keep_trace(run)
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(-1, tail[..., None])[..., 0]
            results.append((float(picked.sum()), bool((logits.argmax(-1) == tail).all())))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise InputError("tokenprune's lmms-eval model does not run multi-round tasks; choose single-round tasks")

    def _keep_trace(self, run: Any) -> None:
        if run is not None:
            self.traces.extend(run.trace)


def _flatten(visuals: Any) -> Iterator[Any]:
    for item in visuals if isinstance(visuals, list | tuple) else [visuals]:
        if isinstance(item, list | tuple):
            yield from _flatten(item)
        else:
            yield item


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
