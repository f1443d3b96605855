"""`tokenprune visualize` on a model whose images have no fixed patch grid: one clear error line."""

from conftest import images
from typer.testing import CliRunner

from tokenprune.cli.app import app

runner = CliRunner()


def test_visualize_refuses_models_without_a_fixed_grid(tiny_next, tmp_path):
    image = tmp_path / "img.png"
    images(1)[0].save(image)
    out = tmp_path / "kept.png"
    result = runner.invoke(
        app,
        [
            "visualize",
            "--model",
            str(tiny_next.path),
            "--image",
            str(image),
            "--strategy",
            "uniform@4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the loading bar
    assert len(errors) == 1 and "on one patch grid" in errors[0] and "llava-next" in errors[0]
    assert "Traceback" not in result.output and not out.exists()
