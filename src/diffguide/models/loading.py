"""Loading diffusers pipelines from a folder or a single .safetensors file, and LoRAs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffguideError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DiffguideError(f"{what} '{path}' does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DiffguideError(
            f"{what} '{path}' is a pickle file ({path.suffix}); diffguide loads only .safetensors, which cannot "
            "run code. Convert it once with safetensors (torch.load with weights_only=True, then save_file)."
        )
    if path.suffix.lower() != ".safetensors":
        raise DiffguideError(f"{what} '{path}' is not a .safetensors file or a diffusers model folder")
    if not _safetensors_complete(path):
        raise DiffguideError(f"{what} '{path}' is not a valid safetensors file (truncated or wrong format)")


def _safetensors_complete(path: Path) -> bool:
    """Header readable and the tensor data it describes ends exactly at the end of the file.

    Checking only the header length let files truncated inside the tensor data through, to
    fail later with a raw ``SafetensorError`` (or a misleading "needs --config").
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return False
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return False
    return 8 + n + max(ends, default=0) == size


def load_pipeline(path: str | Path, *, dtype: torch.dtype = torch.float32, config: str | None = None) -> Any:
    """A diffusers SD1.5/SDXL pipeline from a diffusers folder or a single-file checkpoint.

    Single-file checkpoints need ``config``: a local diffusers folder of the same
    architecture whose configs describe the checkpoint (nothing is downloaded).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if path.is_dir():
        index = check_folder(path)
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        kwargs.update(_absent_components(index))
        try:
            with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype to dtype
                warnings.simplefilter("ignore", FutureWarning)
                return DiffusionPipeline.from_pretrained(str(path), **kwargs)
        except Exception as err:  # diffusers raises ValueError, OSError, ... with multi-line advice
            first = (str(err).strip().splitlines() or [""])[0].split(" If you want")[
                0
            ]  # drop diffusers' advice
            hint = " (a config.json does not match its weights)" if "expected shape" in first else ""
            raise DiffguideError(
                f"could not load model folder '{path}'{hint}: {type(err).__name__}: {first}"
            ) from err
    _check_file(path, "model file")
    if config is None:
        raise DiffguideError(
            f"single-file checkpoint '{path}' needs --config: a local diffusers folder of the same architecture "
            "(SD1.5 or SDXL), since nothing can be downloaded"
        )
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        is_xl = any(k.startswith("conditioner.embedders.1") for k in f.keys())  # noqa: SIM118
    _check_config(Path(config), path, is_xl)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_single_file(str(path), config=config, torch_dtype=dtype, local_files_only=True)
    except Exception as err:  # diffusers raises KeyError, ValueError, OSError, ... for bad files
        first = (str(err).strip().splitlines() or [""])[0]  # later lines: diffusers' code advice
        raise DiffguideError(
            f"could not load single-file checkpoint '{path}' with --config '{config}': "
            f"{type(err).__name__}: {first}"
        ) from err
    _check_all_weights_loaded(pipe, path)
    return pipe


def _absent_components(index: dict[str, Any]) -> dict[str, None]:
    """Components a folder saved as absent (``[null, null]``, e.g. a Qwen-Image pipeline built
    without its text encoder): diffusers loads such a folder only when they are passed as None."""
    return {k: None for k, v in index.items() if isinstance(v, list) and v and all(x is None for x in v)}


#: Every network a supported pipeline can hold (families list the ones they hash).
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def own_memory(pipe: Any) -> Any:
    """Copy every weight out of the memory-mapped files into fresh (64-byte aligned) memory.

    A diffusers folder loads its weights as views into memory-mapped .safetensors files, at
    whatever offset the file header leaves (often not a multiple of 64), while a single-file
    checkpoint's weights are copied. CPU matrix kernels can round differently for differently
    aligned operands (1 ulp on a one-row matmul, ~1e-5 on final latents), so without this the
    same weights would give different bits depending on how they were stored. Only needed
    for pipelines that compute on the CPU: moving to an accelerator copies the weights anyway.
    """
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        for t in [*module.parameters(), *module.buffers()] if module is not None else []:
            if not t.is_meta:
                t.data = t.data.clone()
    return pipe


def _arch(xl: bool) -> str:
    return "SDXL" if xl else "SD1.5"


def _check_config(config: Path, path: Path, is_xl: bool) -> None:
    """``config`` is a diffusers folder of the checkpoint's architecture (SD1.5 or SDXL)."""
    index_file = config / "model_index.json"
    if not index_file.is_file():
        raise DiffguideError(
            f"--config '{config}' is not a diffusers model folder (no model_index.json); single-file "
            "checkpoints need a local diffusers folder of the same architecture for their configs"
        )
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise DiffguideError(f"--config '{config}': model_index.json is not valid JSON ({err})") from err
    config_xl = "text_encoder_2" in index or "XL" in str(index.get("_class_name", ""))
    if config_xl != is_xl:
        raise DiffguideError(
            f"checkpoint '{path}' is {_arch(is_xl)} but --config '{config}' is an {_arch(config_xl)} model; "
            f"pass a diffusers folder of an {_arch(is_xl)} model"
        )


def _check_all_weights_loaded(pipe: Any, path: Path) -> None:
    """diffusers fills model weights from the checkpoint non-strictly: weights the file lacks
    (or that it attributes to another component) stay uninitialised ("meta") and would fail
    only at sampling time."""
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing = [k for k, v in [*module.named_parameters(), *module.named_buffers()] if v.is_meta]
        if missing:
            raise DiffguideError(
                f"checkpoint '{path}' has no weights for {len(missing)} parameter(s) of the {name} "
                f"(e.g. {missing[0]}); it does not match the --config architecture or is incomplete"
            )


def load_lora(pipe: Any, path: str | Path, name: str) -> None:
    """Load a LoRA (.safetensors) into the pipeline's UNet/text encoders as adapter ``name``."""
    path = Path(path)
    _check_file(path, "LoRA file")
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as err:  # diffusers raises several types for incompatible files
        raise DiffguideError(f"could not load LoRA '{path}': {err}") from err
    # diffusers only warns when no key fits the model (e.g. an SD LoRA on Flux): refuse it here
    loaded = {a for adapters in pipe.get_list_adapters().values() for a in adapters}
    if name not in loaded:
        raise DiffguideError(
            f"LoRA '{path}' has no weights that fit this {type(pipe).__name__} (a LoRA for another model family?)"
        )


#: Pipelines diffguide drives (one per model family adapter, see models/families).
PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionPAGPipeline",
    "StableDiffusionXLPAGPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "AuraFlowPipeline",
    "QwenImagePipeline",
)
WEIGHT_MODELS = COMPONENTS


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffguideError(f"{what} '{path}' is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DiffguideError(f"{what} '{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DiffguideError(f"{what} '{path}' is not a JSON object")
    return data


def check_folder(path: Path) -> dict[str, Any]:
    """A diffusers folder of a supported pipeline (:data:`PIPELINES`) whose weights are all
    .safetensors, complete, with configs of the classes ``model_index.json`` names. Returns the model index. One-line errors, before
    diffusers reads anything (it would unpickle a ``.bin`` and fail late with multi-line text)."""
    if not (path / "model_index.json").exists():
        raise DiffguideError(f"'{path}' is a folder but not a diffusers model (no model_index.json)")
    index = _json_object(path / "model_index.json", "model index")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise DiffguideError(
            f"'{path}' is a {name} model (model_index.json); diffguide drives {', '.join(PIPELINES)}"
        )
    for comp in WEIGHT_MODELS:
        spec = index.get(comp)
        if not (isinstance(spec, list) and len(spec) == 2 and spec[1]):
            continue  # absent or null component
        folder = path / comp
        config = _json_object(folder / "config.json", f"{comp} config")
        found = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if found is not None and found != spec[1]:
            raise DiffguideError(
                f"'{folder / 'config.json'}' describes {found}, but model_index.json says {comp} is {spec[1]}"
            )
        _check_weights(folder, comp)
    return index


def _check_weights(folder: Path, comp: str) -> None:
    files = sorted(folder.glob("*.safetensors"))
    pickles = sorted(f for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if not files and pickles:
        raise DiffguideError(
            f"the {comp} weights '{pickles[0]}' are a pickle file ({pickles[0].suffix}); diffguide loads only "
            ".safetensors, which cannot run code. Convert it once (torch.load with weights_only=True, then save_file)."
        )
    if not files:
        raise DiffguideError(f"'{folder}' has no weights (.safetensors)")
    for f in files:
        if not _safetensors_complete(f):
            raise DiffguideError(
                f"{comp} weights '{f}' are not a valid safetensors file (truncated or corrupt)"
            )
