"""The service of docs/comfyui.md: the workflow's steps re-implemented by hand, with the bug the
analysis suspected (conditioning saved as a bare tensor and re-wrapped as [[tensor, {}]], so
ComfyUI's attention_mask is lost). Saves a step trace to compare with the workflow's.

    python docs/examples/comfy_service.py MODELS service.trace.safetensors [--fixed]

With --fixed the conditioning keeps its ComfyUI dict (load_comfy_conditioning + to_diffguide).
"""

import sys
from pathlib import Path

import torch

from diffguide import CFG, CFGNorm, GenerateConfig, GuidedPipeline
from diffguide.comfy_workflow import load_comfy_conditioning
from diffguide.comfy_workflow.conditioning import to_diffguide
from diffguide.comfy_workflow.models import load_diffusion_model
from diffguide.conditioning import ConditioningFile
from diffguide.models.denoiser import Conditioning
from diffguide.repro.trace import TraceRecorder
from diffguide.sampling.comfy import ComfyShift

models, out = Path(sys.argv[1]), sys.argv[2]
gp = GuidedPipeline(
    load_diffusion_model(models / "diffusion_models" / "tiny_qwen.safetensors", torch.float32)
)
gp.load_lora(models / "loras" / "tiny_lora.safetensors", 0.8)
entries = [load_comfy_conditioning(models / f"{s}.safetensors")[0] for s in ("positive", "negative")]
if "--fixed" in sys.argv:  # the whole [[tensor, {"attention_mask": ..., ...}]]
    cond = ConditioningFile(to_diffguide(entries[0], "positive"), to_diffguide(entries[1], "negative"))
else:  # the bug: the bare tensor, re-wrapped as [[tensor, {}]]
    cond = ConditioningFile(*(Conditioning(tensors={"embeds": e[0][0]}) for e in entries))
cfg = GenerateConfig.create(
    "service",
    guidance=[CFG(4.0), CFGNorm(1.0)],
    steps=8,
    seed=12345,
    scheduler="euler",
    noise="comfy",
    schedule="simple",
    width=64,
    height=64,
    comfy_sampling=ComfyShift("flow", 3.1, 1.0),
)
rec = TraceRecorder()
result = gp.generate(cfg, decode=False, conditioning=cond, callback=rec)
rec.save(out, result.manifests[0])
print(f"service trace -> {out}")
