"""The typer application behind the `tokenprune` console script."""

from __future__ import annotations

import typer

from .bench_cmd import bench_command
from .compare_cmd import compare_command
from .list_cmd import list_command
from .run_cmd import run_command
from .visualize_cmd import visualize_command

app = typer.Typer(
    help="Training-free visual-token compression for multimodal LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("list")(list_command)
app.command("run")(run_command)
app.command("compare")(compare_command)
app.command("visualize")(visualize_command)
app.command("bench")(bench_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
