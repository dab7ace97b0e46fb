"""NAG and PLADIS together (both change the conditional rows in place): NAG on the PLADIS model.

Every row's cross-attention uses PLADIS's map; on the prompt rows NAG's z+ and z- are computed with
that map too, then mixed. Checked against an independent reference loop (per-head attention with
the bisection entmax, NAG's official steps on the conditional calls), in one forward per step,
in any term order, chunked, with PAG and per image."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from guide_support import (
    PROMPTS,
    STEPS,
    check_chunks_and_per_image,
    check_restored,
    maxdiff,
    reference,
    run,
)
from test_nag import ref_nag
from test_pladis import entmax_bisect

from diffguide import CFG, PAG, ConfigError, Window
from diffguide.guidance import NAG, PLADIS

TOL = 1e-4
PHI, TAU, ALPHA, LAM = 4.0, 2.0, 0.5, 2.0


def ref_pladis_map(scores: torch.Tensor) -> torch.Tensor:
    """PLADIS's map: softmax + LAM (entmax 1.5 by bisection - softmax)."""
    dense = scores.softmax(-1)
    return dense + LAM * (entmax_bisect(scores, 1.5) - dense)


def ref_both(pipe, w: float):
    """attn2 head by head with the PLADIS map; NAG on the conditional calls (test_nag.ref_nag)."""
    return ref_nag(pipe, w, PHI, TAU, ALPHA, amap=ref_pladis_map)


TERMS = [NAG(PHI, tau=TAU, alpha=ALPHA), PLADIS(LAM)]


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_nag_and_pladis_match_reference(sd15_pipe, sd15, unet_calls, w):
    with ref_both(sd15_pipe, w)():
        expected = reference(sd15_pipe, w, 0.0, nullcontext)
    cfg = [CFG(w)] if w != 1.0 else []
    with unet_calls(sd15.unet) as log:
        got = run(sd15, cfg + TERMS)
    assert log.rows == [len(PROMPTS) * (2 if w != 1.0 else 1)] * STEPS  # no extra rows
    d = maxdiff(expected, got.latents)
    print(f"NAG + PLADIS, CFG {w}, vs reference: {d:.2e}")
    assert d <= TOL
    assert torch.equal(run(sd15, cfg + TERMS[::-1]).latents, got.latents)  # term order does not matter
    for one in TERMS:
        assert maxdiff(got.latents, run(sd15, [*cfg, one]).latents) > 1e-3  # both act


def test_nag_and_pladis_chunks_pag_and_per_image(sd15, unet_calls):
    terms = [CFG(4.0), PAG(2.0), *TERMS]
    with unet_calls(sd15.unet) as log:
        out = run(sd15, terms)
    assert log.rows == [3 * len(PROMPTS)] * STEPS and out.forward_calls == STEPS
    check_chunks_and_per_image(sd15, terms, out, TOL)


def test_nag_and_pladis_windows(sd15):
    """Each part only inside its own term's window: PLADIS late only equals NAG alone early on."""
    late = PLADIS(LAM, window=Window(start=0.5))
    both = run(sd15, [CFG(4.0), TERMS[0], late]).latents
    assert maxdiff(both, run(sd15, [CFG(4.0), *TERMS]).latents) > 1e-4
    assert maxdiff(both, run(sd15, [CFG(4.0), TERMS[0]]).latents) > 1e-4
    off = PLADIS(LAM, window=Window(start=0.99))  # never active in 3 steps
    assert torch.equal(run(sd15, [CFG(4.0), TERMS[0], off]).latents, run(sd15, [CFG(4.0), TERMS[0]]).latents)


def test_nag_and_pladis_restored_and_errors(sd15):
    check_restored(sd15, [CFG(4.0), *TERMS])
    with pytest.raises(
        ConfigError, match="two guidance terms perturb the conditional rows; keep one of them"
    ):
        run(sd15, [NAG(), NAG(name="nag2")])
