"""``sample_validation`` on a denoiser the way trainers hold it: wrapped in a real
``DistributedDataParallel`` (gloo, world size 1, CPU) and compiled with ``torch.compile``. The
samples equal the unwrapped model's bit for bit (the wrappers are unwrapped, never copied), and the
wrapped model still trains / runs as before afterwards."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from diffguide import testing
from diffguide.validation import sample_validation

PROMPT = {"prompt": "a cat", "negative": "blurry", "seeds": [5], "steps": 3}


def sample(model, parts, out):
    r = sample_validation(model, [PROMPT], step=0, out_dir=out, components=parts, threads=1)
    manifest = json.loads((r.folder / "0-5.json").read_text())
    return r.latents[0], manifest


def parts_of(pipe):
    return {k: v for k, v in pipe.components.items() if k != "unet"}


def batch(pipe):
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500]), embeds


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_unet_samples_like_the_plain_one(tmp_path, process_group):
    pipe = testing.tiny_sd15(0)
    unet = pipe.unet
    plain, _ = sample(unet, parts_of(pipe), tmp_path / "plain")
    ddp = DistributedDataParallel(unet.train())
    got, manifest = sample(ddp, parts_of(pipe), tmp_path / "ddp")
    assert torch.equal(got, plain)
    assert manifest["model"]["hashes"]["unet"]  # the UNet itself was hashed and sampled
    assert ddp.training and unet.training  # train mode as before
    # the DDP model still trains: its gradient hooks fire and all-reduce (world size 1)
    x, t, embeds = batch(pipe)
    loss = F.mse_loss(ddp(x, t, encoder_hidden_states=embeds).sample, torch.zeros_like(x))
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_compiled_unet_samples_like_the_plain_one(tmp_path):
    pipe = testing.tiny_sd15(0)
    unet = pipe.unet.eval()
    x, t, embeds = batch(pipe)
    # aot_eager: dynamo's graph capture and AOT autograd without inductor's C++ codegen, so no
    # compiler is needed and it is fast (inductor's first call took 281 s on this 2-core machine)
    compiled = torch.compile(unet, backend="aot_eager")
    with torch.no_grad():
        before = compiled(x, t, encoder_hidden_states=embeds).sample
    plain, _ = sample(unet, parts_of(pipe), tmp_path / "plain")
    got, _ = sample(compiled, parts_of(pipe), tmp_path / "compiled")
    assert torch.equal(got, plain)
    with torch.no_grad():
        after = compiled(x, t, encoder_hidden_states=embeds).sample
        eager = unet(x, t, encoder_hidden_states=embeds).sample
    assert torch.equal(after, before)  # the compiled model runs as before
    assert (after - eager).abs().max().item() <= 1e-5
