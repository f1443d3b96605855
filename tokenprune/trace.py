"""What `apply` records: per forward and stage, tokens in and out and their provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .flops import prefill_flops


@dataclass
class StageRecord:
    """One stage in one forward. Tensors stay on the model's device (recording copies nothing).

    Attributes:
        stage: the stage's spec, e.g. `vtc-cls@64`.
        at: its place.
        tokens_in: visual tokens per image reaching the stage (`N`).
        tokens_out: tokens per image leaving it (`k`).
        kept: per image, `[k]` long: the encoder patch index each output stands for, in output
            order: ascending, unless the selector keeps another order (`prumerge-merge`'s
            `order="score"`).
        weights: per image, `[k, N]` provenance weights for merges; `None` for pure drops.
        scores: per image, the scorer's `[N]` scores over the tokens reaching the stage; `None`
            for a score-free selector.
        image_sample: per image, the batch row whose prompt holds it.
        counts: per image, `(tokens in, tokens out)` when they differ between images (LLaVA-NeXT:
            each image has its own number of tokens); `tokens_in`/`tokens_out` are then the largest.
    """

    stage: str
    at: str
    tokens_in: int
    tokens_out: int
    kept: list[Tensor]
    weights: list[Tensor] | None = None
    scores: list[Tensor] | None = None
    image_sample: list[int] = field(default_factory=list)
    counts: list[tuple[int, int]] | None = None

    def kept_per_image(self) -> list[int]:
        """Tokens each image keeps after this stage (they differ under a budget rule)."""
        return [out for _, out in self.counts] if self.counts is not None else [self.tokens_out] * len(self.kept)

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible summary (kept indices as lists)."""
        return {
            "name": self.stage,
            "at": self.at,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "kept": [idx.tolist() for idx in self.kept],
            "image_sample": list(self.image_sample),
            "counts": self.counts,
        }


@dataclass
class ForwardRecord:
    """One compressed forward (a prefill): its stages and the LLM sequence lengths.

    `seq_len_in`/`seq_len_out`: the prompt length before compression and as the LLM's first layer
    sees it; `layer_tokens`: per decoder layer, the tokens it sees when a stage runs inside the
    LLM (`None`: every layer sees `seq_len_out`); `llm_shape`: the LLM's `(width, FFN width,
    layers)`, for the FLOPs; `scoring_flops`: the stages' scoring overhead per sequence
    (`tokenprune.flops.signal_flops` of every signal they read); `vision_tokens`: per encoder block,
    the tokens ([CLS] included) it saw per image; `vision_shape`: the encoder's `(width, FFN width,
    tokens per block unpruned)`.
    """

    stages: list[StageRecord]
    seq_len_in: int
    seq_len_out: int
    layer_tokens: list[int] | None = None
    llm_shape: tuple[int, int, int] | None = None
    scoring_flops: float = 0.0
    vision_tokens: list[int] | None = None
    vision_shape: tuple[int, int, int] | None = None

    def tokens_per_layer(self) -> list[int]:
        """Tokens each decoder layer saw in this prefill (needs `llm_shape`)."""
        return self.layer_tokens or [self.seq_len_out] * self.llm_shape[2]

    def llm_flops(self) -> dict[str, float] | None:
        """Theoretical LLM prefill FLOPs per sequence (FastV's formula) and the scoring overhead:
        `{"pruned", "unpruned", "ratio", "scoring", "ratio_with_scoring"}`."""
        if self.llm_shape is None:
            return None
        d, m, layers = self.llm_shape
        pruned = prefill_flops(self.tokens_per_layer(), d, m)
        unpruned = prefill_flops([self.seq_len_in] * layers, d, m)
        return {
            "pruned": pruned,
            "unpruned": unpruned,
            "ratio": pruned / unpruned,
            "scoring": self.scoring_flops,
            "ratio_with_scoring": (pruned + self.scoring_flops) / unpruned,
        }

    def vision_flops(self) -> dict[str, float] | None:
        """Theoretical encoder FLOPs per image: `{"pruned", "unpruned", "ratio"}` (stages inside the
        encoder shorten the blocks after them)."""
        if self.vision_shape is None or self.vision_tokens is None:
            return None
        d, m, tokens = self.vision_shape
        pruned = prefill_flops(self.vision_tokens, d, m)
        unpruned = prefill_flops([tokens] * len(self.vision_tokens), d, m)
        return {"pruned": pruned, "unpruned": unpruned, "ratio": pruned / unpruned}

    def to_json(self) -> dict[str, Any]:
        return {
            "seq_len_in": self.seq_len_in,
            "seq_len_out": self.seq_len_out,
            "layer_tokens": self.layer_tokens,
            "vision_tokens": self.vision_tokens,
            "llm_flops": self.llm_flops(),
            "vision_flops": self.vision_flops(),
            "stages": [s.to_json() for s in self.stages],
        }
