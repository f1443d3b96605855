"""Scores of any value: every registered selector handles ±inf by its documented meaning (+inf kept
first, -inf last, for selectors that only rank) or refuses it, and never turns finite tokens into
NaN; a prompt without the image token but with pixel_values gets a clear error."""

import pytest
import torch
from conftest import images

import tokenprune as tp
from tokenprune.errors import InputError, ScoreError
from tokenprune.registry import REGISTRY

SELECTORS = sorted(name for name, entry in tp.list_strategies().items() if entry.role == "selector")
INFO = tp.ModelInfo(vision_layers=2, feature_layer=0, stage_layer=2)
HUGE = torch.finfo(torch.float32).max


def case(n: int = 12, d: int = 6) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, n, d, generator=g)
    return tokens, g


def run(name: str, scores: torch.Tensor, k: int):
    """`name` reduces random tokens to `k` under `scores`; an adaptive selector (PruMerge's) in its
    fixed-budget form, so that every image of the batch keeps `k`."""
    adaptive = "adaptive" in tp.list_strategies()[name].cls.model_fields
    selector = tp.create(name, **({"adaptive": False} if adaptive else {}))
    tokens, g = case(scores.shape[1])
    signals = {s: torch.randn(*tokens.shape[:2], 4, generator=g) for s in selector.signals(INFO)}
    return selector, selector.reduce(tp.SelectContext(tokens=tokens, scores=scores, k=k, signals=signals))


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("k", [2, 5, 11])
def test_infinite_scores_keep_first_or_are_refused(name, k):
    scores = torch.rand(2, 12, generator=torch.Generator().manual_seed(k))
    scores[:, 7] = float("inf")
    scores[:, 3] = -float("inf")
    selector = tp.create(name)
    if selector.weights_by_scores:
        with pytest.raises(
            ScoreError, match=rf"selector '{name}' contain NaN or ±inf \(images \[0, 1\]\).*must be finite"
        ):
            run(name, scores, k)
        return
    _, red = run(name, scores, k)
    assert torch.isfinite(red.tokens).all()
    if selector.needs_scores:  # ranked first: +inf is kept by every score-based selector
        assert (red.index == 7).any(dim=1).all()
    if name == "topk":  # -inf ranks last: dropped whenever anything else can be kept
        assert not (red.index == 3).any()


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("value", [1e30, HUGE, -HUGE])
def test_huge_finite_scores_give_finite_tokens_or_a_clear_error(name, value):
    scores = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    scores[:, 2] = value
    scores[1, 9] = value
    try:
        _, red = run(name, scores, 5)
    except ScoreError as exc:
        assert f"selector '{name}' turned finite tokens into NaN or ±inf" in str(exc)
        return
    assert torch.isfinite(red.tokens).all()


def test_merging_selectors_refuse_overflowing_scores():
    """PruMerge sums score-weighted tokens (as the official code): scores near the float range
    overflow it, which is refused rather than passed on as NaN."""
    scores = torch.full((2, 12), HUGE)
    with pytest.raises(ScoreError, match=r"'prumerge-merge' turned finite tokens into NaN or ±inf \(images \[0, 1\]\)"):
        run("prumerge-merge", scores, 5)


@pytest.fixture
def scorer_of(request):
    """Register a scorer returning the tiny model's feature norms with some entries replaced."""
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)

    def make(name: str, value: float):
        @tp.register(name)
        class Fixed(tp.ScoringStrategy):
            def score(self, ctx):
                scores = ctx.tokens.float().norm(dim=-1)
                scores[:, 5] = value
                return scores

    yield make
    REGISTRY._strategies = saved


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), HUGE])
def test_prumerge_in_a_model_refuses_instead_of_nan_logits(tiny, scorer_of, value):
    scorer_of("odd-scores", value)
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=5))
    with pytest.raises(ScoreError, match="prumerge-merge"):
        with torch.no_grad(), tp.apply(tiny.model, "odd-scores+prumerge-merge(adaptive=False)@4"):
            tiny.model(**inputs)
    with torch.no_grad(), tp.apply(tiny.model, "odd-scores+topk@4") as run_:
        logits = tiny.model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert (5 in run_.trace[0].stages[0].kept[0].tolist()) == (value > 0)


@pytest.mark.parametrize(
    "texts", [["USER: what colour ASSISTANT:"], ["USER: what ASSISTANT:", "USER: how many ASSISTANT:"]]
)
def test_pixel_values_without_image_token_is_a_clear_error(tiny, texts):
    inputs = dict(tiny.processor.tokenizer(texts, return_tensors="pt", padding=True))
    inputs |= dict(tiny.processor.image_processor(images(len(texts)), return_tensors="pt"))
    for call in (lambda: tiny.model(**inputs), lambda: tiny.model.generate(**inputs, max_new_tokens=2)):
        with pytest.raises(InputError, match="a prompt without the image token .* cannot take pixel_values"):
            with torch.no_grad(), tp.apply(tiny.model, "vtc-cls@4"):
                call()
