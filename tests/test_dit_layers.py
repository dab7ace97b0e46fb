"""Layer addressing on transformers: exact names, block indices, ranges, b/s short forms,
AuraFlow's joint_transformer_blocks, past-the-end errors, presets per family, and the
``layers`` command on a transformer model folder."""

from __future__ import annotations

import json

import dit_support as ds
import pytest
from typer.testing import CliRunner

from diffguide import ConfigError, LayerSpecError
from diffguide.cli.main import app
from diffguide.errors import BlockIndexError
from diffguide.models.layers import block_stacks, is_dit, unit_table
from diffguide.models.presets import default_layers
from diffguide.perturb import BlockSkip, IdentityAttention, TokenShuffle


@pytest.fixture(scope="module")
def sd3():
    return ds.sd3(layers=12).model


@pytest.fixture(scope="module")
def flux():
    return ds.flux(layers=3, single=10).model


@pytest.fixture(scope="module")
def aura():
    return ds.auraflow(joint=2, single=10).model


def tb(ks, stack="transformer_blocks"):
    return [f"{stack}.{k}" for k in ks]


def test_block_stacks_per_family(sd3, flux, aura):
    assert [(s.alias, s.name, s.blocks) for s in block_stacks(sd3)] == [("b0-11", "transformer_blocks", 12)]
    assert [(s.alias, s.name) for s in block_stacks(flux)] == [
        ("b0-2", "transformer_blocks"),
        ("s0-9", "single_transformer_blocks"),
    ]
    assert [(s.alias, s.name) for s in block_stacks(aura)] == [
        ("b0-1", "joint_transformer_blocks"),
        ("s0-9", "single_transformer_blocks"),
    ]
    assert is_dit(sd3) and [(u.alias, u.name, u.blocks) for u in unit_table(flux)] == [
        ("b0-2", "transformer_blocks", 3),
        ("s0-9", "single_transformer_blocks", 10),
    ]


def test_exact_names_indices_and_ranges(sd3, flux):
    assert BlockSkip("transformer_blocks.7").targets(sd3) == tb([7])
    assert BlockSkip("transformer_blocks.7-9").targets(sd3) == tb([7, 8, 9])
    assert BlockSkip("single_transformer_blocks.0-9").targets(flux) == tb(
        range(10), "single_transformer_blocks"
    )
    assert TokenShuffle("transformer_blocks.1").targets(sd3) == tb([1])  # never .10 or .11
    assert IdentityAttention("transformer_blocks.1").targets(sd3) == ["transformer_blocks.1.attn"]
    assert IdentityAttention("transformer_blocks.7.attn").targets(sd3) == ["transformer_blocks.7.attn"]
    # a whole stack, and a block named inside a bigger item
    assert BlockSkip("transformer_blocks").targets(sd3) == tb(range(12))


def test_short_forms(sd3, flux, aura):
    assert BlockSkip("b7-9").targets(sd3) == tb([7, 8, 9])
    assert BlockSkip("b7").targets(sd3) == tb([7])
    assert BlockSkip("b2,s0-1").targets(flux) == tb([2]) + tb([0, 1], "single_transformer_blocks")
    assert BlockSkip("s9").targets(flux) == tb([9], "single_transformer_blocks")
    # AuraFlow: b = joint_transformer_blocks, s = single_transformer_blocks
    assert BlockSkip("b0-1").targets(aura) == tb([0, 1], "joint_transformer_blocks")
    assert IdentityAttention("b1,s3").targets(aura) == [
        "joint_transformer_blocks.1.attn",
        "single_transformer_blocks.3.attn",
    ]
    assert TokenShuffle("s2-3").targets(aura) == tb([2, 3], "single_transformer_blocks")


def test_sd35_blocks_hold_two_attentions():
    model = ds.sd35(layers=4).model
    assert IdentityAttention("b1-3").targets(model) == [
        "transformer_blocks.1.attn",
        "transformer_blocks.1.attn2",
        "transformer_blocks.2.attn",
        "transformer_blocks.2.attn2",
        "transformer_blocks.3.attn",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("b12", "layer 'b12': block 12 is past the last block; transformer_blocks has blocks 0..11 (b0-11)"),
        (
            "b7-20",
            "layer 'b7-20': block 20 is past the last block; transformer_blocks has blocks 0..11 (b0-11)",
        ),
        (
            "transformer_blocks.12",
            "layer 'transformer_blocks.12': block 12 is past the last block; transformer_blocks has blocks "
            "0..11 (b0-11)",
        ),
        (
            "transformer_blocks.10-13",
            "layer 'transformer_blocks.10-13': block 12 is past the last block; transformer_blocks has "
            "blocks 0..11 (b0-11)",
        ),
    ],
)
def test_index_past_the_last_block(sd3, spec, message):
    with pytest.raises(BlockIndexError) as err:
        BlockSkip(spec).targets(sd3)
    assert str(err.value) == message
    assert isinstance(err.value, ConfigError) and isinstance(err.value, LayerSpecError)


def test_single_stack_errors(sd3, flux):
    with pytest.raises(
        BlockIndexError, match=r"^layer 's10': .*single_transformer_blocks has blocks 0..9 \(s0-9\)$"
    ):
        BlockSkip("s10").targets(flux)
    with pytest.raises(LayerSpecError, match=r"^layer 's0': this model has no single-stream blocks\. Valid:"):
        BlockSkip("s0").targets(sd3)


def test_unknown_names_on_a_dit(sd3):
    with pytest.raises(LayerSpecError) as err:
        BlockSkip("mid").targets(sd3)
    msg = str(err.value)
    assert "'mid' is not a module of this model" in msg and "b0-11=transformer_blocks (12 blocks)" in msg
    assert "\n" not in msg
    with pytest.raises(LayerSpecError, match="Did you mean: transformer_blocks"):
        BlockSkip("transformer_block.1").targets(sd3)
    with pytest.raises(LayerSpecError, match="start above end"):
        BlockSkip("b9-7").targets(sd3)
    with pytest.raises(LayerSpecError, match="selects no module of the needed kind"):
        IdentityAttention("transformer_blocks.1.ff").targets(sd3)


def test_presets_per_family():
    sd3 = ds.sd3(layers=14).model
    assert default_layers(sd3, "slg") == "b7-9" and default_layers(sd3, "pag") == "b13"
    assert IdentityAttention().targets(sd3) == ["transformer_blocks.13.attn"]
    assert BlockSkip().targets(sd3) == tb([7, 8, 9])
    assert TokenShuffle().targets(sd3) == tb([7, 8, 9])
    flux = ds.flux(layers=10, single=10).model
    assert BlockSkip().targets(flux) == tb([7, 8, 9]) + tb([7, 8, 9], "single_transformer_blocks")
    aura = ds.auraflow(joint=2, single=10).model
    assert BlockSkip().targets(aura) == tb([7, 8, 9], "single_transformer_blocks")
    qwen = ds.qwen(layers=10).model
    assert TokenShuffle().targets(qwen) == tb([7, 8, 9])


def test_preset_on_a_shallow_model_asks_for_layers(sd3):
    with pytest.raises(
        LayerSpecError,
        match=r"^the SD3 PAG preset 'b13' needs block b13, but this model has 12 joint blocks; give its layers$",
    ):
        IdentityAttention().targets(sd3)


def test_unet_has_no_slg_preset(sd15_pipe):
    with pytest.raises(LayerSpecError, match="SLG has no preset for UNets"):
        BlockSkip().targets(sd15_pipe.unet)
    # on a UNet a block skip takes transformer blocks by name
    assert BlockSkip("mid").targets(sd15_pipe.unet) == ["mid_block.attentions.0.transformer_blocks.0"]


# --- the layers command on a transformer folder --------------------------------------------------


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A diffusers folder with only model_index.json and transformer/config.json (the layers
    command builds the network from its config on the meta device)."""
    root = tmp_path_factory.mktemp("tiny-sd3")
    ds.sd3(layers=14).model.save_config(root / "transformer")
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
        )
    )
    return root


def test_layers_command_lists_dit_blocks_and_presets(sd3_dir):
    res = CliRunner().invoke(app, ["layers", "--model", str(sd3_dir)])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()]
    assert ["b0-13", "transformer_blocks", "14"] in rows
    assert ["pag", "b13", "1", "attention", "module"] in rows
    assert ["tpg", "b7-9", "3", "transformer", "blocks"] in rows
    assert ["slg", "b7-9", "3", "transformer", "blocks"] in rows


def test_layers_command_dry_runs_dit_specs(sd3_dir):
    res = CliRunner().invoke(
        app, ["layers", "-m", str(sd3_dir), "--slg", "b7-8", "--pag", "transformer_blocks.2"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == ["transformer_blocks.2.attn", "transformer_blocks.7", "transformer_blocks.8"]
    assert "# slg 'b7-8': 2 transformer blocks" in res.stderr
    assert "# pag 'transformer_blocks.2': 1 attention module" in res.stderr
    res = CliRunner().invoke(app, ["layers", "-m", str(sd3_dir), "--slg", "b14"])
    assert res.exit_code == 2
    assert res.stderr == (
        "error: layer 'b14': block 14 is past the last block; transformer_blocks has blocks 0..13 (b0-13)\n"
    )
