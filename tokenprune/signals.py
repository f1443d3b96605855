"""Signals: the inputs a scorer asks an adapter to compute during the forward.

A signal is a small frozen pydantic model, hashable, so a scorer's request and the adapter's answer
meet in a dict. Adapters compute only the signals the pipeline asks for, and say clearly which ones
they cannot provide.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Signal(BaseModel):
    """Base of every signal; subclasses are frozen value objects."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ClsAttention(Signal):
    """Post-softmax attention of the [CLS] query on each patch key in one vision-encoder block.

    `heads="mean"`: per-head attention, averaged over heads (unweighted); `heads="concat"`: one
    attention over the full projection width `D`, scaled by `D ** -0.5` (PruMerge's official
    score). The [CLS]->[CLS] entry is excluded, so the value is `[B, N]` over the `N` patch tokens
    (softmax taken over all `N + 1` keys). `layer` is a non-negative block index.
    """

    layer: int = Field(ge=0)
    heads: Literal["mean", "concat"] = "mean"


class PatchAttention(Signal):
    """Mean over one axis of the patch-to-patch attention map of one vision-encoder block,
    averaged over heads, `[B, N]` (the [CLS] row and column, if any, dropped): FoPru's significance.

    `axis="col"`: entry `j` is the mean over queries `i` of `A[i, j]` (attention patch `j`
    receives); `axis="row"`: entry `i` is the mean over keys `j` of `A[i, j]` (attention patch `i`
    gives). `scores="logits"`: `A = QK^T / sqrt(d)` before the softmax (linear, so no `N x N` map is
    built); `scores="softmax"`: post-softmax probabilities over all keys of the block ([CLS]
    included), computed in query chunks. `layer` is a non-negative block index.
    """

    layer: int = Field(ge=0)
    axis: Literal["col", "row"] = "col"
    scores: Literal["logits", "softmax"] = "logits"


class PatchKeys(Signal):
    """Key projections of the patch tokens in one vision-encoder block (the [CLS] key dropped).

    `heads="mean"`: averaged over heads, `[B, N, d_head]` (VisionZip's metric); `heads="concat"`:
    the full projection, `[B, N, D]` (PruMerge's). `layer` is a non-negative block index.
    """

    layer: int = Field(ge=0)
    heads: Literal["mean", "concat"] = "mean"


class PatchKeyNorm(Signal):
    """Lp norm of each patch token's key in one vision-encoder block (all heads concatenated, after
    the block's rotary embedding if it has one; the [CLS] key dropped), `[B, N]`. `layer` is a
    non-negative block index."""

    layer: int = Field(ge=0)
    p: int = Field(2, ge=1)


class TextAttention(Signal):
    """Attention that visual tokens receive inside the LLM at decoder layer `layer`.

    `query="last"`: the row of the last prompt token; `query="mean"`: the mean over every
    (non-padding) query token. Post-softmax, averaged over heads; value `[B, N]` over the visual
    tokens reaching the stage.
    """

    layer: int = Field(ge=0)
    query: Literal["last", "mean"] = "last"


class KeyNorm(Signal):
    """Lp norm of each visual token's key at LLM decoder layer `layer` (after the rotary embedding,
    all key heads concatenated), `[B, N]`: DART's pivot criterion."""

    layer: int = Field(ge=0)
    p: int = Field(1, ge=1)


class TextPivots(Signal):
    """The `count` prompt tokens after each image with the largest L1 key norm at LLM layer `layer`,
    as hidden states entering layer `layer + 1` passed through the LLM's final norm: `[B, count, D]`."""

    layer: int = Field(ge=0)
    count: int = Field(ge=1)


class NormedTokens(Signal):
    """The visual tokens reaching an LLM stage passed through the LLM's final norm, `[B, N, D]`."""
