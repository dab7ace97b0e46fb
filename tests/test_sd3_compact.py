"""SD3 text compaction (models/families/sd3_compact.py): without T5, the 256 zero "T5" tokens run as
one token with a log(256) key bias. Final latents, compacted vs every text token, on the bundled
tiny-sd3 and on the tiny SD3 / SD3.5 test pipelines with T5 dropped, for CFG, CFG+SLG, CFG+PAG,
CFG+TPG, batch 1 and 4, with chunking and prefix sharing: in float64, where the comparison shows
the method and not float32 rounding, <= 1e-10 (measured ~4e-16); in float32 <= 1e-4 (measured
8e-6 .. 2e-5: the uncompacted run's own batch-vs-single rounding is 8e-6 on the same latents), and
one compacted float32 forward is as close to the float64 forward as the uncompacted one. The
fallbacks are recorded."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from families_support import max_diff, tiny_sd3
from typer.testing import CliRunner

from diffguide import CFG, PAG, SLG, TPG, ConfigError, GenerateConfig, GuidedPipeline
from diffguide.cli.main import app
from diffguide.guidance import NAG, PromptShuffle
from diffguide.models.families.sd3_compact import trailing_run
from diffguide.repro.schema import config_from_manifest

TOL = 1e-10  # float64
TOL32 = 1e-4
PROMPTS = ["a handwritten digit 4", "a photo of a sneaker", "a handwritten digit 7", "a photo of a bag"]
NEGATIVES = ["", "a photo of a bag", "", "blurry"]
GUIDANCE = {
    "cfg": [CFG(4.0)],
    "cfg+slg": [CFG(4.0), SLG(2.0, layers="b1")],
    "cfg+pag": [CFG(4.0), PAG(2.0, layers="b1")],
    "cfg+tpg": [CFG(4.0), TPG(1.5, layers="b1")],
}


@pytest.fixture(scope="module")
def tiny() -> GuidedPipeline:
    return GuidedPipeline.from_pretrained("tiny-sd3", device="cpu")


@pytest.fixture(scope="module")
def tiny64() -> GuidedPipeline:
    return GuidedPipeline.from_pretrained("tiny-sd3", device="cpu", dtype=torch.float64)


def without_t5(seed: int = 0, sd35: bool = False) -> GuidedPipeline:
    """The tiny SD3 test pipeline (64 image tokens) in float64 with T5 dropped, as tiny-sd3 ships."""
    pipe = tiny_sd3(seed=seed, sd35=sd35).to(dtype=torch.float64)
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    return GuidedPipeline(pipe)


@pytest.fixture(scope="module")
def no_t5() -> GuidedPipeline:
    return without_t5()


def run(gp, guidance, batch, **kwargs):
    return gp.generate(
        PROMPTS[:batch], NEGATIVES[:batch], guidance=guidance, steps=3, seed=5, decode=False, **kwargs
    )


def compare(gp, guidance, batch, **kwargs):
    """(compacted result, every-token result); asserts the compacted run really compacted."""
    on = run(gp, guidance, batch, compact_text=True, **kwargs)
    off = run(gp, guidance, batch, compact_text=False, **kwargs)
    record = on.manifests[0]["engine"]["compact_text"]
    assert record["fallback"] is None and record["full_calls"] == 0, record
    assert record["compacted_calls"] == on.forward_calls
    assert off.manifests[0]["engine"]["compact_text"] == {"on": False}
    return on, off


def test_trailing_run_is_the_shortest_exact_run_over_rows():
    x = torch.randn(3, 10, 4)
    x[:, 6:] = 0.0
    assert trailing_run(x) == 4
    x[1, 5] = 0.0  # one row with a longer run: the shortest counts
    assert trailing_run(x) == 4
    x[2, 9, 1] = 1e-30  # one value off in one row: no run
    assert trailing_run(x) == 1
    y = torch.randn(2, 5, 4)
    y[:, 2:] = y[:, -1:]  # identical non-zero tokens, a different one per row
    assert trailing_run(y) == 3


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", list(GUIDANCE))
def test_tiny_sd3_compacted_equals_every_token(tiny64, method, batch):
    on, off = compare(tiny64, GUIDANCE[method], batch)
    assert on.manifests[0]["engine"]["compact_text"]["text_tokens"] == [333, 78]
    assert max_diff(on.latents, off.latents) <= TOL


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", list(GUIDANCE))
def test_tiny_test_model_compacted_equals_every_token(no_t5, method, batch):
    on, off = compare(no_t5, GUIDANCE[method], batch)
    assert on.manifests[0]["engine"]["compact_text"]["text_tokens"] == [333, 78]
    assert max_diff(on.latents, off.latents) <= TOL


def test_sd35_dual_attention_and_qk_norm():
    on, off = compare(without_t5(1, sd35=True), [CFG(4.0), PAG(2.0, layers="b1", semantics="value")], 2)
    assert max_diff(on.latents, off.latents) <= TOL


@pytest.mark.parametrize("method", ["cfg", "cfg+pag"])
def test_float32_within_rounding(tiny, method):
    on, off = compare(tiny, GUIDANCE[method], 4)
    assert max_diff(on.latents, off.latents) <= TOL32


def test_float32_forward_as_close_to_float64_as_every_token(tiny, tiny64):
    """One forward on 8 rows: compacted float32 is no further from the float64 forward than the
    uncompacted float32 forward is (measured 2.9e-6 vs 3.7e-6)."""
    from diffguide.models.families.sd3_compact import TextCompaction

    cond, uncond = tiny64.encode(GenerateConfig.create(PROMPTS, NEGATIVES), 32, 32)
    embeds = torch.cat([uncond.embeds, cond.embeds])
    pooled = torch.cat([uncond.pooled, cond.pooled])
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(gp, dtype, compact):
        model = gp.pipe.transformer
        args = {"hidden_states": x, "encoder_hidden_states": embeds, "pooled_projections": pooled}
        kwargs = {k: v.to(dtype) for k, v in args.items()}
        with torch.no_grad(), TextCompaction().installed(model, []) if compact else nullcontext():
            out = model(timestep=torch.full((8,), 600.0, dtype=dtype), return_dict=False, **kwargs)
        return out[0].double()

    truth = forward(tiny64, torch.float64, False)
    assert max_diff(forward(tiny64, torch.float64, True), truth) <= TOL
    on, off = (max_diff(forward(tiny, torch.float32, c), truth) for c in (True, False))
    assert on <= 2 * off + 1e-6, (on, off)


def test_chunks_and_prefix_sharing(tiny64):
    terms = [CFG(4.0), PAG(2.0, layers="b2"), SLG(2.0, layers="b3")]
    _, ref = compare(tiny64, terms, 4, prefix_sharing=False)
    for kwargs in ({"max_rows": 3}, {"max_rows": 5, "prefix_sharing": False}, {}):
        on = run(tiny64, terms, 4, **kwargs)
        assert on.manifests[0]["engine"]["compact_text"]["fallback"] is None
        assert max_diff(on.latents, ref.latents) <= TOL, kwargs


def test_installed_for_the_run_only(tiny):
    model = tiny.pipe.transformer
    before = dict(model.attn_processors)
    run(tiny, GUIDANCE["cfg+pag"], 1)
    assert "forward" not in model.__dict__
    assert model.attn_processors == before
    assert all(type(p) is JointAttnProcessor2_0 for p in before.values())


def test_with_t5_nothing_repeats_and_nothing_changes():
    """With T5 the trailing tokens differ: no call is compacted, the run is bit-identical."""
    gp = GuidedPipeline(tiny_sd3(seed=0))
    on, off = run(gp, [CFG(4.0)], 2), run(gp, [CFG(4.0)], 2, compact_text=False)
    record = on.manifests[0]["engine"]["compact_text"]
    assert record["compacted_calls"] == 0 and record["full_calls"] == on.forward_calls
    assert torch.equal(on.latents, off.latents)


@pytest.mark.parametrize(
    ("term", "kind"), [(PromptShuffle(2.0), "TextShuffle"), (NAG(3.0, layers="b1"), "NagAttention")]
)
def test_text_perturbations_fall_back_and_say_why(tiny, term, kind):
    """A prompt shuffle permutes the text tokens; NAG reads the negative prompt's full text stream."""
    on = run(tiny, [CFG(4.0), term], 2)
    off = run(tiny, [CFG(4.0), term], 2, compact_text=False)
    record = on.manifests[0]["engine"]["compact_text"]
    assert record["fallback"] == f"perturbation {kind} may change the text tokens"
    assert record["compacted_calls"] == 0
    assert torch.equal(on.latents, off.latents)


def test_module_traces_fall_back(tiny):
    from diffguide.repro.trace import TraceRecorder

    recorder = TraceRecorder(module_pattern="transformer_blocks.0")
    with recorder.hooks(tiny.pipe.transformer):
        out = tiny.generate(PROMPTS[:1], steps=2, seed=1, decode=False, callback=recorder)
    record = out.manifests[0]["engine"]["compact_text"]
    assert record["fallback"] == "module traces record the text stream at its full length"
    assert recorder.tensors["step_0000/module/transformer_blocks.0/cond"].shape[1] == 333


def test_other_families_record_no_compaction(sd15):
    out = sd15.generate("a cat", steps=1, decode=False)
    assert out.manifests[0]["engine"]["compact_text"]["fallback"] == "sd models have no text compaction"


def test_manifest_switch_and_old_manifests(tiny, tmp_path):
    """``--no-compact-text`` reaches the manifest; a manifest without the field replays uncompacted."""
    manifests = {}
    for flag in ([], ["--no-compact-text"]):
        out = tmp_path / ("off" if flag else "on")
        args = ["generate", "-m", "tiny-sd3", "-p", "a handwritten digit 2", "--steps", "2", "-o", str(out)]
        res = CliRunner().invoke(app, args + flag)
        assert res.exit_code == 0, res.output
        manifests[bool(flag)] = json.loads(next(out.glob("*.json")).read_text())
    assert manifests[False]["parameters"]["compact_text"] is True
    assert manifests[False]["engine"]["compact_text"]["compacted_calls"] == 2
    assert manifests[True]["parameters"]["compact_text"] is False
    assert manifests[True]["engine"]["compact_text"] == {"on": False}
    assert config_from_manifest(manifests[False]).compact_text is True
    old = {**manifests[False], "parameters": dict(manifests[False]["parameters"])}
    del old["parameters"]["compact_text"]
    assert config_from_manifest(old).compact_text is False  # made before compaction existed
    with pytest.raises(ConfigError, match=r"^compact_text must be true or false, got 'yes'$"):
        GenerateConfig.create("a cat", compact_text="yes")


def test_benchmark_quick():
    """``benchmarks/compact_text.py``'s tiny-sd3 section runs both sides on the same latents."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compact_text.py"
    spec = importlib.util.spec_from_file_location("compact_text_bench", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (row,) = module.tiny_sd3(rounds=1, steps=1, quick=True)
    assert row["setting"] == "tiny-sd3 CFG, B=1"
    assert row["every_token_ms"] > 0 and row["compacted_ms"] > 0
    assert row["max_abs_diff"] <= TOL32
