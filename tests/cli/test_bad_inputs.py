"""Every CLI command against a table of bad inputs: exit code 2, one clear line, no traceback.
Keep adding rows: each new kind of bad input a user meets belongs here."""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import images
from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli.app import app

runner = CliRunner()
SECONDS = 60  # every row fails before any real work; the hub rows must not wait on a network


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoints) -> dict[str, str]:
    """Good and bad inputs, by name, as paths."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.png"
    images(1)[0].save(good)
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "corrupt.png").write_bytes(b"this is not an image" * 20)
    (root / "empty.png").write_bytes(b"")
    zero = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)) + png_chunk(b"IEND", b"")
    (root / "zero.png").write_bytes(b"\x89PNG\r\n\x1a\n" + zero)
    Image.new("1", (10_000, 9_000)).save(root / "bomb.png")  # 90 Mpx in a few kB
    (root / "folder.png").mkdir()
    broken = root / "broken-model"
    shutil.copytree(checkpoints["default"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    return {
        "tiny": str(checkpoints["default"]),
        "good": str(good),
        "broken-model": str(broken),
        **{name: str(root / f"{name}.png") for name in ("truncated", "corrupt", "empty", "zero", "bomb", "folder")},
        "missing": str(root / "missing.png"),
    }


BAD_IMAGES = [
    ("truncated", "cannot read image"),
    ("corrupt", "cannot read image"),
    ("empty", "is empty"),
    ("zero", "cannot read image"),
    ("bomb", "more than 89478485 pixels"),
    ("folder", "is not a file"),
    ("missing", "does not exist"),
]
BAD_DEVICES = [
    ("cuda", "not available"),
    ("cuda:7", "not available"),
    ("meta", "holds no data"),
    ("cpux", "unknown device 'cpux'; available here: cpu"),
]
HUB = "tokenprune-tests/no-such-model"
MODELS = [
    ("broken-model", {}, "cannot load model"),
    ("/no/such/dir", {}, "no such directory"),
    (HUB, {}, "local path"),
    (HUB, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and it is not in the local cache"),
]


def cases() -> list[tuple[str, list[str], dict[str, str], str]]:
    """(id, argv with {file} names, env, expected fragment of the error line)."""
    run = ["run", "--model", "{tiny}", "--image", "{good}", "--prompt", "what", "--strategy", "vtc-cls@4"]
    vis = ["visualize", "--model", "{tiny}", "--image", "{good}", "--strategy", "vtc-cls@4", "--out", "{out}/k.png"]
    cmp = ["compare", "--model", "{tiny}", "--strategies", "vtc-cls", "--budgets", "4", "--limit", "2"]
    cmp += ["--out", "{out}/results"]
    bench = ["bench", "--arch", "llava-1.5-7b", "--strategies", "vtc-cls", "--budgets", "64", "--batch", "1"]
    bench += ["--device", "cpu", "--out", "{out}/bench"]
    table = [
        ("list-extra-argument", ["list", "surplus"], {}, "Got unexpected extra argument"),
        ("list-unknown-option", ["list", "--jsn"], {}, "No such option"),
        ("run-empty-spec", [*run[:-1], ""], {}, "empty pipeline spec"),
        ("run-bad-spec", [*run[:-1], "vtc-cls(layer=True)@4"], {}, "bool True is not accepted"),
        ("run-long-spec", [*run[:-1], "x" * 20_000], {}, "longer than 10000 characters"),
        ("run-positions", [*run, "--positions", "sideways"], {}, "unknown positions mode 'sideways'"),
        ("run-no-new-tokens", [*run, "--max-new-tokens", "0"], {}, "Invalid value for '--max-new-tokens'"),
        ("visualize-empty-list", [*vis[:5], "--strategy", ",", *vis[7:]], {}, "lists no pipeline"),
        ("visualize-bad-out", [*vis[:-1], "{out}/kept.txt"], {}, "must be an image file path"),
        ("compare-empty-list", [*cmp[:3], "--strategies", ",", *cmp[5:]], {}, "lists no strategy"),
        ("compare-bad-budgets", [*cmp[:5], "--budgets", "abc", *cmp[7:]], {}, "unknown budget rule 'abc'; known rules"),
        ("compare-no-budgets", [*cmp[:5], "--budgets", ",", *cmp[7:]], {}, "--budgets is empty"),
        ("compare-seed-too-big", [*cmp, "--seed", str(2**64)], {}, "Invalid value for '--seed'"),
        ("compare-seed-too-small", [*cmp, "--seed", str(-(2**63) - 1)], {}, "Invalid value for '--seed'"),
        ("compare-limit-0", [*cmp, "--limit", "0"], {}, "Invalid value for '--limit'"),
        ("compare-missing-data", [*cmp, "--data", "{out}/nope.jsonl"], {}, "does not exist"),
        ("bench-budgets-word", [*bench[:5], "--budgets", "abc", *bench[7:]], {}, "--budgets: 'abc' is not a token"),
        ("bench-budgets-zero", [*bench[:5], "--budgets", "64,0", *bench[7:]], {}, "'0' is not a token count >= 1"),
        ("bench-budgets-empty", [*bench[:5], "--budgets", " , ", *bench[7:]], {}, "--budgets lists no value"),
        ("bench-batch-bad", [*bench[:7], "--batch", "1.5", *bench[9:]], {}, "--batch: '1.5' is not a batch size"),
        ("bench-no-strategies", [*bench[:3], "--strategies", ",", *bench[5:]], {}, "lists no strategy"),
        ("bench-spec-with-budget", [*bench[:3], "--strategies", "vtc-cls@4", *bench[5:]], {}, "without a budget"),
        ("bench-unknown-strategy", [*bench[:3], "--strategies", "nope", *bench[5:]], {}, "unknown strategy 'nope'"),
        ("bench-unknown-arch", ["bench", "--arch", "llava-9000", *bench[3:]], {}, "unknown architecture"),
        ("bench-dtype", [*bench, "--dtype", "float8"], {}, "unknown --dtype 'float8'"),
        ("bench-compile-mode", [*bench, "--compile", "--compile-mode", "fast"], {}, "unknown --compile-mode 'fast'"),
        ("bench-seed", [*bench, "--seed", str(2**64)], {}, "Invalid value for '--seed'"),
        ("bench-both-weights", [*bench, "--random-weights", "--model", "{tiny}"], {}, "exclude each other"),
    ]
    for name, message in BAD_IMAGES:
        table.append((f"run-image-{name}", [*run[:3], "--image", f"{{{name}}}", *run[5:]], {}, message))
        table.append((f"visualize-image-{name}", [*vis[:3], "--image", f"{{{name}}}", *vis[5:]], {}, message))
    for device, message in BAD_DEVICES:
        for command, argv in (("run", run), ("visualize", vis), ("compare", cmp)):
            table.append((f"{command}-device-{device}", [*argv, "--device", device], {}, message))
        table.append((f"bench-device-{device}", [*bench[:-4], "--device", device, *bench[-2:]], {}, message))
    for model, env, message in MODELS:
        tag = f"{Path(model).name}{'-offline' if env else ''}"
        for command, argv in (("run", run), ("visualize", vis), ("compare", cmp)):
            table.append((f"{command}-model-{tag}", [argv[0], "--model", model, *argv[3:]], env, message))
        bench_message = "cannot load a LLaVA checkpoint" if model == "broken-model" else message
        table.append((f"bench-model-{tag}", [*bench[:1], "--model", model, *bench[3:]], env, bench_message))
    return table


CASES = cases()


@pytest.mark.parametrize(("argv", "env", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(files, tmp_path, argv, env, message):
    names = files | {"out": str(tmp_path)}
    argv = [a.format(**names) if "{" in a and len(a) < 200 else a for a in argv]
    argv = [names.get(a, a) for a in argv]
    start = time.perf_counter()
    result = runner.invoke(app, argv, env=env)
    assert time.perf_counter() - start < SECONDS
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    if result.stderr.startswith("error: "):  # tokenprune's own errors are one line (click's usage errors a box)
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK", "1"])
def test_any_image_mode_runs(files, tmp_path, mode):
    rgb = images(1, seed=2)[0]
    if mode == "I;16":
        picture = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    else:
        picture = rgb.convert(mode)
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    picture.save(path)
    result = runner.invoke(
        app,
        ["run", "--model", files["tiny"], "--image", str(path), "--prompt", "what", "--strategy", "vtc-cls@4"]
        + ["--max-new-tokens", "2", "--json"],
    )
    assert result.exit_code == 0, result.output


def test_internal_error_is_one_line_with_a_debug_hint(files, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line of detail")

    monkeypatch.setattr("tokenprune.cli.run_cmd.load", broken)
    argv = ["run", "--model", files["tiny"], "--image", files["good"], "--prompt", "what", "--strategy", "vtc-cls@4"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == (
        "error: internal error: RuntimeError: something inside broke (run with --debug for the traceback)\n"
    )
    debug = runner.invoke(app, ["--debug", *argv])
    assert isinstance(debug.exception, RuntimeError) and "something inside broke" in str(debug.exception)
    again = runner.invoke(app, argv)  # --debug does not stick to later invocations
    assert again.exit_code == 1 and again.exception is not None and isinstance(again.exception, SystemExit)
