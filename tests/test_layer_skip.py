"""SLG on UNets and the autoguidance-like LayerSkip: against diffusers' layer-skip hook
(``LayerSkipConfig`` with an explicit ``fqn``; its ``fqn="auto"`` fails on UNets) in an independent
reference loop on the same tiny models, plus the engine checks."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import LayerSkipConfig, _apply_layer_skip_hook
from families_support import tiny_sd3
from guide_support import (
    check_one_forward_with_cfg_pag,
    check_restored,
    check_window,
    maxdiff,
    reference,
    run,
)

from diffguide import CFG, PAG, SLG, ConfigError, GuidedPipeline, LayerSpecError, Window
from diffguide.guidance import LayerSkip
from diffguide.perturb import BlockSkip, LayerSkipBlocks

TOL = 1e-4


def skipped(unet, fqn: str, indices: list[int]):
    @contextmanager
    def install():
        _apply_layer_skip_hook(unet, LayerSkipConfig(indices=indices, fqn=fqn), name="ref_skip")
        try:
            yield
        finally:
            HookRegistry.check_if_exists_or_initialize(unet).remove_hook("ref_skip", recurse=True)
            # diffusers' remove_hook leaves an instance ``forward`` and its registry behind; the
            # shared fixture must come back exactly as it was for the tests that check it
            for m in unet.modules():
                m.__dict__.pop("forward", None)
                m.__dict__.pop("_diffusers_hook", None)

    return install


# (arch, diffguide layers, diffusers fqn, indices)
CASES = [
    ("sd15", "mid_block.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks", [0]),
    ("sdxl", "d1.1", "down_blocks.1.attentions.1.transformer_blocks", [1]),
    (
        "sdxl",
        "down_blocks.1.attentions.0.transformer_blocks.0-1",
        "down_blocks.1.attentions.0.transformer_blocks",
        [0, 1],
    ),
]


@pytest.mark.parametrize(("arch", "layers", "fqn", "indices"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_slg_on_unets_matches_diffusers_layer_skip(arch, layers, fqn, indices, w, request):
    """SLG's strict step rule: start 0, stop 1 of 3 steps -> steps 1 and 2 (0 < i < 3)."""
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    assert BlockSkip(layers).targets(pipe.unet) == [f"{fqn}.{i}" for i in indices]
    expected = reference(pipe, w, 2.8, skipped(pipe.unet, fqn, indices), steps=lambda i: 0 < i < 3)
    got = run(gp, ([CFG(w)] if w != 1.0 else []) + [SLG(2.8, layers=layers, start=0.0, stop=1.0)]).latents
    assert maxdiff(expected, got) <= TOL
    assert maxdiff(got, run(gp, [CFG(w)] if w != 1.0 else []).latents) > 1e-3


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_layer_skip_default_is_the_mid_block_and_matches_diffusers(arch, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    targets = LayerSkipBlocks().targets(pipe.unet)
    assert targets and all(t.startswith("mid_block.attentions.0.transformer_blocks.") for t in targets)
    fqn = "mid_block.attentions.0.transformer_blocks"
    expected = reference(pipe, 4.0, 2.0, skipped(pipe.unet, fqn, list(range(len(targets)))))
    got = run(gp, [CFG(4.0), LayerSkip(2.0)]).latents
    assert maxdiff(expected, got) <= TOL


def test_slg_on_unets_needs_layers(sd15):
    with pytest.raises(LayerSpecError, match="SLG has no preset for UNets"):
        run(sd15, [CFG(4.0), SLG(2.8, start=0.0, stop=1.0)])


def test_layer_skip_modes_differ_and_errors(sd15):
    outs = {m: run(sd15, [CFG(4.0), LayerSkip(2.0, mode=m)]).latents for m in ("block", "attn", "ff")}
    assert maxdiff(outs["block"], outs["attn"]) > 1e-4 and maxdiff(outs["attn"], outs["ff"]) > 1e-4
    with pytest.raises(ConfigError, match="layer skip mode must be one of block, attn, ff"):
        LayerSkip(mode="resnet")
    with pytest.raises(ConfigError, match=r"layer skip scale must be in \[0, 100\]"):
        LayerSkip(-1.0)


def test_layer_skip_engine_checks(sd15, unet_calls):
    check_one_forward_with_cfg_pag(sd15, LayerSkip(2.0), unet_calls)
    with unet_calls(sd15.unet) as log:  # SLG's strict rule leaves step 0 out
        out = run(sd15, [CFG(4.0), PAG(2.0), SLG(2.8, layers="mid", start=0.0, stop=1.0)])
    assert log.rows == [6, 8, 8] and out.forward_calls == 3
    check_window(sd15, LayerSkip(2.0, window=Window(start=0.5)), unet_calls)
    check_restored(
        sd15, [CFG(4.0), LayerSkip(2.0, mode="attn"), SLG(2.0, layers="d0", start=0.0, stop=1.0, name="s")]
    )


def test_layer_skip_batch_equals_single_runs(sd15_f64):
    terms = [CFG(4.0), LayerSkip(2.0)]
    both = run(sd15_f64, terms).latents
    for i, (prompt, negative) in enumerate(
        zip(["a lighthouse at dusk", "a bowl of fruit"], ["blurry", "dark"], strict=True)
    ):
        one = run(sd15_f64, terms, prompts=[prompt], negatives=[negative], seed=11 + i).latents
        assert maxdiff(both[i : i + 1], one) <= 1e-10


def test_layer_skip_on_sd3_uses_the_slg_preset_blocks():
    pipe = tiny_sd3(seed=0)
    pipe.set_progress_bar_config(disable=True)
    gp = GuidedPipeline(pipe)
    kwargs = {"width": 32, "height": 32, "steps": 2, "seed": 3, "decode": False}
    base = gp.generate(["a cat"], "ugly", guidance=[CFG(3.0)], **kwargs)
    out = gp.generate(["a cat"], "ugly", guidance=[CFG(3.0), LayerSkip(2.0, layers="b1")], **kwargs)
    assert out.forward_calls == 2 and maxdiff(out.latents, base.latents) > 1e-4
