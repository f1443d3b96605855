"""`tokenprune list`: strategies and adapters, built-in or from plugins."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..adapters.base import adapter_class
from ..registry import Entry, list_adapters, list_strategies
from .common import print_json, user_errors

PLACE_FORMS = {"vision": "vision:L", "projector": "projector", "llm": "llm:K"}
"""How each place kind is written in a spec."""


def describe(entry: Entry) -> dict[str, Any]:
    """A JSON-compatible row: name, role, origin, doc, parameters (type and default)."""
    fields = getattr(entry.cls, "model_fields", {})
    params = {
        name: {"type": str(f.annotation).replace("typing.", ""), "default": f.default} for name, f in fields.items()
    }
    row = {"name": entry.name, "role": entry.role, "origin": entry.origin, "doc": entry.doc, "params": params}
    if entry.role == "adapter":
        adapter = adapter_class(entry)
        row["supports"] = adapter.model_class
        row["places"] = list(adapter.places)
    return row


@user_errors
def list_command(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List the registered strategies (scorers, selectors) and model adapters.

    Example: tokenprune list --json
    """
    rows = [describe(e) for e in list_strategies().values()] + [describe(e) for e in list_adapters().values()]
    if json_out:
        print_json({"strategies": rows})
        return
    table = Table(title="tokenprune strategies and adapters")
    for column in ("name", "role", "origin", "parameters", "description"):
        table.add_column(column)
    for row in rows:
        params = ", ".join(f"{k}={v['default']!r}" for k, v in row["params"].items())
        if row["role"] == "adapter":
            params = "places: " + ", ".join(PLACE_FORMS.get(p, p) for p in row["places"])
        table.add_row(row["name"], row["role"], row["origin"], params, row["doc"])
    Console().print(table)
