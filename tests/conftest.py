"""Shared fixtures: tiny random checkpoints of the real architectures (`tokenprune.testing`), built once
per session, saved with `save_pretrained` and loaded back by path, as a user loads a real one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from transformers import LlavaOnevisionImageProcessorPil

from tokenprune.models import load
from tokenprune.testing import (  # noqa: F401  (re-exported to the tests)
    IMAGE,
    INTERNVL_PATCH,
    N_PATCHES,
    PATCH,
    PINPOINTS,
    WORDS,
    Tiny,
    TinyGemma3,
    TinyInternVL,
    TinyOnevision,
    TinyQwen,
    build_tiny,
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_next,
    build_tiny_onevision,
    build_tiny_qwen,
    build_tiny_qwen3,
    images,
    sized_images,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "default": build_tiny(root, "default"),
        "full": build_tiny(root, "full", seed=1, vision_feature_select_strategy="full"),
        "multilayer": build_tiny(root, "multilayer", seed=2, vision_feature_layer=[-2, -3]),
    }


@pytest.fixture(scope="session")
def tiny(checkpoints: dict[str, Path]) -> Tiny:
    model, processor = load(str(checkpoints["default"]))
    return Tiny(checkpoints["default"], model, processor)


@pytest.fixture(scope="session")
def tiny_full(checkpoints: dict[str, Path]) -> Tiny:
    model, processor = load(str(checkpoints["full"]))
    return Tiny(checkpoints["full"], model, processor)


@pytest.fixture(scope="session")
def tiny_multilayer(checkpoints: dict[str, Path]) -> Tiny:
    model, processor = load(str(checkpoints["multilayer"]))
    return Tiny(checkpoints["multilayer"], model, processor)


@st.composite
def keyed_token_cases(draw, max_n: int, key_width: int, salt: int):
    """Seeded `(tokens [2, n, 5], scores [2, n] in [0, 1), keys [2, n, key_width], k)` for
    selectors that merge by key similarity, with `n` in `[2, max_n]` and `k` in `[1, n]`."""
    n = draw(st.integers(2, max_n))
    k = draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * salt + k)
    return (
        torch.randn(2, n, 5, generator=g),
        torch.rand(2, n, generator=g),
        torch.randn(2, n, key_width, generator=g),
        k,
    )


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = build_tiny_next(tmp_path_factory.mktemp("next"))
    model, processor = load(str(path))
    return Tiny(path, model, processor)


@pytest.fixture(scope="session")
def tiny_onevision(tmp_path_factory: pytest.TempPathFactory) -> TinyOnevision:
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    path = build_tiny_onevision(tmp_path_factory.mktemp("onevision"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyOnevision(
        path,
        model,
        LlavaOnevisionImageProcessorPil.from_pretrained(path),
        PreTrainedTokenizerFast.from_pretrained(path),
    )


@pytest.fixture(scope="session", params=["qwen2-vl", "qwen2.5-vl"])
def tiny_qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyQwen:
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    path = build_tiny_qwen(tmp_path_factory.mktemp("qwen"), request.param)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyQwen(
        path, model, Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory: pytest.TempPathFactory) -> TinyInternVL:
    from transformers import AutoModelForImageTextToText, GotOcr2ImageProcessorPil, PreTrainedTokenizerFast

    path = build_tiny_internvl(tmp_path_factory.mktemp("internvl"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyInternVL(
        path, model, GotOcr2ImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> TinyGemma3:
    path = build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))
    model, processor = load(str(path))
    return TinyGemma3(path, model, processor)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> TinyQwen:
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    path = build_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyQwen(
        path, model, Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


def with_video(inputs: dict, frames: list[int]) -> dict:
    """One prompt's `inputs` with a video of two frames of 4x4 patches appended after it: `frames`
    are the text tokens before each frame's 4 placeholders (word id 4; `mm_token_type_ids` 2)."""
    row, types = [], []
    for text in frames:
        row += [4] * (text + 4)
        types += [0] * text + [2] * 4
    ids = torch.cat([inputs["input_ids"], torch.tensor([row])], dim=1)
    return inputs | {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.tensor([types])], dim=1),
        "pixel_values_videos": torch.randn(
            32, inputs["pixel_values"].shape[1], generator=torch.Generator().manual_seed(0)
        ),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
