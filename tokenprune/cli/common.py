"""Helpers shared by the CLI commands: one-line errors, option checks, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
import torch
import typer

from ..errors import InputError, SpecError, TokenpruneError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEBUG_HINT = "run with --debug for the traceback"
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds `torch.manual_seed` accepts, as typer.Option bounds."""


class Settings:
    """Process-wide CLI settings from the global options."""

    debug = False


def user_errors(func: F) -> F:
    """Turn tokenprune errors and file-system errors into one line on stderr and exit code 2, and
    any other exception into one line naming it with a `--debug` hint and exit code 1 (with
    `--debug`, the exception propagates with its traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (TokenpruneError, OSError) as exc:
            if Settings.debug:
                raise
            typer.echo(f"error: {one_line(exc)}", err=True)
            raise typer.Exit(code=2) from None
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if Settings.debug:
                raise
            typer.echo(f"error: internal error: {type(exc).__name__}: {one_line(exc)} ({DEBUG_HINT})", err=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its first non-empty line, or its type)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_device(device: str) -> str:
    """`device` if it can hold tensors in this process.

    Raises:
        InputError: a malformed device string, `meta`, or a device type, index or backend that is
            not available here (the message names what is).
    """
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    hint = f"available here: {', '.join(available)}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {device!r}; {hint}") from None
    if parsed.type == "meta":
        raise InputError(f"device 'meta' holds no data, so nothing can run on it; {hint}")
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r} is not available: torch sees no CUDA GPU here; {hint}")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"device {device!r} is not available: torch sees {count} CUDA GPU(s); {hint}")
        return device
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return device
    backend = getattr(torch, parsed.type, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        return device
    raise InputError(f"device {device!r} is not available here; {hint}")


def split_values(option: str, text: str, parse: Callable[[str], T], what: str) -> list[T]:
    """The comma-separated values of `option`, each parsed by `parse`; at least one.

    Raises:
        SpecError: an empty list, or a value `parse` rejects (with `ValueError`), naming it.
    """
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(parse(item))
        except ValueError:
            raise SpecError(f"{option}: {item[:40]!r} is not {what}") from None
    if not values:
        raise SpecError(f"{option} lists no value; give one or more, comma-separated ({what} each)")
    return values


def positive_int(text: str) -> int:
    """`text` as an int >= 1 (`ValueError` otherwise)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
