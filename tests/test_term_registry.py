"""Adding a guidance method is one file: a term defined HERE only (``@register``) runs from the
CLI (``--guide``), is written to and replayed from its manifest, shows in ``diffguide guides``,
the A1111 text and the benchmark's settings. Plus the ``--guide`` syntax, its one-line errors,
and the built-in terms' manifests unchanged by the move onto :class:`Term`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffguide import CFG, PAG, SLG, TPG, EmbeddedGuidance, GenerateConfig, testing
from diffguide.bench.quality import Setting
from diffguide.cli.guide import parse_guide, split_pairs
from diffguide.cli.main import app
from diffguide.errors import ConfigError
from diffguide.guidance import FDG, REGISTRY, UNCOND, Branch, StepInfo, Term, Window, register
from diffguide.guidance.base import Predictions
from diffguide.guidance.registry import term_from_dict
from diffguide.io import a1111_parameters, load_latents, read_manifest


@register("mytest")
@dataclass(frozen=True)
class MyTest(Term):
    """A test-only term: ``scale (c - u)``, i.e. CFG with w = 1 + scale."""

    scale: float = 1.0
    window: Window = field(default_factory=Window)
    name: str = "mytest"
    flip: bool = False

    ranges = {"scale": (0.0, 10.0)}  # noqa: RUF012 (a plain dict works too)

    def branches(self) -> tuple[Branch, ...]:
        return (UNCOND,)

    def delta(self, preds: Predictions, step: StepInfo) -> torch.Tensor:
        d = self.scale * (preds["cond"] - preds["uncond"])
        return -d if self.flip else d


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd15")
    testing.tiny_sd15(seed=0).save_pretrained(path)
    return path


def generate(runner: CliRunner, model: Path, out: Path, *extra: str) -> Path:
    args = ["generate", "-m", str(model), "-p", "a cat", "--steps", "2", "--seed", "3", "--threads", "1"]
    res = runner.invoke(app, [*args, "-o", str(out), "--save-latents", "-q", *extra])
    assert res.exit_code == 0, res.output
    return out / "diffguide-000-3.png"


def test_new_term_from_cli_and_replay_equals_cfg(runner, model_dir, tmp_path):
    mine = generate(runner, model_dir, tmp_path / "mine", "--cfg", "1", "--guide", "mytest:scale=2")
    cfg = generate(runner, model_dir, tmp_path / "cfg", "--cfg", "3")
    manifest = read_manifest(mine)
    assert manifest["parameters"]["guidance"] == [
        {"method": "mytest", "scale": 2.0, "window": Window().describe(), "name": "mytest", "flip": False}
    ]
    a, b = load_latents(mine)[0], load_latents(cfg)[0]
    # scale (c - u) with scale 2 is (w - 1)(c - u) with w = 3: the same arithmetic, bit for bit
    assert torch.equal(a, b) and a.abs().max() > 0
    flipped = generate(
        runner, model_dir, tmp_path / "flip", "--cfg", "1", "--guide", "mytest:scale=2,flip=true"
    )
    assert not torch.equal(load_latents(flipped)[0], a)
    res = runner.invoke(app, ["replay", str(mine)])
    assert res.exit_code == 0, res.output
    assert "bit-identical" in res.output and "NOT" not in res.output
    assert "MYTEST scale: 2, Seed: 3" in a1111_parameters(manifest)


def test_guides_command_lists_registered_terms(runner):
    res = runner.invoke(app, ["guides", "--json"])
    assert res.exit_code == 0, res.output
    table = {t["method"]: t for t in json.loads(res.stdout)}
    assert list(table)[:5] == ["cfg", "embedded_guidance", "pag", "slg", "tpg"]
    assert table["mytest"]["summary"] == "A test-only term: scale (c - u), i.e. CFG with w = 1 + scale."
    assert table["mytest"]["parameters"] == [
        {"name": "scale", "type": "float", "default": 1.0, "range": [0.0, 10.0]},
        {"name": "window", "type": "window", "default": "whole run"},
        {"name": "name", "type": "str", "default": "mytest"},
        {"name": "flip", "type": "bool", "default": False},
    ]
    pag = {p["name"]: p for p in table["pag"]["parameters"]}
    assert pag["layers"] == {"name": "layers", "type": "str or none", "default": None}
    assert pag["semantics"]["type"] == "diagonal|value"
    assert pag["adaptive_scale"]["range"] == [0.0, "inf"]
    text = runner.invoke(app, ["guides"]).stdout
    assert "  scale: float = 4  in [0, 100]" in text and "  flip: bool = false" in text


def test_guide_syntax():
    assert split_pairs("scale=2,layers=d2.2-9,d3,window=0:0.5,sigma:1:") == [
        "scale=2",
        "layers=d2.2-9,d3",
        "window=0:0.5,sigma:1:",
    ]
    assert parse_guide("pag") == PAG()
    assert parse_guide("pag:layers=d2.2-9,d3,scale=2") == PAG(2.0, "d2.2-9,d3")
    assert parse_guide("tpg:layers=[d2.2-9,d3], scale = 1.5") == TPG(1.5, "d2.2-9,d3")
    assert parse_guide("cfg:window='0:0.5,sigma:1:',renorm=yes") == CFG(
        window=Window(sigma_min=1.0, start=0.0, end=0.5), renorm=True
    )
    assert parse_guide("pag:layers=none,semantics=value,name=pag2") == PAG(semantics="value", name="pag2")
    assert parse_guide("slg:layers=b7-9,start=0,stop=0.5") == SLG(layers="b7-9", start=0.0, stop=0.5)
    assert parse_guide("mytest:scale=2") == MyTest(2.0)


GUIDE_ERRORS = [
    ("xyz:scale=1", "--guide 'xyz:scale=1': unknown guidance method 'xyz'; known: cfg, embedded_guidance"),
    (
        "pag:scle=2",
        "--guide 'pag:scle=2': pag has no parameter 'scle'; it takes scale, layers, adaptive_scale, window, "
        "name, semantics",
    ),
    ("mytest:scale=x", "--guide 'mytest:scale=x': mytest scale: 'x' is not a number"),
    ("mytest:scale=11", "--guide 'mytest:scale=11': MYTEST scale must be in [0, 10], got 11.0"),
    ("mytest:flip=maybe", "--guide 'mytest:flip=maybe': mytest flip: 'maybe' is not true or false"),
    ("pag:semantics=v", "--guide 'pag:semantics=v': pag semantics: 'v' is not one of diagonal, value"),
    ("pag:scale", "--guide 'pag:scale': 'scale' is not key=value; pag takes scale, layers"),
    ("pag:scale=1,scale=2", "--guide 'pag:scale=1,scale=2': pag scale is given twice"),
    ("cfg:window=0.5:0.2", "--guide 'cfg:window=0.5:0.2': cfg window '0.5:0.2': window start (0.5)"),
]


@pytest.mark.parametrize(("spec", "message"), GUIDE_ERRORS)
def test_guide_errors_are_one_line_exit_2(runner, model_dir, tmp_path, spec, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["generate", "-m", str(model_dir), "-p", "a", "-o", str(out), "--guide", spec])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not out.exists()


def test_guide_and_flag_of_one_name_is_an_error(runner, model_dir, tmp_path):
    res = runner.invoke(
        app,
        ["generate", "-m", str(model_dir), "-p", "a", "-o", str(tmp_path), "--pag", "2", "--guide", "pag"],
    )
    assert res.exit_code == 2
    assert "two guidance terms are named 'pag' (--pag and --guide pag)" in res.stderr
    assert 'give the --guide term another name, e.g. --guide "pag:name=pag2"' in res.stderr


def test_guide_cfg_replaces_the_default_cfg(runner, model_dir, tmp_path):
    a = generate(runner, model_dir, tmp_path / "a", "--guide", "cfg:scale=6")
    b = generate(runner, model_dir, tmp_path / "b", "--cfg", "6")
    assert read_manifest(a)["parameters"]["guidance"] == read_manifest(b)["parameters"]["guidance"]
    assert torch.equal(load_latents(a)[0], load_latents(b)[0])


# the manifests of the built-in terms, exactly as before they moved onto Term (keys and values)
BUILTIN = [
    (CFG(), {"method": "cfg", "scale": 4.0, "rescale": 0.0, "window": Window().describe()}),
    (CFG(3.0, renorm=True), {"method": "cfg", "scale": 3.0, "rescale": 0.0, "window": Window().describe(), "renorm": True}),
    (
        PAG(2.0, "mid", 0.1),
        {"method": "pag", "name": "pag", "scale": 2.0, "adaptive_scale": 0.1, "layers": "mid", "window": Window().describe()},
    ),
    (
        PAG(semantics="value"),
        {"method": "pag", "name": "pag", "scale": 3.0, "adaptive_scale": 0.0, "layers": None,
         "window": Window().describe(), "semantics": "value"},
    ),
    (TPG(1.0, "d2"), {"method": "tpg", "name": "tpg", "scale": 1.0, "layers": "d2", "window": Window().describe()}),
    (
        SLG(layers="b7-9"),
        {"method": "slg", "name": "slg", "scale": 2.8, "layers": "b7-9", "start": 0.01, "stop": 0.2,
         "window": Window().describe()},
    ),
    (EmbeddedGuidance(3.0), {"method": "embedded_guidance", "scale": 3.0}),
]  # fmt: skip


@pytest.mark.parametrize(("term", "manifest"), BUILTIN)
def test_builtin_manifests_unchanged_and_replayable(term, manifest):
    assert term.describe() == manifest
    assert term_from_dict(json.loads(json.dumps(manifest))) == term


def test_builtin_activity_unchanged():
    def at(index: int, count: int = 10, timestep: float = 500.0) -> StepInfo:
        return StepInfo(index, count, sigma=1.0, timestep=timestep)

    assert not CFG(1.0).active(at(0)) and CFG(1.5).active(at(0))
    assert not PAG(0.0).active(at(0)) and PAG(3.0, window=Window(start=0.5)).active(at(5))
    assert not PAG(3.0, adaptive_scale=0.01).active(at(0, timestep=0.0))  # adaptive scale reaches 0
    assert [SLG(layers="b1").active(at(i)) for i in range(4)] == [False, True, False, False]  # 0.1 < i < 2
    assert not TPG(0.0).active(at(0)) and not EmbeddedGuidance().active(at(0))
    x = torch.randn(2, 4, 3, 3)
    assert PAG().post(x, {}, at(0)) is x


def test_register_rules():
    with pytest.raises(ValueError, match="lower-case"):
        register("Bad-Name")
    with pytest.raises(TypeError, match="needs a frozen dataclass deriving from Term"):

        @register("plain")
        @dataclass
        class Plain(Term):
            scale: float = 1.0

    with pytest.raises(ValueError, match="'cfg' is already registered by CFG"):
        register("cfg")(MyTest)
    assert REGISTRY["mytest"] is MyTest and MyTest.method == "mytest"


def test_manifest_errors_name_the_term_and_keys():
    with pytest.raises(
        ConfigError, match=r"^mytest has no parameter 'bogus'; its parameters: scale, window, name, flip$"
    ):
        term_from_dict({"method": "mytest", "bogus": 1})
    with pytest.raises(ConfigError, match=r"^unknown guidance method 'nope' in manifest; known: cfg, "):
        term_from_dict({"method": "nope"})
    with pytest.raises(ConfigError, match=r"^MYTEST scale must be a finite number, got nan$"):
        term_from_dict({"method": "mytest", "scale": math.nan})


def test_a1111_text_from_the_registry():
    manifest = {
        "image": {"prompt": "p", "seed": 1},
        "parameters": {
            "steps": 2, "scheduler": "euler", "width": 8, "height": 8,
            "guidance": [CFG(5.0, 0.7).describe(), SLG(layers="b1").describe(), MyTest(2.0).describe(),
                         EmbeddedGuidance(3.5).describe()],
        },
        "environment": {"versions": {"diffguide": "x"}},
    }  # fmt: skip
    assert a1111_parameters(manifest) == (
        "p\nSteps: 2, Sampler: Euler, CFG scale: 5, CFG Rescale phi: 0.7, SLG scale: 2.8, MYTEST scale: 2, "
        "Distilled CFG Scale: 3.5, Seed: 1, Size: 8x8, Version: diffguide x"
    )


def test_bench_settings_take_any_registered_term():
    s = Setting.parse("cond/cfg3+mytest2")
    assert (s.name, s.method, s.cfg, s.scale("mytest"), s.pag) == (
        "cond/cfg3+mytest2",
        "cfg+mytest",
        3.0,
        2.0,
        0.0,
    )
    assert Setting.parse("cond/mytest2+cfg3") == s == Setting(True, cfg=3, mytest=2)
    assert s.terms() == [CFG(3.0), MyTest(2.0)]
    assert Setting(True, pag=2).terms({"pag": "mid"}) == [PAG(2.0, "mid")]
    assert Setting(False, cfg=1.0, mytest=0.0).name == "uncond/none"  # "off" scales are left out
    with pytest.raises(ConfigError, match="'xyz3' is not <method><scale> with a method of cfg, "):
        Setting.parse("cond/xyz3")
    config = GenerateConfig.create("a", guidance=s.terms())
    assert [t.describe()["method"] for t in config.guidance] == ["cfg", "mytest"]


def test_check_determinism_takes_guide(runner, model_dir):
    args = ["check-determinism", "-m", str(model_dir), "-p", "a", "--steps", "1", "--threads", "1"]
    res = runner.invoke(app, [*args, "--cfg", "1", "--guide", "mytest:scale=2", "--json"])
    assert res.exit_code == 0, res.output
    assert [c["check"] for c in json.loads(res.stdout)] == ["rerun"]


def test_guide_reads_tuples():
    want = FDG((10.0, 5.0), (1.0, 0.5))
    assert parse_guide("fdg:scales=[10,5],parallel_weights=[1,0.5]") == want
    assert parse_guide("fdg:scales=10,5,parallel_weights=[1, 0.5]") == want  # brackets optional
    assert parse_guide("fdg:scales=[7, 3, 1.5],parallel_weights=none") == FDG((7.0, 3.0, 1.5))
    assert parse_guide("fdg:scales=[4]").scales == (4.0,)


TUPLE_ERRORS = [
    ("fdg:scales=[10,x]", "--guide 'fdg:scales=[10,x]': fdg scales: 'x' is not a number"),
    (
        "fdg:scales=[10,,5]",
        "--guide 'fdg:scales=[10,,5]': fdg scales: '10,,5' has an empty item; give comma-separated values like [10,5]",
    ),
    ("fdg:scales=[]", "--guide 'fdg:scales=[]': FDG needs 1 to 8 scales (one per pyramid level), got 0"),
    (
        "fdg:scales=[10,5],parallel_weights=[1]",
        "--guide 'fdg:scales=[10,5],parallel_weights=[1]': FDG has 2 scales but 1 parallel_weights",
    ),
]


@pytest.mark.parametrize(("spec", "message"), TUPLE_ERRORS)
def test_guide_tuple_errors(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_guide(spec)
    assert str(err.value) == message


def test_fdg_tuples_from_cli_manifest_and_replay(runner, model_dir, tmp_path):
    spec = "fdg:scales=[6,3],parallel_weights=[1,0.5]"
    png = generate(runner, model_dir, tmp_path / "fdg", "--cfg", "1", "--guide", spec)
    entry = read_manifest(png)["parameters"]["guidance"][-1]
    assert entry == {
        "method": "fdg",
        "scales": [6.0, 3.0],
        "parallel_weights": [1.0, 0.5],
        "window": Window().describe(),
        "name": "fdg",
    }
    assert term_from_dict(entry) == FDG((6.0, 3.0), (1.0, 0.5))
    assert term_from_dict({**entry, "scales": [6, 3]}) == FDG((6.0, 3.0), (1.0, 0.5))  # JSON ints
    plain = generate(runner, model_dir, tmp_path / "cfg", "--cfg", "1")
    assert not torch.equal(load_latents(png)[0], load_latents(plain)[0])
    res = runner.invoke(app, ["replay", str(png)])
    assert res.exit_code == 0, res.output
    assert "bit-identical" in res.output and "NOT" not in res.output
    guides = runner.invoke(app, ["guides"]).stdout
    assert "  scales: float list = [10,5]" in guides
    table = {t["method"]: t for t in json.loads(runner.invoke(app, ["guides", "--json"]).stdout)}
    assert table["fdg"]["parameters"][0] == {"name": "scales", "type": "float list", "default": [10.0, 5.0]}
