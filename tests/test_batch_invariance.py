"""Batch vs single: the stated tolerance, and batch-invariant mode (bit for bit).

Image i of a float32 batch differs from its seed run alone by rounding that depends on the CPU's
kernels (benchmarks/batch_vs_single.py measures it per kernel path); every test that compares a
batch with single runs uses the one bound ``BATCH_TOLERANCE``, relative to the latents' magnitude.
With ``batch_invariant=True`` each image is sampled alone and equals its single run exactly.
"""

from __future__ import annotations

import pytest
import torch

from diffguide import CFG, PAG, TPG, Conditioning, ConfigError, GenerateConfig
from diffguide.repro.determinism import BATCH_TOLERANCE, check_determinism

PROMPTS = ["a cat", "a dog", "a red car"]
TERMS = [CFG(4.0), PAG(2.0), TPG(2.0)]


def _alone(gp, i, **kw):
    return gp.generate(PROMPTS[i], seed=5 + i, decode=False, **kw)


@pytest.mark.parametrize("fixture", ["sd15", "sdxl"])
def test_batch_invariant_images_equal_their_single_runs_bit_for_bit(request, fixture):
    gp = request.getfixturevalue(fixture)
    kw = {"guidance": TERMS, "steps": 3}
    batch = gp.generate(PROMPTS, seed=5, decode=False, batch_invariant=True, **kw)
    for i in range(len(PROMPTS)):
        assert torch.equal(batch.latents[i : i + 1], _alone(gp, i, **kw).latents), f"image {i}"
    # one forward per image per step, each carrying that image's four branches
    assert batch.forward_calls == 3 * len(PROMPTS)
    m = batch.manifests[2]
    assert m["image"]["index"] == 2 and m["image"]["seed"] == 7 and m["image"]["prompt"] == "a red car"
    assert m["parameters"]["batch_invariant"] is True and list(m["parameters"]["prompts"]) == PROMPTS


def test_default_batches_stay_within_the_stated_relative_bound(sd15):
    kw = {"guidance": TERMS, "steps": 4}
    batch = sd15.generate(PROMPTS, seed=5, decode=False, **kw).latents
    for i in range(len(PROMPTS)):
        alone = _alone(sd15, i, **kw).latents
        assert ((batch[i : i + 1] - alone).abs() <= BATCH_TOLERANCE * (1 + alone.abs())).all(), f"image {i}"


def test_batch_invariant_decoded_images_and_check_determinism(sd15):
    cfg = GenerateConfig.create(
        PROMPTS[:2], guidance=[CFG(3.0), PAG(1.0)], steps=2, seed=5, batch_invariant=True
    )
    out = sd15.generate(cfg)
    alone = sd15.generate(PROMPTS[1], guidance=[CFG(3.0), PAG(1.0)], steps=2, seed=6)
    assert list(out.images[1].getdata()) == list(alone.images[0].getdata())
    checks = check_determinism(sd15, cfg, batch_vs_single=True)
    singles = [c for c in checks if "alone" in c.name]
    assert len(singles) == 2 and all(c.ok and c.expectation == "bit-identical" for c in singles)


def test_batch_invariant_refuses_whole_batch_comfy_noise():
    with pytest.raises(ConfigError, match="per-image noise"):
        GenerateConfig.create(PROMPTS, noise="comfy", batch_invariant=True)


def test_conditioning_file_is_cast_to_the_model_dtype(sd15_f64, tmp_path):
    """Embeddings saved in float32 drive a float64 model (as they would a float16 one): cast to the
    model's dtype, they give the encoded run's result up to the float32 rounding of the embeddings."""
    from diffguide.conditioning import ConditioningFile

    cfg = GenerateConfig.create("a cat", guidance=[CFG(3.0)], steps=2, seed=3)
    cond, uncond = sd15_f64.encode(cfg, 32, 32)

    def as_f32(c):
        return Conditioning(tensors={k: v.float() for k, v in c.tensors.items()})

    f32 = ConditioningFile(as_f32(cond), as_f32(uncond))
    assert f32.cond.embeds.dtype == torch.float32
    from_file = sd15_f64.generate(cfg, decode=False, conditioning=f32).latents
    encoded = sd15_f64.generate(cfg, decode=False).latents
    assert from_file.dtype == encoded.dtype == torch.float64
    assert (from_file - encoded).abs().max().item() <= 1e-4
