"""Loading a checkpoint's processor, and Qwen2-VL's for images alone where its video half cannot be built.

`Qwen2VLProcessor` holds a video processor, and transformers' video processors need torchvision (which
cannot be installed beside the CPU torch wheel). The image-only processor below tokenizes, expands
`<|image_pad|>` and returns `mm_token_type_ids` exactly as `Qwen2VLProcessor` does for images (it is a
subclass that omits the video processor), and saves as `Qwen2VLProcessor` without its video part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

QWEN_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images and text alone: no video processor, hence no torchvision."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        kwargs.pop("video_processor", None)  # a saved Qwen2VLProcessor's video part, unused here
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """As `Qwen2VLProcessor` saves itself, without the video processor."""
        return super().to_dict() | {"processor_class": "Qwen2VLProcessor"}


def qwen2_vl_processor(image_processor: Any, tokenizer: Any, chat_template: str) -> Qwen2VLProcessor:
    """A `Qwen2VLProcessor` (its video processor shaped like `image_processor`) where torchvision is
    installed, else an `ImageOnlyQwen2VLProcessor`."""
    if not is_torchvision_available():
        return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template)
    from transformers import Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(
        patch_size=image_processor.patch_size,
        temporal_patch_size=image_processor.temporal_patch_size,
        merge_size=image_processor.merge_size,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )
    return Qwen2VLProcessor(image_processor, tokenizer, video_processor, chat_template=chat_template)


def load_processor(source: str) -> Any:
    """`AutoProcessor.from_pretrained(source)`; a Qwen2-VL processor that cannot be built that way (no
    torchvision for its video processor, or saved without one) is loaded for images alone.

    Raises:
        whatever `AutoProcessor` raises, when `source` holds no Qwen2-VL processor to fall back on.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except Exception:
        if saved_processor_class(source) not in QWEN_PROCESSORS:
            raise
    return ImageOnlyQwen2VLProcessor.from_pretrained(source)


def saved_processor_class(source: str) -> str | None:
    """The `processor_class` in a local checkpoint's `processor_config.json`, if there is one."""
    path = Path(source) / "processor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("processor_class")
    except (OSError, json.JSONDecodeError):
        return None
