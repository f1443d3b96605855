"""Registry: built-ins, duplicates, and plugins discovered through entry points."""

import subprocess
import sys
import types
from importlib.metadata import EntryPoint

import pytest
from torch import nn

import tokenprune as tp
from tokenprune.adapters.base import ModelAdapter, find_adapter
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.errors import RegistryError
from tokenprune.registry import REGISTRY, STRATEGY_GROUP, PluginWarning


def test_builtins_by_role():
    scorers, selectors = tp.list_strategies("scorer"), tp.list_strategies("selector")
    assert {"vtc-cls", "vtc-cls-ensemble", "random"} <= set(scorers)
    assert {"topk", "uniform"} <= set(selectors)
    assert all(e.origin == "built-in" for e in scorers.values())
    assert "llava" in tp.list_adapters()


def test_registering_a_builtin_name_is_refused_naming_it():
    class Other(tp.ScoringStrategy):
        def score(self, ctx):
            return ctx.tokens[..., 0]

    with pytest.raises(
        RegistryError,
        match=r"'vtc-cls' is registered twice: it is the built-in tokenprune\.strategies\.vtc_cls\.VTCCLS, "
        r"which user code \(.*Other\) cannot replace",
    ):
        tp.register("vtc-cls")(Other)
    assert tp.list_strategies()["vtc-cls"].cls.__name__ == "VTCCLS" and Other.name == ""


def python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, where the registry has not loaded yet."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_builtin_name_clash_before_first_use_breaks_no_other_name():
    """Registered before the registry ever loaded (the first thing a script does), the clash is
    refused at once and every built-in still builds."""
    result = python(
        "import tokenprune as tp\n"
        "from tokenprune.errors import RegistryError\n"
        "class Mine(tp.Selector):\n"
        "    def select(self, tokens, scores, k, grid=None): ...\n"
        "try:\n"
        "    tp.register('uniform')(Mine)\n"
        "except RegistryError as exc:\n"
        "    print('refused:', exc)\n"
        "print(tp.create('uniform').name, tp.create('topk').name, tp.Pipeline.from_spec('vtc-cls@4'))\n"
    )
    assert result.returncode == 0, result.stderr
    refused, built = result.stdout.strip().splitlines()
    assert "built-in tokenprune.strategies.uniform.Uniform" in refused and "__main__.Mine" in refused
    assert built == "uniform topk vtc-cls@4"


def test_first_use_from_many_threads_at_once():
    """Eight threads building a pipeline at the same instant in a fresh interpreter all succeed."""
    result = python(
        "import threading\n"
        "import tokenprune as tp\n"
        "barrier, out = threading.Barrier(8), []\n"
        "def build():\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        out.append(str(tp.Pipeline.from_spec('vtc-cls@36')))\n"
        "    except Exception as exc:\n"
        "        out.append(repr(exc))\n"
        "threads = [threading.Thread(target=build) for _ in range(8)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print('\\n'.join(out))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["vtc-cls@36"] * 8


@pytest.fixture
def restore_registry():
    REGISTRY.ensure_loaded()
    saved = dict(REGISTRY._strategies), dict(REGISTRY._adapters)
    yield
    REGISTRY._strategies, REGISTRY._adapters = saved


CELL = """
import tokenprune as tp

@tp.register("cell-norm")
class CellNorm(tp.ScoringStrategy):
    def score(self, ctx):
        return ctx.tokens.norm(dim=-1)
"""


def test_rerunning_a_notebook_cell_replaces_its_class(restore_registry):
    namespace = {"__name__": "notebook_cell"}
    exec(CELL, namespace)
    first = namespace["CellNorm"]
    exec(CELL, namespace)
    assert namespace["CellNorm"] is not first
    entry = tp.list_strategies()["cell-norm"]
    assert entry.cls is namespace["CellNorm"] and entry.origin == "user code"
    assert type(tp.create("cell-norm")) is namespace["CellNorm"]
    other = {"__name__": "another_module"}
    with pytest.raises(RegistryError, match="'cell-norm' is registered twice: by user code .* and by user code"):
        exec(CELL, other)  # the same name from another module is still a clash


def test_one_class_under_two_names_is_refused(restore_registry):
    class Twice(tp.ScoringStrategy):
        def score(self, ctx):
            return ctx.tokens[..., 0]

    tp.register("twice-a")(Twice)
    with pytest.raises(RegistryError, match="already registered as strategy 'twice-a'"):
        tp.register("twice-b")(Twice)
    assert Twice.name == "twice-a" and "twice-b" not in tp.list_strategies()


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


def test_plugin_calling_sys_exit_on_import_is_reported(plugin_module, tmp_path, monkeypatch):
    (tmp_path / "exiting_tokenprune_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="exiting", value="exiting_tokenprune_plugin", group=STRATEGY_GROUP)
    with pytest.warns(PluginWarning, match=r"plugin 'exiting'.*SystemExit\(3\) \(it called sys.exit\)"):
        REGISTRY._load_plugin(ep, STRATEGY_GROUP)
    assert tp.Pipeline.from_spec("vtc-cls@4").stages[0].scorer.name == "vtc-cls"


def claiming(model_type: type, base: type = ModelAdapter, fail: bool = False) -> type:
    """An adapter class that claims every `model_type` (or raises in `supports` when `fail`)."""

    class Claiming(base):
        @classmethod
        def supports(cls, model):
            if fail:
                raise RuntimeError("supports() is broken")
            return isinstance(model, model_type)

    return Claiming


def test_adapter_whose_supports_raises_is_skipped_with_a_warning(restore_registry, tiny):
    tp.register_adapter("aaa-broken")(claiming(object, fail=True))
    with pytest.warns(PluginWarning, match=r"adapter 'aaa-broken' \(user code, .*Claiming\) raised in supports\(\)"):
        adapter = find_adapter(tiny.model)
    assert type(adapter) is LlavaAdapter


def test_builtin_adapter_wins_over_a_plugin_claiming_its_models(restore_registry, tiny):
    with REGISTRY._loading_from("plugin greedy-dist"):
        tp.register_adapter("aaa-greedy")(claiming(nn.Module, LlavaAdapter))  # sorts before 'llava'
    with pytest.warns(PluginWarning, match=r"'aaa-greedy' \(plugin greedy-dist\) also claims .*'llava' is used"):
        adapter = find_adapter(tiny.model)
    assert type(adapter) is LlavaAdapter


def test_two_plugin_adapters_claiming_one_model_is_an_error_naming_both(restore_registry):
    tp.register_adapter("claim-one")(claiming(nn.Linear))
    tp.register_adapter("claim-two")(claiming(nn.Linear))
    with pytest.raises(RegistryError, match=r"Linear is claimed by two adapters: 'claim-one' .* and 'claim-two'"):
        find_adapter(nn.Linear(2, 2))
