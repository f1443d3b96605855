"""A signal type of the example plugin and its provider; importing this module registers both.

`PatchHiddenNorm(layer)` is the L2 norm of each patch token's hidden state leaving vision block
`layer`, `[B, N]`. tokenprune's built-in providers do not compute it; `HIDDEN_NORM`, a
`BlockOutputs` provider, computes it from a forward hook on that block. It is registered for the
built-in LLaVA families (CLIP and SigLIP towers); the plugin's VipLLaVA family lists it itself.
"""

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.providers import BlockOutputs


@tp.register_signal
class PatchHiddenNorm(tp.Signal):
    """L2 norm of each patch token's hidden state leaving vision block `layer` ([CLS] dropped), `[B, N]`.

    Cost: a square and a sum per entry, then a root per token, `2 * tokens * width`."""

    place: ClassVar[Literal["vision", "llm"]] = "vision"
    layer: int = Field(ge=0)

    def flops(self, tokens: int, width: int) -> int:
        return 2 * tokens * width


def hidden_norm(signal: tp.Signal, patches: Tensor) -> Tensor:
    """`[B, N]` float32: the L2 norm of each patch state of `patches` `[B, N, D]`."""
    return patches.float().norm(dim=-1)


HIDDEN_NORM = tp.register_provider(
    BlockOutputs(provides=(PatchHiddenNorm,), compute=hidden_norm),
    adapters=("llava", "llava-next", "llava-onevision"),
)
