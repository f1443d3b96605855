"""Shared fixtures: tiny random checkpoints of the real architectures, built once per session,
saved with `save_pretrained` and loaded back by path, as a user loads a real one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from tokenprune.demo.tokenizer import CHAT_TEMPLATE, llava_processor, word_tokenizer
from tokenprune.models import build_prompt, load

WORDS = "what colour is the square circle red blue green yes no left right how many".split()
IMAGE, PATCH = 32, 8
N_PATCHES = (IMAGE // PATCH) ** 2  # 16


@dataclass
class Tiny:
    """A loaded tiny checkpoint and helpers to build inputs for it."""

    path: Path
    model: LlavaForConditionalGeneration
    processor: Any

    def inputs(self, questions: list[str], images: list[Image.Image], per_prompt: int = 1) -> dict[str, torch.Tensor]:
        prompts = [build_prompt(self.processor, q, per_prompt) for q in questions]
        return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))


FAMILIES = {
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "vipllava": (VipLlavaConfig, VipLlavaForConditionalGeneration),
}


def build_tiny(root: Path, name: str, seed: int = 0, family: str = "llava", **llava_kwargs: Any) -> Path:
    """A tiny random checkpoint of `family` (CLIP tower, Llama LLM) saved with its processor."""
    config_cls, model_cls = FAMILIES[family]
    strategy = llava_kwargs.get("vision_feature_select_strategy", "default")
    processor = llava_processor(WORDS, IMAGE, PATCH, strategy=strategy)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = config_cls(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), **llava_kwargs
    )
    torch.manual_seed(seed)
    path = root / name
    model_cls(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # anyres grids of 1x2, 2x1 and 2x2 crops of 32 px


def build_tiny_next(root: Path, name: str = "llava-next", seed: int = 3) -> Path:
    """A tiny random LLaVA-NeXT (anyres over `PINPOINTS`, 4x4 patches per crop) with its processor."""
    tok = word_tokenizer(WORDS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE},
        crop_size={"height": IMAGE, "width": IMAGE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(seed)
    path = root / name
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with id 0 into `[B, P]` ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids.new_tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


OV_PINPOINTS = [[32 * h, 32 * w] for h in range(1, 5) for w in range(1, 5)]  # up to 4x4 crops: beyond anyres_max_9


@dataclass
class TinyHandBuilt:
    """A loaded tiny model whose processor needs a video processor, which needs torchvision (not
    installable beside the CPU torch wheel): `inputs` expands `<image>` itself, `placeholders` per
    image, from the image processor's output."""

    path: Path
    model: Any
    image_processor: Any
    tokenizer: Any

    def placeholders(self, pixels: dict[str, torch.Tensor]) -> list[int]:
        raise NotImplementedError

    def inputs(self, questions: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pixels = dict(self.image_processor(images=images, return_tensors="pt"))
        image = self.model.config.image_token_id
        rows = [
            [2] + [image] * n + self.tokenizer(q, add_special_tokens=False).input_ids
            for n, q in zip(self.placeholders(pixels), questions, strict=False)
        ]
        ids, mask = left_padded(rows)
        return {"input_ids": ids, "attention_mask": mask, **pixels}


class TinyOnevision(TinyHandBuilt):
    """LLaVA-OneVision: as many placeholders per image as HF's own packing gives (HF's forward checks
    the count)."""

    def placeholders(self, pixels: dict[str, torch.Tensor]) -> list[int]:
        with torch.no_grad():
            packed = self.model.model.get_image_features(
                pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"], return_dict=True
            ).pooler_output
        return [len(features) for features in packed]


def build_tiny_onevision(root: Path, seed: int = 5) -> Path:
    """A tiny random LLaVA-OneVision: SigLIP tower (no [CLS], 4x4 patches per crop), Qwen2 LLM."""
    tok = word_tokenizer(WORDS)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    text = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=OV_PINPOINTS,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    path = root / "onevision"
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE, "width": IMAGE},
        image_grid_pinpoints=OV_PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class TinyQwen(TinyHandBuilt):
    """Qwen2-VL: `t*h*w/4` placeholders per image, as Qwen's processor expands them, and the
    `mm_token_type_ids` it returns."""

    def placeholders(self, pixels: dict[str, torch.Tensor]) -> list[int]:
        return (pixels["image_grid_thw"].prod(-1) // 4).tolist()

    def inputs(self, questions: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = super().inputs(questions, images)
        return out | {"mm_token_type_ids": (out["input_ids"] == self.model.config.image_token_id).int()}


def build_tiny_qwen(root: Path, family: str = "qwen2-vl", seed: int = 7) -> Path:
    """A tiny random Qwen2-VL or Qwen2.5-VL (window attention in the tower): 8-px patches merged 2x2,
    M-RoPE sections (1, 1, 2)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok = word_tokenizer(WORDS)
    if family == "qwen2-vl":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
            in_channels=3,
        )
    config = config_cls(
        vision_config=vision,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_start_token_id=2,
        vision_end_token_id=3,
    )
    torch.manual_seed(seed)
    path = root / family
    model_cls(config).save_pretrained(path)
    Qwen2VLImageProcessorPil(
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_qwen3(root: Path, seed: int = 11) -> Path:
    """A tiny random Qwen3-VL: 8-px patches merged 2x2, DeepStack features from tower blocks 0 and 1
    added after LLM layers 0 and 1 (of 4), QK-normed attention, interleaved M-RoPE sections (1, 1, 2)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = word_tokenizer(WORDS)
    config = Qwen3VLConfig(
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
            in_channels=3,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tok),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_start_token_id=2,
        vision_end_token_id=3,
    )
    torch.manual_seed(seed)
    path = root / "qwen3-vl"
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessorPil(
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sized_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of the given `(height, width)`."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(n)]


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
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> TinyQwen:
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    path = build_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyQwen(
        path, model, Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )
