"""Word-level tokenizers and the demo processors (LLaVA, Qwen2-VL) built from a vocabulary, with no downloads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

from ..processors import qwen2_vl_processor

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
QWEN_SPECIALS = (
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %} </s> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def word_tokenizer(
    words: Sequence[str], specials: Sequence[str] = SPECIALS, bos: str | None = "<s>", eos: str = "</s>"
) -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word-level tokenizer: `specials` first (padding, unknown, then tokens never
    split, `bos` and `eos` among them), then `words` (lower-case)."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=specials[0],
        unk_token=specials[1],
        bos_token=bos,
        eos_token=eos,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials[2:] if t not in (bos, eos)]})
    return tokenizer


def llava_processor(
    words: Sequence[str],
    image_size: int,
    patch_size: int,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    strategy: str = "default",
) -> LlavaProcessor:
    """A `LlavaProcessor` (word tokenizer + CLIP image processor) for a tower of this geometry."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean or (0.5, 0.5, 0.5)),
        image_std=list(image_std or (0.5, 0.5, 0.5)),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def qwen_processor(words: Sequence[str], image_size: int, patch_size: int, merge_size: int = 2) -> Any:
    """A Qwen2-VL processor (word tokenizer, Qwen2-VL image processor, Qwen-style chat template with
    `<|image_pad|>`) that keeps `image_size`-square images at their size: `(image_size / patch_size)^2`
    patches, `merge_size^2` of them per LLM token. Images only where the video processor cannot be
    built (it needs torchvision); both save the same files."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tokenizer = word_tokenizer(words, QWEN_SPECIALS, bos=None, eos="<|im_end|>")
    return qwen2_vl_processor(image_processor, tokenizer, QWEN_CHAT_TEMPLATE)
