"""``diffguide generate --init-latents FILE --strength S`` on the bundled model: the library's result bit
for bit, recorded in the manifest and replayed; bad files and strengths are one-line errors (exit 2)
that write nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffguide import CFG, GuidedPipeline
from diffguide.cli.main import app
from diffguide.io import load_latents, read_manifest
from diffguide.sampling.init import load_init_latents


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def start(runner, tmp_path_factory):
    """A first run's saved latents (key "latents", [1, 4, 8, 8]): the file --init-latents reads."""
    out = tmp_path_factory.mktemp("first")
    res = invoke(runner, "generate", "-p", "a handwritten digit 3", "--steps", "3", "--threads", "1",
                 "--save-latents", "-q", "-o", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    return next(out.glob("*.safetensors"))


def test_cli_img2img_equals_library_and_replays(runner, start, tmp_path):
    args = [
        "-p",
        "a handwritten digit 8",
        "-n",
        "2",
        "--steps",
        "6",
        "--cfg",
        "3",
        "--seed",
        "5",
        "--threads",
        "1",
    ]
    res = invoke(runner, "generate", *args, "--init-latents", start, "--strength", "0.5", "--save-latents",
                 "-q", "-o", tmp_path)  # fmt: skip
    assert res.exit_code == 0, res.output
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    gp = GuidedPipeline.from_pretrained(device="cpu")
    lib = gp.generate(
        "a handwritten digit 8", num_images=2, guidance=[CFG(3.0)], steps=6, seed=5, decode=False,
        init_latents=load_init_latents(start), strength=0.5,
    )  # fmt: skip
    for i, f in enumerate(files):
        assert torch.equal(load_latents(f)[0], lib.latents[i : i + 1])
    manifest = read_manifest(files[0].with_suffix(".json"))
    rec = manifest["parameters"]["init_latents"]
    assert rec["path"] == str(start) and rec["sha256"] == load_init_latents(start).sha256
    assert manifest["parameters"]["strength"] == 0.5
    assert len(manifest["scheduler"]["timesteps"]) == 3  # the last 3 of the 6-step schedule ran
    assert manifest["engine"]["forward_calls"] == 3
    # strength 0.5 from the start latents is not the plain run
    plain = gp.generate(
        "a handwritten digit 8", num_images=2, guidance=[CFG(3.0)], steps=6, seed=5, decode=False
    )
    assert (plain.latents - lib.latents).abs().max() > 1e-2
    res = invoke(runner, "replay", files[1].with_suffix(".png"))
    assert res.exit_code == 0, res.output
    assert "identical" in res.output.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-latents", "{tmp}/x.pt"], "error: initial latents file '{tmp}/x.pt' is a pickle (.pt); only .safetensors is read"),
        (["--init-latents", "{tmp}/pickle.safetensors"], "error: initial latents file '{tmp}/pickle.safetensors' is not a safetensors file"),
        (["--init-latents", "{tmp}/missing.safetensors"], "error: initial latents file '{tmp}/missing.safetensors' does not exist"),
        (["--init-latents", "{tmp}/wrong.safetensors", "--strength", "0.5"],
         "error: initial latents have shape [1, 4, 16, 16]; this model at 32x32 px takes [1, 4, 8, 8]"),
        (["--init-latents", "{start}", "--strength", "0"], "error: strength must be in (0, 1] (1 = start from pure noise), got 0.0"),
        (["--init-latents", "{start}", "--strength", "1.5"], "error: strength must be in (0, 1] (1 = start from pure noise), got 1.5"),
        (["--strength", "0.5"], "error: strength 0.5 needs initial latents to start from (--init-latents; a job's initial_latents)"),
        (["--init-latents", "{start}", "--save-workflow", "{tmp}/wf.json"],
         "error: --save-workflow cannot express --init-latents yet (a LoadLatent node); drop one of them"),
    ],
)  # fmt: skip
def test_bad_init_inputs_one_line(runner, start, tmp_path, args, message):
    (tmp_path / "x.pt").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x02}q\x00.")
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, str(tmp_path / "wrong.safetensors"))
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, start=start) for a in args]
    res = invoke(runner, "generate", "-p", "a", "--steps", "2", *args, "-o", out)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), res.stderr
    assert "Traceback" not in res.output and not out.exists()
