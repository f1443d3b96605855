"""Registry: built-ins, duplicates, and plugins discovered through entry points."""

import sys
import types
from importlib.metadata import EntryPoint

import pytest

import tokenprune as tp
from tokenprune.errors import RegistryError
from tokenprune.registry import REGISTRY, STRATEGY_GROUP, PluginWarning


def test_builtins_by_role():
    scorers, selectors = tp.list_strategies("scorer"), tp.list_strategies("selector")
    assert {"vtc-cls", "vtc-cls-ensemble", "random"} <= set(scorers)
    assert {"topk", "uniform"} <= set(selectors)
    assert all(e.origin == "built-in" for e in scorers.values())
    assert "llava" in tp.list_adapters()


def test_duplicate_name_names_both_sources():
    class Other(tp.ScoringStrategy):
        def score(self, ctx):
            return ctx.tokens[..., 0]

    with pytest.raises(
        RegistryError, match=r"'vtc-cls' is registered twice: by built-in .*VTCCLS.* and by built-in .*Other"
    ):
        tp.register("vtc-cls")(Other)


@pytest.fixture
def plugin_module(monkeypatch):
    module = types.ModuleType("fake_tokenprune_plugin")

    class NormScorer(tp.ScoringStrategy):
        """Feature-norm scorer from a plugin."""

        def score(self, ctx):
            return ctx.tokens.norm(dim=-1)

    module.NormScorer = NormScorer
    monkeypatch.setitem(sys.modules, module.__name__, module)
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies)
    yield module
    REGISTRY._strategies = saved


def test_plugin_entry_point_registers_with_origin(plugin_module):
    ep = EntryPoint(name="norm", value="fake_tokenprune_plugin:NormScorer", group=STRATEGY_GROUP)
    REGISTRY._load_plugin(ep, STRATEGY_GROUP)
    entry = tp.list_strategies()["norm"]
    assert entry.origin.startswith("plugin ") and entry.doc == "Feature-norm scorer from a plugin."
    assert tp.Pipeline.from_spec("norm@4").stages[0].scorer.name == "norm"


def test_broken_plugin_is_a_warning_and_the_rest_works(plugin_module):
    broken = EntryPoint(name="broken", value="no_such_module_xyz:Thing", group=STRATEGY_GROUP)
    with pytest.warns(PluginWarning, match="plugin 'broken'.*no_such_module_xyz"):
        REGISTRY._load_plugin(broken, STRATEGY_GROUP)
    assert "broken" not in tp.list_strategies()
    assert tp.Pipeline.from_spec("vtc-cls@4").stages[0].scorer.name == "vtc-cls"


def test_plugin_with_clashing_name_is_skipped_with_warning(plugin_module):
    clash = EntryPoint(name="vtc-cls", value="fake_tokenprune_plugin:NormScorer", group=STRATEGY_GROUP)
    with pytest.warns(PluginWarning, match="registered twice"):
        REGISTRY._load_plugin(clash, STRATEGY_GROUP)
    assert tp.list_strategies()["vtc-cls"].origin == "built-in"
