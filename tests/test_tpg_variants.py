"""The two TPG variants named apart from TPG (seeds 000 and 001) and the official TPG's own
conventions: known values, independent reference loops on the tiny models, engine checks."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from families_support import tiny_sd3
from guide_support import (
    NEGATIVES,
    PROMPTS,
    SEED,
    STEPS,
    check_one_forward_with_cfg_pag,
    check_restored,
    check_window,
    maxdiff,
    reference,
    run,
    swapped_processors,
)
from test_tpg_reference import blocks_under, encode

from diffguide import CFG, PAG, TPG, ConfigError, GuidedPipeline, Window
from diffguide.checks import GuidanceWarning
from diffguide.guidance import PromptShuffle, UncondQueryShuffle
from diffguide.perturb import BranchRows, ForwardContext, QueryShuffle, TextShuffle, branch_seed
from diffguide.perturb.query_shuffle import shuffle_queries
from diffguide.perturb.text_shuffle import permute_rows
from diffguide.testing_dit import tiny_flux

TOL = 1e-4


# --- 1. prompt shuffle (seed 000) -----------------------------------------------------------------


def test_permute_rows_known_values():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    out = permute_rows(x, 1, torch.tensor([[2, 0, 1]]))
    assert torch.equal(out[0], x[0])
    assert out[1, :, 0].tolist() == [5.0, 3.0, 4.0]


def test_text_shuffle_touches_only_its_rows():
    class Echo(torch.nn.Module):
        def forward(self, sample, encoder_hidden_states=None):
            return encoder_hidden_states

    ehs = torch.randn(3, 5, 2)
    ctx = ForwardContext(seeds=(4, 9))
    with TextShuffle().install(Echo(), "ps", ctx):
        ctx.rows = {"ps": BranchRows(slice(1, 3), (0, 1))}
        out = Echo()(None, ehs)  # a second instance: not hooked
        assert torch.equal(out, ehs)
    model = Echo()
    ctx = ForwardContext(seeds=(4, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Echo is no denoiser known to ignore text order: no warning
        with TextShuffle().install(model, "ps", ctx):
            ctx.rows = {"ps": BranchRows(slice(1, 3), (0, 1))}
            out = model(None, encoder_hidden_states=ehs)
    assert torch.equal(out[0], ehs[0])
    for row, seed in ((1, 4), (2, 9)):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(branch_seed(seed, "ps")))
        assert torch.equal(out[row], ehs[row][perm])


def shuffled_prompt(unet, seed=SEED, branch="prompt_shuffle", batch=2):
    """Reference: the p call's encoder_hidden_states, image i's tokens permuted by its own generator."""
    gens = [torch.Generator().manual_seed(branch_seed(seed + i, branch)) for i in range(batch)]

    @contextmanager
    def install():
        def hook(module, args, kwargs):
            ehs = kwargs["encoder_hidden_states"]
            rows = [ehs[i][torch.randperm(ehs.shape[1], generator=gens[i])] for i in range(ehs.shape[0])]
            return args, {**kwargs, "encoder_hidden_states": torch.stack(rows)}

        handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return install


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_prompt_shuffle_matches_reference(arch, w, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    expected = reference(pipe, w, 3.0, shuffled_prompt(pipe.unet))
    with pytest.warns(GuidanceWarning, match="changes nothing but float rounding on UNet2DConditionModel"):
        got = run(gp, ([CFG(w)] if w != 1.0 else []) + [PromptShuffle(3.0)]).latents
    assert maxdiff(expected, got) <= TOL
    # cross-attention is equivariant in its keys/values and a UNet adds no position to text tokens:
    # shuffling the embedding's tokens changes p only by float rounding (documented finding)
    assert maxdiff(got, run(gp, [CFG(w)] if w != 1.0 else []).latents) < 1e-3


def test_prompt_shuffle_permutes_the_cross_attention_inputs(sd15_pipe):
    """The perturbation does reach the model: the text tokens a cross-attention sees are permuted,
    while its output is unchanged up to rounding (keys and values permuted together)."""
    unet = sd15_pipe.unet
    attn2 = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = []
    handle = attn2.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True
    )
    x, ehs = torch.randn(1, 4, 16, 16), torch.randn(1, 77, unet.config.cross_attention_dim)
    ctx = ForwardContext(seeds=(0,))
    try:
        with torch.no_grad(), TextShuffle().install(unet, "ps", ctx):
            plain = unet(x, 500, encoder_hidden_states=ehs).sample
            ctx.rows = {"ps": BranchRows(slice(0, 1), (0,))}
            shuffled = unet(x, 500, encoder_hidden_states=ehs).sample
    finally:
        handle.remove()
    assert not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0].sort(dim=1).values, seen[1].sort(dim=1).values)
    assert maxdiff(plain, shuffled) < 1e-4


def test_prompt_shuffle_engine_checks(sd15, unet_calls):
    check_one_forward_with_cfg_pag(sd15, PromptShuffle(3.0), unet_calls)
    check_window(sd15, PromptShuffle(3.0, window=Window(start=0.5)), unet_calls)
    check_restored(sd15, [CFG(4.0), PromptShuffle(3.0)])
    with pytest.raises(ConfigError, match=r"prompt shuffle scale must be in \[0, 100\]"):
        PromptShuffle(-1.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_shuffle_on_transformers(family):
    pipe = tiny_sd3(seed=0) if family == "sd3" else tiny_flux(seed=0)
    pipe.set_progress_bar_config(disable=True)
    gp = GuidedPipeline(pipe)
    kwargs = {"width": 32, "height": 32, "steps": 2, "seed": 3, "decode": False}
    base = gp.generate(["a red cat on a blue sofa"], "ugly", guidance=[CFG(3.0)], **kwargs)
    with pytest.warns(GuidanceWarning, match="changes nothing but float rounding on .*Transformer2DModel"):
        out = gp.generate(
            ["a red cat on a blue sofa"], "ugly", guidance=[CFG(3.0), PromptShuffle(2.0)], **kwargs
        )
    assert out.forward_calls == 2
    # no positions on text tokens inside SD3's joint attention, Flux's txt_ids are all zero: a no-op
    assert maxdiff(out.latents, base.latents) < 1e-4
    again = gp.generate(["a red cat on a blue sofa"], "ugly", guidance=[CFG(3.0)], **kwargs)
    assert torch.equal(again.latents, base.latents)


# --- 2. unconditional query shuffle (seed 001) ---------------------------------------------------------


def test_shuffle_queries_known_values():
    q = torch.tensor([[[1.0], [2.0], [3.0]]])
    perm = torch.tensor([[2, 0, 1]])
    assert shuffle_queries(q, perm, 1.0)[0, :, 0].tolist() == [3.0, 1.0, 2.0]
    assert shuffle_queries(q, perm, 0.5)[0, :, 0].tolist() == [2.0, 1.5, 2.5]
    assert torch.equal(shuffle_queries(q, perm, 0.0), q)
    with pytest.raises(ConfigError, match=r"query shuffle strength must be in \[0, 1\]"):
        UncondQueryShuffle(1.5)


class RefQueryShuffleProcessor:
    """attn1 with its queries permuted per image (seeded by layer and timestep) and lerped."""

    def __init__(self, name: str, strength: float, state: dict) -> None:
        self.name, self.strength, self.state = name, strength, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        rows = []
        for i in range(q.shape[0]):
            key = f"uncond/{self.name}/{self.state['t']:.3f}"
            g = torch.Generator().manual_seed(branch_seed(SEED + i, key))
            shuffled = q[i][torch.randperm(q.shape[1], generator=g)]
            rows.append(shuffled if self.strength >= 1 else torch.lerp(q[i], shuffled, self.strength))
        q = torch.stack(rows)
        b, n, _ = q.shape
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def query_shuffled(unet, prefix: str, strength: float):
    def install():
        state = {}
        return swapped_processors(
            unet,
            lambda m, a, kw: state.update(t=float(a[1])),
            where=lambda n: n.startswith(prefix) and n.endswith("attn1"),
            processor=lambda n: RefQueryShuffleProcessor(n, strength, state),
        )

    return install


@pytest.mark.parametrize(
    ("arch", "layers", "prefix", "strength"),
    [
        ("sd15", None, "down_blocks", 1.0),
        ("sdxl", None, "down_blocks", 0.6),
        ("sd15", "mid", "mid_block", 0.6),
    ],
)
def test_uncond_query_shuffle_matches_reference(arch, layers, prefix, strength, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    assert QueryShuffle(layers).targets(pipe.unet) == [
        n for n, _ in pipe.unet.named_modules() if n.startswith(prefix) and n.endswith("attn1")
    ]
    expected = reference(
        pipe,
        4.0,
        0.0,
        contextmanager(lambda: iter([None])),
        uncond_perturbed=query_shuffled(pipe.unet, prefix, strength),
    )
    got = run(gp, [CFG(4.0), UncondQueryShuffle(strength, layers=layers)]).latents
    assert maxdiff(expected, got) <= TOL
    assert maxdiff(got, run(gp, [CFG(4.0)]).latents) > 1e-4


def test_uncond_query_shuffle_adds_no_rows_and_composes(sd15, unet_calls):
    b = len(PROMPTS)
    with unet_calls(sd15.unet) as log:
        out = run(sd15, [CFG(4.0), PAG(2.0), TPG(2.0), UncondQueryShuffle(1.0, layers="mid")])
    assert log.rows == [4 * b] * STEPS and out.forward_calls == STEPS
    # PAG perturbs the same mid-block layer: the shuffle still reaches the uncond rows
    assert maxdiff(out.latents, run(sd15, [CFG(4.0), PAG(2.0), TPG(2.0)]).latents) > 1e-4
    # without CFG nothing reads u: B more rows are evaluated, the result is unchanged (up to rounding)
    with unet_calls(sd15.unet) as log:
        alone = run(sd15, [UncondQueryShuffle()]).latents
    assert log.rows == [2 * b] * STEPS
    assert maxdiff(alone, run(sd15, []).latents) < 1e-4


def test_uncond_query_shuffle_window(sd15):
    seen = []
    run(
        sd15,
        [CFG(4.0), UncondQueryShuffle(window=Window(start=0.5))],
        callback=lambda s: seen.append(s.preds["uncond"]),
    )
    plain = []
    run(sd15, [CFG(4.0)], callback=lambda s: plain.append(s.preds["uncond"]))
    assert torch.equal(seen[0], plain[0])  # step 0: outside the window, u untouched
    assert maxdiff(seen[2], plain[2]) > 1e-5  # step 2: inside


def test_uncond_query_shuffle_batch_equals_single_runs(sd15_f64):
    terms = [CFG(4.0), UncondQueryShuffle(0.7)]
    both = run(sd15_f64, terms).latents
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES, strict=True)):
        one = run(sd15_f64, terms, prompts=[prompt], negatives=[negative], seed=SEED + i).latents
        assert maxdiff(both[i : i + 1], one) <= 1e-10


def test_uncond_query_shuffle_errors_and_restoration(sd15):
    with pytest.raises(
        ConfigError, match="two guidance terms perturb the unconditional rows; keep one of them"
    ):
        run(sd15, [CFG(4.0), UncondQueryShuffle(), UncondQueryShuffle(0.5)])
    check_restored(sd15, [CFG(4.0), UncondQueryShuffle(0.5)])


def test_uncond_query_shuffle_on_flux_blocks():
    pipe = tiny_flux(seed=0)
    pipe.set_progress_bar_config(disable=True)
    gp = GuidedPipeline(pipe)
    kwargs = {"width": 32, "height": 32, "steps": 2, "seed": 3, "decode": False}
    base = gp.generate(["a cat"], "ugly", guidance=[CFG(3.0)], **kwargs)
    out = gp.generate(["a cat"], "ugly", guidance=[CFG(3.0), UncondQueryShuffle(layers="b1,s0")], **kwargs)
    assert maxdiff(out.latents, base.latents) > 1e-4
    with pytest.raises(ConfigError, match="query shuffle has no preset for transformers"):
        gp.generate(["a cat"], "ugly", guidance=[CFG(3.0), UncondQueryShuffle()], **kwargs)


# --- 3. the official TPG's conventions ----------------------------------------------------------------


def official_tpg(
    pipe, blocks, w: float, s: float, seed: int = SEED
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official pipeline's way, written anew: ONE batched forward of [u, c, p] rows ([c, p] when
    w <= 1: its "CFG off"), the p rows' tokens permuted by ``torch.randperm(N)`` from torch's global
    CPU generator after ``torch.manual_seed(seed)``, one permutation shared by the batch."""
    unet, b = pipe.unet, len(PROMPTS)
    size = unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = encode(pipe, PROMPTS, NEGATIVES, size)
    cfg = w > 1.0
    parts = [uncond, cond, cond] if cfg else [cond, cond]
    kw = {"encoder_hidden_states": torch.cat([p["encoder_hidden_states"] for p in parts])}
    if "added_cond_kwargs" in cond:
        kw["added_cond_kwargs"] = {
            k: torch.cat([p["added_cond_kwargs"][k] for p in parts]) for k in cond["added_cond_kwargs"]
        }
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.cat(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)]
    )
    latents = latents * sched.init_noise_sigma
    perms: list[torch.Tensor] = []

    def shuffle(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        org, tpg = h[:-b], h[-b:]
        perm = torch.randperm(h.shape[1])
        perms.append(perm)
        h = torch.cat([org, tpg[:, perm]])
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    modules = dict(unet.named_modules())
    handles = [modules[n].register_forward_pre_hook(shuffle, with_kwargs=True) for n in blocks]
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([latents] * len(parts)), t)
                out = unet(x, t, **kw).sample
                if cfg:
                    u, c, p = out.chunk(3)
                    g = c + (w - 1.0) * (c - u) + s * (c - p)
                else:
                    c, p = out.chunk(2)
                    g = c + s * (c - p)
                latents = sched.step(g, t, latents).prev_sample
    finally:
        torch.set_rng_state(rng)
        for handle in handles:
            handle.remove()
    return latents, perms


@pytest.mark.parametrize("w", [4.0, 0.0], ids=["with-cfg", "official-cfg-off"])
def test_shared_permutation_is_the_official_pipelines(sdxl_pipe, sdxl, w):
    """Permutations bit-identical; latents within 1e-4 (bit-identical where the kernels agree).
    The official ``guidance_scale=0`` is its "CFG off": our ``[TPG]``, not ``[CFG(0), TPG]``."""
    blocks = blocks_under(sdxl_pipe.unet, "down_blocks.1")
    expected, official_perms = official_tpg(sdxl_pipe, blocks, w, 3.0)
    ours_perms = []
    handles = [
        dict(sdxl_pipe.unet.named_modules())[n].register_forward_pre_hook(
            lambda m, a, kw: ours_perms.append(None), with_kwargs=True
        )
        for n in blocks
    ]
    try:
        terms = ([CFG(w)] if w > 1.0 else []) + [TPG(3.0, permutation="shared")]
        got = run(sdxl, terms).latents
    finally:
        for h in handles:
            h.remove()
    assert len(ours_perms) == len(official_perms) == STEPS * len(blocks)
    g = torch.Generator().manual_seed(SEED)
    assert all(torch.equal(p, torch.randperm(p.shape[0], generator=g)) for p in official_perms)
    assert maxdiff(expected, got) <= TOL
    print(f"official TPG convention, w={w}: max |diff| = {maxdiff(expected, got):.3g}")
    per_image = run(sdxl, ([CFG(w)] if w > 1.0 else []) + [TPG(3.0)]).latents
    assert maxdiff(per_image, expected) > 1e-3  # the comparison sees which permutations were used
    if w == 0.0:
        cfg0 = run(sdxl, [CFG(0.0), TPG(3.0, permutation="shared")]).latents
        assert maxdiff(cfg0, expected) > 1e-2  # CFG(0) is the unconditional prediction, not "off"


def test_shared_permutation_is_one_for_the_batch_and_survives_chunking(sd15_f64):
    terms = [CFG(4.0), TPG(3.0, permutation="shared")]
    whole = run(sd15_f64, terms).latents
    chunked = run(sd15_f64, terms, max_rows=3).latents  # the tpg rows split across chunks
    assert maxdiff(whole, chunked) <= 1e-10
    assert maxdiff(whole, run(sd15_f64, [CFG(4.0), TPG(3.0)]).latents) > 1e-6  # differs from per-image
    assert TPG(permutation="shared").describe()["permutation"] == "shared"
    assert "permutation" not in TPG().describe()
    with pytest.raises(ConfigError, match="TPG permutation must be one of per_image, shared"):
        TPG(permutation="global")
