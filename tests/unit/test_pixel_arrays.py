"""Pixel arrays (``{"array": ...}`` ImageRefs of batch messages): reading them safely and giving the numbers
an image file of the same pixels gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.imaging import (InvalidImage, array_ref_source, decode_image, load_pixel_array, pixels_png,
                             pixels_to_model, resolve_image_ref)

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20, "min_side": 8}


def _npy(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def _header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _file(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("shape, size", [((5, 32, 32, 3), 32), ((4, 40, 24, 3), 32), ((3, 20, 20, 1), 16),
                                         ((2, 64, 64, 3), 32)])
def test_pixels_give_exactly_what_the_png_of_the_same_pixels_gives(shape, size):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got = pixels_to_model(pixels, (size, size))
    want = np.stack([decode_image(_file(p), formats=["PNG"], size=(size, size), **LIMITS) for p in pixels])
    assert got.shape == (shape[0], 3, size, size) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, want)


def test_a_worker_batch_goes_to_float_in_one_step_with_each_images_own_numbers():
    """A worker keeps decoded 8-bit images as uint8 and converts its model batch at once."""
    from workers.runtime import DetectionRuntime

    rng = np.random.default_rng(3)
    u8 = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    batch = DetectionRuntime._model_input(u8, 32)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == np.float32 and batch.flags.c_contiguous
    want = np.stack([decode_image(_file(p), formats=["PNG"], size=(32, 32), **LIMITS) for p in u8])
    assert np.array_equal(batch, want)
    # a float image (16-bit samples) and one decoded for an older model's size join the same batch
    deep = rng.random((3, 32, 32), dtype=np.float32)
    older = np.full((16, 16, 3), 204, np.uint8)
    mixed = DetectionRuntime._model_input([u8[0], deep, older], 32)
    assert mixed.shape == (3, 3, 32, 32) and mixed.dtype == np.float32
    assert np.array_equal(mixed[0], want[0]) and np.array_equal(mixed[1], deep)
    assert np.allclose(mixed[2], 0.8, atol=1e-6)


def test_an_insertions_png_holds_the_same_pixels():
    for shape in ((9, 12, 3), (16, 10, 1)):
        pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        back = np.asarray(Image.open(io.BytesIO(pixels_png(pixels))))
        assert np.array_equal(back.reshape(shape), pixels)


def test_a_pixel_array_file_loads_as_n_h_w_c_with_its_pixels():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    assert np.array_equal(load_pixel_array(_npy(rgb), **LIMITS), rgb)
    gray = rng.integers(0, 256, (2, 9, 9), dtype=np.uint8)
    assert np.array_equal(load_pixel_array(_npy(gray), **LIMITS), gray[..., None])
    assert np.array_equal(load_pixel_array(_npy(np.asfortranarray(rgb)), **LIMITS), rgb)  # column-major files too


@pytest.mark.parametrize("blob, code, words", [
    (b"", "not_an_image", "not a readable .npy"),
    (b"\x93NUMPY garbage", "not_an_image", "not a readable .npy"),
    (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "unsupported_mode", "only uint8"),  # no unpickling
    (_npy(np.zeros((2, 16, 16, 3), np.float32)), "unsupported_mode", "only uint8"),
    (_npy(np.zeros((2, 16, 16, 4), np.uint8)), "unsupported_mode", "C 1 (gray) or 3"),
    (_npy(np.zeros((16, 16), np.uint8)), "unsupported_mode", "expected (n, H, W)"),
    (_npy(np.zeros((2, 4, 16, 3), np.uint8)), "too_small", "at least 8"),
    (_npy(np.zeros((1, 2048, 1024), np.uint8)), "decompression_bomb", "exceeds the limit"),
    (_npy(np.zeros((1, 1024, 700, 3), np.uint8)), "too_many_bytes", "over the limit"),
    (_npy(np.zeros((3, 16, 16), np.uint8))[:-1], "truncated", "767 bytes follow"),
    (_npy(np.zeros((3, 16, 16), np.uint8)) + b"x", "truncated", "769 bytes follow"),
    # a header that claims 10^9 images over a few bytes: refused before anything is allocated
    (_header((10**9, 16, 16)) + bytes(256), "truncated", "but 256 bytes follow"),
])
def test_bad_pixel_arrays_are_refused_with_a_reason(blob, code, words):
    with pytest.raises(InvalidImage) as info:
        load_pixel_array(blob, **LIMITS)
    assert info.value.code == code and words in info.value.reason


def test_an_npz_archive_is_refused():
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(InvalidImage, match="not a readable .npy"):
        load_pixel_array(buf.getvalue(), **LIMITS)


def test_array_references_are_parsed_and_malformed_ones_refused():
    assert array_ref_source({"inline": "AAAA"}) is None
    assert array_ref_source({"array": {"redis_key": "umcd:img:m1", "index": 3}}) == ("redis_key", "umcd:img:m1", 3)
    assert array_ref_source({"array": {"path": "/data/a.npy", "index": 0}}) == ("path", "/data/a.npy", 0)
    for bad in ({"array": {"redis_key": "umcd:img:m1"}}, {"array": {"redis_key": "umcd:img:m1", "index": -1}},
                {"array": {"redis_key": "umcd:img:m1", "index": True}},
                {"array": {"redis_key": "umcd:img:m1", "path": "/a.npy", "index": 0}},
                {"array": {"index": 0}}, {"array": "umcd:img:m1"},
                {"array": {"redis_key": "umcd:img:m1", "index": 0}, "inline": "AAAA"}):
        with pytest.raises(InvalidImage) as info:
            array_ref_source(bad)
        assert info.value.code == "bad_reference"
    with pytest.raises(InvalidImage, match="only in a batch message"):  # a single-image task cannot read one
        resolve_image_ref({"array": {"redis_key": "umcd:img:m1", "index": 0}})


def test_part_references_are_parsed_and_malformed_or_out_of_range_ones_refused():
    from workers.imaging import blob_part, message_blob_key, part_ref_source

    ref = {"part": {"redis_key": "umcd:img:m1", "offset": 3, "length": 2}}
    assert part_ref_source({"inline": "AAAA"}) is None
    assert part_ref_source(ref) == ("umcd:img:m1", 3, 2)
    assert part_ref_source({"part": {"redis_key": "umcd:img:m1", "offset": 3, "length": 0}}) == ("umcd:img:m1", 3, 0)
    for bad in ({"part": {"redis_key": "umcd:img:m1", "offset": 0}},
                {"part": {"redis_key": "umcd:img:m1", "offset": -1, "length": 2}},
                {"part": {"redis_key": "umcd:img:m1", "offset": 0, "length": -1}},
                {"part": {"redis_key": "umcd:img:m1", "offset": True, "length": 2}},
                {"part": {"redis_key": "umcd:img:m1", "offset": 0, "length": 2.0}},
                {"part": {"redis_key": "celery-task-meta-m1", "offset": 0, "length": 2}},
                {"part": {"redis_key": "umcd:img:m1", "offset": 0, "length": 2, "path": "/x"}},
                {"part": "umcd:img:m1"}, {**ref, "inline": "AAAA"}):
        with pytest.raises(InvalidImage) as info:
            part_ref_source(bad)
        assert info.value.code == "bad_reference"
    blob = b"0123456789"
    assert blob_part(blob, "umcd:img:m1", 3, 2, max_bytes=8) == b"34"
    assert blob_part(blob, "umcd:img:m1", 0, 10, max_bytes=10) == blob
    with pytest.raises(InvalidImage, match=r"part \[9, 11\) lies past the end of umcd:img:m1 \(10 bytes\)"):
        blob_part(blob, "umcd:img:m1", 9, 2, max_bytes=8)
    with pytest.raises(InvalidImage) as info:
        blob_part(blob, "umcd:img:m1", 0, 9, max_bytes=8)
    assert info.value.code == "too_many_bytes"
    with pytest.raises(InvalidImage, match="only in a batch message"):  # a single-image task cannot read one
        resolve_image_ref(ref)
    assert message_blob_key(ref) == "umcd:img:m1"
    assert message_blob_key({"array": {"redis_key": "umcd:img:m2", "index": 0}}) == "umcd:img:m2"
    assert message_blob_key({"array": {"path": "/a.npy", "index": 0}}) is None
    assert message_blob_key({"part": {"redis_key": "umcd:img:m1"}}) is None  # malformed
    assert message_blob_key({"redis_key": "umcd:img:m1"}) is None  # a single image's own key


def test_an_array_on_a_shared_path_is_read_inside_the_allowed_roots_only(tmp_path):
    from workers.imaging import read_array_source

    inside, outside = tmp_path / "shared", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    pixels = np.random.default_rng(4).integers(0, 256, (2, 10, 10, 3), dtype=np.uint8)
    for folder in (inside, outside):
        np.save(folder / "a.npy", pixels)
    blob = read_array_source("path", str(inside / "a.npy"), allowed_roots=[inside])
    assert np.array_equal(load_pixel_array(blob, **LIMITS), pixels)
    with pytest.raises(InvalidImage, match="outside the allowed directories"):
        read_array_source("path", str(outside / "a.npy"), allowed_roots=[inside])
    with pytest.raises(InvalidImage, match="not found"):
        read_array_source("path", str(inside / "missing.npy"), allowed_roots=[inside])
