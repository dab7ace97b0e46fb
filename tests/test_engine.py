"""Engine structure: one batched forward per step, row layout, chunking, windows, scoping
of perturbations, restoration of the model, determinism, and the formulas on known values."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from diffguide import (
    CFG,
    PAG,
    TPG,
    Branch,
    Conditioning,
    ConfigError,
    GuidedModel,
    LayerSpecError,
    StepInfo,
    Window,
)
from diffguide.guidance.cfg import cfg_delta, rescale
from diffguide.guidance.pag import adaptive_scale
from diffguide.perturb import TokenShuffle
from diffguide.perturb.identity_attention import _RowIdentityProcessor

STEPS = 4
SEED = 3
PROMPTS = ["a cat", "a dog"]
NEGATIVES = ["ugly", "blurry"]
ALL3 = [CFG(5.0), PAG(3.0), TPG(3.0)]


def run(gp, guidance, prompts=PROMPTS, negatives=NEGATIVES, **kwargs):
    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("seed", SEED)
    return gp.generate(prompts, negatives, guidance=guidance, decode=False, **kwargs)


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


# --- one forward per step, rows, chunks, windows --------------------------------------------


def test_cfg_pag_tpg_is_one_forward_per_step(sd15, unet_calls):
    with unet_calls(sd15.unet) as log:
        out = run(sd15, ALL3)
    assert log.rows == [4 * len(PROMPTS)] * STEPS
    assert out.forward_calls == STEPS


@pytest.fixture(scope="module")
def whole_f64(sd15_f64):
    return run(sd15_f64, ALL3, steps=3).latents


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_max_rows_chunks_give_the_same_result(sd15_f64, whole_f64, unet_calls, max_rows):
    """8 rows [u0 u1 c0 c1 p0 p1 t0 t1]; chunks of 3 or 5 split branches in the middle.
    In float64 (see conftest) the chunked run equals the whole one to rounding (1e-10)."""
    with unet_calls(sd15_f64.unet) as log:
        chunked = run(sd15_f64, ALL3, steps=3, max_rows=max_rows)
    per_step = math.ceil(8 / max_rows)
    assert log.calls == 3 * per_step == chunked.forward_calls
    assert sum(log.rows) == 3 * 8 and max(log.rows) == min(8, max_rows)
    assert maxdiff(whole_f64, chunked.latents) <= 1e-10


def test_max_rows_float32_within_equivalence_tolerance(sd15):
    """float32: batch-size-dependent rounding, times the guidance scales, stays far below 1e-4."""
    whole = run(sd15, ALL3, steps=2).latents
    assert maxdiff(whole, run(sd15, ALL3, steps=2, max_rows=3).latents) <= 1e-4


@contextmanager
def out_of_memory_above(unet, rows: int):
    """Fail like a GPU out of memory in the up blocks, after TPG's down-block hooks drew their
    permutations, whenever a forward carries more than ``rows`` rows."""

    def hook(module, args, kwargs):
        if (args[0] if args else kwargs["hidden_states"]).shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    handle = unet.up_blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_out_of_memory_halves_the_rows_and_repeats_the_step_exactly(sd15, unet_calls):
    """8 rows fail, 4 fail, 2 fit: the run equals a --max-rows 2 run bit for bit, which needs
    the failed tries' TPG draws rewound; the fallback is recorded for replay."""
    expected = run(sd15, ALL3, max_rows=2).latents
    with out_of_memory_above(sd15.unet, 3), pytest.warns(RuntimeWarning, match="2 at model evaluation 0"):
        got = run(sd15, ALL3)
    assert torch.equal(got.latents, expected)
    assert got.forward_calls == STEPS * 4  # failed tries are not counted
    assert got.manifests[0]["engine"]["out_of_memory_fallbacks"] == {"0": 2}
    # a later, larger step (PAG's window opens at step 2) falls back there
    late = [CFG(5.0), PAG(3.0, window=Window(start=0.5))]
    with out_of_memory_above(sd15.unet, 5), pytest.warns(RuntimeWarning):
        got = run(sd15, late)
    assert got.manifests[0]["engine"]["out_of_memory_fallbacks"] == {"2": 3}
    assert torch.equal(got.latents, run(sd15, late, rows_schedule={2: 3}).latents)
    from diffguide.repro.replay import replay

    assert replay(got.manifests[1], sd15).identical  # replay chunks as the recorded run did


def test_out_of_memory_retry_keeps_traces_right(sd15):
    """Module outputs recorded by an abandoned attempt are dropped: the trace of the retried run
    equals the trace of a --max-rows 2 run, tensor for tensor."""
    from diffguide.repro.trace import TraceRecorder

    def traced(**kwargs):
        rec = TraceRecorder("mid_block.attentions.0")
        with rec.hooks(sd15.unet):
            run(sd15, ALL3, callback=rec, **kwargs)
        return rec.tensors

    expected = traced(max_rows=2)
    with out_of_memory_above(sd15.unet, 3), pytest.warns(RuntimeWarning):
        got = traced()
    assert got.keys() == expected.keys()
    assert "step_0000/module/mid_block.attentions.0/tpg" in got
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_out_of_memory_with_one_row_is_a_clear_error(sd15):
    from diffguide.engine import OutOfMemory

    with out_of_memory_above(sd15.unet, 0), pytest.raises(OutOfMemory, match="one row per forward"):
        run(sd15, ALL3)
    assert not sd15.unet.up_blocks[-1]._forward_pre_hooks


def test_out_of_memory_detection():
    from diffguide.engine import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    cpu = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
    assert is_out_of_memory(RuntimeError(cpu))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_other_errors_are_not_retried(sd15, unet_calls):
    def hook(module, args):
        raise RuntimeError("shape mismatch")

    handle = sd15.unet.up_blocks[-1].register_forward_pre_hook(hook)
    try:
        with unet_calls(sd15.unet) as log, pytest.raises(RuntimeError, match="shape mismatch"):
            run(sd15, ALL3)
    finally:
        handle.remove()
    assert log.calls == 1


def test_term_outside_its_window_adds_no_rows(sd15, unet_calls):
    b = len(PROMPTS)
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(5.0), PAG(3.0, window=Window(start=0.5))])
    assert log.rows == [2 * b, 2 * b, 3 * b, 3 * b]
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(5.0, window=Window(end=0.25)), TPG(3.0, window=Window(start=0.25, end=0.75))])
    assert log.rows == [2 * b, 2 * b, 2 * b, b]


def test_sigma_window_selects_steps_by_noise_level(sd15, unet_calls):
    sigmas: list[float] = []
    run(sd15, [CFG(5.0)], callback=lambda s: sigmas.append(s.step.sigma))
    assert sigmas == sorted(sigmas, reverse=True) and len(sigmas) == STEPS
    lo, hi = sigmas[2], sigmas[1]  # PAG on steps 1 and 2 only: lo <= sigma <= hi
    b = len(PROMPTS)
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(5.0), PAG(3.0, window=Window(sigma_min=lo, sigma_max=hi))])
    assert log.rows == [2 * b, 3 * b, 3 * b, 2 * b]


def test_cfg_scale_one_evaluates_no_uncond_rows(sd15, unet_calls):
    b = len(PROMPTS)
    with unet_calls(sd15.unet) as log:
        plain = run(sd15, [CFG(1.0)]).latents
    assert log.rows == [b] * STEPS
    assert torch.equal(plain, run(sd15, []).latents)
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(1.0), TPG(3.0)])
    assert log.rows == [2 * b] * STEPS


def test_adaptive_pag_drops_its_rows_when_the_scale_reaches_zero(sd15, unet_calls):
    """Timesteps 751, 501, 251, 1: s_t = max(0, 3 - 0.006 (1000 - t)) = 1.506, 0.006, 0, 0."""
    b = len(PROMPTS)
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(5.0), PAG(3.0, adaptive_scale=0.006)])
    assert log.rows == [3 * b, 3 * b, 2 * b, 2 * b]


# --- batches and per-image reproducibility ---------------------------------------------------


@pytest.mark.parametrize(
    ("guidance", "scheduler"), [(ALL3, "euler"), ([CFG(5.0)], "euler_a")], ids=["cfg-pag-tpg", "euler_a"]
)
def test_batch_of_four_equals_four_single_runs(sd15_f64, guidance, scheduler):
    """float64, so that 1e-10 tests the logic (noise, TPG draws, row layout), not rounding."""
    prompts = ["a cat", "a dog", "a tree", "a boat"]
    negatives = ["ugly", "", "blurry", "dark"]
    batch = run(sd15_f64, guidance, prompts, negatives, scheduler=scheduler, steps=2).latents
    for i in range(4):
        single = run(
            sd15_f64, guidance, prompts[i], negatives[i], seed=SEED + i, scheduler=scheduler, steps=2
        )
        assert maxdiff(batch[i : i + 1], single.latents) <= 1e-10, f"image {i}"


def test_same_inputs_twice_are_bit_identical(sd15):
    a = run(sd15, ALL3, scheduler="euler_a", steps=2).latents
    b = run(sd15, ALL3, scheduler="euler_a", steps=2).latents
    assert torch.equal(a, b)


# --- perturbations stay on their rows and leave the model as they found it ------------------


def test_perturbations_touch_only_their_rows(sd15_f64):
    """With PAG and TPG in the batch, u and c at step 0 are those of a CFG-only run
    (float64: equal to rounding)."""
    first: dict[str, dict[str, torch.Tensor]] = {}

    def keep(key):
        def cb(state):
            if state.step.index == 0:
                first[key] = {k: v.clone() for k, v in state.preds.items()}

        return cb

    run(sd15_f64, [CFG(5.0)], callback=keep("cfg"), steps=1)
    run(sd15_f64, ALL3, callback=keep("all"), steps=1, max_rows=3)  # chunks split the branches too
    assert set(first["all"]) == {"uncond", "cond", "pag", "tpg"}
    for name in ("uncond", "cond"):
        assert maxdiff(first["cfg"][name], first["all"][name]) <= 1e-12
    for name in ("pag", "tpg"):
        assert maxdiff(first["all"][name], first["all"]["cond"]) > 1e-3  # the perturbation acted


def probe_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(500.0), encoder_hidden_states=ehs).sample


def test_model_is_restored_after_a_run(sd15, snapshot):
    unet = sd15.unet
    before, out_before = snapshot(unet), probe_output(unet)
    seen = {}

    def cb(state):
        if state.step.index == 0:
            seen["procs"] = {type(p) for p in unet.attn_processors.values()}
            seen["hooks"] = sum(len(m._forward_pre_hooks) for m in unet.modules())

    run(sd15, ALL3, callback=cb)
    assert _RowIdentityProcessor in seen["procs"] and seen["hooks"] > 0  # installed during the run
    assert snapshot(unet) == before
    assert not snapshot(unet)["hooks"]
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    assert torch.equal(probe_output(unet), out_before)


def test_model_is_restored_when_a_callback_raises(sd15, snapshot):
    unet = sd15.unet
    before, out_before = snapshot(unet), probe_output(unet)

    def cb(state):
        if state.step.index == 2:
            raise RuntimeError("stop at step 2")

    with pytest.raises(RuntimeError, match="stop at step 2"):
        run(sd15, ALL3, callback=cb)
    assert snapshot(unet) == before
    assert torch.equal(probe_output(unet), out_before)


@dataclass(frozen=True)
class Boom:
    """A perturbed term whose delta raises at step ``at``."""

    at: int = 1
    name: str = "boom"
    window: Window = field(default_factory=Window)

    def branches(self):
        return (Branch(self.name, "cond", TokenShuffle("mid")),)

    def active(self, step):
        return True

    def delta(self, preds, step):
        if step.index == self.at:
            raise ValueError("delta failed")
        return torch.zeros_like(preds["cond"])

    def post(self, guided, preds, step):
        return guided

    def describe(self):
        return {"method": "boom"}


def test_model_is_restored_when_a_term_raises(sd15, snapshot):
    unet = sd15.unet
    before, out_before = snapshot(unet), probe_output(unet)
    with pytest.raises(ValueError, match="delta failed"):
        run(sd15, [CFG(5.0), PAG(3.0), Boom(at=1)])
    assert snapshot(unet) == before
    assert torch.equal(probe_output(unet), out_before)


def test_model_is_restored_when_an_install_fails(sd15, snapshot):
    """TPG and the first PAG are installed; the second PAG's layers select nothing."""
    unet = sd15.unet
    before = snapshot(unet)
    bad = PAG(2.0, layers="down_blocks.1.resnets.0", name="pag_bad")
    with pytest.raises(LayerSpecError):
        run(sd15, [CFG(5.0), TPG(3.0), PAG(3.0), bad])
    assert snapshot(unet) == before


# --- the engine's combination on known values (a fake denoiser) ------------------------------


class FakeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.offsets: dict[str, float] = {}
        self.ctx = None
        self.calls: list[int] = []


@dataclass(frozen=True)
class AddOffset:
    """A fake perturbation: the fake denoiser adds ``offset`` on the branch's rows."""

    offset: float
    layers: str | None = None

    def targets(self, model):
        return []

    @contextmanager
    def install(self, model, branch, ctx):
        model.offsets[branch], model.ctx = self.offset, ctx
        try:
            yield
        finally:
            del model.offsets[branch]


class FakeDenoiser:
    """Row r's prediction is the conditioning value embeds[r, 0, 0] (+ its branch's offset).

    The input x carries the image index, so the rows a perturbation is told about can be
    checked against the images they really hold."""

    prediction_type = "epsilon"

    def __init__(self) -> None:
        self.model = FakeNet()

    def __call__(self, x, t, cond):
        self.model.calls.append(x.shape[0])
        out = cond.embeds[:, 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()
        for branch, offset in self.model.offsets.items():
            sel = self.model.ctx.rows_of(branch)
            if sel is not None:
                assert x[sel.rows, 0, 0, 0].tolist() == [float(i) for i in sel.images]
                out[sel.rows] += offset
        return out


@dataclass(frozen=True)
class Push:
    """s (c - p) with a fake perturbation."""

    scale: float
    offset: float
    name: str
    window: Window = field(default_factory=Window)

    def branches(self):
        return (Branch(self.name, "cond", AddOffset(self.offset)),)

    def active(self, step):
        return self.window.contains(step)

    def delta(self, preds, step):
        return self.scale * (preds["cond"] - preds[self.name])

    def post(self, guided, preds, step):
        return guided

    def describe(self):
        return {}


def conditioning(values: list[float]) -> Conditioning:
    return Conditioning(torch.tensor(values).view(-1, 1, 1).expand(-1, 3, 2).clone())


@pytest.mark.parametrize("max_rows", [None, 1, 2, 3, 5, 7, 8])
def test_guided_model_combines_known_values(max_rows):
    """B = 2, c_i = 2 + i, u_i = 1 + i, p1 = c + 10, p2 = c + 100:
    g = c + (3 - 1)(c - u) + 0.5 (c - p1) + 0.25 (c - p2) = 2 + i + 2 - 5 - 25."""
    den = FakeDenoiser()
    terms = [CFG(3.0), Push(0.5, 10.0, "p1"), Push(0.25, 100.0, "p2")]
    gm = GuidedModel(den, terms, conditioning([2.0, 3.0]), conditioning([1.0, 2.0]), [0, 1], max_rows)
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 4, 2, 2)
    with gm.installed():
        res = gm(x, torch.tensor(500.0), StepInfo(0, 1, 1.0, 500.0))
    assert torch.equal(res.guided[:, 0, 0, 0], torch.tensor([-26.0, -25.0]))
    assert res.preds["uncond"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert res.preds["p2"][:, 0, 0, 0].tolist() == [102.0, 103.0]
    assert sum(den.model.calls) == 8 and len(den.model.calls) == math.ceil(8 / (max_rows or 8))
    assert den.model.offsets == {}


def test_guided_model_rejects_bad_setup():
    den = FakeDenoiser()
    c = conditioning([2.0, 3.0])
    with pytest.raises(ConfigError, match="negative conditioning"):
        GuidedModel(den, [CFG(3.0)], c, None, [0, 1])
    with pytest.raises(ConfigError, match="one seed per image"):
        GuidedModel(den, [], c, None, [0])
    with pytest.raises(ConfigError, match="max_rows"):
        GuidedModel(den, [], c, None, [0, 1], max_rows=0)
    with pytest.raises(ConfigError, match="rows"):
        GuidedModel(den, [CFG(3.0)], c, conditioning([1.0]), [0, 1])


# --- formulas ---------------------------------------------------------------------------------


def test_cfg_formula_known_values():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(c + cfg_delta(c, u, 3.0), torch.tensor([4.0, -5.0]))  # u + 3 (c - u)
    assert torch.equal(c + cfg_delta(c, u, 0.0), u)
    assert torch.equal(cfg_delta(c, u, 1.0), torch.zeros(2))
    step = StepInfo(0, 1, 1.0, 500.0)
    term = CFG(3.0)
    g = c + term.delta({"cond": c, "uncond": u}, step)
    assert torch.equal(term.post(g, {"cond": c, "uncond": u}, step), g)  # rescale 0: identity


def test_guidance_rescale_formula_known_values():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 5.0]).view(2, 1, 2, 2)
    g = 2 * c + 1  # std(g) = 2 std(c) per image, so g * std(c) / std(g) = c + 0.5
    out = rescale(g, c, 0.7)
    assert torch.allclose(out, 0.7 * (c + 0.5) + 0.3 * g, atol=1e-6)
    assert torch.allclose(out, 1.3 * c + 0.65, atol=1e-6)
    assert torch.allclose(rescale(g, c, 1.0), c + 0.5, atol=1e-6)
    assert torch.allclose(out, rescale_noise_cfg(g, c, 0.7), atol=1e-6)
    step = StepInfo(0, 1, 1.0, 500.0)
    assert torch.allclose(CFG(2.0, rescale=0.7).post(g, {"cond": c}, step), out)


def test_pag_adaptive_scale_formula():
    assert adaptive_scale(3.0, 0.0, 1.0) == 3.0
    assert adaptive_scale(3.0, 0.004, 751.0) == pytest.approx(3.0 - 0.004 * 249)
    assert adaptive_scale(3.0, 0.004, 1.0) == 0.0  # clipped at 0, never negative
    pag = PAG(3.0, adaptive_scale=0.004)
    assert pag.scale_at(StepInfo(0, 4, 5.0, 751.0)) == pytest.approx(2.004)
    assert pag.active(StepInfo(0, 4, 5.0, 751.0))
    assert not pag.active(StepInfo(3, 4, 0.03, 1.0))  # scale 0: inactive, no rows
    c, p = torch.tensor([1.0]), torch.tensor([0.5])
    d = pag.delta({"cond": c, "pag": p}, StepInfo(0, 4, 5.0, 751.0))
    assert d.item() == pytest.approx(2.004 * 0.5)


def test_window_semantics():
    def at(index, count=4, sigma=1.0):
        return StepInfo(index, count, sigma, 500.0)

    assert all(Window().contains(at(i, sigma=s)) for i in range(4) for s in (0.0, 1.0, 1e4))
    w = Window(sigma_min=1.0, sigma_max=5.0)  # inclusive on both ends
    assert w.contains(at(0, sigma=1.0)) and w.contains(at(0, sigma=5.0))
    assert not w.contains(at(0, sigma=0.999)) and not w.contains(at(0, sigma=5.001))
    f = Window(start=0.5, end=0.75)  # fraction index / count, start inclusive, end exclusive
    assert [f.contains(at(i)) for i in range(4)] == [False, False, True, False]
    assert [Window(start=0.5).contains(at(i)) for i in range(4)] == [False, False, True, True]
    assert at(0).fraction == 0.0 and at(3).fraction == 0.75
    with pytest.raises(ConfigError):
        Window(start=0.5, end=0.5)
    with pytest.raises(ConfigError):
        Window(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ConfigError):
        Window(start=-0.1)
