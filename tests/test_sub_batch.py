"""ForwardContext.sub_batch: when a perturbation runs a module on part of the rows (PAG's processor
runs the original attention on the rows outside its branch), the other branches' rows are given in
that part's coordinates, so two perturbations on one module each edit their own rows."""

from __future__ import annotations

from diffguide.perturb import BranchRows, ForwardContext


def ctx_with(**rows: tuple[int, int]) -> ForwardContext:
    ctx = ForwardContext(seeds=(0, 1))
    ctx.rows = {k: BranchRows(slice(a, b), tuple(range(b - a))) for k, (a, b) in rows.items()}
    return ctx


def test_outside_shifts_later_branches_and_drops_the_excluded_one():
    # rows: uncond 0-1, cond 2-3, pag 4-5, seg 6-7 (n = 8); PAG runs the others as 6 rows
    ctx = ctx_with(uncond=(0, 2), pag=(4, 6), seg=(6, 8))
    with ctx.sub_batch(slice(4, 6), 8, inside=False):
        assert ctx.rows == {
            "uncond": BranchRows(slice(0, 2), (0, 1)),
            "seg": BranchRows(slice(4, 6), (0, 1)),
        }
    assert ctx.rows["seg"] == BranchRows(slice(6, 8), (0, 1))  # restored


def test_inside_keeps_only_the_overlap():
    ctx = ctx_with(uncond=(0, 2), pag=(4, 6), seg=(6, 8))
    with ctx.sub_batch(slice(4, 6), 8, inside=True):
        assert ctx.rows == {"pag": BranchRows(slice(0, 2), (0, 1))}
    with ctx.sub_batch(slice(1, 3), 8, inside=True):  # a chunk-like window cutting a branch
        assert ctx.rows == {"uncond": BranchRows(slice(0, 1), (1,))}


def test_outside_of_a_middle_slice_joins_a_straddling_branch():
    ctx = ctx_with(big=(0, 6))
    with ctx.sub_batch(slice(2, 4), 6, inside=False):
        assert ctx.rows == {"big": BranchRows(slice(0, 4), (0, 1, 4, 5))}
