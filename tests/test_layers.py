"""Layer addressing: exact names, ranges, down/mid/up, dN / dN.a-b / m0 / uN, and errors."""

from __future__ import annotations

import pytest
from torch import nn

from diffguide import LayerSpecError, testing
from diffguide.models.layers import attention_units, select
from diffguide.perturb import IdentityAttention, TokenShuffle
from diffguide.perturb.identity_attention import is_self_attention
from diffguide.perturb.token_shuffle import is_transformer_block

D2 = "down_blocks.2.attentions.0"
D3 = "down_blocks.2.attentions.1"


@pytest.fixture(scope="module")
def deep_unet():
    """SDXL-shaped: d0, d1 in down_blocks.1 (2 blocks each), d2, d3 in down_blocks.2 with 11
    transformer blocks each, so that both ``transformer_blocks.1`` and ``.10`` exist."""
    return testing.sdxl_unet(channels=(32, 64, 64), layers=(1, 2, 11))


def blocks(unit: str, ks) -> list[str]:
    return [f"{unit}.transformer_blocks.{k}" for k in ks]


def attn1(names: list[str]) -> list[str]:
    return [f"{n}.attn1" for n in names]


def test_attention_units_and_aliases(deep_unet):
    units = {u.alias: (u.name, u.blocks) for u in attention_units(deep_unet)}
    assert units["d0"] == ("down_blocks.1.attentions.0", 2)
    assert units["d1"] == ("down_blocks.1.attentions.1", 2)
    assert units["d2"] == (D2, 11)
    assert units["d3"] == (D3, 11)
    assert units["m0"] == ("mid_block.attentions.0", 11)
    assert units["u0"] == ("up_blocks.0.attentions.0", 11)
    assert units["u3"] == ("up_blocks.1.attentions.0", 2)
    assert set(units) == {"d0", "d1", "d2", "d3", "m0", "u0", "u1", "u2", "u3", "u4", "u5"}


def test_exact_names(deep_unet):
    name = "mid_block.attentions.0.transformer_blocks.3.attn1"
    assert IdentityAttention(name).targets(deep_unet) == [name]
    # a whole unit: every self-attention below it, in model order
    assert IdentityAttention(D3).targets(deep_unet) == attn1(blocks(D3, range(11)))
    assert TokenShuffle(f"{D2}.transformer_blocks.4").targets(deep_unet) == blocks(D2, [4])
    # cross-attention is never a PAG target, even when named exactly
    with pytest.raises(LayerSpecError, match="selects no module of the needed kind"):
        IdentityAttention("mid_block.attentions.0.transformer_blocks.3.attn2").targets(deep_unet)


def test_ranges_in_numeric_parts(deep_unet):
    assert TokenShuffle(f"{D2}.transformer_blocks.2-9").targets(deep_unet) == blocks(D2, range(2, 10))
    got = TokenShuffle("down_blocks.2.attentions.0-1.transformer_blocks.9-10").targets(deep_unet)
    assert got == blocks(D2, [9, 10]) + blocks(D3, [9, 10])


def test_down_mid_up(deep_unet):
    every = [n for n, m in deep_unet.named_modules() if is_self_attention(n, m)]
    for part, prefix in (("down", "down_blocks."), ("mid", "mid_block."), ("up", "up_blocks.")):
        got = IdentityAttention(part).targets(deep_unet)
        assert got == [n for n in every if n.startswith(prefix)] and got
    assert IdentityAttention("down,mid,up").targets(deep_unet) == every
    assert IdentityAttention("mid").targets(deep_unet) == attn1(blocks("mid_block.attentions.0", range(11)))


def test_unit_shorthands(deep_unet):
    assert TokenShuffle("d2").targets(deep_unet) == blocks(D2, range(11))
    assert TokenShuffle("d2.2-9").targets(deep_unet) == blocks(D2, range(2, 10))
    assert TokenShuffle("d2.10").targets(deep_unet) == blocks(D2, [10])
    assert TokenShuffle("d0").targets(deep_unet) == blocks("down_blocks.1.attentions.0", [0, 1])
    assert TokenShuffle("m0.0").targets(deep_unet) == blocks("mid_block.attentions.0", [0])
    assert TokenShuffle("u3").targets(deep_unet) == blocks("up_blocks.1.attentions.0", [0, 1])
    assert IdentityAttention("d1.1").targets(deep_unet) == attn1(blocks("down_blocks.1.attentions.1", [1]))
    # items combine (union, model order, no duplicates)
    assert TokenShuffle("d2.2-9,d3").targets(deep_unet) == blocks(D2, range(2, 10)) + blocks(D3, range(11))
    assert TokenShuffle("d3, d2.0, d2.0").targets(deep_unet) == blocks(D2, [0]) + blocks(D3, range(11))


def test_prefix_1_never_selects_10(deep_unet):
    assert TokenShuffle(f"{D2}.transformer_blocks.1").targets(deep_unet) == blocks(D2, [1])
    assert IdentityAttention(f"{D2}.transformer_blocks.1").targets(deep_unet) == attn1(blocks(D2, [1]))
    assert TokenShuffle("d2.1").targets(deep_unet) == blocks(D2, [1])
    # "down_blocks.1" selects down_blocks.1 only, nothing of down_blocks.10.. or .2
    got = TokenShuffle("down_blocks.1").targets(deep_unet)
    assert got and all(n.startswith("down_blocks.1.") for n in got)


def test_matcher_on_plain_names():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])

    def linear(name, module):
        return isinstance(module, nn.Linear)

    net = Net()
    assert select(net, "blocks.1", linear) == ["blocks.1"]
    assert select(net, "blocks.10", linear) == ["blocks.10"]
    assert select(net, "blocks.9-11", linear) == ["blocks.9", "blocks.10", "blocks.11"]
    assert select(net, "blocks", linear) == [f"blocks.{i}" for i in range(12)]


def test_kind_filters():
    assert is_transformer_block("x.transformer_blocks.0", nn.Module()) is False
    block = nn.Module()
    block.attn1 = nn.Identity()
    assert is_transformer_block("x.transformer_blocks.0", block)


# --- errors -----------------------------------------------------------------------------------


def test_unknown_layer_lists_valid_names(deep_unet):
    with pytest.raises(LayerSpecError) as err:
        TokenShuffle("down_blocks.7").targets(deep_unet)
    msg = str(err.value)
    assert "'down_blocks.7' is not a module of this model" in msg
    assert (
        "Valid: down, mid, up" in msg and f"d2={D2} (11 blocks)" in msg and "m0=mid_block.attentions.0" in msg
    )


def test_typo_gets_a_suggestion(deep_unet):
    with pytest.raises(LayerSpecError, match=r"Did you mean: mid_block\b"):
        IdentityAttention("mid_blok").targets(deep_unet)


def test_unknown_unit(deep_unet):
    with pytest.raises(LayerSpecError, match=r"no attention unit d9\. Valid"):
        TokenShuffle("d9").targets(deep_unet)


def test_unit_block_out_of_range(deep_unet):
    with pytest.raises(
        LayerSpecError, match=r"d2 \(down_blocks.2.attentions.0\) has transformer blocks 0..10"
    ):
        TokenShuffle("d2.11").targets(deep_unet)
    with pytest.raises(LayerSpecError, match="has transformer blocks"):
        TokenShuffle("d2.5-3").targets(deep_unet)


@pytest.mark.parametrize("spec", ["", " ", ",", " , "])
def test_empty_spec(deep_unet, spec):
    with pytest.raises(LayerSpecError, match="empty layer spec"):
        select(deep_unet, spec, is_transformer_block)


def test_empty_spec_on_a_term_is_an_error_not_the_preset(sd15_pipe):
    """ "" is falsy: the perturbations treat it as 'no spec' and fall back to the preset.
    An explicitly empty spec should be an error, not silently the default layers."""
    with pytest.raises(LayerSpecError, match="empty layer spec"):
        IdentityAttention("").targets(sd15_pipe.unet)


def test_range_start_above_end(deep_unet):
    with pytest.raises(LayerSpecError, match="start above end"):
        TokenShuffle(f"{D2}.transformer_blocks.5-2").targets(deep_unet)


def test_item_that_selects_no_module_of_the_kind(deep_unet, sd15):
    with pytest.raises(
        LayerSpecError, match=r"'down_blocks\.0\.resnets\.0' selects no module of the needed kind"
    ):
        IdentityAttention("down_blocks.0.resnets.0").targets(deep_unet)
    # and through the API: every item of a spec must select something
    from diffguide import PAG

    with pytest.raises(LayerSpecError, match=r"down_blocks\.1\.resnets\.0"):
        sd15.generate("x", guidance=[PAG(3.0, layers="mid,down_blocks.1.resnets.0")], steps=1, decode=False)
