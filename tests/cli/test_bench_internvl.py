"""`bench` on InternVL shapes: one tile of 16 pixel-shuffled tokens per image, the oracle keeps k,
no official row (its [CLS] route is LLaVA-1.5's), and the full-size InternVL3-8B model config."""

import json

import pytest
import torch
from test_bench import prefill_flops
from typer.testing import CliRunner

from tokenprune.bench import ARCHS, TEXT_TOKENS, build, image_tokens, run
from tokenprune.cli.app import app
from tokenprune.errors import InputError


def test_bench_tiny_internvl_rows_and_flops(tmp_path):
    args = ["--strategies", "vtc-cls,fastv", "--budgets", "4", "--batch", "2", "--repeats", "1", "--new-tokens", "2"]
    result = CliRunner().invoke(
        app,
        ["bench", "--arch", "tiny-internvl", *args, "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["row"], r["kept"]) for r in rows] == [("unpruned", 16), ("oracle", 4), ("vtc-cls", 4), ("fastv", 4)]
    text = ARCHS["tiny-internvl"]["internvl"]["text"]
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    assert [r["llm_flops"] for r in rows] == [
        prefill_flops([TEXT_TOKENS + 16] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 4] * layers, d, m),
        prefill_flops([TEXT_TOKENS + 16] * 2 + [TEXT_TOKENS + 4], d, m),
    ]


def test_internvl3_8b_shapes_build_on_the_meta_device():
    model = build("internvl3-8b", torch.bfloat16, "meta")
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1024,
        24,
        (448, 448),
        (14, 14),
    )
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (3584, 28, 4)
    assert image_tokens(model) == 256  # (448 / 14 / 2) ** 2 units of one tile
    assert model.model.multi_modal_projector.linear_1.in_features == 4 * 1024


def test_compile_is_refused_on_internvl_naming_the_llava_architectures():
    with pytest.raises(InputError, match="LLaVA architectures, not 'tiny-internvl'") as caught:
        run("tiny-internvl", ["vtc-cls"], [4], [1], "cpu", torch.float32, 1, 2, compile_mode="eager")
    assert "internvl" not in str(caught.value).split("known LLaVA ones")[1]
