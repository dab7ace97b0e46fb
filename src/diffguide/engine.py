"""The guided model: all branches of a step in one batched forward.

At each step the active terms declare the branches they need. Rows are laid out branch by
branch, ``[uncond?, cond, perturbed_1, ...]`` with B images each (the order diffusers' PAG
pipelines use), so row ``k * B + i`` is image i of branch k. The rows run as ONE forward,
or in contiguous chunks of at most ``max_rows``; before each chunk the engine tells every
installed perturbation which of the chunk's rows are its own. A forward that runs out of
memory is repeated with half the rows per chunk (and the perturbations' random state as it
was before the failed try); the smaller size stays for the rest of the run and is recorded in
:attr:`GuidedModel.fallbacks`, so a replay can chunk each step the same way. Terms outside their window
add no rows. With ``prefix_sharing`` (the default), the model units before a perturbed branch's
first perturbed module run once for it and the conditional rows (:mod:`diffguide.prefix`).
Predictions are then split per branch and combined::

    g = c + sum_i term_i.delta(preds)      g = term_i.post(g, preds)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .checks import check_rows_schedule
from .errors import ConfigError, DiffguideError
from .guidance.base import COND, UNCOND, Branch, GuidanceTerm, RunState, StepInfo
from .models.denoiser import Conditioning, Denoiser
from .perturb.base import BranchRows, ForwardContext, in_scope, row_parts
from .perturb.stacked import Stacked
from .prefix import ChunkState, PrefixPlan, sharing


@dataclass(frozen=True)
class StepResult:
    """The guided prediction and every branch's prediction, each (B, C, H, W)."""

    guided: Tensor
    preds: dict[str, Tensor]


def _branch_table(terms: Sequence[GuidanceTerm]) -> dict[str, Branch]:
    table: dict[str, Branch] = {"cond": COND}
    for term in terms:
        for branch in term.branches():
            known = table.get(branch.name)
            if branch.name == "uncond" and known is not None and _shares_uncond(known, branch):
                table["uncond"] = branch if branch.perturbation is not None else known
                continue
            if branch.name == "cond" and branch.prompt == "cond" and known is not None:
                table["cond"] = _in_place_cond(known, branch)
                continue
            if branch.name == "uncond" and known is not None:
                raise ConfigError("two guidance terms perturb the unconditional rows; keep one of them")
            # A perturbed branch belongs to one term: two equal ones (e.g. two PAG() terms, both
            # named "pag") would otherwise both be laid out, with only the last copy perturbed.
            if known is not None and (known != branch or branch.perturbation is not None):
                raise ConfigError(
                    f"two guidance terms define a branch named '{branch.name}'; give one of them another name="
                )
            table[branch.name] = branch
    return table


def _shares_uncond(a: Branch, b: Branch) -> bool:
    """A term may perturb the unconditional rows in place (no extra branch): the plain and one
    perturbed ``uncond`` branch are then the same rows, evaluated once, perturbed."""
    return a.prompt == b.prompt == "uncond" and (a.perturbation is None or b.perturbation is None)


def _in_place_cond(known: Branch, branch: Branch) -> Branch:
    """A term may perturb the conditional rows in place (PLADIS: a model-wide change, no extra rows);
    NAG and PLADIS together stack (:class:`~diffguide.perturb.stacked.Stacked`), others are an error."""
    if known.perturbation is not None and branch.perturbation is not None:
        return Branch("cond", "cond", Stacked.of(known.perturbation, branch.perturbation))
    return branch if branch.perturbation is not None else known


class GuidedModel:
    """Evaluates the guided prediction for a batch of B images at one step."""

    def __init__(
        self,
        denoiser: Denoiser,
        terms: Sequence[GuidanceTerm],
        cond: Conditioning,
        uncond: Conditioning | None,
        seeds: Sequence[int],
        max_rows: int | None = None,
        rows_schedule: Mapping[int, int] | None = None,
        on_retry: Callable[[], None] | None = None,
        prefix_sharing: bool = True,
        compaction: Any | None = None,
    ) -> None:
        """``rows_schedule``: {step: max_rows from that step on}, e.g. a recorded run's
        :attr:`fallbacks`, to chunk every step exactly as that run did. ``on_retry``: called
        when a step's forwards are abandoned and repeated (see :meth:`ForwardContext.rollback`).
        ``prefix_sharing``: perturbed branches reuse the conditional rows' work before their first
        perturbed unit (:mod:`diffguide.prefix`); False runs every row through every unit.
        ``compaction``: the family's exact text-token compaction for the run (its ``installed(model,
        perturbations)`` context; :mod:`diffguide.models.families.sd3_compact`), or None."""
        self.denoiser, self.terms = denoiser, tuple(terms)
        self.branches = _branch_table(self.terms)
        if "uncond" in self.branches and uncond is None:
            raise ConfigError(
                "a guidance term needs the unconditional branch but no negative conditioning was given"
            )
        if uncond is not None and uncond.batch != cond.batch:
            raise ConfigError(f"negative conditioning has {uncond.batch} rows, the prompt {cond.batch}")
        if len(seeds) != cond.batch:
            raise ConfigError(f"{len(seeds)} seeds for {cond.batch} images: give one seed per image")
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        check = getattr(denoiser, "check", None)
        for c in (cond, uncond):
            if check is not None and c is not None:
                check(c)
        self.cond, self.uncond, self.max_rows = cond, uncond, max_rows
        self.ctx = ForwardContext(tuple(seeds), retry_listeners=[on_retry] if on_retry else [])
        self.ctx.negative = None if uncond is None else uncond.tensors.get("embeds")
        self.ctx.negative_pooled = None if uncond is None else uncond.tensors.get("pooled")
        self._rows_cache: dict[tuple[str, ...], Conditioning] = {}
        self.forward_calls = 0
        self.rows_evaluated = 0  # batch rows through the model, summed over the calls (the cost)
        self.rows_schedule = check_rows_schedule(rows_schedule)
        self.fallbacks: dict[int, int] = {}  # step -> max_rows from then on, after running out of memory
        self.prefix_sharing = prefix_sharing
        self.compaction = compaction
        self._prefix: PrefixPlan | None = None  # while installed, when some branch shares a prefix
        self._chunk = ChunkState()
        self.run_state = RunState()  # stateful terms' memory (APG momentum); fresh for every run

    @contextmanager
    def installed(self) -> Iterator[GuidedModel]:
        """Install every perturbation of every branch for the run; all removed on exit."""
        self.ctx.generators.clear()  # every run draws from freshly seeded generators
        self.run_state = RunState()  # and no term remembers a previous run
        with ExitStack() as stack:
            for branch in self.branches.values():
                if branch.perturbation is not None:
                    stack.enter_context(
                        branch.perturbation.install(self.denoiser.model, branch.name, self.ctx)
                    )
            if self.compaction is not None:  # after the perturbations: it checks what they installed
                perturbations = [b.perturbation for b in self.branches.values() if b.perturbation is not None]
                stack.enter_context(self.compaction.installed(self.denoiser.model, perturbations))
            plan = PrefixPlan(self.denoiser.model, self.branches.values()) if self.prefix_sharing else None
            if plan is not None and plan.shared_units:  # after the perturbations: its wrappers are outermost
                stack.enter_context(sharing(self.denoiser.model, plan, self.ctx, self._chunk))
                self._prefix = plan
                stack.callback(setattr, self, "_prefix", None)
            yield self

    def active_branches(self, step: StepInfo) -> tuple[list[GuidanceTerm], list[Branch]]:
        terms = [t for t in self.terms if t.active(step)]
        names = {b.name for t in terms for b in t.branches()}
        perturbed = [
            b for t in terms for b in t.branches() if b.name == "uncond" and b.perturbation is not None
        ]
        order = [perturbed[0] if perturbed else UNCOND] if "uncond" in names else []
        in_place = [b for t in terms for b in t.branches() if b.name == "cond" and b.perturbation is not None]
        stacked = self.branches["cond"].perturbation
        if in_place and isinstance(stacked, Stacked):  # the active terms' parts, under their row keys
            in_place = [Branch("cond", "cond", stacked.only([b.perturbation for b in in_place]))]
        order.append(in_place[0] if in_place else COND)
        order += [b for t in terms for b in t.branches() if b.name not in ("cond", "uncond")]
        return terms, order

    def _conditioning(self, branches: list[Branch]) -> Conditioning:
        key = tuple(b.name for b in branches)
        if key not in self._rows_cache:
            parts = [self.cond if b.prompt == "cond" else self.uncond for b in branches]
            self._rows_cache[key] = Conditioning.cat([p for p in parts if p is not None])
        return self._rows_cache[key]

    def _forward(
        self, x: Tensor, t: Tensor, cond: Conditioning, branches: list[Branch], batch: int, step: int
    ) -> Tensor:
        if step in self.rows_schedule:
            self.max_rows = self.rows_schedule[step]
        while True:
            size = min(self.max_rows or x.shape[0], x.shape[0])
            state = self.ctx.checkpoint()
            try:
                return self._forward_chunks(x, t, cond, branches, batch, size)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                if size == 1:
                    raise OutOfMemory(
                        "out of memory with one row per forward: lower the resolution or the batch, "
                        "use --dtype float16/bfloat16, or run on a device with more memory"
                    ) from err
            # outside the except block, so the failed attempt's frames (and tensors) are gone
            self.ctx.rollback(state)
            self.max_rows = (size + 1) // 2
            self.fallbacks[step] = self.max_rows
            free_cached_memory(x.device)

    def _forward_chunks(
        self, x: Tensor, t: Tensor, cond: Conditioning, branches: list[Branch], batch: int, size: int
    ) -> Tensor:
        total = x.shape[0]
        outs = []
        for start in range(0, total, size):
            stop = min(start + size, total)
            self.ctx.rows = _rows_in(branches, batch, start, stop)
            if self._prefix is not None:
                self._chunk.units = self._prefix.chunk(branches, batch, start, stop, x.device)
            try:
                tt = t[start:stop] if t.ndim > 0 else t
                outs.append(self.denoiser(x[start:stop], tt, cond.rows(start, stop)))
                self.forward_calls += 1
                self.rows_evaluated += stop - start
            finally:
                self.ctx.rows = {}
                self._chunk.units = None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, x: Tensor, t: Tensor, step: StepInfo) -> StepResult:
        """x: (B, C, H, W) scaled model input; t: model timestep (scalar or (B,))."""
        batch = x.shape[0]
        terms, branches = self.active_branches(step)
        rows_x = torch.cat([x] * len(branches)) if len(branches) > 1 else x  # (K*B, C, H, W)
        rows_t = torch.cat([t] * len(branches)) if t.ndim > 0 else t
        out = self._forward(rows_x, rows_t, self._conditioning(branches), branches, batch, step.index)
        preds = {b.name: out[k * batch : (k + 1) * batch] for k, b in enumerate(branches)}
        step = replace(step, state=self.run_state)
        guided = preds["cond"]
        for term in terms:
            guided = guided + term.delta(preds, step)
        for term in terms:
            guided = term.post(guided, preds, step)
        return StepResult(guided, preds)


class OutOfMemory(DiffguideError):
    """Even one row per forward does not fit in memory."""


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (any accelerator), or the CPU allocator's failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    messages = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory")
    return isinstance(err, RuntimeError) and any(m in str(err) for m in messages)


def free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _rows_in(branches: list[Branch], batch: int, start: int, stop: int) -> dict[str, BranchRows]:
    """For each perturbed branch, its rows within the chunk [start, stop), chunk-relative
    (with its perturbation's ``scope``, the rows of other branches too: :func:`in_scope`)."""
    rows = {}
    for k, branch in enumerate(branches):
        if branch.perturbation is None:
            continue
        for key, part in row_parts(branch):
            mine = [r for r in range(start, stop) if in_scope(branches, k, r // batch, part)]
            if mine:
                rows[key] = BranchRows(
                    slice(mine[0] - start, mine[-1] - start + 1), tuple(r % batch for r in mine)
                )
    return rows
