"""Pooled soft tokens: a projector that average-pools the tower's square patch grid (Gemma 3's
`multi_modal_projector`: 64x64 patches -> 16x16 = 256 soft tokens with a 4x4 window).

Pure functions of tensors and a `PooledGrid`, no model in them. A kept token is a pooled soft token;
a per-patch vision signal (FoPru's `PatchAttention`, patch keys) reaches it as the mean over the
token's pooling window, the same average the projector takes of the features, and provenance
back to patches is that window.

Also here: the image-block rule of an LLM that lets an image's tokens attend to each other in both
directions (`token_type_ids` == 1 marks image tokens; one contiguous run of them is one image), and
the reference mask that rule gives, used to check a compressed prompt's mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ..errors import InputError
from ..signals import Signal


@dataclass(frozen=True)
class PooledGrid:
    """A square grid of `patches x patches` tower patches, average-pooled in `kernel x kernel`
    windows (stride = kernel) into `tokens x tokens` soft tokens. Patches and tokens are numbered
    row-major (`row * side + col`), as the tower flattens patches and the projector flattens its
    pooled map."""

    patches: int  # patches per side
    tokens: int  # soft tokens per side

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.patches % self.tokens:
            raise InputError(
                f"a {self.patches}x{self.patches} patch grid cannot be pooled into {self.tokens}x{self.tokens} "
                "soft tokens: the side must divide evenly"
            )

    @classmethod
    def from_config(cls, config: Any) -> PooledGrid:
        """The grid of a Gemma 3 style config (`vision_config.image_size / patch_size` patches per side,
        `mm_tokens_per_image` soft tokens, a square number).

        Raises:
            InputError: `mm_tokens_per_image` is not a square, or its side does not divide the patch side.
        """
        side = int(config.mm_tokens_per_image**0.5)
        if side * side != config.mm_tokens_per_image:
            raise InputError(f"mm_tokens_per_image={config.mm_tokens_per_image} is not a square number of soft tokens")
        return cls(config.vision_config.image_size // config.vision_config.patch_size, side)

    @property
    def kernel(self) -> int:
        """Patches per side of one pooling window."""
        return self.patches // self.tokens

    @property
    def n_patches(self) -> int:
        return self.patches * self.patches

    @property
    def n_tokens(self) -> int:
        return self.tokens * self.tokens

    def window(self, token: Tensor) -> Tensor:
        """The patches each soft token averages: `token` `[...]` long -> `[..., kernel * kernel]` patch
        indices, row-major within the window (ascending)."""
        k = self.kernel
        offsets = torch.arange(k, device=token.device)
        rows = (token // self.tokens)[..., None, None] * k + offsets[:, None]  # [..., k, 1]
        cols = (token % self.tokens)[..., None, None] * k + offsets[None, :]  # [..., 1, k]
        return (rows * self.patches + cols).flatten(-2)

    def pool(self, values: Tensor) -> Tensor:
        """Per-patch `values` `[B, N, ...]` (`N = patches^2`) averaged over each soft token's window:
        `[B, T, ...]` (`T = tokens^2`), float32. A `[B, N]` score becomes the window's mean score; a
        `[B, N, d]` feature (keys) the window's mean feature.

        Raises:
            InputError: `values` does not hold one entry per patch.
        """
        if values.shape[1] != self.n_patches:
            raise InputError(
                f"a per-patch signal has {values.shape[1]} entries per image where the {self.patches}x{self.patches} "
                f"patch grid has {self.n_patches}"
            )
        k = self.kernel
        windows = rearrange(values.float(), "b (i ki j kj) ... -> b (i j) (ki kj) ...", ki=k, j=self.tokens, kj=k)
        return windows.mean(dim=2)

    def pool_signals(self, signals: Mapping[Signal, Tensor]) -> dict[Signal, Tensor]:
        """Every per-patch signal `[B, N, ...]` pooled to the soft tokens (`pool`)."""
        return {signal: self.pool(value) for signal, value in signals.items()}


def image_blocks(token_type_ids: Tensor) -> Tensor:
    """`[B, P]` long: for each image token (`token_type_ids == 1`) the index of its image in its row
    (one contiguous run of image tokens is one image, counted from 0), `-1` elsewhere."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def bidirectional_image_mask(token_type_ids: Tensor, key_mask: Tensor, sliding_window: int | None = None) -> Tensor:
    """The `[B, P, P]` bool attention (query, key) of a causal LLM in which an image's tokens also see
    each other in both directions: key `j` is visible from query `i` when `j` is not padding and
    (`j <= i`, or `i` and `j` are tokens of one image); with `sliding_window` `w`, also `i - j < w`
    (a window on earlier keys only, applied after the image rule, as Gemma 3's local layers do: an
    image token sees its image's later tokens however far).

    Args:
        token_type_ids: `[B, P]`, 1 at image tokens.
        key_mask: `[B, P]`, 1 (or True) at real tokens, 0 at padding.
    """
    p = token_type_ids.shape[1]
    at = torch.arange(p, device=token_type_ids.device)
    causal = at[None, :] <= at[:, None]  # [P(query), P(key)]
    blocks = image_blocks(token_type_ids)
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    allowed = (causal[None] | same_image) & key_mask.bool()[:, None, :]
    if sliding_window is not None:
        allowed &= (at[:, None] - at[None, :])[None] < sliding_window
    return allowed
