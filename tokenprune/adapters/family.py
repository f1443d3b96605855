"""A model family as data: where its parts live (`Layout`), how its image features become LLM tokens
(a `Packing`, see `tokenprune.adapters.packing`), how kept tokens are numbered (a `PositionRule`), and
which signals it computes, where and how (its provider table, see `tokenprune.adapters.providers`).
The engine (`tokenprune.adapters.engine`) runs every family the same way.

A family module is a `Family(...)` value and a one-line adapter class:

    LLAVA = Family(model_classes=("LlavaForConditionalGeneration",), packing=Plain(), ...)

    @register_adapter("llava")
    class LlavaAdapter(Engine):
        family = LLAVA
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..pipeline import Stage
from ..strategy import ModelInfo
from .providers import DECODER, QK_PROBE, Provider
from .sequence import Compaction

if TYPE_CHECKING:
    from .engine import Engine, ImageTokens, Prefill


def resolve(root: Any, *paths: str, default: Any = ...) -> Any:
    """The first of the dotted attribute `paths` found under `root` (e.g. `"vision_model.encoder.layers"`).

    Raises:
        AttributeError: none is there and no `default` is given (the layout does not fit the model).
    """
    for path in paths:
        node = root
        for name in path.split("."):
            node = getattr(node, name, None)
            if node is None:
                break
        if node is not None:
            return node
    if default is not ...:
        return default
    raise AttributeError(f"{type(root).__name__} has none of {', '.join(paths)}")


@dataclass(frozen=True)
class Layout:
    """Where a family's parts live, as attribute paths (alternatives tried in order).

    Attributes:
        core: the HF core model under the `...ForConditionalGeneration` (its `forward` takes the prompt).
        tower: the vision tower, under the core.
        blocks: the tower's transformer blocks, under the tower.
        attention: a block's self-attention, under the block (its `q_proj`/`k_proj` feed vision signals).
        embeddings: the tower's embeddings, under the tower (a `cls_token` attribute there means [CLS]).
        cls_token: the attribute of the embeddings holding the [CLS] token, if the tower has one.
        query, key: the submodules of a block's attention whose outputs are the query and key its
            attention uses (after a qk-norm, where the tower has one); vision signals read them.
        projector: the projector, under the core (plain packing prunes in a pre-hook on it).
        llm: the decoder, under the core: its `layers` and final `norm` (for `llm:K` stages).
        image_token: the config field holding the image placeholder token id.
        feature_layer: the config field naming the tower output the projector reads (an index into
            `hidden_states`, or a list of them); `None`: the last block's output.
    """

    core: str = "model"
    tower: tuple[str, ...] = ("vision_tower",)
    blocks: tuple[str, ...] = ("vision_model.encoder.layers", "encoder.layers")
    attention: str = "self_attn"
    embeddings: tuple[str, ...] = ("vision_model.embeddings", "embeddings")
    cls_token: str = "class_embedding"
    query: str = "q_proj"
    key: str = "k_proj"
    projector: str = "multi_modal_projector"
    llm: str = "language_model"
    image_token: str = "image_token_id"
    feature_layer: str | None = "vision_feature_layer"


class Packing(Protocol):
    """How a family's tower output becomes the LLM's image tokens, and where the stages before the
    LLM run on it (`tokenprune.adapters.packing` holds the built-in ones)."""

    @property
    def shares_encodings(self) -> bool:
        """Whether the projector's input alone, fed back through `mm_encoder_outputs`, reproduces a forward."""
        ...

    @property
    def unequal(self) -> str:
        """What `llm:K` stages count per image, for their refusal of unequal counts ("tokens", "patch tokens")."""
        ...

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        """The patch grid `(rows, cols)` of one image (or crop), or `None` where it varies."""
        ...

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        """Refuse, before any hook is placed, stages before the LLM (`vision:L`, `projector`) it cannot run."""
        ...

    def attach(self, engine: Engine) -> list[Any]:
        """Hooks (or other removable changes) this packing needs on the model; `[]` for none."""
        ...

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """Encode the images of a prefill's core call `kw` unless `generate` did (`encoded`), run the
        stages before the LLM on them and return what reaches the LLM."""
        ...


class PositionRule(Protocol):
    """How the engine numbers the compressed prompt and the later tokens."""

    @property
    def fixed(self) -> str | None:
        """A `positions` mode this rule always uses (M-RoPE: `"original"`), or `None` to follow `tp.apply`'s."""
        ...

    def prefill(self, engine: Engine, kw: dict[str, Any], comp: Compaction) -> tuple[Tensor | None, Tensor | None]:
        """Position ids of the compressed prompt (`None`: HF's default) and a per-row `[B]` offset later
        tokens add (M-RoPE's delta; `None` for none). `kw` is the core call, still in the original frame."""
        ...

    def decode(self, prefill: Prefill, mask: Tensor | None, start: int, step: int) -> Tensor:
        """Original-frame position ids of a later forward's `step` tokens, the first at `start`
        (`mask`: its original-frame 2D attention mask, or `None`)."""
        ...

    def generation(self, engine: Engine, kwargs: dict[str, Any]) -> Tensor | None:
        """Position ids for `generate`'s keyword arguments `kwargs`, equal to those `generate` would
        compute itself, where this rule computes them faster; `None`: `generate` computes them."""
        ...


@dataclass(frozen=True)
class Sequential:
    """1D positions: kept tokens renumbered without gaps, or their original ids (`tp.apply(positions=...)`)."""

    fixed: str | None = None

    def prefill(self, engine: Engine, kw: dict[str, Any], comp: Compaction) -> tuple[Tensor | None, Tensor | None]:
        return comp.positions(kw.get("position_ids"), engine.positions), None

    def decode(self, prefill: Prefill, mask: Tensor | None, start: int, step: int) -> Tensor:
        source = prefill.compaction.source
        return (torch.arange(step, device=source.device) + start).expand(source.shape[0], -1)

    def generation(self, engine: Engine, kwargs: dict[str, Any]) -> Tensor | None:
        return None


@dataclass(frozen=True)
class Family:
    """One model family: data for the engine.

    Attributes:
        model_classes: the transformers class names it drives (looked up in `transformers`).
        packing: how features become LLM tokens (`Plain()`, `Anyres(...)`, `Merged()`).
        layout: where the parts live.
        positions: the position rule (`Sequential()`, `mrope.MRope()`).
        places: the place kinds stages may run at (`vision` needs `Plain` packing and a CLIP-style tower,
            or a packing with `tower_stages`).
        ragged_places: places where images of one batch may keep different counts (a budget rule).
        feature_keys: config fields that shape the image features; per-call overrides are refused.
        providers: the signal providers, first match wins (a plugin's, `providers.register_provider`,
            come after): by default the tower blocks' q/k (`QK_PROBE`: `ClsAttention`,
            `PatchAttention`, `PatchKeys`, `PatchKeyNorm`) and the `llm:K` stages (`DECODER`); a
            family whose tower has no q/k to read lists `(DECODER,)`. A signal none provides is refused.
        keeps_cls: whether the projector's input starts with the [CLS] feature, from the config.
        no_signals: the advice of the refusal of a vision signal no provider computes.
        tower_stages: whether the packing runs the `vision:L` stages and computes the vision signals
            itself (its providers are `providers.Computed`): the engine then sets up no encoder stages,
            and refuses providers that hook the tower's blocks (Qwen's tower, `qwen_tower.TowerMerged`).
    """

    model_classes: tuple[str, ...]
    packing: Packing
    layout: Layout = field(default_factory=Layout)
    positions: PositionRule = field(default_factory=Sequential)
    places: tuple[str, ...] = ("projector", "llm")
    ragged_places: tuple[str, ...] = ("projector",)
    feature_keys: tuple[str, ...] = ()
    providers: tuple[Provider, ...] = (QK_PROBE, DECODER)
    keeps_cls: Callable[[Any], bool] = lambda config: False
    no_signals: str = "use score-free selectors (divprune, tome, pool, uniform) or random"
    tower_stages: bool = False

    def classes(self) -> tuple[type[nn.Module], ...]:
        """The model classes this transformers install has (a family may name classes newer than it)."""
        import transformers

        found = (getattr(transformers, name, None) for name in self.model_classes)
        return tuple(c for c in found if isinstance(c, type))
