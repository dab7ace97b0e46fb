"""One table of defaults (diffguide.defaults) used by the API and the CLI and quoted in the
docs; the bundled model as the default model; quiet loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from proc_support import run_python
from typer.testing import CliRunner

import diffguide
from diffguide import CFG, GenerateConfig, GuidedPipeline, testing
from diffguide.cli.main import app
from diffguide.defaults import (
    COMFY_SCHEDULE_NAMES,
    DEFAULTS,
    NOISE_POLICIES,
    SCHEDULER_NAMES,
    default_model,
    markdown_table,
)
from diffguide.io import read_manifest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_generate_config_takes_the_table():
    cfg = GenerateConfig.create("a")
    assert (cfg.steps, cfg.seed, cfg.scheduler, cfg.eta, cfg.noise, cfg.shift) == (
        DEFAULTS.steps,
        DEFAULTS.seed,
        DEFAULTS.scheduler,
        DEFAULTS.eta,
        DEFAULTS.noise,
        DEFAULTS.shift,
    )
    assert (cfg.width, cfg.height) == (DEFAULTS.size, DEFAULTS.size)
    assert cfg.guidance == (CFG(DEFAULTS.cfg),) and CFG().scale == DEFAULTS.cfg
    assert GenerateConfig(("a",), ("",)).steps == DEFAULTS.steps
    assert (DEFAULTS.steps, DEFAULTS.cfg) == (20, 4.0)  # the README's main job and sample grid


def test_cli_options_take_the_table():
    command = typer.main.get_command(app).commands["generate"]  # type: ignore[attr-defined]
    got = {p.name: p.default for p in command.params}
    # --cfg not given means DEFAULTS.cfg, or the family's own default where it differs (Flux: off)
    assert "--cfg" in command.params[[p.name for p in command.params].index("cfg")].opts
    expected = {
        "steps": DEFAULTS.steps,
        "cfg": None,
        "pag": DEFAULTS.pag,
        "tpg": DEFAULTS.tpg,
        "scheduler": DEFAULTS.scheduler,
        "seed": DEFAULTS.seed,
        "eta": DEFAULTS.eta,
        "noise": DEFAULTS.noise,
        "shift": DEFAULTS.shift,
        "width": DEFAULTS.size,
        "height": DEFAULTS.size,
        "device": DEFAULTS.device,
        "dtype": DEFAULTS.dtype,
        "model": DEFAULTS.model,
    }
    assert {k: getattr(got[k], "value", got[k]) for k in expected} == expected


def test_light_name_lists_match_the_implementations():
    from diffguide.pipeline import NOISE_POLICIES as pipeline_policies
    from diffguide.sampling.comfy import COMFY_SCHEDULERS
    from diffguide.sampling.schedulers import SCHEDULERS

    assert tuple(SCHEDULERS) == SCHEDULER_NAMES
    assert COMFY_SCHEDULERS == COMFY_SCHEDULE_NAMES
    assert pipeline_policies == NOISE_POLICIES


def test_docs_quote_the_table():
    text = (DOCS / "cli.md").read_text()
    match = re.search(r"<!-- defaults-table -->\n(.*?)\n<!-- /defaults-table -->", text, re.S)
    assert match, "docs/cli.md lost its defaults table markers"
    assert match.group(1) == markdown_table(), "regenerate it: python -m diffguide.defaults"
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines() if "|" in line
    }
    assert rows["`-s, --steps N`"] == str(DEFAULTS.steps)
    assert rows["`--cfg W`"] == f"{DEFAULTS.cfg:g}"


def test_no_options_is_the_same_run_from_the_cli_and_the_api(tmp_path):
    model = tmp_path / "tiny-sd15"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    res = CliRunner().invoke(
        app, ["generate", "-m", str(model), "-p", "a cat", "-o", str(tmp_path / "o"), "-q"]
    )
    assert res.exit_code == 0, res.output
    cli = read_manifest(tmp_path / "o" / "diffguide-000-0.json")
    api = GuidedPipeline.from_pretrained(model).generate("a cat")
    assert cli["parameters"] == json.loads(json.dumps(api.manifests[0]["parameters"]))
    assert cli["parameters"]["steps"] == DEFAULTS.steps
    assert cli["environment"]["device"] == api.manifests[0]["environment"]["device"]
    assert cli["output"]["latents_hash"] == api.manifests[0]["output"]["latents_hash"]


def test_default_model_is_the_bundled_folder():
    path = diffguide.default_model()
    assert path == default_model()
    assert path.parts[-2:] == ("assets", "tiny-sd") and (path / "model_index.json").is_file()
    assert path.parent.parent == Path(diffguide.__file__).parent


def test_from_pretrained_without_arguments_loads_the_bundled_model_silently():
    """A fresh process (transformers warns once per process): nothing on stdout or stderr."""
    res = run_python(
        "from diffguide import GuidedPipeline, default_model\n"
        "pipe = GuidedPipeline.from_pretrained()\n"
        "import sys; sys.stderr.flush()\n"
        "print(pipe.source == str(default_model()), pipe.unet.device.type)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout == f"True {'cuda' if torch.cuda.is_available() else 'cpu'}\n"


def test_loading_is_quiet_and_leaves_library_logging_as_it_was(capfd):
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    capfd.readouterr()
    pipe = GuidedPipeline.from_pretrained(device="cpu")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)] == before
    assert pipe.source == str(default_model())


def test_missing_bundled_model_is_a_clear_error(monkeypatch, tmp_path):
    from importlib import resources

    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    with pytest.raises(diffguide.DiffguideError, match=r"has no bundled model \(.*tiny-sd is missing\)$"):
        GuidedPipeline.from_pretrained()
