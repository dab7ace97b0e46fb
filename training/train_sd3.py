"""Train diffguide's second bundled model, tiny-sd3: a small SD3-architecture flow-matching model.

It reuses the first model's (tiny-sd, ``src/diffguide/assets/tiny-sd/``) VAE, CLIP BPE tokenizer and
trained CLIP text encoder, frozen, and trains only an ``SD3Transformer2DModel`` (rectified flow,
SD3's logit-normal timestep sampling, 10 % empty captions, EMA) on the same data
(MNIST digits + Fashion-MNIST, 32x32 pixels -> 8x8x4 latents).

Stages (in order; each resumable from training/runs/<run>/, default training/runs/sd3/):

    python training/train_sd3.py prepare                 # latents + prompt embeddings (cached)
    python training/train_sd3.py train --steps 2500      # the transformer (checkpoints every few min)
    python training/train_sd3.py export                  # diffusers folder -> src/diffguide/assets/tiny-sd3/

``python training/train_sd3.py all`` runs every stage in turn.  CPU only, one thread; per-step RNG is
derived from (seed, step), so a resumed run draws the same batches, noise and timesteps.

Text conditioning is exactly what diffusers' ``StableDiffusion3Pipeline.encode_prompt`` gives at
inference (no T5: ``text_encoder_3`` is None, so 256 zero "T5" tokens follow the 77 CLIP tokens), computed
once per caption.  The 256 zero tokens stay identical through every joint block (context tokens have no
position embedding), so training attends to one of them with an additive log(256) logit bias, which is
exactly attending to all 256 (checked at start) and makes a step ~2.5x cheaper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402
from common import (  # noqa: E402
    Checkpoint,
    Logger,
    Progress,
    atomic_save,
    batch_indices,
    count,
    ema_update,
    lr_at,
    set_lr,
    step_generator,
)

REPO = HERE.parent
BASE = REPO / "src" / "diffguide" / "assets" / "tiny-sd"  # the first model: VAE, tokenizer, text encoder
DEFAULT_EXPORT = REPO / "src" / "diffguide" / "assets" / "tiny-sd3"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length (zeros without T5)
SHIFT = 1.0  # flow shift: 8x8 latents need none (SD3's 3.0 is for 128x128)

TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=24,
    num_attention_heads=4,
    joint_attention_dim=128,  # two CLIP slots x 64 (the zero T5 tokens are 128-wide too)
    caption_projection_dim=96,  # = num_attention_heads * attention_head_dim
    pooled_projection_dim=128,  # two pooled CLIP outputs x 64
    pos_embed_max_size=4,  # in patches
)
N_IMAGE = (8 // TRANSFORMER_CONFIG["patch_size"]) ** 2  # image tokens of an 8x8 latent


# ----------------------------------------------------------------------------- components
def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def load_text_encoder():
    """tiny-sd's CLIPTextModel as CLIPTextModelWithProjection (identity projection: the pooled
    output is the plain pooled state)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = CLIPTextModel.from_pretrained(str(BASE / "text_encoder"), dtype=torch.float32)
    cfg = base.config
    enc = CLIPTextModelWithProjection(cfg)
    enc.text_model.load_state_dict(base.state_dict())
    with torch.no_grad():
        enc.text_projection.weight.copy_(torch.eye(cfg.projection_dim, cfg.hidden_size))
    return enc.eval()


def load_vae(shift: float | None = None, scaling: float | None = None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(BASE / "vae"), torch_dtype=torch.float32)
    if shift is not None:
        vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scaling))
    return vae.eval()


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def build_pipeline(transformer, vae):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(BASE / "tokenizer"))
    enc = load_text_encoder()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(), vae=vae,
        text_encoder=enc, tokenizer=tok, text_encoder_2=enc, tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


# ----------------------------------------------------------------------------- prepare
def stage_prepare(args, run: Path, log: Logger):
    out = run / "prepared.pt"
    if out.exists():
        log("prepare: cached")
        return
    vae = load_vae()
    images, labels = data.load_split("train")
    means, stds = [], []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = vae.encode(torch.from_numpy(data.to_model_space(images[i : i + 256]))).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    g = torch.Generator().manual_seed(args.seed)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    shift, scaling = sample.mean().item(), 1.0 / sample.std().item()  # SD3 convention: (z - shift) * scaling
    log(f"prepare: latents {tuple(mean.shape)} in {time.time() - t0:.0f}s; shift_factor {shift:.5f} "
        f"scaling_factor {scaling:.5f}")  # fmt: skip
    pipe = build_pipeline(make_transformer(), vae)
    prompts = [*data.CAPTIONS, ""]  # index 20 = unconditional (CFG dropout)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=False,
        )  # fmt: skip
    assert embeds.shape == (21, 77 + T5_TOKENS, 128), embeds.shape
    assert torch.all(embeds[:, 77:] == 0)
    log(f"prepare: prompt embeds {tuple(embeds.shape)} pooled {tuple(pooled.shape)}")
    atomic_save({"mean": mean, "std": std, "labels": torch.from_numpy(labels), "shift_factor": shift,
                 "scaling_factor": scaling, "embeds": embeds, "pooled": pooled}, out)  # fmt: skip


# ----------------------------------------------------------------------------- compressed context
class BiasedJointAttn:
    """diffusers' JointAttnProcessor2_0 (no qk norm) plus an additive key bias: with the zero T5
    tokens reduced to one key carrying +log(256), attention is the same as over all 256 copies."""

    def __init__(self):
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n = hidden_states.shape[0], hidden_states.shape[1]
        h = attn.heads

        def split(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q = torch.cat([split(attn.to_q(hidden_states)), split(attn.add_q_proj(encoder_hidden_states))], 2)
        k = torch.cat([split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))], 2)
        v = torch.cat([split(attn.to_v(hidden_states)), split(attn.add_v_proj(encoder_hidden_states))], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        o = o.transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        hs, ehs = o[:, :n], o[:, n:]
        if not attn.context_pre_only:
            ehs = attn.to_add_out(ehs)
        return attn.to_out[0](hs), ehs


def use_compressed(model, n_image: int) -> None:
    proc = BiasedJointAttn()
    bias = torch.zeros(1, 1, 1, n_image + 78)
    bias[..., -1] = math.log(T5_TOKENS)
    proc.bias = bias
    model.set_attn_processor(proc)


def compress(embeds: torch.Tensor) -> torch.Tensor:
    return embeds[:, :78]  # 77 CLIP tokens + one of the identical zero T5 tokens


def check_compressed(prep: dict, log: Logger) -> None:
    """The compressed forward equals the full one (random model, random-ish inputs)."""
    torch.manual_seed(123)
    full, comp = make_transformer(), make_transformer()
    with torch.no_grad():
        for p in full.parameters():  # non-zero output projections so the check means something
            p.add_(0.02 * torch.randn_like(p))
    comp.load_state_dict(full.state_dict())
    use_compressed(comp, N_IMAGE)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    e, p = prep["embeds"][[0, 5, 20]], prep["pooled"][[0, 5, 20]]
    with torch.no_grad():
        a = full(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p).sample
        c = comp(hidden_states=x, timestep=t, encoder_hidden_states=compress(e), pooled_projections=p).sample
    d = (a - c).abs().max().item()
    log(f"train: compressed-context check max abs diff {d:.2e} (output scale {a.abs().max().item():.2f})")
    assert d < 1e-4, d


# ----------------------------------------------------------------------------- train
def stage_train(args, run: Path, log: Logger):
    torch.manual_seed(args.seed)
    prep = torch.load(run / "prepared.pt", map_location="cpu")
    check_compressed(prep, log)
    mean, std, labels = prep["mean"], prep["std"], prep["labels"]
    shift, scaling = prep["shift_factor"], prep["scaling_factor"]
    embeds, pooled = compress(prep["embeds"]), prep["pooled"]
    cdf = np.cumsum(data.balanced_weights(labels.numpy()))

    model, ema = make_transformer(), make_transformer()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    use_compressed(model, N_IMAGE)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    parts = {"model": model, "ema": ema, "opt": opt}
    ck = Checkpoint(run / "transformer.pt", parts, args.ckpt_minutes, log, "train")
    step = ck.resume()
    log(f"train: params {count(model)} config {TRANSFORMER_CONFIG} batch {args.batch} lr {args.lr}")
    model.train()
    progress = Progress(log, "train", ("loss", "gradnorm"), (".4f", ".3f"), every=100)
    while step < args.steps:
        lr = set_lr(opt, lr_at(step, args.lr, 300, args.steps))
        idx = torch.from_numpy(batch_indices(cdf, args.seed, step, args.batch))
        gen = step_generator(args.seed, step)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(len(idx), generator=gen))  # SD3 logit-normal (m=0, s=1)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise
        cond = labels[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < args.cfg_drop] = 20
        pred = model(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=embeds[cond],
                     pooled_projections=pooled[cond]).sample  # fmt: skip
        loss = torch.mean((pred - (noise - z0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update(((model, ema),), step, args.ema)
        progress(step, step == args.steps, lr, loss.item(), gn.item())
        ck.maybe_save(step, step == args.steps)


# ----------------------------------------------------------------------------- export
def stage_export(args, run: Path, log: Logger):
    out = Path(args.out)
    prep = torch.load(run / "prepared.pt", map_location="cpu")
    st = torch.load(run / "transformer.pt", map_location="cpu")
    model = make_transformer()
    model.load_state_dict(st["model" if args.no_ema else "ema"])
    pipe = build_pipeline(model, load_vae(prep["shift_factor"], prep["scaling_factor"]))
    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        # float16 on disk (2 x 6.5 MB instead of 2 x 13 MB: the 49408 x 64 token table), float32 in
        # config.json, so plain from_pretrained builds float32 encoders from the float16 values
        enc = type(pipe.text_encoder).from_pretrained(str(tmp / name), dtype=torch.float32)
        enc.to(torch.float16).save_pretrained(str(tmp / name), safe_serialization=True)
        cfg_path = tmp / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        # tiny-sd's vocab.json + merges.txt (1.5 MB) instead of the 3.6 MB tokenizer.json: same ids
        shutil.rmtree(tmp / name)
        shutil.copytree(BASE / "tokenizer", tmp / name, ignore=shutil.ignore_patterns("tokenizer.json"))
    info = {"transformer_steps": st["step"], "ema": not args.no_ema, "shift_factor": prep["shift_factor"],
            "scaling_factor": prep["scaling_factor"], "base": "tiny-sd (VAE, tokenizer, text encoder)"}  # fmt: skip
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"export: wrote {out} ({size / 1e6:.2f} MB) from transformer step {st['step']}")


def stage_bench(args, run: Path, log: Logger):
    prep = torch.load(run / "prepared.pt", map_location="cpu")
    model = make_transformer()
    use_compressed(model, N_IMAGE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    e, p = compress(prep["embeds"])[:1].expand(args.batch, -1, -1), prep["pooled"][:1].expand(args.batch, -1)
    x = torch.randn(args.batch, 4, 8, 8)
    for i in range(6):
        if i == 1:
            t0 = time.time()
        loss = model(hidden_states=x, timestep=torch.full((args.batch,), 500.0), encoder_hidden_states=e,
                     pooled_projections=p).sample.square().mean()  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"bench: params {count(model)} {(time.time() - t0) / 5:.3f}s/step batch {args.batch}")


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["prepare", "train", "export", "all", "bench"])
    ap.add_argument("--run", default=str(HERE / "runs" / "sd3"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--out", default=str(DEFAULT_EXPORT))
    ap.add_argument("--no-ema", action="store_true")
    args = ap.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    log = Logger(run / "train.log")
    log(f"args: {vars(args)}")
    stages = ["prepare", "train", "export"] if args.stage == "all" else [args.stage]
    for s in stages:
        {"prepare": stage_prepare, "train": stage_train, "export": stage_export, "bench": stage_bench}[s](
            args, run, log
        )


if __name__ == "__main__":
    main()
