"""Prefix sharing (diffguide.prefix): a perturbed branch reuses the conditional rows' work up to
its first perturbed module (the units before its unit, and the steps before it inside: a UNet
block's resnets and attentions, an attention's proj_in and transformer blocks). A shared run
equals the unshared run (float32, final latents, <= 1e-5 times the latents' scale) for every
family and perturbation, batch 1 and 4, in one forward or in chunks, and through the
out-of-memory fallback; and the shared units and steps really run on fewer rows (counted).

Measured (one thread): bit-identical for every family and perturbation alone, at batch 1 and 4;
with PAG, TPG and SLG together at batch 1 (5 rows; units then run on 2, 4 or 5 rows) the tiny
models' latents (max |x| 7-9) differ by up to 2.5e-5 (3e-6 relative): a smaller batch changes
how a CPU kernel blocks its sums. That is 60x below the batch-vs-single tolerance (2e-4 relative)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from dit_support import _liven as liven
from families_support import tiny_sd3
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from diffguide import CFG, PAG, SLG, TPG, Conditioning, ConfigError, GuidedPipeline, testing
from diffguide.conditioning import ConditioningFile
from diffguide.guidance import NAG, PLADIS, SEG, LayerSkip, UncondQueryShuffle
from diffguide.models.layers import first_in_forward_order, forward_steps, forward_units
from diffguide.perturb import IdentityAttention, TokenShuffle
from diffguide.pipeline import GenerateConfig
from diffguide.prefix import PrefixPlan
from diffguide.repro.schema import config_from_manifest
from diffguide.testing_dit import qwen_embeds, tiny_auraflow, tiny_flux, tiny_qwen_image

TOL = 1e-5
STEPS = 2
SIZE = {"sd15": 64, "sdxl": 64, "sd3": 32, "flux": 32, "auraflow": 32, "qwen": 32}
# per family: (PAG, TPG, SLG) layers, each fanning out after at least one shared unit
LAYERS = {
    "sd15": ("mid", "u0", "m0"),
    "sdxl": ("mid", "d1", "u0"),
    "sd3": ("b3", "b1", "b2"),  # unit 1 shared by PAG and SLG around TPG; unit 2 by PAG around SLG
    "flux": ("b1", "s1", "s0"),  # unit 2 (s0) skipped by SLG while TPG still shares it
    "auraflow": ("s0", "s0", "s0"),
    "qwen": ("b1", "b1", "b1"),
}
FAMILIES = tuple(LAYERS)


def _build(family: str) -> Any:
    if family == "sd15":
        return testing.tiny_sd15(0)
    if family == "sdxl":
        return testing.tiny_sdxl(0)
    if family == "sd3":
        return tiny_sd3(seed=0)
    if family == "flux":
        return tiny_flux(seed=0)
    if family == "auraflow":
        pipe = tiny_auraflow(seed=0)
        liven(pipe.transformer, 3)  # diffusers zero-initialises the modulations: blocks would be identities
        return pipe
    pipe = tiny_qwen_image(seed=0)
    liven(pipe.transformer, 4)
    return pipe


@pytest.fixture(scope="module")
def pipes() -> dict[str, GuidedPipeline]:
    built = {}
    for family in FAMILIES:
        pipe = _build(family)
        pipe.set_progress_bar_config(disable=True)
        built[family] = GuidedPipeline(pipe)
    return built


def network(gp: GuidedPipeline) -> nn.Module:
    return gp.model


def terms(family: str, which: str = "all") -> list[Any]:
    pag, tpg, slg = LAYERS[family]
    chosen = {
        "pag": [PAG(3.0, layers=pag)],
        "tpg": [TPG(2.0, layers=tpg)],
        "slg": [SLG(2.0, layers=slg, start=0.0, stop=1.0)],
    }
    perturbed = [t for k, ts in chosen.items() if which in ("all", k) for t in ts]
    return [CFG(4.0), *perturbed]


def generate(gp: GuidedPipeline, family: str, batch: int, guidance: list[Any], **kwargs: Any) -> Any:
    conditioning = None
    prompts = ["a red cat", "a blue dog", "a green tree", "a house"][:batch]
    if family == "qwen":  # no tiny Qwen2.5-VL encoder: precomputed embeddings
        pe, pm = qwen_embeds(1, batch)
        ne, nm = qwen_embeds(2, batch)
        conditioning = ConditioningFile(
            Conditioning(tensors={"embeds": pe, "mask": pm}), Conditioning(tensors={"embeds": ne, "mask": nm})
        )
        prompts = ["<embeds>"] * batch
    return gp.generate(
        prompts,
        "ugly",
        guidance=guidance,
        steps=STEPS,
        seed=3,
        height=SIZE[family],
        width=SIZE[family],
        decode=False,
        conditioning=conditioning,
        **kwargs,
    )


@dataclass
class RowCount:
    rows: list[int]


@contextmanager
def rows_in_first_unit(model: nn.Module):
    """Rows each forward computes in the model's first unit (seen by its first module with weights)."""
    unit = dict(model.named_modules())[forward_units(model)[0]]
    leaf = next(m for m in unit.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    seen = RowCount([])
    handle = leaf.register_forward_pre_hook(lambda m, a: seen.rows.append(int(a[0].shape[0])))
    try:
        yield seen
    finally:
        handle.remove()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def close(shared: torch.Tensor, plain: torch.Tensor) -> bool:
    """Within 1e-5 on latents of scale 1 (the tiny models' latents reach |x| = 9)."""
    return maxdiff(shared, plain) <= TOL * max(1.0, plain.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("batch", "max_rows"), [(1, None), (4, None), (4, 7)], ids=["b1", "b4", "b4-chunked"]
)
def test_shared_equals_unshared(pipes, family, batch, max_rows):
    """CFG + PAG + TPG + SLG together (three perturbed branches, each with its own fan-out unit)."""
    gp = pipes[family]
    guidance = terms(family)
    with rows_in_first_unit(network(gp)) as shared_rows:
        shared = generate(gp, family, batch, guidance, max_rows=max_rows)
    with rows_in_first_unit(network(gp)) as plain_rows:
        plain = generate(gp, family, batch, guidance, max_rows=max_rows, prefix_sharing=False)
    assert close(shared.latents, plain.latents)
    assert shared.forward_calls == plain.forward_calls  # still one forward per chunk
    # uncond, cond, pag, tpg, and from step 1 slg (SLG's window is strict: N*start < i)
    assert sum(plain_rows.rows) == 9 * batch
    if max_rows is None:  # the perturbed branches share the first unit with cond
        assert plain_rows.rows == [4 * batch, 5 * batch]
        assert shared_rows.rows == [2 * batch] * STEPS
    else:  # a perturbed row whose cond twin is in another chunk computes the unit itself
        assert sum(shared_rows.rows) < sum(plain_rows.rows)
    assert shared.manifests[0]["engine"]["prefix_sharing"] is True
    assert plain.manifests[0]["engine"]["prefix_sharing"] is False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["pag", "tpg", "slg"])
def test_each_perturbation_alone(pipes, family, method):
    gp = pipes[family]
    shared = generate(gp, family, 1, terms(family, method))
    plain = generate(gp, family, 1, terms(family, method), prefix_sharing=False)
    assert torch.equal(shared.latents, plain.latents)  # measured bit-identical (one thread)
    assert maxdiff(shared.latents, generate(gp, family, 1, [CFG(4.0)]).latents) > 1e-4  # it did act


@contextmanager
def out_of_memory_above(model: nn.Module, rows: int):
    """Fail like a GPU out of memory in the last unit whenever a forward carries more than ``rows`` rows."""
    last = dict(model.named_modules())[forward_units(model)[-1]]

    def hook(module, args, kwargs):
        if (args[0] if args else kwargs["hidden_states"]).shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    handle = last.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_out_of_memory_fallback_with_sharing(pipes, family):
    """16 rows fail (step 0, SLG not yet active), 8 fail, 4 fit: equal bit for bit to a max_rows=4
    shared run, and to the unshared run within the tolerance."""
    gp = pipes[family]
    guidance = terms(family)
    expected = generate(gp, family, 4, guidance, max_rows=4)
    with out_of_memory_above(network(gp), 4), pytest.warns(RuntimeWarning, match="4 at model evaluation 0"):
        got = generate(gp, family, 4, guidance)
    assert torch.equal(got.latents, expected.latents)
    assert got.manifests[0]["engine"]["out_of_memory_fallbacks"] == {"0": 4}
    plain = generate(gp, family, 4, guidance, prefix_sharing=False)
    assert close(got.latents, plain.latents)


def test_model_untouched_after_a_run_and_after_a_failed_one(pipes):
    gp = pipes["sd3"]
    model = network(gp)
    units = dict(model.named_modules())
    generate(gp, "sd3", 1, terms("sd3"))
    with out_of_memory_above(model, 0), pytest.raises(Exception, match="one row per forward"):
        generate(gp, "sd3", 1, terms("sd3"))
    assert all("forward" not in units[u].__dict__ for u in forward_units(model))


def test_first_module_is_in_forward_order(pipes):
    """On a UNet ``up_blocks`` is registered before ``mid_block`` but runs after it."""
    unet = network(pipes["sdxl"])
    assert forward_units(unet) == [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    first = IdentityAttention("mid,up").first_module(unet)
    assert first is not None and first.startswith("mid_block.")
    assert TokenShuffle("d1").first_module(unet) == "down_blocks.1.attentions.1.transformer_blocks.0"
    assert first_in_forward_order(unet, ["up_blocks.0", "conv_in"]) == "conv_in"  # outside units: first


@dataclass(frozen=True)
class NoFirstModule:
    """A perturbation that does not say where it starts (e.g. one at the input): shares nothing."""

    inner: IdentityAttention

    @property
    def layers(self) -> str | None:
        return self.inner.layers

    def targets(self, model: nn.Module) -> list[str]:
        return self.inner.targets(model)

    def install(self, model: nn.Module, branch: str, ctx: Any) -> Any:
        return self.inner.install(model, branch, ctx)


@dataclass(frozen=True)
class FirstModuleAt:
    """Says it starts at module ``at`` (read by the prefix plan only; never installed)."""

    at: str

    def first_module(self, model: nn.Module) -> str:
        return self.at


def test_a_perturbation_without_first_module_shares_nothing(pipes):
    from diffguide.guidance.base import Branch

    unet = network(pipes["sdxl"])
    assert PrefixPlan(unet, [Branch("p", "cond", NoFirstModule(IdentityAttention("mid")))]).shared_units == 0
    assert PrefixPlan(unet, [Branch("p", "cond", IdentityAttention("mid"))]).shared_units == 4
    # a branch on the negative prompt never shares the conditional rows
    assert PrefixPlan(unet, [Branch("p", "uncond", IdentityAttention("mid"))]).shared_units == 0
    # a perturbation in the first unit (SD1.5's first down block) shares the steps before it there
    sd15 = network(pipes["sd15"])
    plan = PrefixPlan(sd15, [Branch("p", "cond", TokenShuffle("d0"))])
    assert list(plan.shared) == ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0"]
    # one in the first step of the first unit (the first resnet) shares nothing
    assert (
        PrefixPlan(sd15, [Branch("p", "cond", FirstModuleAt("down_blocks.0.resnets.0.conv1"))]).shared == {}
    )


def test_switch_recorded_and_old_manifests_replay_unshared(pipes):
    out = generate(pipes["sd15"], "sd15", 1, terms("sd15", "pag"))
    params = out.manifests[0]["parameters"]
    assert params["prefix_sharing"] is True
    assert config_from_manifest(out.manifests[0]).prefix_sharing is True
    old = {**out.manifests[0], "parameters": {k: v for k, v in params.items() if k != "prefix_sharing"}}
    assert config_from_manifest(old).prefix_sharing is False  # made before sharing existed
    with pytest.raises(ConfigError, match=r"^prefix_sharing must be true or false, got 'yes'$"):
        GenerateConfig.create("a cat", prefix_sharing="yes")


def test_cli_switch_and_replay(pipes, tmp_path):
    """``--no-prefix-sharing`` reaches the manifest; replay follows the recorded switch either way
    (and a manifest without it, made before sharing existed, replays unshared)."""
    from typer.testing import CliRunner

    from diffguide.cli.main import app
    from diffguide.io import read_manifest
    from diffguide.repro.replay import replay

    model = tmp_path / "model"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    args = ["generate", "--model", str(model), "-p", "a cat", "--steps", "2", "--cfg", "4", "--pag", "3"]
    args += ["--threads", "1", "--quiet"]
    manifests = {}
    for flag in ([], ["--no-prefix-sharing"]):
        out = tmp_path / ("plain" if flag else "shared")
        res = CliRunner().invoke(app, [*args, *flag, "--out", str(out)])
        assert res.exit_code == 0, res.output
        manifests[bool(flag)] = read_manifest(next(out.glob("*.png")))
    assert manifests[False]["parameters"]["prefix_sharing"] is True
    assert manifests[True]["parameters"]["prefix_sharing"] is False
    assert manifests[True]["engine"]["prefix_sharing"] is False
    gp = pipes["sd15"]
    assert replay(manifests[False], gp).identical and replay(manifests[True], gp).identical
    old = {k: v for k, v in manifests[True].items()}
    old["parameters"] = {k: v for k, v in old["parameters"].items() if k != "prefix_sharing"}
    assert replay(old, gp).identical


@pytest.mark.parametrize("share", [True, False])
def test_pag_inside_a_block_slg_skips_keeps_its_rows(pipes, share):
    """SLG skips block b1 on its rows and runs it on the others alone (a sub-batch); PAG's identity
    attention in that block must still act on the PAG rows there: the PAG branch's prediction at
    step 1 (SLG's window is strict, so step 0 is the same in both runs) equals the run without SLG."""
    gp = pipes["sd3"]
    preds: dict[bool, torch.Tensor] = {}
    for with_slg in (False, True):
        seen: list[torch.Tensor] = []
        guidance = [CFG(4.0), PAG(3.0, layers="b1")]
        if with_slg:  # before PAG: the SLG rows sit before the PAG rows, which the sub-batch renumbers
            guidance.insert(1, SLG(2.0, layers="b1", start=0.0, stop=1.0))
        generate(
            gp,
            "sd3",
            2,
            guidance,
            prefix_sharing=share,
            callback=lambda s, seen=seen: seen.append(s.preds["pag"]),
        )
        preds[with_slg] = seen[1]
    assert close(preds[True], preds[False])


def test_plan_fans_out_inside_a_unit(pipes):
    """The plan names the exact modules each branch shares: the units before its first perturbed
    module's unit, then the steps before it inside (a UNet block's resnets and attentions, an
    attention's proj_in); a step shared by one branch may sit inside a unit shared by another."""
    from diffguide.guidance.base import Branch

    unet = network(pipes["sdxl"])
    pag, tpg = Branch("pag", "cond", IdentityAttention("mid")), Branch("tpg", "cond", TokenShuffle("d1"))
    plan = PrefixPlan(unet, [pag, tpg])
    assert plan.fan == {
        "pag": "mid_block.attentions.0.transformer_blocks.0",
        "tpg": "down_blocks.1.attentions.1.transformer_blocks.0",
    }
    both, p, t = frozenset({"pag", "tpg"}), frozenset({"pag"}), frozenset({"tpg"})
    assert plan.shared == {
        "down_blocks.0": both,
        "down_blocks.1": p,
        "down_blocks.1.attentions.0": t,
        "down_blocks.1.attentions.1.proj_in": t,
        "down_blocks.1.resnets.0": t,
        "down_blocks.1.resnets.1": t,
        "mid_block.attentions.0.proj_in": p,
        "mid_block.resnets.0": p,
    }
    # an up block: its first resnet (which reads a skip residual) and the attention's proj_in
    up = PrefixPlan(unet, [Branch("pag", "cond", IdentityAttention("u0"))])
    assert list(up.shared) == [
        "down_blocks.0",
        "down_blocks.1",
        "up_blocks.0.attentions.0.proj_in",
        "up_blocks.0.resnets.0",
        "mid_block",
    ]
    # a DiT block has no known steps: it fans out whole
    sd3 = PrefixPlan(network(pipes["sd3"]), [Branch("pag", "cond", IdentityAttention("b2"))])
    assert sd3.fan == {"pag": "transformer_blocks.2"}
    assert list(sd3.shared) == ["transformer_blocks.0", "transformer_blocks.1"]


class WeightRows(TorchFunctionMode):
    """Rows of the input of every linear / convolution call, per weight it was given."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = {id(w): n for n, w in weights.items()}
        self.rows: dict[str, list[int]] = {n: [] for n in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d) and id(args[1]) in self.names:
            self.rows[self.names[id(args[1])]].append(int(args[0].shape[0]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_steps_inside_the_fan_out_unit_run_on_fewer_rows(pipes, family):
    """CFG+PAG(mid), batch 2: the mid block's first resnet and the attention's proj_in compute 4
    rows (uncond, cond), the first perturbed transformer block and everything after it 6; the
    result equals the unshared run bit for bit."""
    gp = pipes[family]
    mid = network(gp).mid_block
    probes = {
        "resnets.0": mid.resnets[0].conv1.weight,
        "proj_in": mid.attentions[0].proj_in.weight,
        "block.0": mid.attentions[0].transformer_blocks[0].attn2.to_q.weight,  # attn1 q: not on PAG rows
        "resnets.1": mid.resnets[1].conv1.weight,
    }
    got = {}
    for share in (True, False):
        with WeightRows(probes) as seen:
            got[share] = generate(gp, family, 2, [CFG(4.0), PAG(3.0, layers="mid")], prefix_sharing=share)
        expected = {True: [4, 4, 6, 6], False: [6, 6, 6, 6]}[share]
        assert [sorted(set(seen.rows[k])) for k in probes] == [[n] for n in expected]
        assert all(len(v) == STEPS for v in seen.rows.values())
    assert torch.equal(got[True].latents, got[False].latents)


def test_forward_order_inside_a_unit(pipes):
    """Inside a unit the forward order is the blocks' (resnet i, then attention i), not the names':
    ``attentions.1`` sorts before ``resnets.1`` but runs after it."""
    unet = network(pipes["sdxl"])
    names = ["up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.0.resnets.1"]
    assert first_in_forward_order(unet, names) == "up_blocks.0.resnets.1"
    # a module whose place inside a step is not known counts as the step's start
    names = ["mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.norm"]
    assert first_in_forward_order(unet, names) == "mid_block.attentions.0.norm"
    assert forward_steps(unet, "mid_block.attentions.0.transformer_blocks.0") == []


# the other perturbed terms: SEG and LayerSkip branch off the conditional rows and share; NAG and
# PLADIS perturb the conditional rows in place and the unconditional query shuffle the
# unconditional ones: they share nothing themselves but stay exact next to a branch that does
OTHERS = {
    "seg": lambda: [SEG(3.0, layers="mid")],
    "layer_skip": lambda: [LayerSkip(2.0)],
    "nag": lambda: [NAG(4.0), PAG(3.0, layers="mid")],
    "pladis": lambda: [PLADIS(2.0), PAG(3.0, layers="mid")],
    "uncond_query_shuffle": lambda: [UncondQueryShuffle(0.5), PAG(3.0, layers="mid")],
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", list(OTHERS))
def test_other_perturbations_shared_equals_unshared(pipes, family, method):
    from diffguide.guidance.base import Branch

    gp = pipes[family]
    unet = network(gp)
    extra = OTHERS[method]()
    term = extra[0]
    (branch,) = term.branches()
    first = branch.perturbation.first_module(unet)
    in_place = branch.name in ("cond", "uncond")
    assert first is not None and first.startswith("down_blocks." if in_place else "mid_block.")
    if in_place:  # the same perturbation on a branch of its own would share; in place it does not
        assert PrefixPlan(unet, [branch]).shared_units == 0
        assert PrefixPlan(unet, [Branch("p", "cond", branch.perturbation)]).shared_units > 0
    else:
        plan = PrefixPlan(unet, [branch])
        assert plan.fan == {branch.name: "mid_block.attentions.0.transformer_blocks.0"}
        assert plan.shared_units == 4
    guidance = [CFG(4.0), *extra]
    shared = generate(gp, family, 2, guidance)
    plain = generate(gp, family, 2, guidance, prefix_sharing=False)
    assert close(shared.latents, plain.latents)
    alone = generate(gp, family, 2, [CFG(4.0), *extra[1:]])
    assert maxdiff(shared.latents, alone.latents) > 1e-4  # the term did act
