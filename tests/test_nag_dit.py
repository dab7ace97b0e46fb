"""NAG on SD3/SD3.5 and Flux (joint attention): diffguide vs an independent reference loop written
here after the official NAG pipelines (``NAGStableDiffusion3Pipeline``, ``NAGFluxPipeline``):

* the text stream runs twice as many rows (the prompt, then the negative prompt); the image
  stream's adaLN takes the first rows' modulation (the official ``Trunc*`` norms); SD3 pools the
  prompt for the negative rows, Flux the negative prompt;
* each joint attention tiles the image queries, keys and values over both text streams and
  replaces the conditional image output by the NAG mix (SD3: L1 norms + 1e-7; Flux: L2 norms);
* Flux's single blocks run ``[negative text, image]`` as rows of their own (image tiled when they
  start), and both rows' image attention output becomes the mix.

Everything runs in diffusers' own pipelines (``StableDiffusion3Pipeline`` / ``FluxPipeline``),
with the transformer's forward, norms and attention processors patched for the call only.
Final latents must agree to 1e-4; diffguide makes one forward per step with B rows (counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from families_support import tiny_sd3

from diffguide import CFG, PAG, ConfigError, GuidedPipeline, Window
from diffguide.guidance import NAG, PLADIS
from diffguide.testing_dit import tiny_auraflow, tiny_flux

TOL = 1e-4
STEPS = 3
SEED = 7
SIZE = 32  # Flux: 32 px -> 8x8 packed tokens
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", "blurry"]
PHI, TAU, ALPHA = 4.0, 2.0, 0.5


def mix(pos: torch.Tensor, neg: torch.Tensor, p: int) -> torch.Tensor:
    g = pos * PHI - neg * (PHI - 1)
    if p == 1:
        s = torch.norm(g, p=1, dim=-1, keepdim=True) / (torch.norm(pos, p=1, dim=-1, keepdim=True) + 1e-7)
        g = g * torch.minimum(s, s.new_ones(1) * TAU) / (s + 1e-7)
    else:
        s = torch.norm(g, p=2, dim=-1, keepdim=True) / torch.norm(pos, p=2, dim=-1, keepdim=True)
        g = g * torch.minimum(s, s.new_ones(1) * TAU) / s
    return g * ALPHA + pos * (1 - ALPHA)


def attend(q, k, v):
    """(B, L, H, D) -> (B, L, H * D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def heads(attn, x):
    return x.unflatten(-1, (attn.heads, -1))


class RefSD3:
    """SD3 joint attention with a negative text stream in the last rows of the text stream."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        bi, bt = hidden_states.shape[0], encoder_hidden_states.shape[0]
        m = bt - bi
        q, k, v = (heads(attn, p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (torch.cat([x, x[bi - m :]]) for x in (q, k, v))  # the conditional rows, again
        e = encoder_hidden_states
        eq, ek, ev = (heads(attn, p(e)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        n = q.shape[1]
        out = attend(torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1))
        img, txt = out[:, :n], out[:, n:]
        if self.state["on"] and m:
            img = torch.cat([img[: bi - m], mix(img[bi - m : bi], img[bi:], 1)])
        else:
            img = img[:bi]
        img = attn.to_out[1](attn.to_out[0](img))
        return img, (txt if attn.context_pre_only else attn.to_add_out(txt))


class RefFlux:
    """Flux attention: dual blocks tile the image over both text streams; single blocks mix halves."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        q, k, v = (heads(attn, p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            b, bt = hidden_states.shape[0], encoder_hidden_states.shape[0]
            q, k, v = (x.repeat(bt // b, 1, 1, 1) for x in (q, k, v))
            e = encoder_hidden_states
            eq, ek, ev = (heads(attn, p(e)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = attend(q, k, v)
        t = self.state["text"]
        if encoder_hidden_states is not None:
            txt, img = out[:, :t], out[:, t:]
            if self.state["on"]:
                img = mix(img[:b], img[b:], 2)
            return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)
        if self.state["on"]:
            half = out.shape[0] // 2
            mixed = mix(out[:half, t:], out[half:, t:], 2)
            out = out.clone()
            out[:half, t:] = mixed
            out[half:, t:] = mixed
        return out


def truncated(original):
    """An adaLN forward that takes the first rows of its embedding (the official ``Trunc*`` norms)."""

    def forward(x, *args, **kwargs):
        n = x.shape[0]

        def cut(a):
            return a[:n] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] > n else a

        return original(x, *(cut(a) for a in args), **{k: cut(v) for k, v in kwargs.items()})

    return forward


@contextmanager
def reference_nag(model, negative, negative_pooled, flux: bool, on_steps=None) -> Iterator[None]:
    """The official NAG set-up on ``model`` for the ``with`` block (instance attributes only)."""
    state = {"on": True, "text": 0, "calls": 0}
    original = model.forward

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs):
        state["on"] = on_steps is None or state["calls"] in on_steps
        state["calls"] += 1
        state["text"] = encoder_hidden_states.shape[1]
        if not state["on"]:
            return original(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs)
        b, m = hidden_states.shape[0], negative.shape[0]
        pooled = negative_pooled if flux else pooled_projections[b - m :]
        extra = {
            k: torch.cat([v, v[b - m :]]) for k, v in kwargs.items() if k == "guidance" and v is not None
        }
        out = original(
            hidden_states,
            torch.cat([encoder_hidden_states, negative]),
            torch.cat([pooled_projections, pooled]),
            torch.cat([timestep, timestep[b - m :]]),
            **{**kwargs, **extra},
        )
        return (out[0][:b],) if flux else out  # Flux ran the single blocks on 2B rows

    def tile(module, args, kwargs):
        h, e = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        if h.shape[0] != e.shape[0]:
            return args, {**kwargs, "hidden_states": h.repeat(e.shape[0] // h.shape[0], 1, 1)}
        return None

    with ExitStack() as stack:
        model.forward = forward
        stack.callback(lambda: model.__dict__.pop("forward"))
        for m in model.modules():
            if isinstance(m, AdaLayerNormZero | SD35AdaLayerNormZeroX | AdaLayerNormContinuous):
                m.forward = truncated(m.forward)
                stack.callback(m.__dict__.pop, "forward")
        for name, m in model.named_modules():
            if name.endswith(".attn") and (flux or m.add_k_proj is not None):
                saved = m.processor
                m.processor = (RefFlux if flux else RefSD3)(state)
                stack.callback(setattr, m, "processor", saved)
        if flux:
            handle = model.single_transformer_blocks[0].register_forward_pre_hook(tile, with_kwargs=True)
            stack.callback(handle.remove)
        yield


def rows_hook(model):
    rows: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: rows.append(int(k["hidden_states"].shape[0])), with_kwargs=True
    )
    return rows, handle


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def sd35_pipe():
    return tiny_sd3(seed=1, sd35=True)


@pytest.fixture(scope="module")
def flux_pipe():
    pipe = tiny_flux(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def schnell_pipe():
    pipe = tiny_flux(seed=1, guidance_embeds=False, dynamic_shift=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref_sd3(pipe, w: float, on_steps=None) -> torch.Tensor:
    ref = StableDiffusion3Pipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    neg, _, neg_pooled, _ = ref.encode_prompt(NEGATIVES, None, None, do_classifier_free_guidance=False)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with reference_nag(pipe.transformer, neg, neg_pooled, flux=False, on_steps=on_steps):
        return ref(
            PROMPTS,
            negative_prompt=NEGATIVES,
            guidance_scale=w,
            generator=gens,
            num_inference_steps=STEPS,
            output_type="latent",
        ).images


def ref_flux(pipe, on_steps=None) -> torch.Tensor:
    ref = FluxPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    neg, neg_pooled, _ = ref.encode_prompt(NEGATIVES, None)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with reference_nag(pipe.transformer, neg, neg_pooled, flux=True, on_steps=on_steps):
        out = ref(
            PROMPTS, height=SIZE, width=SIZE, generator=gens, num_inference_steps=STEPS, output_type="latent"
        ).images
    return FluxPipeline._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor)


def ours(pipe, terms, **kwargs):
    if isinstance(pipe, FluxPipeline):
        kwargs = {"width": SIZE, "height": SIZE, **kwargs}
    rows, handle = rows_hook(pipe.transformer)
    try:
        out = GuidedPipeline(pipe).generate(
            PROMPTS, NEGATIVES, guidance=terms, steps=STEPS, seed=SEED, decode=False, **kwargs
        )
    finally:
        handle.remove()
    assert out.forward_calls == len(rows) == (STEPS if "max_rows" not in kwargs else len(rows))
    return out, rows


def maxdiff(a, b) -> float:
    return float((a - b).abs().max())


NAG_TERM = NAG(PHI, tau=TAU, alpha=ALPHA)


@pytest.mark.parametrize(("arch", "w"), [("sd3", 1.0), ("sd3", 4.0), ("sd35", 4.0)])
def test_nag_sd3_matches_reference(arch, w, request):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    expected = ref_sd3(pipe, w)
    terms = ([CFG(w)] if w != 1.0 else []) + [NAG_TERM]
    got, rows = ours(pipe, terms)
    d = maxdiff(got.latents, expected)
    print(f"NAG {arch} w={w} vs reference: {d:.2e}")
    assert d <= TOL
    assert rows == [len(PROMPTS) * (2 if w != 1.0 else 1)] * STEPS  # no rows for the negative stream
    plain = ours(pipe, terms[:-1])[0].latents
    assert maxdiff(got.latents, plain) > 1e-3  # it does act


@pytest.mark.parametrize("arch", ["flux", "schnell"])
def test_nag_flux_matches_reference(arch, request):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    expected = ref_flux(pipe)
    got, rows = ours(pipe, [NAG_TERM])
    d = maxdiff(got.latents, expected)
    print(f"NAG {arch} vs reference: {d:.2e}")
    assert d <= TOL
    assert rows == [len(PROMPTS)] * STEPS  # guidance-distilled: a negative prompt without CFG rows
    assert maxdiff(got.latents, ours(pipe, [])[0].latents) > 1e-3


def test_nag_dit_window(flux_pipe, sd3_pipe):
    term = NAG(PHI, tau=TAU, alpha=ALPHA, window=Window(start=0.5))
    assert maxdiff(ours(flux_pipe, [term])[0].latents, ref_flux(flux_pipe, on_steps={2})) <= TOL
    assert maxdiff(ours(sd3_pipe, [CFG(4.0), term])[0].latents, ref_sd3(sd3_pipe, 4.0, on_steps={2})) <= TOL


@pytest.mark.parametrize("arch", ["sd35", "flux"])
def test_nag_dit_composes_in_one_forward(arch, request):
    """CFG + PAG + NAG: 3 B rows in one forward per step; the same with rows chunked one by one,
    with prefix sharing off, and per image."""
    pipe = request.getfixturevalue(f"{arch}_pipe")
    terms = [CFG(3.0), PAG(2.0, "b1"), NAG_TERM]
    out, rows = ours(pipe, terms)
    assert rows == [3 * len(PROMPTS)] * STEPS
    assert maxdiff(out.latents, ours(pipe, terms[:2])[0].latents) > 1e-3
    assert maxdiff(out.latents, ours(pipe, terms, max_rows=1)[0].latents) <= TOL
    assert maxdiff(out.latents, ours(pipe, terms, max_rows=4)[0].latents) <= TOL
    assert maxdiff(out.latents, ours(pipe, terms, prefix_sharing=False)[0].latents) <= TOL


def test_nag_dit_leaves_the_model_clean(flux_pipe):
    model = flux_pipe.transformer
    procs = {k: id(v) for k, v in model.attn_processors.items()}
    ours(flux_pipe, [CFG(2.0), NAG_TERM])
    assert {k: id(v) for k, v in model.attn_processors.items()} == procs
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_nag_dit_errors(sd3_pipe):
    with pytest.raises(ConfigError, match="two guidance terms perturb the conditional rows"):
        ours(sd3_pipe, [NAG(), NAG(name="nag2")])
    with pytest.raises(
        ConfigError, match="PLADIS needs a UNet's cross-attention; this model has joint attention"
    ):
        ours(sd3_pipe, [NAG(), PLADIS()])
    with pytest.raises(
        ConfigError, match="PLADIS needs a UNet's cross-attention; this model has joint attention"
    ):
        ours(sd3_pipe, [PLADIS()])
    aura = GuidedPipeline(tiny_auraflow())
    with pytest.raises(
        ConfigError,
        match="NAG is implemented for UNet cross-attention and SD3/Flux joint attention, not AuraFlowTransformer2DModel",
    ):
        aura.generate("a cat", "ugly", guidance=[NAG()], steps=1, seed=0, decode=False)


def test_nag_on_schnell_from_the_cli_replays_bit_identical(schnell_pipe, tmp_path):
    """The main use: a negative prompt on guidance-distilled Flux without CFG, from the CLI."""
    from typer.testing import CliRunner

    from diffguide.cli.main import app
    from diffguide.io import load_latents, read_manifest

    schnell_pipe.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    base = ["generate", "-m", str(tmp_path / "m"), "-p", "a cat", "--negative-prompt", "ugly", "--cfg", "1"]
    base += [
        "--steps",
        "2",
        "--seed",
        "3",
        "--width",
        "32",
        "--height",
        "32",
        "--threads",
        "1",
        "--save-latents",
        "-q",
    ]
    res = runner.invoke(app, [*base, "--guide", "nag:scale=4", "-o", str(tmp_path / "nag")])
    assert res.exit_code == 0, res.output
    png = tmp_path / "nag" / "diffguide-000-3.png"
    assert read_manifest(png)["parameters"]["guidance"][-1]["method"] == "nag"
    res = runner.invoke(app, ["replay", str(png)])
    assert res.exit_code == 0 and "bit-identical" in res.output and "NOT" not in res.output, res.output
    assert runner.invoke(app, [*base, "-o", str(tmp_path / "plain")]).exit_code == 0
    plain = load_latents(tmp_path / "plain" / "diffguide-000-3.png")[0]
    assert maxdiff(load_latents(png)[0], plain) > 1e-3
