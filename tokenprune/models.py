"""Loading models and processors by path or hub id, and building prompts for them."""

from __future__ import annotations

import os
import re
import socket
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
HUB_TIMEOUT_S = 3.0
"""How long a hub id waits to learn whether the Hugging Face hub is reachable at all."""
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def resolve(model: str) -> str:
    """The local directory or hub id to load `model` from, without waiting on a network that is
    not there: a demo's name (`"demo"`, `"demo-qwen"`) is its bundled checkpoint; an existing
    directory is itself; a hub id is itself while the hub is reachable, else (or with
    `HF_HUB_OFFLINE=1`) its copy in the local Hugging Face cache.

    Raises:
        ModelLoadError: a named demo whose checkpoint is not in this installation, a path that is
            not a checkpoint directory, or a hub id with the hub unreachable and no cached copy (the
            message says how to use a local path).
    """
    if model in DEMOS:
        path = demo_path(model)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the {model!r} checkpoint is not in this installation ({path} is missing); train it with "
                f"`python -m {TRAINERS[model]} --out DIR` and pass --model DIR, or install a release that ships it"
            )
        return str(path)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelLoadError(f"cannot load model {model!r}: it is a file; give the checkpoint's directory")
    if not _HUB_ID.match(model):
        raise ModelLoadError(
            f"cannot load model {model!r}: no such directory (and not a hub id such as llava-hf/llava-1.5-7b-hf)"
        )
    offline = _offline_flag()
    if not offline and _hub_reachable():
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not in the cache, whatever the reason huggingface_hub gives
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face hub ({_endpoint()}) cannot be reached"
        raise ModelLoadError(
            f"cannot load model {model!r}: {why} and it is not in the local cache; download it where there is "
            f"network (huggingface-cli download {model} --local-dir DIR) and pass --model DIR, a local path"
        ) from None


def _offline_flag() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in _OFFLINE_VARS)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """Whether a TCP connection to the hub's endpoint opens within `HUB_TIMEOUT_S` (name lookup
    included: it runs in a thread that is abandoned when it takes longer)."""
    url = urlsplit(_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    return bool(result and result[0])


def load(model: str, device: str = "cpu", dtype: str | None = None) -> tuple[nn.Module, Any]:
    """Load `(model, processor)` with plain `transformers` (`from_pretrained`), in eval mode; a
    Qwen2-VL processor whose video half cannot be built is loaded for images alone
    (`tokenprune.processors`).

    Raises:
        ModelLoadError: the path or id does not hold a loadable image-text model and processor
            (missing, corrupt or incompatible files; a hub id offline, see `resolve`).
    """
    from transformers import AutoModelForImageTextToText

    from .processors import load_processor

    source = resolve(model)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else "auto")
    try:
        processor = load_processor(source)
        loaded = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:  # corrupt weights (SafetensorError), bad configs, shape mismatches: all one message
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
