"""Tiny random models of every supported family, for tests and for `tokenprune bench`'s `tiny-*`
architectures: a checkpoint of a few thousand parameters builds in well under a second on a CPU.

Each `build_tiny*` function saves a random checkpoint with `save_pretrained` (and its processor)
under a directory and returns its path, so that it loads as a user loads a real one:

```python
from tokenprune.models import load
from tokenprune.testing import build_tiny, images

model, processor = load(str(build_tiny(tmp_dir, "default")))
```

The shapes (`TINY_VISION`, `TINY_TEXT`, `TINY_QWEN_VISION`, ...) are shared with `tokenprune bench`,
whose `tiny`, `tiny-next`, `tiny-onevision` and `tiny-qwen` architectures are these models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

from .demo.tokenizer import CHAT_TEMPLATE, llava_processor, word_tokenizer
from .models import build_prompt

WORDS = "what colour is the square circle red blue green yes no left right how many".split()
IMAGE, PATCH = 32, 8
N_PATCHES = (IMAGE // PATCH) ** 2  # 16

TINY_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH
)
"""A 4-block ViT (CLIP with [CLS], or SigLIP without) over 32-px images of 8-px patches."""
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
"""A 3-layer LLM with grouped-query attention (Llama or Qwen2); the vocabulary is the caller's."""
TINY_QWEN_VISION: dict[str, Any] = dict(
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
"""Qwen2-VL's tower: 2 blocks, 8-px patches merged 2x2."""
TINY_QWEN25_VISION: dict[str, Any] = dict(
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
TINY_QWEN3_VISION: dict[str, Any] = dict(
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
)
TINY_QWEN3_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True, "rope_theta": 1e4},
)
"""Qwen2.5-VL's tower: as Qwen2-VL's, with window attention in block 0."""
TINY_MROPE: dict[str, Any] = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
"""M-RoPE sections (1, 1, 2) of the tiny Qwen LLMs' 8-wide heads."""
PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # anyres grids of 1x2, 2x1 and 2x2 crops of 32 px
OV_PINPOINTS = [[32 * h, 32 * w] for h in range(1, 5) for w in range(1, 5)]  # up to 4x4 crops: beyond anyres_max_9


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
    vision = CLIPVisionConfig(**TINY_VISION)
    text = LlamaConfig(
        **TINY_TEXT,
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
    vision = CLIPVisionConfig(**TINY_VISION)
    text = LlamaConfig(
        **TINY_TEXT,
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    next_config: Any = LlavaNextConfig  # transformers types `image_token_index` only; both names work
    config = next_config(
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


def token_id(tokenizer: Any, token: str) -> int:
    """The id of one `token` in `tokenizer`'s vocabulary."""
    index = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(index, int):
        raise ValueError(f"{token!r} is not one token of the tokenizer")
    return index


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with id 0 into `[B, P]` ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids.new_tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


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
    vision = SiglipVisionConfig(**TINY_VISION)
    text = Qwen2Config(
        **TINY_TEXT,
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    onevision_config: Any = LlavaOnevisionConfig  # as LLaVA-NeXT's: `image_token_id` is untyped
    config = onevision_config(
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


QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
"""The tiny Qwen families `tiny_qwen_config` builds."""


def tiny_qwen_config(family: str, vocab_size: int, image_token_id: int, **tower: Any) -> Any:
    """The config of a tiny Qwen2-VL, Qwen2.5-VL (window attention in the tower) or Qwen3-VL (DeepStack
    from tower blocks 0 and 1, interleaved M-RoPE) `family` (one of `QWEN_FAMILIES`): 8-px patches
    merged 2x2, M-RoPE sections (1, 1, 2); `tower` overrides vision-config fields (e.g. `depth`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    tokens: dict[str, Any] = dict(image_token_id=image_token_id, vision_start_token_id=2, vision_end_token_id=3)
    special = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "qwen3-vl":
        return Qwen3VLConfig(
            vision_config=TINY_QWEN3_VISION | tower, text_config=dict(**TINY_QWEN3_TEXT, **special), **tokens
        )
    config_cls: Any = Qwen2VLConfig if family == "qwen2-vl" else Qwen2_5_VLConfig
    vision = TINY_QWEN_VISION if family == "qwen2-vl" else TINY_QWEN25_VISION
    return config_cls(
        vision_config=vision | tower, text_config=dict(**TINY_TEXT, **special, rope_parameters=TINY_MROPE), **tokens
    )


def build_tiny_qwen(root: Path, family: str = "qwen2-vl", seed: int = 7, **tower: Any) -> Path:
    """A tiny random Qwen2-VL or Qwen2.5-VL (`tiny_qwen_config`) saved with its processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tok = word_tokenizer(WORDS)
    model_cls: Any = Qwen2VLForConditionalGeneration if family == "qwen2-vl" else Qwen2_5_VLForConditionalGeneration
    config = tiny_qwen_config(family, len(tok), token_id(tok, "<image>"), **tower)
    torch.manual_seed(seed)
    path = root / family
    model_cls(config).save_pretrained(path)
    _save_qwen_processor(path, tok)
    return path


def _save_qwen_processor(path: Path, tok: Any) -> None:
    """Save the tiny Qwen image processor (8-px patches merged 2x2, 32-64 px images) and `tok` at `path`."""
    from transformers import Qwen2VLImageProcessorPil

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


def build_tiny_qwen3(root: Path, seed: int = 11) -> Path:
    """A tiny random Qwen3-VL (`tiny_qwen_config`) saved with its processor."""
    from transformers import Qwen3VLForConditionalGeneration

    tok = word_tokenizer(WORDS)
    config = tiny_qwen_config("qwen3-vl", len(tok), token_id(tok, "<image>"))
    torch.manual_seed(seed)
    path = root / "qwen3-vl"
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    _save_qwen_processor(path, tok)
    return path


def sized_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of the given `(height, width)`."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` random RGB images of the tiny models' `IMAGE x IMAGE` pixels."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(n)]


@dataclass
class TinyGemma3:
    """Gemma 3 with its own processor (`Gemma3Processor`): each image becomes `<start_of_image>`,
    `mm_tokens_per_image` placeholders and `<end_of_image>`, with `token_type_ids` 1 at the placeholders."""

    path: Path
    model: Any
    processor: Any

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def inputs(self, questions: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        prompts = [build_prompt(self.processor, q) for q in questions]
        out = self.processor(images=[[image] for image in images], text=prompts, return_tensors="pt", padding=True)
        return dict(out)


TINY_GEMMA3_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=4
)
"""Gemma 3's SigLIP tower: 3 blocks, 8x8 patches of 4 px."""
TINY_GEMMA3_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=8,
)
"""A 4-layer Gemma 3 LLM whose local layers slide a window of 8 tokens."""
GEMMA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<start_of_image>", "<end_of_image>"]
GEMMA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>", "<start_of_image>")


def build_tiny_gemma3(root: Path, seed: int = 11) -> Path:
    """A tiny random Gemma 3: SigLIP tower (8x8 patches of 4 px), a projector pooling them 2x2 into
    4x4 = 16 soft tokens, and a 4-layer Gemma 3 LLM whose local layers slide a window of 8 tokens
    (shorter than a prompt) between its global ones; saved with its `Gemma3Processor` (word tokenizer)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )

    words = word_tokenizer(WORDS, specials=GEMMA_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    vision = SiglipVisionConfig(**TINY_GEMMA3_VISION)
    text = dict(
        TINY_GEMMA3_TEXT,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    ids = tok.convert_tokens_to_ids(GEMMA_SPECIALS[4:])
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=16,
        image_token_index=ids[0],
        boi_token_index=ids[1],
        eoi_token_index=ids[2],
    )
    torch.manual_seed(seed)
    path = root / "gemma3"
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=16, chat_template=GEMMA_CHAT_TEMPLATE
    ).save_pretrained(path)
    return path


INTERNVL_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<IMG_CONTEXT>", "<img>", "</img>")
INTERNVL_PATCH = 4  # 8x8 patches per 32-px tile, pixel-shuffled into 4x4 = 16 units


class TinyInternVL:
    """InternVL: each image expanded by hand as its processor does, `<img>`, `<IMG_CONTEXT>` x (tiles x
    units per tile), `</img>` (the image processor cuts tiles plus a thumbnail; `num_patches` per image)."""

    def __init__(self, path: Path, model: Any, image_processor: Any, tokenizer: Any) -> None:
        self.path, self.model, self.image_processor, self.tokenizer = path, model, image_processor, tokenizer

    @property
    def units(self) -> int:
        return self.model.config.image_seq_length

    def inputs(self, questions: list[str], images: list[Image.Image], per_prompt: int = 1) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=images, return_tensors="pt")
        tiles = pixels["num_patches"].tolist()
        context, start, end = self.tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>"])
        rows = []
        for p, question in enumerate(questions):
            row = [2]
            for n in tiles[p * per_prompt : (p + 1) * per_prompt]:
                row += [start] + [context] * (n * self.units) + [end]
            turn = [3, 2]  # the user turn's end and the answer's start, as InternVL's chat template closes a turn
            rows.append(row + self.tokenizer(question, add_special_tokens=False).input_ids + turn)
        ids, mask = left_padded(rows)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels["pixel_values"]}


def build_tiny_internvl(root: Path, seed: int = 11, **vision_kwargs: Any) -> Path:
    """A tiny random InternVL: InternViT ([CLS], 8x8 patches per 32-px tile, pixel shuffle 0.5 into
    16 units), Qwen2 LLM, and an image processor cutting up to 4 tiles plus a thumbnail."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    tok = word_tokenizer(WORDS, specials=INTERNVL_SPECIALS)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=INTERNVL_PATCH,
        **vision_kwargs,
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
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=token_id(tok, "<IMG_CONTEXT>"),
        image_seq_length=(IMAGE // INTERNVL_PATCH // 2) ** 2,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises [CLS] and position embeddings to zero: give them values
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
    path = root / ("internvl" + "-qknorm" * bool(vision_kwargs.get("use_qk_norm")))
    model.save_pretrained(path)
    GotOcr2ImageProcessorPil(
        size={"height": IMAGE, "width": IMAGE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path
