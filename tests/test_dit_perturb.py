"""Perturbations on transformer blocks (SD3, SD3.5, Flux, AuraFlow, Qwen-Image), checked against
diffusers where diffusers has the same thing:

* identity attention "diagonal" vs diffusers' PAGJointAttnProcessor2_0 (StableDiffusion3PAGPipeline);
* identity attention "value" vs diffusers' LayerSkipConfig(skip_attention_scores=True) (the modular guider);
* block skip vs SD3Transformer2DModel(skip_layers=...);
* where no reference exists, properties that pin the semantics down (which token sees which).

Every perturbation acts on its branch's rows only (other rows bit-identical to an unperturbed
forward; block skip's to the last bits, as it runs the skipped blocks on the other rows alone) and leaves the model exactly as it found it, also when the forward raises.
"""

from __future__ import annotations

import copy

import dit_support as ds
import pytest
import torch
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode, LayerSkipConfig, _apply_layer_skip_hook
from diffusers.models.attention_processor import AttnProcessor, PAGJointAttnProcessor2_0

from diffguide import ConfigError, DiffguideError
from diffguide.perturb import BlockSkip, BranchRows, ForwardContext, IdentityAttention, TokenShuffle
from diffguide.repro.determinism import BATCH_TOLERANCE

SPECS = {"sd3": "b1-2", "sd35": "b0-2", "flux": "b1,s0-1", "auraflow": "b1,s0-1", "qwen": "b1-2"}


@pytest.fixture(scope="module", params=ds.FAMILIES)
def dit(request):
    return ds.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def sd3():
    return ds.sd3(layers=4)


def context(rows: slice, n: int = 4, branch: str = "p") -> ForwardContext:
    ctx = ForwardContext(seeds=tuple(range(n)))
    start, stop = rows.start or 0, rows.stop
    ctx.rows[branch] = BranchRows(rows, tuple(range(stop - start)))
    return ctx


def run(d: ds.TinyDiT, pert, x, rows: slice) -> torch.Tensor:
    with pert.install(d.model, "p", context(rows)):
        return d(**x)


def all_perturbations(spec: str) -> list:
    return [
        IdentityAttention(spec),
        IdentityAttention(spec, "value"),
        TokenShuffle(spec),
        BlockSkip(spec),
        BlockSkip(spec, "attn"),
        BlockSkip(spec, "ff"),
    ]


# --- references -----------------------------------------------------------------------------------


def test_diagonal_matches_diffusers_sd3_pag_processor(sd3):
    """diffusers' processor perturbs the second half of the batch: rows 2, 3 of [o, o, p, p]
    (as StableDiffusion3PAGPipeline batches [u, c, p] with CFG, [c, p] without)."""
    x = sd3.inputs(4)
    pert = IdentityAttention("b1-2")
    ours = run(sd3, pert, x, slice(2, 4))
    ref_model = copy.deepcopy(sd3.model)
    modules = dict(ref_model.named_modules())
    for name in pert.targets(ref_model):
        modules[name].processor = PAGJointAttnProcessor2_0()
    with torch.no_grad():
        ref = ref_model(**x, return_dict=False)[0]
    # bit for bit at one thread on the AVX2 machine this was written on; other kernels may round
    # differently, so the bound is relative (the float64 check below shows the computations agree)
    assert ((ours[2:] - ref[2:]).abs() <= 1e-6 * (1 + ref[2:].abs())).all()  # the perturbed rows
    # diffusers runs the unperturbed rows of a perturbed layer as a half batch: equal at one thread,
    # 9.5e-7 apart at two (ours are the model's own full-batch rows): batch composition, so the
    # project's batch bound
    assert ((ours[:2] - ref[:2]).abs() <= BATCH_TOLERANCE * (1 + ref[:2].abs())).all()
    assert (ours[2:] - sd3(**x)[2:]).abs().max().item() > 0.1  # and it is a real perturbation
    # in float64 the two agree to rounding
    ours64 = run(
        ds.TinyDiT("sd3", copy.deepcopy(sd3.model).double(), sd3.make_inputs), pert, _f64(x), slice(2, 4)
    )
    with torch.no_grad():
        ref64 = ref_model.double()(**_f64(x), return_dict=False)[0]
    assert (ours64 - ref64).abs().max().item() <= 1e-12


def _f64(x: dict) -> dict:
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()
    }


@pytest.mark.parametrize("family", ds.FAMILIES)
def test_value_matches_diffusers_attention_score_skip(family):
    """diffusers' modular PAG guider skips the attention scores with its own TorchFunctionMode
    (``AttentionScoreSkipFunctionMode``: SDPA returns V). Entered around exactly the selected
    attention modules, it must give what ``semantics="value"`` gives, bit for bit."""
    d = ds.BUILDERS[family]()
    x = d.inputs(2)
    name = {"auraflow": "joint_transformer_blocks.1", "flux": "single_transformer_blocks.0"}.get(
        family, "transformer_blocks.1"
    )
    pert = IdentityAttention(name, "value")
    ours = run(d, pert, x, slice(0, 2))
    ref_model = copy.deepcopy(d.model)
    modules = dict(ref_model.named_modules())
    for target in pert.targets(ref_model):
        mode = AttentionScoreSkipFunctionMode()

        def enter(*args, mode=mode) -> None:
            mode.__enter__()

        def leave(*args, mode=mode) -> None:
            mode.__exit__(None, None, None)

        modules[target].register_forward_pre_hook(enter)
        modules[target].register_forward_hook(leave)
    with torch.no_grad():
        ref = ref_model(**x, return_dict=False)[0]
    assert torch.equal(ours, ref)
    assert (ours - d(**x)).abs().max().item() > 0.01


def test_value_matches_diffusers_layer_skip_config():
    """The modular guider's own LayerSkipConfig agrees too, on Qwen-Image. (diffusers 0.42.1 cannot
    apply it to the other families: SD3's JointAttnProcessor2_0 and AuraFlow's processor are not in
    its registry, and on Flux it reads ``FluxAttention.is_cross_attention``, which does not exist.)"""
    d = ds.qwen()
    x = d.inputs(2)
    ours = run(d, IdentityAttention("transformer_blocks.1", "value"), x, slice(0, 2))
    ref_model = copy.deepcopy(d.model)
    config = LayerSkipConfig(
        [1], fqn="transformer_blocks", skip_attention=False, skip_attention_scores=True, skip_ff=False
    )
    _apply_layer_skip_hook(ref_model, config)
    with torch.no_grad():
        ref = ref_model(**x, return_dict=False)[0]
    assert torch.equal(ours, ref)


def test_block_skip_matches_sd3_skip_layers(sd3):
    """Bit-identical to diffusers' ``skip_layers`` (the SD3 pipeline's SLG call) on the same rows,
    whether every row is the branch's or rows 1..2 of 4 (the others unperturbed: the skipped
    blocks run on them alone, a sub-batch, so equal to an unperturbed forward up to the last bits).
    diffusers' own SLG call runs those rows as a separate batch: equal to rounding in float64."""
    x = sd3.inputs(4)
    with torch.no_grad():
        ref = sd3.model(**x, skip_layers=[1, 3], return_dict=False)[
            0
        ]  # 3 is the last, context_pre_only block
    assert torch.equal(run(sd3, BlockSkip("b1,b3"), x, slice(0, 4)), ref)
    mixed = run(sd3, BlockSkip("b1,b3"), x, slice(1, 3))
    assert torch.equal(mixed[1:3], ref[1:3])
    plain = sd3(**x)[[0, 3]]
    assert ((mixed[[0, 3]] - plain).abs() <= 1e-5 * (1 + plain.abs())).all()
    d64 = ds.TinyDiT("sd3", copy.deepcopy(sd3.model).double(), sd3.make_inputs)
    x64 = _f64(x)
    mixed64 = run(d64, BlockSkip("b1,b3"), x64, slice(1, 3))
    with torch.no_grad():
        ref64 = d64.model(**{k: v[1:3] for k, v in x64.items()}, skip_layers=[1, 3], return_dict=False)[0]
    assert (mixed64[1:3] - ref64).abs().max().item() <= 1e-12


def test_diffusers_pag_processor_crashes_on_sd35_attn2_ours_perturbs_it():
    """diffusers sets PAGJointAttnProcessor2_0 on attn2 too (self-attention without text), whose
    forward needs encoder_hidden_states; diffguide gives attn2 the identity (out = V) instead."""
    d = ds.sd35(layers=4)
    x = d.inputs(2)
    ref_model = copy.deepcopy(d.model)
    ref_model.transformer_blocks[0].attn2.processor = PAGJointAttnProcessor2_0()
    with pytest.raises(AttributeError), torch.no_grad():
        ref_model(**x)
    attn2 = d.model.transformer_blocks[0].attn2
    h = torch.randn(2, 16, attn2.query_dim)
    for semantics in ("diagonal", "value"):
        with (
            IdentityAttention("transformer_blocks.0.attn2", semantics).install(
                d.model, "p", context(slice(1, 2), 2)
            ),
            torch.no_grad(),
        ):
            out = attn2(hidden_states=h)
        with torch.no_grad():
            assert torch.equal(out[0], attn2(hidden_states=h)[0])
            assert (out[1] - attn2.to_out[0](attn2.to_v(h[1]))).abs().max().item() <= 1e-6


def test_diffusers_sd3_pag_processor_drops_qk_norm_on_sd35():
    """diffusers' PAGJointAttnProcessor2_0 never applies norm_q / norm_k: on SD3.5 (qk-norm) even
    its unperturbed rows leave the model's output. diffguide's 'diagonal' keeps the model's own
    processor, so its unperturbed rows are the model's, bit for bit."""
    d = ds.sd35(layers=4)
    x = d.inputs(4)
    base = d(**x)
    ref_model = copy.deepcopy(d.model)
    ref_model.transformer_blocks[1].attn.processor = PAGJointAttnProcessor2_0()
    with torch.no_grad():
        ref = ref_model(**x, return_dict=False)[0]
    assert (ref[:2] - base[:2]).abs().max().item() > 0.1  # measured 0.79
    assert torch.equal(run(d, IdentityAttention("transformer_blocks.1.attn"), x, slice(2, 4))[:2], base[:2])


# --- semantics where diffusers has no reference -------------------------------------------------------


def _attention_io(d: ds.TinyDiT, name: str, x: dict) -> dict:
    """The keyword arguments the attention module ``name`` gets in a forward of ``x``."""
    seen: dict = {}
    module = dict(d.model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    d(**x)
    handle.remove()
    return seen


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("sd3", "transformer_blocks.1.attn"),
        ("sd35", "transformer_blocks.1.attn"),
        ("flux", "transformer_blocks.1.attn"),
        ("flux", "single_transformer_blocks.1.attn"),
        ("auraflow", "joint_transformer_blocks.1.attn"),
        ("auraflow", "single_transformer_blocks.1.attn"),
        ("qwen", "transformer_blocks.1.attn"),
    ],
)
def test_who_sees_whom(family, name):
    """Change image token j at the attention's input. 'diagonal': image tokens i != j keep their
    output (they see only themselves and the text), text outputs change (text sees all).
    'value': every other token, image or text, keeps its output (out = V)."""
    d = ds.BUILDERS[family]()
    x = d.inputs(1)
    kw = _attention_io(d, name, x)
    module = dict(d.model.named_modules())[name]
    joint = kw.get("encoder_hidden_states") is not None
    n_img = 16
    seq = kw["hidden_states"].shape[1]
    img = slice(0, n_img) if joint else slice(seq - n_img, seq)  # single stream: [text, image]
    j = img.start + 3
    changed = {**kw, "hidden_states": kw["hidden_states"].clone()}
    changed["hidden_states"][:, j] += 1.0

    def outputs(semantics: str, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(image outputs, text outputs) of the attention on ``call``, perturbed."""
        with IdentityAttention(name, semantics).install(d.model, "p", context(slice(0, 1), 1)):
            d(**x)  # records the image token count, as in a run
            with torch.no_grad():
                out = module(**call)
        if joint:
            return out[0], out[1]
        return out[:, img], out[:, : img.start]

    others = [i for i in range(n_img) if i != 3]
    for semantics in ("diagonal", "value"):
        (img_a, txt_a), (img_b, txt_b) = outputs(semantics, kw), outputs(semantics, changed)
        assert (img_a[:, others] - img_b[:, others]).abs().max().item() <= 1e-6, semantics
        assert (img_a[:, 3] - img_b[:, 3]).abs().max().item() > 1e-3
        text_moved = (txt_a - txt_b).abs().max().item()
        assert text_moved <= 1e-6 if semantics == "value" else text_moved > 1e-4
    # and without the perturbation every image token sees token j
    with torch.no_grad():
        a, b = module(**kw), module(**changed)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a[:, img], b[:, img])
    assert (a[:, 0] - b[:, 0]).abs().max().item() > 1e-4


def test_token_shuffle_moves_image_tokens_only(dit):
    """The tokens entering each selected block on the branch's rows: the image tokens are a
    permutation of the unperturbed ones (not the identity), the text tokens are untouched."""
    x = dit.inputs(2)
    spec = SPECS[dit.family]
    pert = TokenShuffle(spec)
    names = pert.targets(dit.model)
    modules = dict(dit.model.named_modules())

    def capture() -> tuple[dict, list]:
        seen: dict = {}

        def record(module, args, kwargs, name) -> None:
            seen.setdefault(name, dict(kwargs))

        handles = [
            modules[n].register_forward_pre_hook(lambda m, a, k, n=n: record(m, a, k, n), with_kwargs=True)
            for n in names
        ]
        return seen, handles

    seen_before, handles = capture()
    dit(**x)
    for h in handles:
        h.remove()
    with pert.install(dit.model, "p", context(slice(1, 2), 2)):
        seen_after, handles = capture()  # registered after the shuffle hook: sees shuffled inputs
        dit(**x)
        for h in handles:
            h.remove()
    name = names[0]  # the first block sees the same input in both runs
    before, after = seen_before[name], seen_after[name]
    h0, h1 = before["hidden_states"], after["hidden_states"]
    assert torch.equal(h0[0], h1[0])  # other row untouched
    if dit.family == "auraflow" and name.startswith("single"):
        text = h0.shape[1] - 16
        assert torch.equal(h0[1, :text], h1[1, :text])
        h0, h1 = h0[:, text:], h1[:, text:]
    assert not torch.equal(h0[1], h1[1])
    assert torch.equal(h0[1].sort(dim=0).values, h1[1].sort(dim=0).values)
    if "encoder_hidden_states" in before:
        assert torch.equal(before["encoder_hidden_states"], after["encoder_hidden_states"])
    # AuraFlow's single blocks get [text, image] concatenated: their text part is never shuffled
    if dit.family == "auraflow":
        single = next(n for n in names if n.startswith("single"))
        text = 5 + 8  # 5 prompt tokens + 8 register tokens
        assert seen_after[single]["hidden_states"].shape[1] == text + 16


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen"])
def test_attn_plus_ff_skip_equals_block_skip(family):
    """Zeroed attention and zeroed feed-forward together remove the whole residual update of a
    double-stream block (not the last SD3 block: its text stream ends there)."""
    d = ds.BUILDERS[family]()
    x = d.inputs(2)
    ctx = context(slice(0, 1), 2)
    with BlockSkip("b1", "attn").install(d.model, "p", ctx), BlockSkip("b1", "ff").install(d.model, "p", ctx):
        both = d(**x)
    block = run(d, BlockSkip("b1"), x, slice(0, 1))
    assert (both[0] - block[0]).abs().max().item() <= 1e-6
    # row 1 (unperturbed) ran block 1 on a sub-batch in one case, its sub-modules in the other
    assert ((both[1] - block[1]).abs() <= 1e-5 * (1 + block[1].abs())).all()
    attn_only = run(d, BlockSkip("b1", "attn"), x, slice(0, 1))
    assert (attn_only[0] - block[0]).abs().max().item() > 1e-3


def test_attention_skip_zeroes_both_streams(sd3):
    attn = sd3.model.transformer_blocks[1].attn
    kw = _attention_io(sd3, "transformer_blocks.1.attn", sd3.inputs(2))
    with BlockSkip("b1", "attn").install(sd3.model, "p", context(slice(1, 2), 2)), torch.no_grad():
        img, txt = attn(**kw)
    with torch.no_grad():
        img0, txt0 = attn(**kw)
    assert torch.equal(img[0], img0[0]) and torch.equal(txt[0], txt0[0])
    assert not img[1].any() and not txt[1].any()


# --- rows, scope, restoration -------------------------------------------------------------------------


def test_branch_rows_only_others_bit_identical(dit):
    """Other rows bit-identical; block skip runs the skipped blocks on the other rows alone (a
    sub-batch, so the branch's rows cost nothing there): equal up to the last bits."""
    x = dit.inputs(3)
    base = dit(**x)
    for pert in all_perturbations(SPECS[dit.family]):
        out = run(dit, pert, x, slice(1, 2))
        if isinstance(pert, BlockSkip):
            assert ((out[[0, 2]] - base[[0, 2]]).abs() <= 1e-5 * (1 + base[[0, 2]].abs())).all(), pert
        else:
            assert torch.equal(out[[0, 2]], base[[0, 2]]), pert
        assert (out[1] - base[1]).abs().max().item() > 1e-3, pert
        ctx = ForwardContext(seeds=(0, 1, 2))  # the branch has no rows in this call: nothing changes
        with pert.install(dit.model, "p", ctx):
            assert torch.equal(dit(**x), base), pert


def test_branch_row_equals_that_row_alone(dit):
    """A perturbed row in a batch of 3 equals the same row perturbed in a batch of 1 within the
    project's batch bound (measured <= 2.5e-6: batch composition changes the last bits)."""
    x = dit.inputs(3)
    alone = {
        k: v[1:2] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 3 else v for k, v in x.items()
    }
    if dit.family == "qwen":
        alone["img_shapes"] = x["img_shapes"][:1]
    for pert in all_perturbations(SPECS[dit.family])[:2] + all_perturbations(SPECS[dit.family])[3:]:
        in_batch = run(dit, pert, x, slice(1, 2))[1]
        with pert.install(dit.model, "p", context(slice(0, 1), 1)):
            single = dit(**alone)[0]
        assert ((in_batch - single).abs() <= BATCH_TOLERANCE * (1 + single.abs())).all(), pert


def _clean(model: torch.nn.Module) -> bool:
    return all(
        "forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks
        for m in model.modules()
    )


def test_model_restored_after_exit_and_after_a_raise(dit):
    x = dit.inputs(2)
    base = dit(**x)
    processors = {n: m.processor for n, m in dit.model.named_modules() if hasattr(m, "processor")}
    later = {"flux": "single_transformer_blocks.5", "auraflow": "single_transformer_blocks.5"}
    last = dict(dit.model.named_modules())[later.get(dit.family, "transformer_blocks.3")]

    def boom(*args) -> None:
        raise RuntimeError("boom")

    for pert in all_perturbations(SPECS[dit.family]):
        run(dit, pert, x, slice(0, 1))
        assert torch.equal(dit(**x), base) and _clean(dit.model), pert
        handle = last.register_forward_hook(boom)  # raises inside the forward, after the perturbed blocks
        try:
            with (
                pytest.raises(RuntimeError, match="boom"),
                pert.install(dit.model, "p", context(slice(0, 1), 2)),
            ):
                dit(**x)
        finally:
            handle.remove()
        assert torch.equal(dit(**x), base) and _clean(dit.model), pert
        assert all(m.processor is processors[n] for n, m in dit.model.named_modules() if n in processors), (
            pert
        )


# --- errors -------------------------------------------------------------------------------------------


def test_bad_semantics_and_mode():
    with pytest.raises(
        ConfigError, match=r"^identity attention semantics must be one of diagonal, value, got 'v'$"
    ):
        IdentityAttention("b1", "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^block skip mode must be one of block, attn, ff, got 'all'$"):
        BlockSkip("b1", "all")  # type: ignore[arg-type]


def test_a_processor_without_sdpa_is_an_error_not_a_no_op():
    """A processor that computes attention another way (here the classic bmm AttnProcessor on
    SD3.5's image-only attn2) cannot be perturbed through SDPA: one clear error."""
    d = ds.sd35(layers=4)
    model = copy.deepcopy(d.model)
    model.transformer_blocks[0].attn2.processor = AttnProcessor()
    tiny = ds.TinyDiT("sd35", model, d.make_inputs)
    with pytest.raises(DiffguideError, match="made no call to torch's scaled_dot_product_attention"):
        run(tiny, IdentityAttention("transformer_blocks.0.attn2"), tiny.inputs(2), slice(1, 2))
    assert _clean(model)


def test_block_skip_on_unet_transformer_blocks(sd15_pipe):
    """The same spec type works on a UNet's BasicTransformerBlocks: skipped rows pass through."""
    unet = sd15_pipe.unet
    block = dict(unet.named_modules())["mid_block.attentions.0.transformer_blocks.0"]
    seen: dict = {}

    def grab_in(module, args, kwargs) -> None:
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def grab_out(module, args, out) -> None:
        seen["out"] = out

    pre = block.register_forward_pre_hook(grab_in, with_kwargs=True)
    handle = block.register_forward_hook(grab_out)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    try:
        with torch.no_grad():
            base = unet(x, 500, emb).sample
            with BlockSkip("mid", "block").install(unet, "p", context(slice(1, 2), 2)):
                out = unet(x, 500, emb).sample
    finally:
        handle.remove()
        pre.remove()
    h_in, h_out = seen["in"], seen["out"]
    assert torch.equal(h_out[1], h_in[1]) and not torch.equal(h_out[0], h_in[0])
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])
    assert _clean(unet)
