"""How far image i of a float32 batch is from its seed run alone, per CPU kernel path.

Batch composition changes how the CPU's GEMM and convolution kernels block their sums, so
image i of a batch differs from the same seed run alone by rounding, amplified by the guidance
scales over the steps. This script measures that difference on the bundled default model and on
the random tiny test models, for several step counts, batch sizes and guidance settings, under
several kernel paths (each in a fresh process, since the paths are chosen when torch loads):

    default   whatever this CPU and torch pick (AVX-512 or AVX2)
    avx2      ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2
    sse       ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41, MKL_ENABLE_INSTRUCTIONS=SSE4_2

It prints, per path, the largest absolute difference and the largest relative difference
``|a - b| / (1 + |b|)`` (the form check-determinism and the tests use) over all cases, and
writes every case to ``--json``. docs/reproducibility.md quotes the bound derived from it.

    python benchmarks/batch_vs_single.py --json benchmarks/results/batch_vs_single.json
    python benchmarks/batch_vs_single.py --paths default --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PATHS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "sse": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}
STEPS = (2, 4, 10, 20, 50)
BATCHES = (2, 4)


def _settings() -> dict[str, list[object]]:
    from diffguide import CFG, PAG, TPG

    return {
        "cfg7.5": [CFG(7.5)],
        "cfg4+pag2+tpg2": [CFG(4.0), PAG(2.0), TPG(2.0)],
    }


def _models() -> dict[str, object]:
    from importlib import resources

    from diffguide import GuidedPipeline, testing

    bundled = Path(str(resources.files("diffguide") / "assets" / "tiny-sd"))
    return {
        "default-model": GuidedPipeline.from_pretrained(bundled),
        "tiny-sd15-random": GuidedPipeline(testing.tiny_sd15(seed=0)),
        "tiny-sdxl-random": GuidedPipeline(testing.tiny_sdxl(seed=0)),
    }


def measure(quick: bool, threads: int) -> dict[str, object]:
    """Run every case in this process; return the cases and the kernel path torch reports."""
    import torch

    torch.set_num_threads(threads)
    prompts = ["a handwritten digit 7", "a photo of a dress", "a handwritten digit 3", "a photo of a bag"]
    steps_list = (2, 10) if quick else STEPS
    cases = []
    for model_name, pipe in _models().items():
        for setting, terms in _settings().items():
            for steps in steps_list:
                kw = {"guidance": terms, "steps": steps, "seed": 11}
                alone = [
                    pipe.generate(prompts[i], decode=False, **{**kw, "seed": 11 + i}).latents
                    for i in range(max(BATCHES))
                ]
                for batch in BATCHES:
                    whole = pipe.generate(prompts[:batch], decode=False, **kw).latents
                    for i in range(batch):
                        a, b = whole[i : i + 1].double(), alone[i].double()
                        err = (a - b).abs()
                        cases.append(
                            {
                                "model": model_name,
                                "setting": setting,
                                "steps": steps,
                                "batch": batch,
                                "image": i,
                                "max_abs": err.max().item(),
                                "max_rel": (err / (1 + b.abs())).max().item(),
                                "max_latent": b.abs().max().item(),
                            }
                        )
    return {
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "cases": cases,
    }


def _child(path: str, quick: bool, threads: int) -> dict[str, object]:
    env = {**os.environ, **PATHS[path]}
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default="default,avx2,sse", help="comma-separated kernel paths")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="steps 2 and 10 only")
    ap.add_argument("--json", type=Path, help="write every case here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.quick, args.threads)))
        return
    cpu = platform.processor() or platform.machine()
    results = {}
    print(f"CPU: {cpu}; threads {args.threads}")
    print(f"{'path':8} {'kernels':9} {'torch':12} {'cases':>5} {'max abs':>10} {'max rel':>10}  worst case")
    for path in args.paths.split(","):
        res = _child(path, args.quick, args.threads)
        results[path] = res
        cases = res["cases"]
        assert isinstance(cases, list)
        worst = max(cases, key=lambda c: c["max_rel"])
        print(
            f"{path:8} {res['capability']:9} {res['torch']:12} {len(cases):5d} "
            f"{max(c['max_abs'] for c in cases):10.3g} {worst['max_rel']:10.3g}  "
            f"{worst['model']} {worst['setting']} steps {worst['steps']} batch {worst['batch']} image {worst['image']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
