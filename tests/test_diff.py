"""diffguide.repro.diff: tensor comparison, file loading, CLI entry point."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffguide.errors import DiffguideError
from diffguide.repro.diff import (
    DiffReport,
    compare,
    compare_dicts,
    load_tensors,
    render_report,
    run_diff_cli,
)


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse a file holding one."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _cli(a, b, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = run_diff_cli(
        a, b, kw.pop("rtol", 1e-5), kw.pop("atol", 1e-6), kw.pop("as_json", False), stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_on_known_tensors():
    a = _t([1.0, 2.0, 3.0, 4.0])
    b = _t([1.0, 2.5, 2.0, 4.0])
    r = compare(a, b)
    # |a-b| = [0, .5, 1, 0]; rel = |a-b| / (|b| + 1e-8) = [0, .2, .5, 0]
    assert r.comparable and not r.ok and not r.allclose
    assert r.max_abs_err == pytest.approx(1.0)
    assert r.mean_abs_err == pytest.approx(0.375)
    assert r.max_rel_err == pytest.approx(0.5, rel=1e-7)
    assert r.mean_rel_err == pytest.approx(0.175, rel=1e-7)
    assert r.violations == 2
    assert r.violation_fraction == pytest.approx(0.5)
    assert r.shape_a == r.shape_b == (4,)
    assert r.dtype_a == r.dtype_b == "float64"
    assert r.nan_a == r.nan_b == r.inf_a == r.inf_b == 0
    assert r.near_zero_note is None
    assert [d.index for d in r.top[:2]] == [(2,), (1,)]
    assert r.top[0].a == 3.0 and r.top[0].b == 2.0 and r.top[0].abs_err == 1.0


def test_identical_tensors_are_ok():
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    r = compare(x, x.clone())
    assert r.ok and r.allclose and r.violations == 0
    assert r.max_abs_err == 0.0 and r.max_rel_err == 0.0
    assert r.reason is None


def test_top_k_multi_dimensional_indices_and_per_channel():
    b = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    a = b.clone()
    a[1, 2, 0, 1] = 5.0  # largest
    a[0, 1, 1, 0] = -3.0  # second
    a[0, 1, 0, 0] = 1.0  # third
    r = compare(a, b, top_k=2)
    assert [d.index for d in r.top] == [(1, 2, 0, 1), (0, 1, 1, 0)]
    assert r.top[1].a == -3.0 and r.top[1].abs_err == 3.0
    assert [c.channel for c in r.per_channel] == [0, 1, 2]
    ch = {c.channel: c for c in r.per_channel}
    assert ch[0].max_abs_err == 0.0 and ch[0].violations == 0
    assert ch[1].max_abs_err == 3.0
    assert ch[1].mean_abs_err == pytest.approx(4.0 / 8)  # 8 elements per channel
    assert ch[1].violations == 2
    assert ch[2].max_abs_err == 5.0 and ch[2].mean_abs_err == pytest.approx(5.0 / 8)


def test_no_per_channel_for_1d():
    assert compare(_t([1.0, 2.0]), _t([1.0, 2.5])).per_channel == ()


def test_nan_and_inf_counts():
    a = _t([1.0, math.nan, math.inf, 2.0, -math.inf])
    b = _t([1.0, 1.0, math.inf, math.nan, 0.0])
    r = compare(a, b)
    assert (r.nan_a, r.nan_b, r.inf_a, r.inf_b) == (1, 1, 2, 1)
    # equal infinities are close (torch semantics); NaNs and inf-vs-finite are not
    assert r.violations == 3 and not r.ok
    assert r.compared == 1  # only element 0 is finite on both sides
    assert any("NaN/Inf" in n for n in r.notes)
    json.loads(r.to_json())  # no NaN/Infinity tokens in the JSON


# --------------------------------------------------------------------------------------- near zero


def test_near_zero_reference_note():
    # Like a service-vs-ComfyUI-workflow report: a huge max relative error that only comes from dividing by a near-zero reference.
    b = _t([1e-9, 1.0, -2.0, 3.0, 0.5, -1.5])
    a = b + 1e-4
    r = compare(a, b)
    assert r.max_rel_err == pytest.approx(1e-4 / (1e-9 + 1e-8), rel=1e-6)  # about 9.1e3
    assert r.near_zero_count == 1
    assert r.near_zero_fraction == pytest.approx(1 / 6)
    assert r.max_rel_err_excl_near_zero == pytest.approx(1e-4 / 0.5, rel=1e-6)
    assert r.near_zero_note is not None
    assert "near-zero reference" in r.near_zero_note
    assert "absolute error" in r.near_zero_note
    assert r.max_abs_err == pytest.approx(1e-4)


def test_no_near_zero_note_when_relative_error_is_genuine():
    b = _t([1.0, 2.0, 3.0, 1e-9])
    a = _t([2.0, 2.0, 3.0, 1e-9])  # the max relative error (1.0) is at |b| = 1, not near zero
    r = compare(a, b)
    assert r.near_zero_count == 1
    assert r.near_zero_note is None


def test_near_zero_threshold_can_be_given():
    b = _t([0.01, 1.0])
    r = compare(b + 0.001, b, near_zero=0.05)
    assert r.near_zero_count == 1 and r.near_zero_threshold == 0.05
    assert r.near_zero_note is not None and "as given" in r.near_zero_note


# ---------------------------------------------------------------------------------------- allclose


def test_allclose_boundary_is_inclusive_and_uses_the_reference():
    # atol + rtol * |b| = 0.25 + 0.5 * 1 = 0.75, all exactly representable
    one = _t([1.0])
    assert compare(_t([1.75]), one, rtol=0.5, atol=0.25).allclose  # |a-b| == bound: close
    assert compare(_t([0.25]), one, rtol=0.5, atol=0.25).allclose
    assert not compare(_t([1.875]), one, rtol=0.5, atol=0.25).allclose
    # b is the reference: |2 - 1| <= 0.25 + 0.5 * 2 but not <= 0.25 + 0.5 * 1
    assert compare(one, _t([2.0]), rtol=0.5, atol=0.25).allclose
    assert not compare(_t([2.0]), one, rtol=0.5, atol=0.25).allclose


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_allclose_agrees_with_torch(dtype):
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        b = torch.randn(64, generator=g).to(dtype)
        a = (b.double() + torch.randn(64, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
        for rtol, atol in [(1e-5, 1e-6), (1e-3, 1e-3), (1e-2, 0.0), (0.0, 2e-3)]:
            r = compare(a, b, rtol=rtol, atol=atol)
            assert r.allclose == torch.allclose(a, b, rtol=rtol, atol=atol)
            assert r.violations == int((~torch.isclose(a, b, rtol=rtol, atol=atol)).sum())


def test_dtype_mismatch_is_compared_in_float64_with_a_note():
    a = torch.tensor([1.0, 2.0], dtype=torch.float16)
    b = torch.tensor([1.0, 2.0], dtype=torch.float32)
    r = compare(a, b)
    assert r.ok and r.dtype_a == "float16" and r.dtype_b == "float32"
    assert any("float64" in n for n in r.notes)


def test_negative_tolerance_is_an_error():
    with pytest.raises(DiffguideError):
        compare(_t([1.0]), _t([1.0]), rtol=-1)


# ---------------------------------------------------------------------------------- shape mismatch


def test_shape_mismatch_is_a_result_not_a_crash():
    r = compare(torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 16, 4, 4))
    assert isinstance(r, DiffReport)
    assert not r.ok and not r.comparable and not r.allclose
    assert "shape mismatch" in (r.reason or "")
    assert r.shape_a == (1, 16, 1, 4, 4) and r.shape_b == (1, 16, 4, 4)
    assert any("same number of elements" in n for n in r.notes)
    assert r.max_abs_err is None
    json.loads(r.to_json())
    render_report(r, _console())


def test_shape_mismatch_same_rank_names_the_dims():
    r = compare(torch.zeros(2, 4, 8), torch.zeros(2, 3, 8))
    assert any("dim(s) [1]" in n for n in r.notes)


# ---------------------------------------------------------------------------------- dicts / render


def test_compare_dicts_reports_unmatched_keys():
    x = torch.ones(2, 2)
    s = compare_dicts({"a": x, "b": x, "only_a": x}, {"b": x + 1, "a": x, "only_b": x})
    assert [r.name for r in s.reports] == ["a", "b"]
    assert s.only_in_a == ("only_a",) and s.only_in_b == ("only_b",)
    assert s.reports[0].ok and not s.reports[1].ok
    assert not s.ok
    assert compare_dicts({"a": x}, {"a": x.clone()}).ok
    doc = json.loads(s.to_json())
    assert doc["only_in_a"] == ["only_a"] and len(doc["reports"]) == 2


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=120)


def test_render_report_prints_tables():
    from rich.console import Console

    buf = io.StringIO()
    b = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    render_report(compare(b + 0.1, b), Console(file=buf, width=120))
    text = buf.getvalue()
    assert "max abs error" in text and "largest absolute differences" in text and "per channel" in text
    buf = io.StringIO()
    render_report(compare_dicts({"x": b}, {"x": b, "y": b}), Console(file=buf, width=120))
    assert "only in b" in buf.getvalue()


# ------------------------------------------------------------------------------------------ files


def test_npy_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    np.save(tmp_path / "x.npy", arr)
    loaded = load_tensors(tmp_path / "x.npy")
    assert list(loaded) == ["tensor"]
    assert torch.equal(loaded["tensor"], torch.from_numpy(arr))


def test_npz_and_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"latents": torch.randn(1, 4, 8, 8, generator=g), "eps": torch.randn(3, generator=g).half()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    loaded = load_tensors(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    np.savez(tmp_path / "x.npz", **{k: v.numpy() for k, v in tensors.items()})
    loaded = load_tensors(tmp_path / "x.npz")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_pt_with_tensors_loads_and_flattens(tmp_path):
    x = torch.arange(4.0)
    torch.save({"a": x, "nested": {"b": x * 2, "n": 3}, "list": [x * 3]}, tmp_path / "x.pt")
    loaded = load_tensors(tmp_path / "x.pt")
    assert set(loaded) == {"a", "nested/b", "list/0"}
    assert torch.equal(loaded["nested/b"], x * 2)
    torch.save(x, tmp_path / "bare.pth")
    assert list(load_tensors(tmp_path / "bare.pth")) == ["tensor"]


def test_pickle_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"latents": torch.ones(2), "extra": NotATensor()}, path)
    with pytest.raises(DiffguideError) as info:
        load_tensors(path)
    msg = str(info.value)
    assert "arbitrary Python objects" in msg
    assert "NotATensor" in msg
    assert "will not unpickle" in msg
    assert "safetensors" in msg and "save_file" in msg
    code, out, err = _cli(path, path)
    assert code == 2 and "arbitrary Python objects" in err and out == ""


def test_object_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DiffguideError, match="will not"):
        load_tensors(tmp_path / "obj.npy")


def test_bad_input_errors(tmp_path):
    with pytest.raises(DiffguideError, match="no such file"):
        load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DiffguideError, match=r"unsupported file type '\.txt'"):
        load_tensors(tmp_path / "x.txt")
    for name in ("empty.safetensors", "empty.pt", "empty.npy"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DiffguideError, match="empty"):
            load_tensors(tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DiffguideError, match="not a valid safetensors"):
        load_tensors(tmp_path / "junk.safetensors")
    save_file({"x": torch.randn(100)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])  # truncated inside the tensor data
    with pytest.raises(DiffguideError, match="not a valid safetensors"):
        load_tensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage12345")
    with pytest.raises(DiffguideError, match="not a readable PyTorch file"):
        load_tensors(tmp_path / "junk.pt")


# -------------------------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_json(tmp_path):
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "a.npy", x.numpy())
    save_file({"latents": x}, str(tmp_path / "b.safetensors"))
    save_file({"latents": x + 1e-3}, str(tmp_path / "c.safetensors"))
    save_file({"latents": x[:, :2]}, str(tmp_path / "d.safetensors"))

    code, out, _ = _cli(tmp_path / "a.npy", tmp_path / "b.safetensors")  # single tensors: names may differ
    assert code == 0 and "within tolerance" in out
    code, out, _ = _cli(tmp_path / "c.safetensors", tmp_path / "b.safetensors", as_json=True)
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["max_abs_err"] == pytest.approx(1e-3, rel=1e-3)
    code, _, _ = _cli(tmp_path / "c.safetensors", tmp_path / "b.safetensors", rtol=0, atol=2e-3)
    assert code == 0
    code, out, _ = _cli(tmp_path / "d.safetensors", tmp_path / "b.safetensors")
    assert code == 1 and "shape mismatch" in out
    code, _, err = _cli(tmp_path / "nope.npy", tmp_path / "b.safetensors")
    assert code == 2 and "no such file" in err
    code, _, err = _cli(tmp_path / "a.npy", tmp_path / "b.safetensors", rtol=-1)
    assert code == 2


def test_cli_multi_key_files(tmp_path):
    x = torch.ones(2, 2)
    save_file({"a": x, "b": x.clone()}, str(tmp_path / "one.safetensors"))
    save_file({"a": x, "c": x.clone()}, str(tmp_path / "two.safetensors"))
    code, out, _ = _cli(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    assert code == 1 and "only in" in out
    code, out, _ = _cli(tmp_path / "one.safetensors", tmp_path / "one.safetensors", as_json=True)
    assert code == 0 and json.loads(out)["ok"] is True


# ------------------------------------------------------------------------------------------- images


def test_png_images_compare_pixel_by_pixel(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    other = pixels.copy()
    other[3, 5, 1] = (int(other[3, 5, 1]) + 7) % 256
    a, b, same = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "same.png"
    Image.fromarray(pixels).save(a)
    Image.fromarray(other).save(b)
    Image.fromarray(pixels).save(same)
    loaded = load_tensors(a)["image"]
    assert loaded.shape == (1, 3, 6, 8) and loaded.dtype == torch.float32
    assert torch.equal(loaded[0].permute(1, 2, 0), torch.from_numpy(pixels).float())
    code, out, _ = _cli(a, same, rtol=0.0, atol=0.0)
    assert code == 0
    code, out, _ = _cli(a, b, rtol=0.0, atol=0.0, as_json=True)
    assert code == 1
    entry = json.loads(out)  # one tensor on each side: a flat report
    assert entry["name"] == "image" and entry["violations"] == 1
    assert entry["max_abs_err"] == pytest.approx(abs(int(other[3, 5, 1]) - int(pixels[3, 5, 1])))
    assert list(entry["top"][0]["index"]) == [0, 1, 3, 5]
    grey = tmp_path / "grey.png"
    Image.fromarray(pixels[..., 0]).save(grey)
    assert load_tensors(grey)["image"].shape == (1, 1, 6, 8)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = _cli(broken, a)
    assert code == 2 and "not a readable PNG image" in err
