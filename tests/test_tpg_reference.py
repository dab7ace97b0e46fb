"""TPG (Rajabi et al. 2025) against an independent reference written from the paper.

The reference below uses none of diffguide's engine, perturbation or sampling code: it
encodes the prompts with the diffusers pipeline, draws the initial noise per image, and runs
a plain loop over a diffusers Euler scheduler with three separate UNet calls per step
(u, c, p). The perturbed call p is the cond branch with forward pre-hooks on the selected
``BasicTransformerBlock``s that permute the tokens (dim 1 of the (B, N, C) hidden states)
and never un-permute them. Permutations: image i owns a CPU generator seeded
``branch_seed(seed + i, "tpg")`` and draws ``torch.randperm(N)`` once per selected block per
call, in forward order (diffguide's documented draw order; the paper shares one permutation
across the batch, diffguide draws per image so a batch reproduces its single-image runs).
Guidance: ``g = c + (w - 1)(c - u) + s (c - p)``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from torch import nn

from diffguide import CFG, TPG, testing
from diffguide.perturb import BranchRows, ForwardContext, TokenShuffle, branch_seed
from diffguide.perturb.token_shuffle import shuffle_tokens

TOL = 1e-4
STEPS = 3
SEED = 11
PROMPTS = ["a lighthouse at dusk", "a bowl of fruit"]
NEGATIVES = ["blurry", "dark"]


def blocks_under(unet: nn.Module, prefix: str) -> list[str]:
    return [
        n
        for n, m in unet.named_modules()
        if type(m).__name__ == "BasicTransformerBlock" and (n == prefix or n.startswith(prefix + "."))
    ]


def encode(pipe, prompts, negatives, size):
    """(cond, uncond) UNet kwargs, straight from the diffusers pipeline's encoder."""
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is None:
            pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
            return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne}
        pe, ne, pp, npool = pipe.encode_prompt(
            prompt=prompts,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
        )
    # SDXL micro-conditioning: original size, crop top-left, target size
    ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=pe.dtype)
    return (
        {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pp, "time_ids": ids}},
        {"encoder_hidden_states": ne, "added_cond_kwargs": {"text_embeds": npool, "time_ids": ids}},
    )


def reference_tpg(pipe, blocks: list[str], w: float, s: float, seed: int = SEED) -> torch.Tensor:
    unet = pipe.unet
    b = len(PROMPTS)
    size = unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = encode(pipe, PROMPTS, NEGATIVES, size)
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.cat(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)]
    )
    latents = latents * sched.init_noise_sigma
    perm_gens = [torch.Generator().manual_seed(branch_seed(seed + i, "tpg")) for i in range(b)]
    perturb = False

    def shuffle(module, args, kwargs):
        if not perturb:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        rows = [h[i, torch.randperm(h.shape[1], generator=perm_gens[i])] for i in range(h.shape[0])]
        h = torch.stack(rows)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    modules = dict(unet.named_modules())
    handles = [modules[n].register_forward_pre_hook(shuffle, with_kwargs=True) for n in blocks]
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.scale_model_input(latents, t)
                c = unet(x, t, **cond).sample
                u = unet(x, t, **uncond).sample if w != 1.0 else c
                perturb = True
                p = unet(x, t, **cond).sample
                perturb = False
                g = c + (w - 1.0) * (c - u) + s * (c - p)
                latents = sched.step(g, t, latents).prev_sample
    finally:
        for h in handles:
            h.remove()
    return latents


def run_tpg(gp, terms):
    return gp.generate(
        PROMPTS, NEGATIVES, guidance=terms, steps=STEPS, seed=SEED, scheduler="euler", decode=False
    ).latents


# (arch, diffguide spec or None for the preset, reference block prefix)
CASES = [
    ("sd15", None, "down_blocks.0"),  # preset: the deepest down block with attention
    ("sdxl", None, "down_blocks.1"),  # (the tiny SDXL has no d2/d3, so the same rule)
    ("sdxl", "d1.1", "down_blocks.1.attentions.1.transformer_blocks.1"),
    ("sd15", "mid", "mid_block"),
]


@pytest.mark.parametrize(("arch", "spec", "prefix"), CASES, ids=[f"{a}-{s}" for a, s, _ in CASES])
@pytest.mark.parametrize("w", [1.0, 4.0], ids=["tpg-alone", "with-cfg"])
def test_tpg_matches_reference(arch, spec, prefix, w, request):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    gp = request.getfixturevalue(arch)
    blocks = blocks_under(pipe.unet, prefix)
    assert blocks
    assert TokenShuffle(spec).targets(pipe.unet) == blocks
    expected = reference_tpg(pipe, blocks, w, 3.0)
    terms = ([CFG(w)] if w != 1.0 else []) + [TPG(3.0, layers=spec)]
    got = run_tpg(gp, terms)
    assert (expected - got).abs().max().item() <= TOL
    # no hook left behind by either side
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())


def test_tpg_changes_the_result(sdxl_pipe, sdxl):
    """The comparison above can see the perturbation: p differs from c."""
    with_tpg = run_tpg(sdxl, [TPG(3.0)])
    expected_plain = reference_tpg(sdxl_pipe, [], 1.0, 0.0)
    assert (with_tpg - expected_plain).abs().max().item() > 1e-2
    assert (run_tpg(sdxl, []) - expected_plain).abs().max().item() <= TOL


# --- the shuffle op and its row scoping -----------------------------------------------------


def test_shuffle_tokens_known_values():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    perms = torch.tensor([[2, 0, 1], [0, 1, 2]])
    out = shuffle_tokens(h, perms)
    assert torch.equal(out[0], torch.tensor([[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(out[1], h[1])  # identity permutation


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = nn.Identity()

    def forward(self, hidden_states, encoder_hidden_states=None):
        return hidden_states


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, h):
        h = self.transformer_blocks[0](h)
        return self.transformer_blocks[1](hidden_states=h)  # kwargs path of the hook


def test_token_shuffle_hook_touches_only_branch_rows():
    """Rows 1..2 of 3 are the branch's (images 0 and 1); row 0 passes through untouched.
    Two selected blocks: two draws per image per call, the second applied on top of the first."""
    model = _Model()
    seeds = (5, 6)
    ctx = ForwardContext(seeds)
    h = torch.randn(3, 7, 4)
    with TokenShuffle("transformer_blocks.0-1").install(model, "tpg", ctx):
        ctx.rows = {"tpg": BranchRows(slice(1, 3), (0, 1))}
        out = model(h)
        ctx.rows = {}
        untouched = model(h)  # no rows of the branch: no draw, no change
    assert torch.equal(untouched, h)
    assert torch.equal(out[0], h[0])
    for row, seed in zip((1, 2), seeds, strict=True):
        g = torch.Generator().manual_seed(branch_seed(seed, "tpg"))
        p1, p2 = torch.randperm(7, generator=g), torch.randperm(7, generator=g)
        assert torch.equal(out[row], h[row][p1][p2])
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_branch_seed_is_stable_and_distinct():
    assert branch_seed(0, "tpg") == branch_seed(0, "tpg")
    assert len({branch_seed(0, "tpg"), branch_seed(1, "tpg"), branch_seed(0, "tpg2"), 0, 1}) == 5
    assert 0 <= branch_seed(123, "tpg") < 2**63


# --- the paper's SDXL preset ----------------------------------------------------------------


def test_tpg_sdxl_preset_layers():
    """On an SDXL-shaped UNet (10 transformer blocks per unit of down_blocks.2): blocks 2..9 of
    down_blocks.2.attentions.0 and all of down_blocks.2.attentions.1 ("d2.2-9,d3")."""
    unet = testing.sdxl_unet(channels=(32, 64, 64), layers=(1, 2, 10))
    expected = [f"down_blocks.2.attentions.0.transformer_blocks.{k}" for k in range(2, 10)]
    expected += [f"down_blocks.2.attentions.1.transformer_blocks.{k}" for k in range(10)]
    assert TokenShuffle().targets(unet) == expected
    assert TokenShuffle("d2.2-9,d3").targets(unet) == expected
