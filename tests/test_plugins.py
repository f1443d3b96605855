"""Plugins found through real entry points (in a fresh interpreter): the example package in
`plugins/`, installed with pip, and a deliberately broken one. The example's strategies pass the
contract suite; its VipLLaVA adapter passes the adapter checks; its own signal type reaches its
scorer through the provider it registers, without touching the core."""

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import N_PATCHES, Tiny, build_tiny, images
from reference import cls_attention_eager, topk_reference
from test_contract import check_contract

import tokenprune as tp
import tokenprune.signals
from tokenprune.adapters import find_adapter, providers
from tokenprune.errors import SignalError, UnsupportedModelError
from tokenprune.models import load
from tokenprune.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "tokenprune-example"


def make_dist(site: Path, name: str, entry_points: str) -> None:
    """An installed-distribution record (dist-info) that importlib.metadata discovers on sys.path."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An environment where the example plugin is pip-installed (into a target directory) and a
    broken plugin's distribution record names a module that does not exist."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        check=True,
        timeout=300,
    )
    make_dist(site, "tokenprune-broken", "[tokenprune.strategies]\nbroken = tokenprune_no_such_module.strategies\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenprune.cli.app", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_list_names_plugins_with_origin_and_reports_the_broken_one(plugin_env):
    result = cli(plugin_env, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["strategies"]}
    assert rows["example-norm"]["origin"] == "plugin tokenprune-example"
    assert rows["example-chunk-mean"]["role"] == "selector"
    assert rows["vtc-cls"]["origin"] == "built-in" and "broken" not in rows
    assert (
        rows["example-vipllava"]["role"] == "adapter"
        and rows["example-vipllava"]["origin"] == "plugin tokenprune-example"
    )
    assert rows["llava"]["role"] == "adapter" and rows["llava"]["origin"] == "built-in"
    assert "plugin 'broken'" in result.stderr and "tokenprune-broken" in result.stderr


def test_cli_runs_plugin_strategies(plugin_env, tiny, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    for spec in ("example-norm@4", "example-chunk-mean@4", "example-norm+topk@0.5", "example-hidden-norm@4"):
        result = cli(
            plugin_env,
            "run",
            "--model",
            str(tiny.path),
            "--image",
            str(image),
            "--prompt",
            "what",
            "--strategy",
            spec,
            "--max-new-tokens",
            "2",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        stage = json.loads(result.stdout)["stages"][0]
        assert stage["tokens_out"] == (8 if spec.endswith("0.5") else 4)


def register_example(monkeypatch, module: str, table: str):
    """Import a module of the example plugin (it registers on import); restore the registry, the
    signal types and the registered signal providers after."""
    REGISTRY.ensure_loaded()
    saved = dict(getattr(REGISTRY, table))
    monkeypatch.setattr(tokenprune.signals, "_TYPES", dict(tokenprune.signals._TYPES))
    monkeypatch.setattr(providers, "_EXTRA", {k: list(v) for k, v in providers._EXTRA.items()})
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    importlib.import_module(module)
    yield
    setattr(REGISTRY, table, saved)
    for name in [m for m in sys.modules if m.split(".")[0] == "tokenprune_example"]:
        sys.modules.pop(name)


@pytest.fixture
def example_registered(monkeypatch):
    yield from register_example(monkeypatch, "tokenprune_example.strategies", "_strategies")


@pytest.mark.parametrize("name", ["example-norm", "example-chunk-mean", "example-hidden-norm"])
def test_example_plugin_passes_the_contract(example_registered, tiny, name):
    check_contract(tiny, name)


def hidden_norms(tiny: Tiny, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
    """`[I, N]`: the L2 norm of each patch's hidden state leaving vision block `block` ([CLS] dropped),
    from the tower run alone with `output_hidden_states` (`hidden_states[b + 1]` leaves block `b`)."""
    with torch.no_grad():
        out = tiny.model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[block + 1][:, 1:].float().norm(dim=-1)


@pytest.mark.parametrize("k", [1, 6])
def test_plugin_signal_reaches_its_scorer_through_its_provider(example_registered, tiny, k):
    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=5))
    with torch.no_grad(), tp.apply(tiny.model, f"example-hidden-norm@{k}") as run:
        tiny.model(**inputs)
    depth = tiny.model.config.vision_config.num_hidden_layers
    rows = hidden_norms(tiny, inputs["pixel_values"], depth - 2)  # the scorer's default block, -2
    record = run.trace[0]
    assert [x.tolist() for x in record.stages[0].kept] == [topk_reference(r.tolist(), k) for r in rows]
    assert record.seq_len_in - record.seq_len_out == N_PATCHES - k
    width = tiny.model.config.vision_config.hidden_size
    assert record.scoring_flops == 2 * (N_PATCHES + 1) * width  # the plugin signal's declared cost, per prompt


def test_plugin_signal_runs_inside_the_tower(example_registered, tiny):
    """`vision:1` prunes by block 0's output hidden states, which the stage's input is."""
    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=6))
    with torch.no_grad(), tp.apply(tiny.model, "example-hidden-norm(layer=0)@5@vision:1 > vtc-cls@3") as run:
        tiny.model(**inputs)
    rows = hidden_norms(tiny, inputs["pixel_values"], 0)
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), 5) for r in rows]
    assert [len(x) for x in run.trace[0].stages[1].kept] == [3, 3]


def test_a_family_without_the_provider_refuses_naming_what_it_provides(example_registered, tiny_gemma3):
    message = (
        "the gemma3 adapter cannot compute PatchHiddenNorm(layer=0) in the vision encoder or before the "
        "projector (place 'vision'): the gemma3 adapter provides there: PatchAttention, PatchKeyNorm, PatchKeys"
    )
    with pytest.raises(SignalError, match=re.escape(message)) as from_check:
        tp.check(tiny_gemma3.model, "example-hidden-norm(layer=0)@4")
    with pytest.raises(SignalError) as from_apply, tp.apply(tiny_gemma3.model, "example-hidden-norm(layer=0)@4"):
        pass
    assert str(from_check.value) == str(from_apply.value)


def test_check_agrees_with_attach_and_leaves_the_model_unchanged(example_registered, tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=7))
    with torch.no_grad():
        before = tiny.model(**inputs).logits
        assert tp.check(tiny.model, "example-hidden-norm@4").stages[0].budget == 4
        assert torch.equal(tiny.model(**inputs).logits, before)
        with tp.apply(tiny.model, "example-hidden-norm@4") as run:
            tiny.model(**inputs)
    assert run.trace[0].stages[0].tokens_out == 4


BUILT_IN_SPECS = [
    "vtc-cls@4",
    "fopru@4",
    "visionzip@6",
    "prumerge@4",
    "divprune@4",
    "tome@8@vision:1 > vtc-cls@4",
    "vtc-cls@8 > fastv@4@llm:1",
]


def built_in_outputs(tiny: Tiny, inputs: dict) -> list[tuple[torch.Tensor, list[list[int]]]]:
    outputs = []
    for spec in BUILT_IN_SPECS:
        with torch.no_grad(), tp.apply(tiny.model, spec) as run:
            logits = tiny.model(**inputs).logits
        outputs.append((logits, [x.tolist() for s in run.trace[0].stages for x in s.kept]))
    return outputs


def test_registering_the_plugin_signal_changes_no_built_in_output(monkeypatch, tiny):
    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=8))
    before = built_in_outputs(tiny, inputs)
    with contextlib.contextmanager(register_example)(monkeypatch, "tokenprune_example.strategies", "_strategies"):
        assert providers.providers_of("llava", ())  # the plugin's provider is in LLaVA's table now
        after = built_in_outputs(tiny, inputs)
    for (logits, kept), (logits_after, kept_after) in zip(before, after, strict=True):
        assert torch.equal(logits, logits_after) and kept == kept_after


@pytest.fixture(scope="module")
def tiny_vipllava(tmp_path_factory) -> Tiny:
    """A tiny VipLLaVA: its projector reads blocks -2 and -3 concatenated, without [CLS]."""
    path = build_tiny(
        tmp_path_factory.mktemp("vip"), "vipllava", seed=4, family="vipllava", vision_feature_layer=[-2, -3]
    )
    model, processor = load(str(path))
    return Tiny(path, model, processor)


@pytest.fixture
def vipllava_registered(monkeypatch):
    yield from register_example(monkeypatch, "tokenprune_example.adapters", "_adapters")


def test_vipllava_is_unsupported_without_the_plugin(tiny_vipllava):
    with pytest.raises(
        UnsupportedModelError,
        match=r"VipLlavaForConditionalGeneration; supported models: .*LlavaForConditionalGeneration \(llava\)",
    ):
        with tp.apply(tiny_vipllava.model, "vtc-cls@4"):
            pass


@pytest.mark.parametrize("name", ["vtc-cls", "vtc-cls-ensemble", "fastv", "divprune", "pool"])
def test_plugin_adapter_passes_the_contract(vipllava_registered, tiny_vipllava, name):
    check_contract(tiny_vipllava, name)


@pytest.mark.parametrize("k", [1, 6])
def test_plugin_adapter_vtc_cls_matches_eager_reference(vipllava_registered, tiny_vipllava, k):
    inputs = tiny_vipllava.inputs(["what colour is the square"] * 2, images(2, seed=3))
    with torch.no_grad(), tp.apply(tiny_vipllava.model, f"vtc-cls@{k}") as run:
        tiny_vipllava.model(**inputs)
    rows = cls_attention_eager(str(tiny_vipllava.path), inputs["pixel_values"])[2]  # feature block: max(-2, -3) of 4
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), k) for r in rows]
    assert run.trace[0].seq_len_in - run.trace[0].seq_len_out == N_PATCHES - k


def test_cli_runs_the_plugin_adapter(plugin_env, tiny_vipllava, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    result = cli(
        plugin_env,
        "run",
        "--model",
        str(tiny_vipllava.path),
        "--image",
        str(image),
        "--prompt",
        "what",
        "--strategy",
        "vtc-cls@5",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"][0]["tokens_out"] == 5


def test_plugin_family_lists_the_plugin_provider(example_registered, vipllava_registered, tiny_vipllava):
    """VipLLaVA's family record names the provider in its own table (no registration for it)."""
    assert "example-vipllava" not in providers._EXTRA
    inputs = tiny_vipllava.inputs(["what colour is the square", "how many"], images(2, seed=9))
    with torch.no_grad(), tp.apply(tiny_vipllava.model, "example-hidden-norm(layer=1)@5") as run:
        tiny_vipllava.model(**inputs)
    rows = hidden_norms(tiny_vipllava, inputs["pixel_values"], 1)
    assert [x.tolist() for x in run.trace[0].stages[0].kept] == [topk_reference(r.tolist(), 5) for r in rows]


@pytest.mark.parametrize("family", ["tiny_next", "tiny_onevision"])
def test_plugin_signal_runs_per_crop_on_the_anyres_families(example_registered, family, request):
    """On LLaVA-NeXT ([CLS]) and OneVision (SigLIP, none) the provider runs on every crop; each
    image's first packed tokens are its base crop, whose scores are that crop's hidden-state norms."""
    tiny = request.getfixturevalue(family)
    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=4))
    with torch.no_grad(), tp.apply(tiny.model, "example-hidden-norm@6") as run:
        tiny.model(**inputs)
    stage = run.trace[0].stages[0]
    assert stage.tokens_out == 6 and [len(k) for k in stage.kept] == [6, 6]
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        out = tiny.model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
    first = 1 if family == "tiny_next" else 0
    depth = tiny.model.config.vision_config.num_hidden_layers
    norms = out.hidden_states[depth - 1][:, first:].float().norm(dim=-1).view(*pixels.shape[:2], -1)
    for i in range(2):
        torch.testing.assert_close(stage.scores[i][: norms.shape[-1]], norms[i, 0], atol=1e-5, rtol=1e-5)


def test_plugin_signal_through_a_shared_encoding_equals_apply(example_registered, tiny):
    """`compare` encodes each batch once for every pipeline: the plugin provider computes its signal then too."""
    from tokenprune_example.signals import PatchHiddenNorm

    inputs = tiny.inputs(["what colour is the square", "how many"], images(2, seed=3))
    pipeline = tp.Pipeline.from_spec("example-hidden-norm@5")
    encoding = find_adapter(tiny.model).encode(inputs, [pipeline])
    depth = tiny.model.config.vision_config.num_hidden_layers
    assert encoding is not None and set(encoding.signals) == {PatchHiddenNorm(layer=depth - 2)}
    with torch.no_grad(), tp.apply(tiny.model, pipeline) as run:
        direct = tiny.model(**inputs).logits
        shared = tiny.model(**run.adapter.reuse(encoding, inputs)).logits
    assert torch.equal(direct, shared)
    assert [x.tolist() for x in run.trace[1].stages[0].kept] == [x.tolist() for x in run.trace[0].stages[0].kept]
