"""Train the diffguide default model: a tiny Stable-Diffusion-1.5-architecture model.

Stages (run in this order; each one is resumable from training/runs/<run>/):

    python training/train.py vae    --steps 2000     # AutoencoderKL, 32x32x3 -> 8x8x4
    python training/train.py latents                # cache VAE posteriors of the training set
    python training/train.py unet   --steps 7000     # UNet2DConditionModel + CLIPTextModel (joint)
    python training/train.py export                  # diffusers folder -> src/diffguide/assets/tiny-sd/

``python training/train.py all`` runs every stage in turn.  CPU only, one
thread (torch.set_num_threads(1)); seeds are fixed and per-step RNG is derived
from (seed, step), so a resumed run draws the same batches and noise.
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
DEFAULT_EXPORT = REPO / "src" / "diffguide" / "assets" / "tiny-sd"
BPE_WHEEL = "open-clip-torch==3.3.0"
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# ----------------------------------------------------------------------------- configs
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16,
    act_fn="silu",
    sample_size=32,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' legacy name: number of heads (SD1.5 uses 8)
    norm_num_groups=16,
    act_fn="silu",
)

SCHED_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


# ----------------------------------------------------------------------------- components
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


# ----------------------------------------------------------------------------- VAE
def stage_vae(args, run: Path, log: Logger):
    torch.manual_seed(args.seed)
    images, labels = data.load_split("train")
    x_all = torch.from_numpy(data.to_model_space(images))
    cdf = np.cumsum(data.balanced_weights(labels))
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ck = Checkpoint(run / "vae.pt", {"model": vae, "opt": opt}, args.ckpt_minutes, log, "vae")
    step = ck.resume()
    log(f"vae: params {count(vae)} config {VAE_CONFIG}")
    vae.train()
    progress = Progress(log, "vae", ("mse", "l1", "kl"), (".5f", ".4f", ".1f"), every=50)
    while step < args.steps:
        lr = set_lr(opt, lr_at(step, args.lr, 200, args.steps))
        x = x_all[batch_indices(cdf, args.seed, step, args.batch)]
        gen = step_generator(args.seed, step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.mean((rec - x) ** 2)
        l1 = torch.mean((rec - x).abs())
        kl = post.kl().mean()
        loss = mse + l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        progress(step, step == args.steps, lr, mse.item(), l1.item(), kl.item())
        ck.maybe_save(step, step == args.steps)
    # reconstruction quality on held-out reference images
    vae.eval()
    ref, _ = data.load_split("reference")
    sel = np.random.RandomState(0).permutation(len(ref))[:1000]
    xr = torch.from_numpy(data.to_model_space(ref[sel]))
    with torch.no_grad():
        rec = torch.cat(
            [vae.decode(vae.encode(xr[i : i + 100]).latent_dist.mean).sample for i in range(0, 1000, 100)]
        )
    mse = torch.mean((rec.clamp(-1, 1) - xr) ** 2).item()
    psnr = 10 * math.log10(4.0 / mse)
    log(f"vae: held-out reconstruction mse {mse:.5f} psnr {psnr:.2f} dB (1000 reference images)")
    _save_recon_grid(xr[:16], rec[:16], run / "vae_recon.png")


def _save_recon_grid(x, rec, path: Path):
    from PIL import Image

    def row(t):
        t = ((t.clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0].numpy()
        return np.concatenate(list(t), axis=1)

    img = np.concatenate([row(x), row(rec)], axis=0)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------- latents
def load_trained_vae(run: Path):
    vae = make_vae()
    vae.load_state_dict(torch.load(run / "vae.pt", map_location="cpu")["model"])
    return vae.eval()


def stage_latents(args, run: Path, log: Logger):
    out = run / "latents.pt"
    if out.exists():
        log("latents: cached")
        return
    vae = load_trained_vae(run)
    images, labels = data.load_split("train")
    means, stds = [], []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = torch.from_numpy(data.to_model_space(images[i : i + 256]))
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    # SD convention: scaling_factor = 1 / std of latents (posterior samples)
    g = torch.Generator().manual_seed(args.seed)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    scaling = 1.0 / sample.std().item()
    log(
        f"latents: {tuple(mean.shape)} in {time.time() - t0:.0f}s; latent std {sample.std().item():.4f} "
        f"mean {sample.mean().item():.4f} -> scaling_factor {scaling:.5f}; mean posterior std {std.mean().item():.4f}"
    )
    atomic_save(
        {"mean": mean, "std": std, "labels": torch.from_numpy(labels), "scaling_factor": scaling}, out
    )


# ----------------------------------------------------------------------------- tokenizer
def find_bpe() -> Path:
    cand = [Path(os.environ.get("DIFFGUIDE_CLIP_BPE", "")), data.DOWNLOADS / BPE_NAME]
    for c in cand:
        if c.is_file():
            return c
    # fetch the open_clip wheel from PyPI (no import of open_clip; it needs torchvision)
    import subprocess
    import zipfile

    data.DOWNLOADS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", BPE_WHEEL, "-d", str(data.DOWNLOADS)],
        check=True,
    )
    whl = next(data.DOWNLOADS.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(whl) as z:
        (data.DOWNLOADS / BPE_NAME).write_bytes(z.read(f"open_clip/{BPE_NAME}"))
    return data.DOWNLOADS / BPE_NAME


def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer(out_dir: Path):
    """Build the real CLIP BPE tokenizer (49408 tokens) from open_clip's merges file."""
    import gzip

    from transformers import CLIPTokenizer

    with gzip.open(find_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408, len(vocab)
    tmp = out_dir.parent / (out_dir.name + "_src")
    tmp.mkdir(parents=True, exist_ok=True)
    vf, mf = tmp / "vocab.json", tmp / "merges.txt"
    vf.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    mf.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(vf),
        merges=str(mf),
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(out_dir)
    # also keep the classic slow-tokenizer files (as in SD1.5's tokenizer/ folder)
    shutil.copy(vf, out_dir / "vocab.json")
    shutil.copy(mf, out_dir / "merges.txt")
    shutil.rmtree(tmp)
    return CLIPTokenizer.from_pretrained(out_dir)


def check_tokenizer(tok):
    ids = tok("a photo of an ankle boot").input_ids
    expect_prefix = [49406, 320, 1125, 539, 550]
    assert ids[:5] == expect_prefix and ids[-1] == 49407, ids
    return ids


def get_tokenizer(run: Path):
    d = run / "tokenizer"
    if (d / "tokenizer_config.json").exists():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(d)
    return build_tokenizer(d)


# ----------------------------------------------------------------------------- UNet
def stage_unet(args, run: Path, log: Logger):
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    lat = torch.load(run / "latents.pt", map_location="cpu")
    mean, std, labels, scaling = lat["mean"], lat["std"], lat["labels"], lat["scaling_factor"]
    cdf = np.cumsum(data.balanced_weights(labels.numpy()))
    tok = get_tokenizer(run)
    ids = check_tokenizer(tok)
    log(f"tokenizer ok: {ids}")
    prompts = [*data.CAPTIONS, ""]  # index 20 = unconditional (CFG dropout)
    input_ids = tok(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids

    unet, text = make_unet(), make_text_encoder()
    ema = make_unet()
    ema.load_state_dict(unet.state_dict())
    ema_text = make_text_encoder()
    ema_text.load_state_dict(text.state_dict())
    for p in list(ema.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    # The 49408 x H token embedding stays at its (seeded) random init: only ~30 of its rows are
    # ever used and updating the whole dense matrix every step costs ~7% of a CPU step.
    # Positional embedding and all transformer layers of the text encoder are trained jointly.
    text.embeddings.token_embedding.weight.requires_grad_(False)
    params = [p for p in unet.parameters()] + [p for p in text.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = DDPMScheduler(**SCHED_KW)
    acp = sched.alphas_cumprod.float()

    parts = {"unet": unet, "text": text, "ema": ema, "ema_text": ema_text, "opt": opt}
    ck = Checkpoint(run / "unet.pt", parts, args.ckpt_minutes, log, "unet")
    step = ck.resume()
    log(f"unet: params unet {count(unet)} text {count(text)} config {UNET_CONFIG} text {TEXT_CONFIG}")
    unet.train()
    text.train()
    progress = Progress(log, "unet", ("loss", "gradnorm"), (".4f", ".3f"), every=100)
    while step < args.steps:
        lr = set_lr(opt, lr_at(step, args.lr, 500, args.steps))
        idx = torch.from_numpy(batch_indices(cdf, args.seed, step, args.batch))
        gen = step_generator(args.seed, step)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = labels[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < args.cfg_drop
        cond[drop] = 20
        emb_all = text(input_ids).last_hidden_state  # (21, 77, H): 20 captions + ""
        pred = unet(zt, t, emb_all[cond]).sample
        loss = torch.mean((pred - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update(((unet, ema), (text, ema_text)), step, args.ema)
        progress(step, step == args.steps, lr, loss.item(), gn.item())
        ck.maybe_save(step, step == args.steps)


# ----------------------------------------------------------------------------- export
def stage_export(args, run: Path, log: Logger):
    from diffusers import EulerDiscreteScheduler

    out = Path(args.out)
    lat = torch.load(run / "latents.pt", map_location="cpu")
    st = torch.load(run / "unet.pt", map_location="cpu")
    vae = load_trained_vae(run)
    vae.register_to_config(scaling_factor=float(lat["scaling_factor"]))
    unet, text = make_unet(), make_text_encoder()
    unet.load_state_dict(st["ema" if not args.no_ema else "unet"])
    text.load_state_dict(st["ema_text" if not args.no_ema else "text"])
    tok = get_tokenizer(run)
    check_tokenizer(tok)
    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    shutil.copytree(run / "tokenizer", tmp / "tokenizer")
    EulerDiscreteScheduler(**SCHED_KW).save_pretrained(tmp / "scheduler")
    # Keys other schedulers read, as in SD1.5's scheduler_config.json: diffusers' DDIM defaults
    # (clip_sample true, set_alpha_to_one true) would clip latents to [-1, 1] and give noise.
    sched_json = tmp / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_json.read_text())
    sched_cfg.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    sched_json.write_text(json.dumps(sched_cfg, indent=2, sort_keys=True) + "\n")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {"unet_steps": st["step"], "ema": not args.no_ema, "scaling_factor": lat["scaling_factor"]}
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"export: wrote {out} ({size / 1e6:.2f} MB) from unet step {st['step']}")


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "latents", "unet", "export", "all"])
    ap.add_argument("--run", default=str(HERE / "runs" / "default"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="total optimisation steps for the stage")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--out", default=str(DEFAULT_EXPORT))
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--unet-steps", type=int, default=7000)
    args = ap.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    log = Logger(run / "train.log")
    log(f"args: {vars(args)}")
    stages = ["vae", "latents", "unet", "export"] if args.stage == "all" else [args.stage]
    for s in stages:
        a = argparse.Namespace(**vars(args))
        if s == "vae":
            a.steps = args.steps if args.stage == "vae" and args.steps else args.vae_steps
            a.batch = args.batch or 32
            a.lr = args.lr or 1e-3
            stage_vae(a, run, log)
        elif s == "latents":
            stage_latents(a, run, log)
        elif s == "unet":
            a.steps = args.steps if args.stage == "unet" and args.steps else args.unet_steps
            a.batch = args.batch or 64
            a.lr = args.lr or 8e-4
            stage_unet(a, run, log)
        elif s == "export":
            stage_export(a, run, log)


if __name__ == "__main__":
    main()
