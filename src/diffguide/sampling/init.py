"""Sampling from given initial latents (img2img): the latents, their files, and the schedule's tail.

:class:`InitLatents` holds latents in one of two spaces: ``model`` (what the model samples, the
latents a :class:`~diffguide.pipeline.GenerationResult` returns) or ``comfy`` (ComfyUI's LATENT,
as its ``SaveLatent`` writes it; converted with the latent format of the model at run time).

``strength`` (``GenerateConfig.strength``) follows each noise policy's reference:

* ``diffusers``: diffusers' img2img pipelines. The schedule of ``steps`` is set as usual; sampling
  starts at index ``steps - int(steps * strength)`` (times the scheduler's order), and x starts as the
  latents noised to that level with the per-image seeded noise (``scheduler.add_noise``, or
  ``scale_noise`` for flow models). Strength 1 is the plain run, bit for bit (pure noise; the
  latents are not used).
* ``comfy``: ComfyUI's KSampler ``denoise``. The sigmas of ``int(steps / denoise)`` steps, their
  last ``steps + 1`` kept; x starts as ``noise_scaling(sigma_0, noise, latent)`` (ComfyUI adds the
  latent also at denoise 1, where an empty latent is zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..manifest import file_hash, tensor_hash

#: File suffixes of pickles (torch.save and friends): never read (loading one can run code).
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
#: ComfyUI's SaveLatent keys: the samples and the format version marker (LoadLatent's rule: a file
#: without the marker holds latents of the old format, scaled by 0.18215).
COMFY_KEY, COMFY_VERSION_KEY = "latent_tensor", "latent_format_version_0"


@dataclass(frozen=True, eq=False)
class InitLatents:
    """Initial latents of a run: batch 1 (every image) or one row per image, float32 on the CPU."""

    latents: Tensor
    space: str = "model"  # "model" or "comfy" (ComfyUI's LATENT convention)
    path: str | None = None  # the file they came from (replay loads it again)
    sha256: str | None = None  # the file's hash (first 16 hex digits, as manifest hashes)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, Tensor):
            raise ConfigError(f"initial latents must be a tensor, got {type(self.latents).__name__}")
        if self.latents.ndim < 3 or not self.latents.is_floating_point():
            raise ConfigError(
                f"initial latents must be a float tensor (batch, channels, ...), got {self.latents.dtype} "
                f"of shape {list(self.latents.shape)}"
            )
        if not bool(torch.isfinite(self.latents).all()):
            raise ConfigError("initial latents contain NaN or infinite values")
        if self.space not in ("model", "comfy"):
            raise ConfigError(f"initial latents space must be 'model' or 'comfy', got {self.space!r}")

    @staticmethod
    def of(latents: Tensor | InitLatents) -> InitLatents:
        """A tensor (model space) or ready InitLatents."""
        if isinstance(latents, InitLatents):
            return latents
        if not isinstance(latents, Tensor):
            raise ConfigError(f"initial latents must be a tensor or a file, got {type(latents).__name__}")
        return InitLatents(latents.detach().to("cpu", torch.float32))

    def describe(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "path": self.path,
            "sha256": self.sha256,
            "shape": list(self.latents.shape),
            "latents_hash": tensor_hash(self.latents),
        }

    def image(self, index: int, count: int) -> InitLatents:
        """Image ``index``'s latents alone (batch-invariant runs sample each image by itself)."""
        if self.latents.shape[0] == 1:
            return self
        if self.latents.shape[0] != count:
            raise ConfigError(
                f"initial latents have batch {self.latents.shape[0]}, but {count} images were asked for"
            )
        rows = self.latents[index : index + 1]
        return InitLatents(rows, self.space, self.path, self.sha256)


def load_init_latents(path: str | Path) -> InitLatents:
    """Latents from a safetensors file: one tensor (model space), or ComfyUI's SaveLatent form
    (``latent_tensor``; comfy space, old-format files scaled as ComfyUI's LoadLatent scales them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ConfigError(
            f"initial latents file '{p}' is a pickle ({p.suffix}); only .safetensors is read (loading a pickle can run code)"
        )
    if not p.is_file():
        raise ConfigError(f"initial latents file '{p}' does not exist")
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"initial latents file '{p}' is not a safetensors file ({err})") from None
    sha = file_hash(str(p))
    if COMFY_KEY in tensors:
        scale = 1.0 if COMFY_VERSION_KEY in tensors else 1.0 / 0.18215
        x = tensors[COMFY_KEY].float() * scale
        return InitLatents(x, "comfy", str(p), sha)
    if len(tensors) != 1:
        raise ConfigError(
            f"initial latents file '{p}' holds {len(tensors)} tensors ({', '.join(sorted(tensors)) or 'none'}); "
            "give a file with one latent tensor, or ComfyUI's SaveLatent form ('latent_tensor')"
        )
    (x,) = tensors.values()
    return InitLatents(x.float(), "model", str(p), sha)


def save_init_latents(path: str | Path, latents: Tensor) -> None:
    """Model-space latents as a one-tensor safetensors file that ``--init-latents`` reads."""
    from safetensors.torch import save_file

    save_file({"latents": latents.detach().to("cpu").contiguous()}, str(path))


def check_strength_value(strength: Any) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ConfigError(f"strength must be a number in (0, 1], got {strength!r}")
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ConfigError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength}")


def check_strength(strength: Any, init: InitLatents | None) -> None:
    check_strength_value(strength)
    if strength < 1.0 and init is None:
        raise ConfigError(
            f"strength {strength} needs initial latents to start from (--init-latents; a job's initial_latents)"
        )
    if init is not None and not isinstance(init, InitLatents):
        raise ConfigError(
            f"init_latents must be InitLatents (InitLatents.of(tensor)), got {type(init).__name__}"
        )


def init_rows(
    init: InitLatents,
    shape: tuple[int, ...],
    family: Any,
    pipe: Any,
    size: tuple[int, int],
) -> Tensor:
    """The run's (B, ...) model-space initial latents, float32 on the CPU; one-line error when the
    shape does not fit the model at this size."""
    x = init.latents
    if init.space == "comfy":
        x = comfy_latent_in(family.name, family.architecture(pipe) == "sdxl", x, shape[1:])
    batch = shape[0]
    if tuple(x.shape[1:]) != tuple(shape[1:]) or x.shape[0] not in (1, batch):
        expected = [1 if batch == 1 else "1 or " + str(batch), *shape[1:]]
        raise ConfigError(
            f"initial latents have shape {list(init.latents.shape)}; this model at {size[1]}x{size[0]} px "
            f"takes {expected}".replace("'", "")
        )
    return x.expand(batch, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x


def comfy_latent_in(family: str, is_xl: bool, x: Tensor, per_image: tuple[int, ...]) -> Tensor:
    """ComfyUI's LATENT -> model space (``process_latent_in`` of the model's latent format; the
    inverse of :func:`diffguide.comfy_workflow.comfy_latent_out`), reshaped to ``per_image``."""
    from .comfy import SD_SCALE_FACTOR, SDXL_SCALE_FACTOR

    x = x.float()
    if family == "qwen-image":
        from ..comfy_workflow import WAN21_MEAN, WAN21_STD

        if x.ndim != 5 or x.shape[1] != 16:
            return x  # the shape check names it
        view = (1, 16, 1, 1, 1)
        x = (x - torch.tensor(WAN21_MEAN).view(view)) / torch.tensor(WAN21_STD).view(view)
    elif family == "auraflow":
        x = x * SDXL_SCALE_FACTOR
    elif family == "sd":
        x = x * (SDXL_SCALE_FACTOR if is_xl else SD_SCALE_FACTOR)
    elif family in ("sd3", "flux"):
        from ..comfy_workflow import FLUX_SCALE, FLUX_SHIFT, SD3_SCALE, SD3_SHIFT

        scale, shift = (SD3_SCALE, SD3_SHIFT) if family == "sd3" else (FLUX_SCALE, FLUX_SHIFT)
        x = (x - shift) * scale
    else:
        raise ConfigError(f"ComfyUI's latent format for {family} models is not mapped yet")
    if x.numel() == x.shape[0] * math.prod(per_image):
        return x.reshape(x.shape[0], *per_image)
    return x


def img2img_begin(steps: int, strength: float, order: int) -> int:
    """diffusers' ``get_timesteps``: the index of the first timestep an img2img run keeps."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ConfigError(
            f"strength {strength} with {steps} steps runs no step (int(steps * strength) = 0); raise the strength or the steps"
        )
    return (steps - run) * order


@dataclass
class TailStepper:
    """A diffusers-policy stepper (:class:`~diffguide.sampling.steppers.DiscreteStepper` or
    ``FlowStepper``) from model evaluation ``begin`` on; ``start`` noises ``init`` to that level
    as diffusers' img2img pipelines do (``add_noise``; ``scale_noise`` for flow matching)."""

    inner: Any
    begin: int
    init: Tensor  # (B, ...) model-space latents in the sampling layout, device and dtype

    def __post_init__(self) -> None:
        self.prediction: str = self.inner.prediction
        sched = self.inner.scheduler
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(self.begin)

    @property
    def sigmas(self) -> list[float]:
        return list(self.inner.sigmas[self.begin :])

    @property
    def timesteps(self) -> list[float]:
        return list(self.inner.timesteps[self.begin :])

    def start(self, noise: Tensor) -> Tensor:
        sched = self.inner.scheduler
        t = sched.timesteps[self.begin : self.begin + 1].repeat(noise.shape[0])
        if hasattr(sched, "scale_noise"):  # flow matching: (1 - s) x0 + s noise
            return sched.scale_noise(self.init, t, noise)  # type: ignore[no-any-return]
        return sched.add_noise(self.init, noise, t)  # type: ignore[no-any-return]

    def model_input(self, x: Tensor, i: int) -> Tensor:
        return self.inner.model_input(x, i + self.begin)  # type: ignore[no-any-return]

    def model_time(self, i: int, batch: int) -> Tensor:
        return self.inner.model_time(i + self.begin, batch)  # type: ignore[no-any-return]

    def step(self, guided: Tensor, x: Tensor, i: int) -> Tensor:
        return self.inner.step(guided, x, i + self.begin)  # type: ignore[no-any-return]

    def finish(self, x: Tensor) -> Tensor:
        return self.inner.finish(x)  # type: ignore[no-any-return]


def replay_init_latents(recorded: Any) -> InitLatents | None:
    """A manifest's ``parameters.init_latents`` -> the latents again (from the recorded file, whose
    hash must match); one-line error when they cannot be had."""
    from ..errors import DiffguideError

    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise DiffguideError(f"manifest field parameters.init_latents must be an object, got {recorded!r}")
    path = recorded.get("path")
    if not isinstance(path, str) or not path:
        raise DiffguideError(
            "this run started from initial latents given as a tensor, not a file; the manifest records "
            f"only their hash ({recorded.get('latents_hash')}), so it cannot be replayed"
        )
    if not Path(path).is_file():
        raise DiffguideError(f"the run's initial latents file '{path}' does not exist")
    loaded = load_init_latents(path)
    if recorded.get("sha256") and loaded.sha256 != recorded["sha256"]:
        raise DiffguideError(
            f"the initial latents file '{path}' changed since the run (sha256 {loaded.sha256}, recorded {recorded['sha256']})"
        )
    return loaded


def check_init_latents(gp: Any, cfg: Any) -> None:
    """One-line error, before any sampling, when ``cfg``'s initial latents do not fit ``gp``'s model
    at the run's size (:class:`~diffguide.pipeline.GuidedPipeline`, ``GenerateConfig``)."""
    if cfg.init_latents is None:
        return
    size = gp.default_size()
    height, width = cfg.height or size, cfg.width or size
    shape = gp.family.latent_shape(gp.pipe, cfg.num_images, height, width)
    init_rows(cfg.init_latents, shape, gp.family, gp.pipe, (height, width))
