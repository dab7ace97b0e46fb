"""The application layer (diffguide.app): typed requests -> runs, no typer involved."""

from __future__ import annotations

import pytest
import torch

from diffguide import CFG, PAG, ConfigError, GenerateConfig, LayerSpecError, app, testing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd15-app")
    testing.tiny_sd15(seed=0).save_pretrained(path)
    return str(path)


def test_generate_request_equals_the_library_call(folder):
    cfg = GenerateConfig.create("a cat", guidance=[CFG(4.0), PAG(2.0)], steps=3, seed=5)
    req = app.GenerateRequest(app.ModelRequest(folder), cfg, threads=1)
    pipe = app.load_model(req.model)
    out = app.generate(req, pipe, decode=False)
    assert out.forward_calls == 3
    assert torch.equal(out.latents, pipe.generate(cfg, decode=False).latents)
    (choice,) = app.dry_run_layers(pipe, cfg.guidance)
    assert choice.term == "pag" and choice.spec is None
    assert choice.modules == ("mid_block.attentions.0.transformer_blocks.0.attn1",)


def test_bad_requests_fail_before_sampling(folder):
    with pytest.raises(ConfigError, match=r"^unknown dtype 'float8'; one of: float32, float16, bfloat16$"):
        app.ModelRequest(folder, dtype="float8")
    cfg = GenerateConfig.create("a cat", guidance=[PAG(2.0, layers="up_blocks.9")], steps=2)
    pipe = app.load_model(app.ModelRequest(folder))
    calls = []
    handle = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LayerSpecError, match=r"^layer .up_blocks\.9. is not a module of this model"):
            app.generate(app.GenerateRequest(app.ModelRequest(folder), cfg), pipe)
    finally:
        handle.remove()
    assert calls == []
