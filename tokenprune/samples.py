"""Evaluation samples: the demo split, or a user's JSONL file validated line by line before any work.

A data file holds one JSON object per line: `{"image": path, "question": str, "answer"?: str,
"id"?: str | int}`, image paths relative to the file. Every error names the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InputError

FIELDS: dict[str, type | tuple[type, ...]] = {
    "image": str,
    "question": str,
    "answer": str,
    "id": (str, int),
    "meta": (dict, list, str, int, float, type(None)),
}
"""The fields a data line may hold, with their JSON types; `image` and `question` are required,
`meta` carries anything of the user's own (ignored)."""

FIRST_TOKEN, EXACT_MATCH = "first-token", "exact-match"
"""The accuracy metrics: the first greedy token against the answer's only token, or the normalised
generated text against the normalised answer (see `normalise`)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Sample:
    """One evaluation item; `index` is its position in the data, `id` the data's own id if any."""

    image: Image.Image
    question: str
    answer: str | None = None
    index: int = 0
    id: str | int | None = None


def demo_samples(limit: int) -> list[Sample]:
    """The first `limit` samples of the demo evaluation split."""
    from .demo.scenes import sample

    out = []
    for i in range(limit):
        scene, q = sample("eval", i)
        out.append(Sample(Image.fromarray(scene.render()), q.text, q.answer, index=i))
    return out


def _field_errors(row: dict[str, Any]) -> list[str]:
    problems = [f"missing {name!r}" for name in ("image", "question") if name not in row]
    for name, value in row.items():
        if name not in FIELDS:
            problems.append(f"unknown field {name!r} (allowed: {', '.join(FIELDS)})")
        elif name != "meta" and (isinstance(value, bool) or not isinstance(value, FIELDS[name])):
            kind = {"id": "a string or an integer", "meta": "any JSON value"}.get(name, "a string")
            problems.append(f"{name!r} must be {kind}, got {type(value).__name__}")
        elif name in ("image", "question", "answer") and not value.strip():
            problems.append(f"{name!r} is empty")
    return problems


def _open_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            if min(image.size) < 1:
                raise InputError(f"{where}: image {str(path)!r} is empty ({image.size[0]}x{image.size[1]})")
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{where}: image {str(path)!r} does not exist (paths are relative to the data file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{where}: image {str(path)!r} cannot be opened ({type(exc).__name__}: {exc})") from None


def jsonl_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    """The first `limit` samples of a JSONL data file, every line checked first.

    Raises:
        InputError: (naming the file and line) the file is missing, empty or not UTF-8; a line is
            not a JSON object, lacks `image`/`question`, has a field of the wrong type, an empty
            string or an unknown field; ids repeat; answers are on some lines but not others; an
            image of the first `limit` samples does not open.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist or is not a file")
    rows: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str | int, int] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f'{where}: each line must be a JSON object like {{"image": ..., "question": ...}}')
        problems = _field_errors(row)
        if problems:
            raise InputError(f"{where}: {'; '.join(problems)}")
        if "id" in row:
            if row["id"] in seen:
                raise InputError(f"{where}: id {row['id']!r} repeats line {seen[row['id']]}; ids must be unique")
            seen[row["id"]] = number
        rows.append((number, row))
    if not rows:
        raise InputError(f"data file {str(path)!r} holds no samples (one JSON object per line)")
    used = rows[:limit] if limit is not None else rows
    with_answer = [n for n, row in used if "answer" in row]
    if with_answer and len(with_answer) != len(used):
        missing = next(n for n, row in used if "answer" not in row)
        raise InputError(
            f"{path}:{missing}: no 'answer', but line {with_answer[0]} has one; give every line an answer "
            "(for accuracy) or none (agreement and KL only)"
        )
    return [
        Sample(
            _open_image(path.parent / row["image"], f"{path}:{number}"),
            row["question"],
            row.get("answer"),
            index=i,
            id=row.get("id"),
        )
        for i, (number, row) in enumerate(used)
    ]


def data_fingerprint(path: str | Path | None) -> str:
    """SHA-256 of a data file's bytes (`"demo"` for the demo split): a resumed run must see the same data."""
    if path is None:
        return "demo"
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def answer_metric(tokenizer: Any, samples: Sequence[Sample], source: str = "data") -> str | None:
    """The accuracy metric `samples` call for: `None` without answers, `FIRST_TOKEN` when every
    answer is one token, `EXACT_MATCH` (generate, then compare normalised text) otherwise.

    Raises:
        InputError: (naming the sample) an answer the tokenizer cannot represent (unknown tokens).
    """
    if not samples or samples[0].answer is None:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    longest = 0
    for s in samples:
        ids = tokenizer(s.answer, add_special_tokens=False).input_ids
        if not ids or (unk is not None and unk in ids):
            raise InputError(
                f"{source}, sample {s.index + 1}: the tokenizer cannot represent the answer {s.answer!r} "
                f"(it becomes {tokenizer.convert_ids_to_tokens(ids)}); accuracy against it would be 0"
            )
        longest = max(longest, len(ids))
    return FIRST_TOKEN if longest == 1 else EXACT_MATCH


def answer_tokens(tokenizer: Any, samples: Sequence[Sample]) -> list[list[int]]:
    """Each answer's token ids (no special tokens)."""
    return [tokenizer(s.answer, add_special_tokens=False).input_ids for s in samples]


def normalise(text: str) -> str:
    """The form exact-match compares: Unicode NFKC, lower case, ASCII punctuation removed, the
    articles a/an/the dropped, runs of whitespace collapsed to one space, ends stripped."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())
