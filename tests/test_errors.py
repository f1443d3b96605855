"""Bad input gets a clear error that says what was wrong and what is allowed."""

import pytest
import torch
from conftest import N_PATCHES, images
from transformers import LlamaConfig, LlamaForCausalLM

import tokenprune as tp
from tokenprune.errors import BudgetError, ScoreError, SpecError, UnknownStrategyError, UnsupportedModelError


@pytest.mark.parametrize("budget", [0, -3])
def test_budget_count_below_one(budget):
    with pytest.raises(BudgetError, match="k >= 1"):
        tp.Stage(scorer="vtc-cls", budget=budget)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan")])
def test_budget_ratio_outside_unit_interval(budget):
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        tp.Stage(scorer="vtc-cls", budget=budget)


def test_budget_larger_than_tokens(tiny):
    inputs = tiny.inputs(["what"], images(1))
    with pytest.raises(BudgetError, match=f"exceeds the {N_PATCHES} tokens"):
        with tp.apply(tiny.model, f"vtc-cls@{N_PATCHES + 1}"):
            tiny.model(**inputs)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(UnknownStrategyError, match="known strategies: .*vtc-cls"):
        tp.Pipeline.from_spec("vtc-clss@64")


@pytest.mark.parametrize(
    "spec",
    [
        "vtc-cls",
        "vtc-cls@",
        "vtc-cls@abc",
        "vtc-cls(layer=)@4",
        "vtc-cls(3)@4",
        "vtc-cls+topk+topk@4",
        "vtc-cls@4@nowhere",
        "",
        "vtc-cls(layer=[1)@4",
        "topk@4",
        "uniform+topk@4",
    ],
)
def test_malformed_spec(spec):
    with pytest.raises(tp.TokenpruneError):
        tp.Pipeline.from_spec(spec)


def test_unknown_parameter_names_the_allowed_ones():
    with pytest.raises(tp.errors.StrategyConfigError, match="its parameters: layer"):
        tp.create("vtc-cls", layr=3)


def test_unsupported_model_lists_supported():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    )
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        with tp.apply(model, "vtc-cls@4"):
            pass


def test_nan_scores_are_refused():
    scores = torch.rand(2, 6)
    scores[1, 3] = float("nan")
    with pytest.raises(ScoreError, match=r"NaN \(images \[1\]\)"):
        tp.create("topk").reduce(tp.SelectContext(tokens=torch.zeros(2, 6, 3), scores=scores, k=2))


def test_stage_order_and_budgets_validated():
    with pytest.raises(SpecError, match="model order"):
        tp.Pipeline.from_spec("vtc-cls@8 > vtc-cls@4")
    with pytest.raises(tp.errors.PlaceError, match="cannot run at llm:2"):
        tp.Pipeline.from_spec("vtc-cls@8@llm:2")


def test_unsupported_place_for_adapter(tiny):
    from tokenprune.adapters.llava import LlavaAdapter

    class ProjectorOnly(LlavaAdapter):
        name, places = "projector-only", ("projector",)

    with pytest.raises(
        tp.errors.PlaceError,
        match="vision:1, which the 'projector-only' adapter does not support; supported places: projector",
    ):
        ProjectorOnly(tiny.model).check(tp.Pipeline([tp.Stage(at="vision:1", selector="uniform", budget=4)]))


def test_vision_stage_after_the_feature_block_is_refused(tiny):
    with pytest.raises(
        tp.errors.PlaceError, match="after block 2, whose output the projector reads; use vision:L with L <= 2"
    ):
        with tp.apply(tiny.model, "tome@4@vision:3"):
            pass


@pytest.mark.parametrize(
    ("spec", "block"),
    [
        ("tome@8@vision:2 > vtc-cls(layer=1)@4", 1),  # the projector stage reads a block before the merge
        ("uniform@8@vision:1 > tome@4@vision:2 > vtc-cls(layer=0)@2", 0),
    ],
)
def test_signal_from_a_block_whose_tokens_are_gone_is_refused(tiny, spec, block):
    with pytest.raises(
        tp.errors.SignalError, match=f"reads vision block {block}, but the tokens it receives exist in blocks"
    ):
        with tp.apply(tiny.model, spec):
            pass


def test_nan_scores_inside_a_model_are_refused_before_the_forward_returns(tiny):
    """The adapter defers the NaN check until the LM head has been launched (nothing between tower
    and LLM waits for the device); it still fires, naming the image, before the forward or
    `generate` returns anything, or on exit for an encoding no forward consumed; the next call
    runs clean."""
    from tokenprune.registry import REGISTRY

    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)

    @tp.register("nan-for-second-image")
    class NanForSecondImage(tp.ScoringStrategy):
        def score(self, ctx):
            scores = ctx.tokens.float().norm(dim=-1)
            scores[1, 2] = float("nan")
            return scores

    try:
        inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=43))
        with tp.apply(tiny.model, "nan-for-second-image@4"):
            with pytest.raises(ScoreError, match=r"selector 'topk' contain NaN \(images \[1\]\)"):
                tiny.model(**inputs)
            with pytest.raises(ScoreError, match=r"selector 'topk' contain NaN \(images \[1\]\)"):
                tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            with pytest.raises(ScoreError, match=r"selector 'topk' contain NaN \(images \[1\]\)"):
                tiny.model.model(**inputs)  # the core on its own
        with pytest.raises(ScoreError, match=r"selector 'topk' contain NaN \(images \[1\]\)"):
            with tp.apply(tiny.model, "nan-for-second-image@4"):  # encoded alone: refused on exit
                tiny.model.model.get_image_features(pixel_values=inputs["pixel_values"])
        calls = []

        @tp.register("nan-on-first-call")
        class NanOnFirstCall(tp.ScoringStrategy):
            def score(self, ctx):
                scores = ctx.tokens.float().norm(dim=-1)
                if not calls:
                    scores[0, 1] = float("nan")
                calls.append(1)
                return scores

        with tp.apply(tiny.model, "nan-on-first-call@4"):  # an encoding alone, then a clean forward
            tiny.model.model.get_image_features(pixel_values=inputs["pixel_values"])
            with pytest.raises(ScoreError, match=r"selector 'topk' contain NaN \(images \[0\]\)"):
                tiny.model(**inputs)
        assert len(calls) == 2
        with tp.apply(tiny.model, "vtc-cls@4"):
            placeholders = (inputs["input_ids"] == tiny.model.config.image_token_id).sum(dim=1)
            width = int((inputs["input_ids"].shape[1] - placeholders + 4).max())
            assert tiny.model(**inputs).logits.shape[1] == width
    finally:
        REGISTRY._strategies = saved
