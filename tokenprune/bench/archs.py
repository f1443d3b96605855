"""The architectures `tokenprune bench` measures: full-size shapes (random weights) and the tiny ones
of `tokenprune.testing`, and the synthetic prompts it feeds them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from ..errors import InputError
from ..testing import (
    OV_PINPOINTS,
    PINPOINTS,
    TINY_GEMMA3_TEXT,
    TINY_GEMMA3_VISION,
    TINY_MROPE,
    TINY_QWEN3_TEXT,
    TINY_QWEN3_VISION,
    TINY_QWEN_VISION,
    TINY_TEXT,
    TINY_VISION,
)

TEXT_TOKENS = 32  # prompt words around the image
TINY_BENCH_TEXT = {**TINY_TEXT, "vocab_size": 64, "max_position_embeddings": 512}

GEMMA3_SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)

ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    "llava-1.5-7b": {
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
    },
    "llava-1.5-13b": {
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        "text": dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
    },
    "llava-v1.6-vicuna-7b": {
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        "next": dict(pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], image=(672, 672)),
    },
    "tiny-next": {
        "vision": TINY_VISION,
        "text": TINY_BENCH_TEXT,
        "next": dict(pinpoints=PINPOINTS, image=(64, 64)),
    },
    "llava-onevision-qwen2-7b": {
        "onevision": dict(
            vision=dict(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=26,
                num_attention_heads=16,
                image_size=384,
                patch_size=14,
            ),
            text=dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                max_position_embeddings=32768,
            ),
            pinpoints=[[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
            image=(768, 768),
        ),
    },
    "tiny-onevision": {
        "onevision": dict(vision=TINY_VISION, text=TINY_BENCH_TEXT, pinpoints=OV_PINPOINTS, image=(64, 64)),
    },
    "qwen2-vl-7b": {
        "qwen": dict(
            vision=dict(
                depth=32,
                embed_dim=1280,
                hidden_size=3584,
                num_heads=16,
                mlp_ratio=4,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            text=dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
            ),
            image=(672, 672),
        ),
    },
    "tiny-qwen": {
        "qwen": dict(vision=TINY_QWEN_VISION, text={**TINY_BENCH_TEXT, "rope_parameters": TINY_MROPE}, image=(64, 64)),
    },
    # Qwen3-VL-8B-Instruct's config.json (text 36 layers x 4096, 32 heads, 8 KV heads, head_dim 128,
    # MLP 12288, rope theta 5e6, interleaved M-RoPE sections 24/20/20; SigLIP-2-style tower 27 blocks x
    # 1152, 16 heads, MLP 4304, 16-px patches, DeepStack from blocks 8, 16, 24): the tower matches
    # transformers' Qwen3VLVisionConfig defaults; 768x768 images give 576 merged tokens, as qwen2-vl-7b's.
    "qwen3-vl-8b": {
        "qwen": dict(
            family="qwen3-vl",
            vision=dict(
                depth=27,
                hidden_size=1152,
                intermediate_size=4304,
                num_heads=16,
                out_hidden_size=4096,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24],
                in_channels=3,
            ),
            text=dict(
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                vocab_size=151936,
                max_position_embeddings=262144,
                rope_parameters={
                    "rope_type": "default",
                    "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True,
                    "rope_theta": 5e6,
                },
            ),
            image=(768, 768),
        ),
    },
    "tiny-qwen3": {
        "qwen": dict(
            family="qwen3-vl",
            vision=TINY_QWEN3_VISION,
            text={**TINY_QWEN3_TEXT, "vocab_size": 64, "max_position_embeddings": 512},
            image=(64, 64),
        ),
    },
    "tiny": {"vision": TINY_VISION, "text": TINY_BENCH_TEXT},
    # InternVL3-8B (arXiv 2504.10479, Table 1: InternViT-300M-448px-V2.5 + Qwen2.5-7B): the tower is
    # transformers' InternVLVisionConfig defaults (documented as the InternVL3 -hf geometry); the LLM is
    # Qwen2.5-7B's shapes (as qwen2-vl-7b's above) with InternVL's vocabulary of 151674 tokens, as the
    # published InternVL3-8B-hf config lists it. One 448-px image is one tile: 256 LLM tokens.
    "internvl3-8b": {
        "internvl": dict(
            vision=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=448,
                patch_size=14,
            ),
            text=dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=151674,
                max_position_embeddings=32768,
            ),
        ),
    },
    "tiny-internvl": {
        "internvl": dict(
            vision=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
            ),
            text=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=64,
                max_position_embeddings=512,
            ),
        ),
    },
    # Gemma 3 (`Gemma3ForConditionalGeneration`): the shapes of google/gemma-3-4b-it and -12b-it's
    # config.json (the fields they set; the rest are transformers' Gemma3TextConfig defaults, e.g.
    # vocab_size 262208, a sliding window every 5 of 6 layers). Their SigLIP tower is shared: 896 px,
    # 14 px patches (64x64), pooled 4x4 into mm_tokens_per_image=256 soft tokens.
    "gemma-3-4b-it": {
        "gemma3": dict(
            vision=GEMMA3_SIGLIP,
            text=dict(
                hidden_size=2560,
                intermediate_size=10240,
                num_hidden_layers=34,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=256,
                query_pre_attn_scalar=256,
                sliding_window=1024,
                rope_scaling={"rope_type": "linear", "factor": 8.0},
            ),
            tokens=256,
        ),
    },
    "gemma-3-12b-it": {
        "gemma3": dict(
            vision=GEMMA3_SIGLIP,
            text=dict(
                hidden_size=3840,
                intermediate_size=15360,
                num_hidden_layers=48,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=256,
                query_pre_attn_scalar=256,
                sliding_window=1024,
                rope_scaling={"rope_type": "linear", "factor": 8.0},
            ),
            tokens=256,
        ),
    },
    "tiny-gemma3": {
        "gemma3": dict(
            vision=TINY_GEMMA3_VISION,
            text={**TINY_GEMMA3_TEXT, "vocab_size": 64, "max_position_embeddings": 512},
            tokens=16,
        ),
    },
}


def build(arch: str, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A random-weight LLaVA, LLaVA-NeXT, OneVision, Qwen2-VL, Qwen3-VL, InternVL or Gemma 3 of the shapes named."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    shapes = ARCHS[arch]
    config: Any  # the family's config and model class (transformers' config signatures are narrower)
    cls: Any
    if "onevision" in shapes:
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            Qwen2Config,
            SiglipVisionConfig,
        )

        spec = shapes["onevision"]
        text = Qwen2Config(**spec["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**spec["vision"]),
            text_config=text,
            image_token_index=text.vocab_size - 1,
            image_grid_pinpoints=spec["pinpoints"],
            vision_feature_layer=-1,
        )
        cls, image = LlavaOnevisionForConditionalGeneration, spec["image"]
    elif "internvl" in shapes:
        from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

        spec = shapes["internvl"]
        text = Qwen2Config(**spec["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        side = spec["vision"]["image_size"] // spec["vision"]["patch_size"]
        config = InternVLConfig(
            vision_config=spec["vision"],
            text_config=text,
            image_token_id=text.vocab_size - 1,
            image_seq_length=(side // 2) ** 2,
        )
        cls, image = InternVLForConditionalGeneration, None
    elif "gemma3" in shapes:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

        spec = shapes["gemma3"]
        vocab = spec["text"].get("vocab_size", 262208)
        config = Gemma3Config(
            vision_config=SiglipVisionConfig(**spec["vision"]),
            text_config={**spec["text"], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            mm_tokens_per_image=spec["tokens"],
            image_token_index=vocab - 1,
            boi_token_index=vocab - 2,
            eoi_token_index=vocab - 3,
        )
        cls, image = Gemma3ForConditionalGeneration, None
    elif "qwen" in shapes:
        from transformers import (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
        )

        spec = shapes["qwen"]
        vocab = spec["text"]["vocab_size"]
        qwen3 = spec.get("family") == "qwen3-vl"
        config = (Qwen3VLConfig if qwen3 else Qwen2VLConfig)(
            vision_config=spec["vision"],
            text_config={**spec["text"], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            image_token_id=vocab - 1,
            vision_start_token_id=vocab - 2,
            vision_end_token_id=vocab - 3,
            video_token_id=vocab - 4,
        )
        cls, image = (Qwen3VLForConditionalGeneration if qwen3 else Qwen2VLForConditionalGeneration), spec["image"]
    else:
        llama = LlamaConfig(**shapes["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        common: dict[str, Any] = dict(
            vision_config=CLIPVisionConfig(**shapes["vision"]), text_config=llama, image_token_id=llama.vocab_size - 1
        )
        if "next" in shapes:
            config, cls = (
                LlavaNextConfig(**common, image_grid_pinpoints=shapes["next"]["pinpoints"]),
                LlavaNextForConditionalGeneration,
            )
        else:
            config, cls = LlavaConfig(**common), LlavaForConditionalGeneration
        image = shapes["next"]["image"] if "next" in shapes else None
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    model.bench_image = image
    return model.to(dtype).eval()


def budgeted(strategy: str, k: int) -> str:
    """The spec of `strategy` at `k` tokens per image: `name@k`, or `name@k@place` for a strategy
    given with its place (`divprune@vision:8`: a stage inside the vision tower)."""
    name, _, place = strategy.partition("@")
    return f"{name}@{k}" + (f"@{place}" if place else "")


def is_qwen(model: Any) -> bool:
    return hasattr(model.model, "visual")


def is_internvl(model: Any) -> bool:
    """InternVL: one benchmark image is one tile of `image_seq_length` pixel-shuffled tokens."""
    return getattr(model.config, "model_type", None) == "internvl"


def is_gemma3(model: Any) -> bool:
    """Gemma 3: soft tokens pooled by the projector, image tokens marked in `token_type_ids`."""
    return hasattr(model.config, "mm_tokens_per_image")


def is_next(model: Any) -> bool:
    """LLaVA-NeXT or LLaVA-OneVision: anyres crops packed per image."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return isinstance(model, LlavaNextForConditionalGeneration | LlavaOnevisionForConditionalGeneration)


def image_tokens(model: Any) -> int:
    """Placeholder tokens of one benchmark image: the patch grid for LLaVA-1.5; for LLaVA-NeXT the
    packed count of the benchmark image (base, unpadded crops, newlines), from HF's own packing."""
    if is_gemma3(model):
        return model.config.mm_tokens_per_image
    if is_qwen(model):
        patch = model.config.vision_config.patch_size
        return (model.bench_image[0] // patch) * (model.bench_image[1] // patch) // 4
    if is_internvl(model):
        return model.config.image_seq_length
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if not is_next(model):
        return patches
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = torch.tensor([model.bench_image])
    crops = image_size_to_num_patches(
        image_size=model.bench_image, grid_pinpoints=model.config.image_grid_pinpoints, patch_size=vision.image_size
    )
    features, newline = [torch.zeros(crops, patches, 1)], torch.zeros(1)
    if isinstance(model, LlavaNextForConditionalGeneration):
        packed, _ = model.model.pack_image_features(features, size, "default", image_newline=newline)
    else:
        packed, _ = model.model.pack_image_features(
            features, size, image_newline=newline, vision_aspect_ratio=model.config.vision_aspect_ratio
        )
    return packed[0].shape[0]


def load_checkpoint(path: str, dtype: torch.dtype, device: str) -> Any:
    """A saved LLaVA-1.5 checkpoint (path or hub id) instead of random weights."""
    try:
        model: Any = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # missing or corrupt files (SafetensorError), bad configs: one message
        raise InputError(f"cannot load a LLaVA checkpoint from {path!r}: {exc}") from None
    model.bench_image = None
    return model.to(device).eval()


def with_text_positions(model: Any, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`given` with text-style M-RoPE position ids `[3, B, P]` when it is a Qwen oracle's prompt (its
    `k` placeholders carry no `mm_token_type_ids`, see `inputs`), as a plain forward needs them;
    otherwise `given` unchanged."""
    if not is_qwen(model) or "mm_token_type_ids" in given:
        return given
    ids = given["input_ids"]
    return {**given, "position_ids": torch.arange(ids.shape[1], device=ids.device).expand(3, len(ids), -1)}


def inputs(model: Any, batch: int, image_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` prompts of TEXT_TOKENS words around one image of `image_tokens` placeholders (for
    LLaVA-NeXT, pixel values of the benchmark image's anyres crops and its `image_sizes`)."""
    config, device = model.config, model.device
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, config.image_token_id, (batch, TEXT_TOKENS), generator=g)
    image = torch.full((batch, image_tokens), config.image_token_id)
    ids = torch.cat([words[:, :4], image, words[:, 4:]], dim=1).to(device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if is_gemma3(model):  # its LLM lets an image's tokens attend both ways, read from token_type_ids
        out["token_type_ids"] = (ids == config.image_token_id).long()
    if is_qwen(model):
        vision = config.vision_config
        h, w = (side // vision.patch_size for side in model.bench_image)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        out["pixel_values"] = torch.randn(batch * h * w, width, generator=g).to(device, model.dtype)
        out["image_grid_thw"] = torch.tensor([[1, h, w]] * batch, device=device)
        if image_tokens == h * w // 4:  # the full prompt; the oracle's k placeholders get text positions
            out["mm_token_type_ids"] = (ids == config.image_token_id).int()
        return out
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, list | tuple) else size  # InternViT's is (height, width)
    if is_next(model):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = image_size_to_num_patches(
            image_size=model.bench_image, grid_pinpoints=config.image_grid_pinpoints, patch_size=size
        )
        out["pixel_values"] = torch.randn(batch, crops, 3, size, size, generator=g).to(device, model.dtype)
        out["image_sizes"] = torch.tensor([model.bench_image] * batch, device=device)
    else:
        out["pixel_values"] = torch.randn(batch, 3, size, size, generator=g).to(device, model.dtype)
    return out
