"""What a new user meets first: `diffguide --help` without loading torch, `--version`, flags
without a value placeholder in the help, and a lazy `import diffguide`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from proc_support import run_python
from typer.testing import CliRunner

import diffguide
from diffguide.cli.main import app

HEAVY = ("torch", "diffusers", "transformers")
REPO = Path(__file__).resolve().parents[1]


def heavy_after(statements: str) -> list[str]:
    code = f"import sys\n{statements}\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    line = res.stdout.splitlines()[-1]
    assert line.startswith("HEAVY:"), res.stdout
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_cli_module_imports_no_torch_or_diffusers():
    assert heavy_after("import diffguide.cli.main") == []


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["check-determinism", "--help"]])
def test_help_runs_without_torch_or_diffusers(args):
    call = (
        "import typer\nfrom diffguide.cli.main import app\n"
        f"typer.main.get_command(app).main({args!r}, prog_name='diffguide', standalone_mode=False)"
    )
    assert heavy_after(call) == []


def test_import_diffguide_is_lazy_and_public_names_still_import():
    assert heavy_after("import diffguide") == []
    loaded = heavy_after(
        "from diffguide import CFG, PAG, TPG, GuidedPipeline, Window\n"
        "assert CFG.__module__ == 'diffguide.guidance.cfg' and GuidedPipeline.__name__ == 'GuidedPipeline'\n"
        "assert Window().start == 0.0 and PAG(2.0).scale == 2.0 and TPG(1.0).scale == 1.0"
    )
    assert "torch" in loaded  # the names are the real classes, imported on first use


def test_lazy_names_and_unknown_attribute():
    from diffguide.pipeline import GuidedPipeline

    assert diffguide.GuidedPipeline is GuidedPipeline
    assert set(diffguide.__all__) <= set(dir(diffguide))
    with pytest.raises(AttributeError, match="module 'diffguide' has no attribute 'NoSuchThing'"):
        _ = diffguide.NoSuchThing  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def test_version_option_and_command(runner):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert diffguide.__version__ == version
    for args in (["--version"], ["version"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert res.stdout == f"diffguide {version}\n"


HELP_PAGES = [
    [],
    ["generate"],
    ["check-determinism"],
    ["diff"],
    ["layers"],
    ["replay"],
    ["bench"],
    ["bench", "quality"],
    ["bench", "report"],
]


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda c: " ".join(c) or "diffguide")
def test_flags_show_no_value_placeholder(runner, command):
    res = runner.invoke(app, [*command, "--help"])
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.stdout
    help_line = next(line for line in res.stdout.splitlines() if "--help" in line)
    assert help_line.split() == ["│", "--help", "-h", "Show", "this", "message", "and", "exit.", "│"]


def test_flag_rows_in_generate_help(runner):
    lines = [
        line for line in runner.invoke(app, ["generate", "--help"]).stdout.splitlines() if "│ --" in line
    ]
    quiet = next(line for line in lines if "--quiet" in line)
    assert quiet.split()[:4] == ["│", "--quiet", "-q", "No"]  # option names, then straight the help text
    latents = next(line for line in lines if "--save-latents" in line)
    assert latents.split()[:3] == ["│", "--save-latents", "Also"]
    steps = next(line for line in lines if "--steps" in line)
    assert "<int>" in steps  # options that take a value keep their placeholder
