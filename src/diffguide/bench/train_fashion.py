"""Train the garment classifier of the quality benchmark (Fashion-MNIST, 28x28 grey).

    python -m diffguide.bench.train_fashion [--epochs 3] [--out src/diffguide/assets/classifiers/...]

Data: the official Fashion-MNIST IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, or ``$DIFFGUIDE_FASHION_DIR``): trained on the 60k
``train`` split, accuracy measured on the 10k ``t10k`` split and stored in the safetensors
metadata (``test_accuracy``). CPU, one thread, fixed seed; a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classifiers import FASHION_MEAN, FASHION_STD, FashionNet, fashion_weights_path, predict


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    from .data import load_fashion

    return load_fashion(split)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=fashion_weights_path())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    xtr, ytr = load("train")
    xte, yte = load("t10k")
    x = (torch.from_numpy(xtr).float()[:, None] / 255.0 - FASHION_MEAN) / FASHION_STD
    y = torch.from_numpy(ytr).long()
    net = FashionNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch):
            idx = perm[i : i + args.batch]
            xb = x[idx]
            # light augmentation: random horizontal flip (garments are left-right symmetric)
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(
                    f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} {time.time() - t0:.0f}s",
                    flush=True,
                )
        net.eval()
        acc = float((predict(net, xte / 255.0, FASHION_MEAN, FASHION_STD) == yte).mean())
        print(f"epoch {epoch}: t10k accuracy {acc:.4f}", flush=True)

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "test_accuracy": json.dumps(acc),
        "test_split": "Fashion-MNIST t10k (10000)",
        "train_split": "Fashion-MNIST train (60000)",
        "train_steps": json.dumps(step),
        "recipe": f"python -m diffguide.bench.train_fashion --epochs {args.epochs} --batch {args.batch} "
        f"--lr {args.lr} --seed {args.seed}",
        "normalisation": f"(x/255 - {FASHION_MEAN}) / {FASHION_STD}",
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out), metadata=meta)
    print(f"wrote {args.out}: t10k accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    return acc


if __name__ == "__main__":
    main()
