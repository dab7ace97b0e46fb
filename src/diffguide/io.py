"""Saving results with their provenance, and reading it back.

:func:`save_result` writes, per image ``i`` of a :class:`~diffguide.pipeline.GenerationResult`::

    {prefix}-{index:03d}-{seed}.png          the image; PNG text chunks "diffguide" (the manifest
                                             as JSON) and "parameters" (A1111 style)
    {prefix}-{index:03d}-{seed}.json         the same manifest (sidecar)
    {prefix}-{index:03d}-{seed}.safetensors  with ``save_latents``: key "latents", shape (1, C, h, w),
                                             the manifest JSON in the metadata under "diffguide"

File names never overwrite anything. When any of an image's three names is taken, the image
gets the first free numbered name: ``{prefix}-{index:03d}-{seed}_1.png``, ``_2``, ...; the
three files of one image always share one stem. Each file is written to a hidden temporary
file in the output folder (``.tmp-*``), flushed to disk and then published under its final
name without replacing an existing file (a hard link; on file systems without hard links,
``os.replace`` after a check). A reader never sees a half-written file, and the PNG is
published last, so when a PNG exists its sidecars do too.

The manifest JSON is Python's ``json`` (non-finite floats, such as a window's open
``sigma_max``, are written as ``Infinity``); :func:`read_manifest` reads it back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DiffguideError

if TYPE_CHECKING:
    from torch import Tensor

    from .pipeline import GenerationResult

MANIFEST_KEY = "diffguide"  # PNG text chunk and safetensors metadata key
PARAMETERS_KEY = "parameters"  # A1111's PNG text chunk
MAX_SUFFIX = 10_000
MAX_MANIFEST_CHARS = 8_000_000  # refused when reading: far above any manifest diffguide writes

# diffguide scheduler names -> A1111 sampler names (what A1111's "PNG Info" understands)
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
}

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def manifest_json(manifest: Mapping[str, Any], *, indent: int | None = None) -> str:
    return json.dumps(manifest, indent=indent, ensure_ascii=False)


def _num(x: Any) -> str:
    return f"{float(x):g}"


def a1111_parameters(manifest: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text of one image's manifest.

    ``prompt``, then ``Negative prompt: ...`` (when not empty), then one line of
    ``Key: value`` pairs: steps, sampler, CFG scale, each guidance term's own pairs (its class's
    ``a1111``: "PAG scale: 3", ...), seed, size, model hash (diffguide's UNet hash), model name
    and version.
    """
    from .guidance.registry import REGISTRY

    image, params = manifest["image"], manifest["parameters"]
    lines = [str(image["prompt"])]
    if image.get("negative_prompt"):
        lines.append(f"Negative prompt: {image['negative_prompt']}")
    terms = params.get("guidance", [])
    cfg = next((t for t in terms if t.get("method") == "cfg"), None)
    fields = [
        ("Steps", params["steps"]),
        ("Sampler", A1111_SAMPLERS.get(params["scheduler"], params["scheduler"])),
        ("CFG scale", _num(cfg["scale"] if cfg else 1.0)),
    ]
    for term in terms:
        cls = REGISTRY.get(term.get("method"))
        if cls is not None:
            fields += cls.a1111(term)
    fields += [
        ("Seed", image["seed"]),
        ("Size", f"{params['width']}x{params['height']}"),
    ]
    model = manifest.get("model", {})
    unet_hash = model.get("hashes", {}).get("unet")
    if unet_hash:
        fields.append(("Model hash", unet_hash))
    if model.get("source"):
        fields.append(("Model", Path(str(model["source"])).name))
    version = manifest.get("environment", {}).get("versions", {}).get("diffguide")
    if version is None:
        from . import __version__ as version
    fields.append(("Version", f"diffguide {version}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


# -- atomic, no-clobber writes ---------------------------------------------------------------
def _write_temp(folder: Path, data: bytes, suffix: str) -> Path:
    """A new hidden file in ``folder`` holding ``data``, flushed to disk (mode from the umask)."""
    for _ in range(100):
        path = folder / f".tmp-{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return path
    raise DiffguideError(f"could not create a temporary file in '{folder}'")


def replace_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path``, replacing it atomically: readers see the old or the new file,
    never a half-written one (reports rewritten while a long benchmark runs)."""
    dst = Path(path)
    tmp = _write_temp(dst.parent, data.encode() if isinstance(data, str) else data, dst.suffix)
    try:
        os.replace(tmp, dst)
    except BaseException:  # dst is a folder, a signal arrived, ...: leave no temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dst


def write_new(path: str | os.PathLike[str], data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically, never replacing anything: DiffguideError if ``path``
    exists (also when another writer creates it meanwhile). Used for explicitly named outputs
    (``--trace FILE``), where a numbered name would surprise the caller."""
    dst = Path(path)
    if dst.exists() or dst.is_symlink():
        raise DiffguideError(
            f"{what} '{dst}' already exists; diffguide never overwrites a file: choose a new name"
        )
    tmp = _write_temp(dst.parent, data, dst.suffix)
    try:
        _publish(tmp, dst)
    except FileExistsError:
        raise DiffguideError(
            f"{what} '{dst}' already exists; diffguide never overwrites a file: choose a new name"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dst


def _publish(tmp: Path, dst: Path) -> None:
    """Give ``tmp`` the name ``dst`` atomically; FileExistsError if ``dst`` exists. Keeps ``tmp``."""
    try:
        os.link(tmp, dst)  # atomic and never replaces an existing file
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network / FAT file systems)
        if dst.exists():
            raise FileExistsError(str(dst)) from None
        copy = _write_temp(dst.parent, tmp.read_bytes(), dst.suffix)  # tmp stays usable for a retry
        os.replace(copy, dst)


def _stems(base: str) -> Iterator[str]:
    yield base
    for n in range(1, MAX_SUFFIX):
        yield f"{base}_{n}"


def _save_files(folder: Path, base: str, files: list[tuple[str, bytes]]) -> dict[str, Path]:
    """Write ``files`` (suffix, bytes) under the first stem free for all of them, last one last."""
    temps = [(suffix, _write_temp(folder, data, suffix)) for suffix, data in files]
    try:
        for stem in _stems(base):
            if any((folder / f"{stem}{suffix}").exists() for suffix, _ in temps):
                continue
            published: list[Path] = []
            try:
                for suffix, tmp in temps:
                    dst = folder / f"{stem}{suffix}"
                    _publish(tmp, dst)
                    published.append(dst)
            except FileExistsError:  # another writer took this stem meanwhile: undo ours, try the next
                for p in published:
                    p.unlink()
                continue
            except BaseException:  # failed or interrupted (SIGINT/SIGTERM): no image half-published
                for p in published:
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            return {suffix: folder / f"{stem}{suffix}" for suffix, _ in temps}
        raise DiffguideError(f"no free file name for '{base}' in '{folder}' after {MAX_SUFFIX} tries")
    finally:
        for _, tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _png_bytes(image: Any, manifest: Mapping[str, Any]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(manifest))
    info.add_text(MANIFEST_KEY, manifest_json(manifest))  # tEXt, or UTF-8 iTXt when needed
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _latents_bytes(latents: Tensor, manifest: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save(
        {"latents": latents.detach().cpu().contiguous()}, metadata={MANIFEST_KEY: manifest_json(manifest)}
    )


def save_result(
    result: GenerationResult,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "diffguide",
    save_latents: bool = False,
) -> list[Path]:
    """Save each image as PNG (manifest in its text chunks) + JSON sidecar (+ latents).

    Returns the PNG paths, one per image in batch order; the sidecars share each PNG's
    stem (``path.with_suffix(".json")``, ``.with_suffix(".safetensors")``). The output
    folder is created. See the module docstring for names and the no-overwrite rule.
    """
    check_prefix(prefix)
    if not result.images:
        raise DiffguideError(
            "the result has no decoded images (generated with decode=False): nothing to save"
        )
    if len(result.images) != len(result.manifests):
        raise DiffguideError(f"{len(result.images)} images but {len(result.manifests)} manifests")
    folder = Path(out_dir)
    with _output_folder(folder):
        paths = []
        for i, (image, manifest) in enumerate(zip(result.images, result.manifests, strict=True)):
            index, seed = manifest["image"]["index"], manifest["image"]["seed"]
            files = []
            if save_latents:
                files.append((".safetensors", _latents_bytes(result.latents[i : i + 1], manifest)))
            files.append((".json", (manifest_json(manifest, indent=2) + "\n").encode()))
            files.append((".png", _png_bytes(image, manifest)))  # last: a PNG implies its sidecars
            saved = _save_files(folder, f"{prefix}-{index:03d}-{seed}", files)
            paths.append(saved[".png"])
    return paths


def check_prefix(prefix: str) -> None:
    if not _PREFIX.match(prefix):
        raise DiffguideError(
            f"file prefix '{prefix}' must start with a letter or digit and contain only letters, digits, '.', '_', '-'"
        )


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the folders created, deepest first."""
    created = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        created.append(p)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise DiffguideError(f"output folder '{folder}' is not a folder: {err.strerror}") from None
    except OSError as err:
        raise DiffguideError(f"cannot create output folder '{folder}': {err.strerror}") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first; stops at the first one that is not empty
        try:
            p.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def _output_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` for writing; if the block fails, remove the folders it created while empty."""
    created = _make_folder(folder)
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


def check_writable(
    folder: str | os.PathLike[str], longest_name: str, hint: str = "use a shorter --prefix"
) -> None:
    """Fail now, not after sampling, if ``folder`` cannot take a file named ``longest_name``:
    create it (and missing parents), write and remove a probe file of that name's length, and
    remove again the folders created. Leaves the file system as it was."""
    folder = Path(folder)
    created = _make_folder(folder)
    try:
        probe = folder / (".tmp-" + secrets.token_hex(4)).ljust(len(longest_name), "0")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise DiffguideError(
                    f"file names like '{longest_name[:40]}...' ({len(longest_name)} characters) are too long "
                    f"for '{folder}': {hint}"
                ) from None
            raise DiffguideError(f"cannot write files in output folder '{folder}': {err.strerror}") from None
        os.close(fd)
        probe.unlink()
    finally:
        _remove_empty(created)


def check_file_target(path: str | os.PathLike[str], what: str) -> None:
    """``path`` can be written as a new file: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise DiffguideError(
            f"{what} '{path}' is a folder; give a file name, e.g. '{path / 'trace.safetensors'}'"
        )
    check_writable(path.parent, path.name, "use a shorter file name")


# -- reading back ----------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest saved with an image: from its PNG, JSON sidecar or latents file."""
    path = Path(path)
    if not path.is_file():
        raise DiffguideError(f"'{path}' does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        if path.stat().st_size > MAX_MANIFEST_CHARS:
            _too_big(path, path.stat().st_size)
        try:
            return _loads(path.read_text(encoding="utf-8"), path)
        except UnicodeDecodeError as err:
            raise DiffguideError(f"'{path}' is not UTF-8 text, not a manifest: {err.reason}") from None
    if suffix == ".safetensors":
        return _loads(_safetensors_metadata(path).get(MANIFEST_KEY), path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DiffguideError(f"'{path}' is a {im.format} image, not a PNG saved by diffguide")
            im.load()  # a truncated or corrupt file fails here, not later in replay
            text = getattr(im, "text", {}).get(MANIFEST_KEY)
    except UnidentifiedImageError as err:
        raise DiffguideError(f"'{path}' is not an image (expected a PNG saved by diffguide)") from err
    except ValueError as err:  # PIL refuses text chunks over PngImagePlugin.MAX_TEXT_CHUNK
        raise DiffguideError(
            f"'{path}' has a text chunk too large to be a diffguide manifest ({err})"
        ) from None
    except (OSError, SyntaxError, EOFError) as err:
        raise DiffguideError(f"'{path}' is a damaged PNG ({err})") from None
    return _loads(text, path)


def _too_big(path: Path, size: int) -> None:
    raise DiffguideError(
        f"the manifest in '{path}' is {size / 1e6:.1f} MB; diffguide's are far smaller "
        f"(limit {MAX_MANIFEST_CHARS // 1_000_000} MB): not a manifest diffguide wrote"
    )


def _loads(text: str | None, path: Path) -> dict[str, Any]:
    if text is None:
        raise DiffguideError(
            f"'{path}' has no diffguide manifest (no '{MANIFEST_KEY}' entry); was it saved by diffguide?"
        )
    if len(text) > MAX_MANIFEST_CHARS:
        _too_big(path, len(text))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DiffguideError(f"the diffguide manifest in '{path}' is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "diffguide_manifest" not in data:
        raise DiffguideError(f"'{path}' holds JSON that is not a diffguide manifest")
    return data


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for bad files
        raise DiffguideError(f"'{path}' is not a valid safetensors file: {err}") from err


def load_latents(path: str | os.PathLike[str]) -> tuple[Tensor, dict[str, Any]]:
    """The latents (1, C, h, w) and manifest saved by ``save_result(..., save_latents=True)``."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    manifest = read_manifest(path)
    tensors = load_file(str(path))
    if "latents" not in tensors:
        raise DiffguideError(f"'{path}' has no 'latents' tensor")
    return tensors["latents"], manifest
