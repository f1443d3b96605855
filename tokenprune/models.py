"""Loading models and processors by path or hub id, and building prompts for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TokenpruneError

DEMO = "demo"
DEMO_QWEN = "demo-qwen"
DEMOS = {DEMO: "checkpoint", DEMO_QWEN: "checkpoint-qwen"}  # name -> directory in tokenprune/demo
TRAINERS = {DEMO: "tokenprune.demo.train", DEMO_QWEN: "tokenprune.demo.train_qwen"}


class ModelLoadError(TokenpruneError):
    """A model or processor that could not be loaded."""


def demo_path(name: str = DEMO) -> Path:
    """Directory of a demo checkpoint shipped inside the package (`"demo"` or `"demo-qwen"`)."""
    return Path(__file__).parent / "demo" / DEMOS[name]


def resolve(model: str) -> str:
    """A demo's name becomes its bundled checkpoint's path; anything else is a path or hub id.

    Raises:
        ModelLoadError: the named demo's checkpoint is not in this installation.
    """
    if model not in DEMOS:
        return model
    path = demo_path(model)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the {model!r} checkpoint is not in this installation ({path} is missing); train it with "
            f"`python -m {TRAINERS[model]} --out DIR` and pass --model DIR, or install a release that ships it"
        )
    return str(path)


def load(model: str, device: str = "cpu", dtype: str | None = None) -> tuple[nn.Module, Any]:
    """Load `(model, processor)` with plain `transformers` (`from_pretrained`), in eval mode; a
    Qwen2-VL processor whose video half cannot be built is loaded for images alone
    (`tokenprune.processors`).

    Raises:
        ModelLoadError: the path or id does not hold a loadable image-text model and processor.
    """
    from transformers import AutoModelForImageTextToText

    from .processors import load_processor

    source = resolve(model)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else "auto")
    try:
        processor = load_processor(source)
        loaded = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {model!r} ({source}): {first}") from None
    return loaded.to(device).eval(), processor  # type: ignore[arg-type]  # HF: @wraps hides `to`'s self


def build_prompt(processor: Any, question: str, n_images: int = 1) -> str:
    """The model's chat prompt for `question` about `n_images` images (LLaVA-1.5 style fallback)."""
    if "<image>" in question:
        return question
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return "USER: " + "<image>\n" * n_images + f"{question} ASSISTANT:"
