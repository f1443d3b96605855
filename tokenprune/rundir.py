"""The output directory of a long comparison: checked before any work, each finished row appended
to `rows.jsonl` and fsync'd at once, summary files replaced atomically, `--resume` continuing a run
whose model, data, seed and versions match.

`rows.jsonl` holds one JSON object per line: first `{"meta": ...}` (the run's identity), then one
`{"row": ..., "samples": [...], "batches": [...]}` per finished (strategy, budget) row. A line cut
short by a crash is ignored on resume; a row that failed is written with its error and run again
on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InputError

ROWS = "rows.jsonl"
SUMMARY = ("results.json", "results.csv", "accuracy.png", "agreement.png", "pareto.png")
"""Every file a comparison writes besides `ROWS` (only these are removed by `--overwrite`)."""

IDENTITY = ("model", "model_fingerprint", "data", "data_sha256", "limit", "seed", "batch_size", "metric", "versions")
"""The meta fields a resumed run must share with the run it continues."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`:
    a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure `out` can take a comparison's results, before any model work.

    Raises:
        InputError: `out` is a file or cannot be created or written; it holds files and neither
            `resume` nor `overwrite` is set; both are set.
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tokenprune-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {str(out)!r} cannot be created or written ({exc.strerror or exc})") from None
    present = sorted(p.name for p in out.iterdir())
    if present and not resume and not overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise InputError(
            f"--out {str(out)!r} is not empty ({shown}); add --resume to continue the run in it, "
            "--overwrite to replace its results, or choose another --out"
        )
    if overwrite:
        for name in (ROWS, *SUMMARY):
            (out / name).unlink(missing_ok=True)


def read_rows(out: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows `out/rows.jsonl` holds, by spec key, for a resumed run with this `meta`; failed rows
    and a last line cut short are left out. Rewrites the file without such a line.

    Raises:
        InputError: the file holds another run (its identity differs from `meta`'s, named field by field).
    """
    path = out / ROWS
    if not path.exists():
        return {}
    lines = path.read_bytes().splitlines(keepends=True)
    entries, good = [], 0
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):  # the row in flight when the process died
                break
            raise InputError(f"{path}:{number}: not a JSON row; the file is damaged, rerun with --overwrite") from None
        entries.append(entry)
        good += len(line)
    if not entries:
        return {}
    if good < sum(map(len, lines)):
        with path.open("r+b") as handle:
            handle.truncate(good)
    stored = entries[0].get("meta", {})
    differ = [f"{k}: {stored.get(k)!r} there, {meta.get(k)!r} now" for k in IDENTITY if stored.get(k) != meta.get(k)]
    if differ:
        raise InputError(
            f"cannot resume in {str(out)!r}: it holds another run ({'; '.join(differ)}); rerun with the "
            "original settings, or use --overwrite or another --out to start over"
        )
    return {row_key(e["row"]): e for e in entries[1:] if "row" in e and not e["row"].get("error")}


def row_key(row: dict[str, Any]) -> str:
    """A row's identity in the file: its strategy name and pipeline spec."""
    return f"{row['strategy']}|{row['spec']}"


class RowLog:
    """Appends rows to `out/rows.jsonl`, each line flushed and fsync'd before `append` returns."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        path = out / ROWS
        fresh = not path.exists() or path.stat().st_size == 0
        self._handle: IO[str] = path.open("a", encoding="utf-8")
        if fresh:
            self._write({"meta": meta})
            _sync_dir(out)

    def _write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def append(self, row: dict[str, Any], samples: list[dict[str, Any]], batches: list[dict[str, Any]]) -> None:
        self._write({"row": row, "samples": samples, "batches": batches})

    def close(self) -> None:
        self._handle.close()


@contextmanager
def row_log(out: Path, meta: dict[str, Any]) -> Iterator[RowLog]:
    log = RowLog(out, meta)
    try:
        yield log
    finally:
        log.close()
