"""The typer application behind the `tokenprune` console script."""

from __future__ import annotations

import typer

from .bench_cmd import bench_command
from .common import Settings
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


@app.callback()
def global_options(
    debug: bool = typer.Option(
        False, "--debug", envvar="TOKENPRUNE_DEBUG", help="Show the full traceback of an error instead of one line."
    ),
) -> None:
    """Training-free visual-token compression for multimodal LLMs."""
    Settings.debug = debug


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
