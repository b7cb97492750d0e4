"""The worker's image decoder on a hostile corpus, random bytes and mutations, and image references."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyspng
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.hostile_corpus import CORPUS_LIMITS, CORPUS_NAMES, EXPECTED_CODES, build_hostile_corpus
from workers.imaging import (
    PNG_SIGNATURE,
    InvalidImage,
    _fast_png,
    decode_image,
    decode_pixels,
    fast_png_available,
    resolve_image_ref,
    to_model,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    entries = build_hostile_corpus(tmp_path_factory.mktemp("hostile"))
    return {name: (path, expected) for name, path, expected in entries}


def _decode(data: bytes, **overrides) -> np.ndarray:
    return decode_image(data, **{**CORPUS_LIMITS, **overrides})


def _png(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _assert_model_input(array: np.ndarray, shape=(3, 32, 32)) -> None:
    assert isinstance(array, np.ndarray)
    assert array.shape == shape
    assert array.dtype == np.float32
    assert array.flags.c_contiguous
    assert np.all(np.isfinite(array))
    assert array.min() >= 0.0 and array.max() <= 1.0


def _decodes_or_refuses(data: bytes) -> None:
    """The decoder's whole contract: a model input, or InvalidImage with a reason; nothing else."""
    try:
        array = _decode(data)
    except InvalidImage as exc:
        assert exc.reason and isinstance(exc.reason, str)
        assert exc.code
        return
    _assert_model_input(array)


# --------------------------------------------------------------------------- the corpus


def test_corpus_holds_at_least_30_files_of_both_kinds(corpus):
    kinds = [expected for _, expected in corpus.values()]
    assert len(corpus) >= 30
    assert kinds.count("valid") >= 15 and kinds.count("invalid") >= 15


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_file_decodes_to_model_input_or_raises_invalid_image(corpus, name):
    path, expected = corpus[name]
    data = path.read_bytes()
    if expected == "valid":
        _assert_model_input(_decode(data))
    else:
        with pytest.raises(InvalidImage) as info:
            _decode(data)
        assert info.value.reason
        if name in EXPECTED_CODES:
            assert info.value.code == EXPECTED_CODES[name], info.value.reason


def test_decode_pixels_is_decode_image_before_its_float_conversion(corpus):
    """Workers keep 8-bit images as uint8 until their batch goes to float: the numbers must not change."""
    decoded, deeper = [], []
    for name, (path, expected) in sorted(corpus.items()):
        if expected != "valid":
            continue
        data = path.read_bytes()
        pixels = decode_pixels(data, **CORPUS_LIMITS)
        assert np.array_equal(to_model(pixels), _decode(data)), name
        if pixels.dtype == np.uint8:
            assert pixels.shape == (32, 32, 3), name
            decoded.append(pixels)
        else:  # 16-bit, 32-bit or float samples: already the model input
            _assert_model_input(pixels)
            deeper.append(name)
    assert len(decoded) >= 12 and "gray16.pgm" in deeper
    stacked = to_model(np.stack(decoded))  # a batch goes to float in one step, with the same numbers
    assert stacked.shape == (len(decoded), 3, 32, 32) and stacked.flags.c_contiguous
    assert np.array_equal(stacked, np.stack([to_model(p) for p in decoded]))


def test_to_model_gives_every_8_bit_sample_the_float32_of_its_quotient_by_255():
    """Every value 0..255 in every channel, in a batch and alone: the bits of ``astype(float32) / 255``."""
    values = np.arange(256, dtype=np.uint8)
    batch = np.stack([np.roll(values, k).reshape(16, 16) for k in range(6)]).reshape(2, 16, 16, 3)
    for pixels in (batch, batch[1], batch[:, ::2, 1:]):  # a strided view too
        expected = np.moveaxis(pixels, -1, -3).astype(np.float32) / np.float32(255.0)
        got = to_model(pixels)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == expected.shape
        assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(expected).view(np.uint32))


@pytest.mark.parametrize("image", [
    Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200),  # 16-bit gray
    Image.fromarray(np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1)), mode="F"),
])
def test_decode_pixels_keeps_deeper_samples_as_the_float_model_input(image):
    data = _png(image, "TIFF" if image.mode == "F" else "PNG")
    pixels = decode_pixels(data, **CORPUS_LIMITS)
    _assert_model_input(pixels)  # uint8 would lose what 16-bit and float samples hold
    assert to_model(pixels) is pixels
    assert np.array_equal(pixels, _decode(data))


def test_header_bomb_is_refused_without_allocating_its_pixels(corpus):
    # a fresh interpreter, so its peak RSS (VmHWM: reset by exec, unlike ru_maxrss) says what
    # decoding the 20000x20000 RGB header cost (its pixels would need 1.2 GB); baseline is ~30 MB
    path = corpus["header_20000.png"][0]
    code = (
        "import json, re, sys\n"
        "from workers.imaging import decode_image, InvalidImage\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "try:\n"
        "    decode_image(data, max_bytes=1 << 20, max_pixels=4096 * 4096, min_side=8, formats=['PNG'])\n"
        "    code = None\n"
        "except InvalidImage as exc:\n"
        "    code = exc.code\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(json.dumps({'code': code, 'maxrss_kb': int(hwm)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["code"] == "decompression_bomb"
    assert report["maxrss_kb"] < 300 * 1024


@pytest.mark.parametrize("name, pixels", [("header_5000.png", 25_000_000), ("header_20000.png", 400_000_000)])
def test_a_bomb_is_told_with_its_size_and_the_configured_limit(corpus, name, pixels):
    """Past twice its limit Pillow raises an error quoting that doubled limit; the reason says the configured one."""
    with pytest.raises(InvalidImage) as info:
        _decode(corpus[name][0].read_bytes())
    assert info.value.code == "decompression_bomb"
    assert info.value.reason == (f"decompression bomb: {pixels} pixels exceeds the limit of "
                                 f"{CORPUS_LIMITS['max_pixels']} pixels")


def test_header_size_is_checked_before_pixels_are_decoded(corpus, monkeypatch):
    import workers.imaging as imaging

    loads, spng_loads = [], []
    real_load, real_spng = imaging._load, imaging.pyspng.load
    monkeypatch.setattr(imaging, "_load", lambda im: loads.append(im.size) or real_load(im))
    monkeypatch.setattr(imaging.pyspng, "load", lambda data: spng_loads.append(len(data)) or real_spng(data))
    for name in ("bomb_30000.png", "header_20000.png", "header_5000.png", "one_by_one.png"):
        with pytest.raises(InvalidImage):
            _decode(corpus[name][0].read_bytes())
    assert loads == [] and spng_loads == []
    valid = corpus["rgb.png"][0].read_bytes()
    _decode(valid, fast_png=False)  # the controls: a valid image does reach the pixel decoder, Pillow's
    assert len(loads) == 1 and spng_loads == []
    _decode(valid)  # or libspng's
    assert len(loads) == 1 and spng_loads == [len(valid)]


def test_exif_orientation_is_applied(corpus):
    # stored 64x32 with the left half black; orientation 6 (rotate 90° clockwise) puts black on top
    array = _decode(corpus["exif_rotated.jpg"][0].read_bytes())
    assert array[:, :12, :].mean() < 0.1
    assert array[:, 20:, :].mean() > 0.9


def test_alpha_is_composited_on_white(corpus):
    array = _decode(corpus["rgba_alpha.png"][0].read_bytes())  # fully transparent black
    assert np.allclose(array, 1.0)


def test_palette_transparency_is_composited_on_white(corpus):
    array = _decode(corpus["palette_transparency.png"][0].read_bytes())
    # index 0 (red) is transparent -> white border; index 1 (green) is opaque in the middle
    assert np.allclose(array[:, 0, 0], [1.0, 1.0, 1.0], atol=0.02)
    assert np.allclose(array[:, 16, 16], [0.0, 1.0, 0.0], atol=0.02)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    plane = np.full((16, 16), 32768, np.uint16)
    array = _decode(_png(Image.fromarray(plane)))
    assert np.allclose(array, 32768 / 65535, atol=1e-3)


def test_sixteen_bit_rgb_png_keeps_its_colours(corpus):
    array = _decode(corpus["rgb16.png"][0].read_bytes())
    # blue channel is constant 30000/65535 over the whole image
    assert np.allclose(array[2], 30000 / 65535, atol=0.01)
    assert array[0, :, -1].mean() > 0.9 and array[0, :, 0].mean() < 0.1


def test_cmyk_jpeg_is_converted_to_rgb():
    red = Image.new("RGB", (32, 32), (255, 0, 0)).convert("CMYK")
    array = _decode(_png(red, "JPEG", quality=95))
    assert np.allclose(array[:, 16, 16], [1.0, 0.0, 0.0], atol=0.05)


def test_animated_gif_uses_its_first_frame(corpus):
    array = _decode(corpus["animated.gif"][0].read_bytes())  # frames: red, green, blue
    assert np.allclose(array.mean(axis=(1, 2)), [1.0, 0.0, 0.0], atol=0.02)


def test_float_tiff_in_unit_range_is_kept():
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    array = _decode(_png(Image.fromarray(ramp, mode="F"), "TIFF"))
    assert array[0, :, 0].mean() < 0.05 and array[0, :, -1].mean() > 0.95


def test_output_size_follows_pillow_width_height_order():
    array = _decode(_png(Image.new("RGB", (40, 40), (0, 0, 255))), size=(16, 24))
    _assert_model_input(array, shape=(3, 24, 16))


def test_min_side_boundary():
    _assert_model_input(_decode(_png(Image.new("RGB", (8, 8)))))
    with pytest.raises(InvalidImage, match="too small") as info:
        _decode(_png(Image.new("RGB", (7, 100))))
    assert info.value.code == "too_small"


def test_byte_limit_is_checked_before_anything_else():
    data = _png(Image.new("RGB", (16, 16)))
    _assert_model_input(_decode(data, max_bytes=len(data)))
    with pytest.raises(InvalidImage, match="exceeds the limit") as info:
        _decode(data, max_bytes=len(data) - 1)
    assert info.value.code == "too_many_bytes"


def test_only_the_listed_formats_are_tried():
    data = _png(Image.new("RGB", (16, 16)))
    with pytest.raises(InvalidImage, match="not accepted") as info:
        _decode(data, formats=["JPEG"])
    assert info.value.code == "not_an_image"
    _assert_model_input(_decode(data, formats=["jpg", "png"]))  # aliases and case are normalised


def test_pixel_limit_comes_from_the_argument():
    data = _png(Image.new("RGB", (64, 64)))
    with pytest.raises(InvalidImage, match="decompression bomb"):
        _decode(data, max_pixels=64 * 64 - 1)
    _assert_model_input(_decode(data, max_pixels=64 * 64))


def test_non_bytes_input_is_refused():
    with pytest.raises(InvalidImage):
        decode_image("not bytes", **CORPUS_LIMITS)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- property tests

_VALID_PNG = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)))
_VALID_JPEG = _png(Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)),
                   "JPEG")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_invalid_image(data):
    _decodes_or_refuses(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([_VALID_PNG, _VALID_JPEG]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_valid_images_decode_or_raise_invalid_image(base, edits, cut):
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decodes_or_refuses(bytes(data))


# --------------------------------------------------------------------------- image references


def test_inline_reference_round_trips():
    raw = _png(Image.new("RGB", (16, 16)))
    assert resolve_image_ref({"inline": base64.b64encode(raw).decode()}) == raw


@pytest.mark.parametrize("bad", ["not base64!!", "abc", 12, "QUJD\x00"])
def test_bad_base64_is_a_bad_reference(bad):
    with pytest.raises(InvalidImage) as info:
        resolve_image_ref({"inline": bad})
    assert info.value.code == "bad_reference"


def test_inline_reference_over_the_byte_limit_is_refused_before_decoding():
    text = base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(InvalidImage) as info:
        resolve_image_ref({"inline": text}, max_bytes=1000)
    assert info.value.code == "too_many_bytes"


@pytest.mark.parametrize("ref", [{}, {"inline": "", "path": "/x"}, {"url": "http://x"}, [], "umcd:img:1"])
def test_reference_needs_exactly_one_known_kind(ref):
    with pytest.raises(InvalidImage, match="bad image reference"):
        resolve_image_ref(ref)


def test_redis_key_reference_reads_bytes_and_reports_missing_keys(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url_for(3))
    try:
        client.set("umcd:img:abc", b"\x89PNG bytes", ex=60)
        assert resolve_image_ref({"redis_key": "umcd:img:abc"}, client) == b"\x89PNG bytes"
        with pytest.raises(InvalidImage, match="missing from Redis"):
            resolve_image_ref({"redis_key": "umcd:img:gone"}, client)
        with pytest.raises(InvalidImage, match="must be a string starting with"):
            resolve_image_ref({"redis_key": "celery-task-meta-abc"}, client)
        with pytest.raises(InvalidImage, match="no Redis client"):
            resolve_image_ref({"redis_key": "umcd:img:abc"}, None)
    finally:
        client.delete("umcd:img:abc")
        client.close()


def test_path_reference_reads_files_inside_allowed_roots(tmp_path):
    inside = tmp_path / "shared"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"abc")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (inside / "link.png").symlink_to(outside)

    assert resolve_image_ref({"path": str(inside / "a.png")}, allowed_roots=[inside]) == b"abc"
    assert resolve_image_ref({"path": str(outside)}) == b"secret"  # no roots configured
    with pytest.raises(InvalidImage, match="outside the allowed"):
        resolve_image_ref({"path": str(outside)}, allowed_roots=[inside])
    with pytest.raises(InvalidImage, match="outside the allowed"):
        resolve_image_ref({"path": str(inside / "link.png")}, allowed_roots=[inside])
    with pytest.raises(InvalidImage, match="outside the allowed"):
        resolve_image_ref({"path": str(inside / ".." / "secret.png")}, allowed_roots=[inside])
    with pytest.raises(InvalidImage, match="not found"):
        resolve_image_ref({"path": str(inside / "missing.png")})
    with pytest.raises(InvalidImage, match="not a regular file"):
        resolve_image_ref({"path": str(inside)})
    with pytest.raises(InvalidImage) as info:
        resolve_image_ref({"path": str(inside / "a.png")}, max_bytes=2)
    assert info.value.code == "too_many_bytes"
    linked_root = tmp_path / "root-link"  # a root that is itself a symlink still serves its files
    linked_root.symlink_to(inside)
    assert resolve_image_ref({"path": str(linked_root / "a.png")}, allowed_roots=[linked_root]) == b"abc"
    with pytest.raises(InvalidImage, match="outside the allowed"):  # named outside the roots: refused by its name
        resolve_image_ref({"path": str(linked_root / "a.png")}, allowed_roots=[inside])
    # outside the roots, the answer is the same whether a file is there or not (no existence oracle)
    reasons = set()
    for probe in (outside, tmp_path / "nothing.png", outside / "x", tmp_path / "nothing" / ".." / "secret.png"):
        with pytest.raises(InvalidImage) as info:
            resolve_image_ref({"path": str(probe)}, allowed_roots=[inside])
        reasons.add(info.value.reason.replace(str(probe), "<path>"))
    assert reasons == {"image path outside the allowed directories: <path>"}


def test_path_reference_decides_on_the_file_it_opened_not_on_the_name_it_checked(tmp_path, monkeypatch):
    """The name is resolved and checked before the file is opened; whatever is swapped in between (a
    directory on the way turned into a symlink out of the roots, the file turned into a symlink or a FIFO)
    is refused from the open descriptor, and a FIFO never blocks the read."""
    import pathlib

    from workers import imaging

    inside, outside = tmp_path / "shared", tmp_path / "elsewhere"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (inside / "sub" / "a.png").write_bytes(b"inside")
    (outside / "a.png").write_bytes(b"secret")
    real_resolve = pathlib.Path.resolve
    swaps = []

    def resolve_then_swap(self, strict=False):  # the race: the check passes, then the tree changes
        out = real_resolve(self, strict=strict)
        if self.name == "a.png" and not swaps:
            swaps.append(self)
            (inside / "sub").rename(tmp_path / "moved")
            (inside / "sub").symlink_to(outside)
        return out

    assert resolve_image_ref({"path": str(inside / "sub" / "a.png")}, allowed_roots=[inside]) == b"inside"
    monkeypatch.setattr(pathlib.Path, "resolve", resolve_then_swap)
    with pytest.raises(InvalidImage, match="outside the allowed") as info:
        resolve_image_ref({"path": str(inside / "sub" / "a.png")}, allowed_roots=[inside])
    assert info.value.code == "bad_reference" and swaps
    monkeypatch.undo()

    roots = [inside.resolve()]
    (inside / "b.png").symlink_to(outside / "a.png")  # a final symlink is not followed once opened
    with pytest.raises(InvalidImage, match="not a regular file"):
        imaging._read_opened(inside / "b.png", "b.png", roots, None)
    os.mkfifo(inside / "pipe.png")  # no writer: a blocking open would wait forever
    with pytest.raises(InvalidImage, match="not a regular file"):
        imaging._read_opened(inside / "pipe.png", "pipe.png", roots, None)
    with pytest.raises(InvalidImage, match="not a regular file"):
        imaging._read_opened(inside, "shared", roots, None)
    with pytest.raises(InvalidImage, match="not found"):
        imaging._read_opened(inside / "gone.png", "gone.png", roots, None)
    real_open = os.open

    def file_table_full(path, flags, *args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", file_table_full)  # the worker's trouble, not the request's: it propagates
    with pytest.raises(OSError, match="Too many open files"):
        imaging._read_opened(inside / "sub" / "a.png", "a.png", roots, None)
    monkeypatch.setattr(os, "open", real_open)
    (tmp_path / "moved" / "a.png").write_bytes(b"x" * 10)
    with pytest.raises(InvalidImage) as info:  # the size limit from the open file, too
        imaging._read_opened(tmp_path / "moved" / "a.png", "a.png", None, 9)
    assert info.value.code == "too_many_bytes"
    assert imaging._read_opened(tmp_path / "moved" / "a.png", "a.png", None, 10) == b"x" * 10


def test_bomb_warnings_stay_errors_and_concurrent_decodes_leave_the_warning_filters_alone():
    """Pillow warns (not raises) for pixel counts between its limit and twice it; decoding makes that warning
    an error once, even after the process asked to ignore all warnings, and threads decoding at the same
    time neither drop nor duplicate filters (catch_warnings per decode swapped the global list)."""
    import threading
    import warnings

    band = _png(Image.new("RGB", (64, 48)))  # 3,072 pixels: over a 2,048 limit, under twice it
    good = _png(Image.new("RGB", (32, 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an application silencing every warning
        with pytest.raises(InvalidImage) as info:
            _decode(band, max_pixels=2048)
        assert info.value.code == "decompression_bomb"
        filters = list(warnings.filters)
        errors: list[BaseException] = []

        def hammer(k: int) -> None:
            try:
                for i in range(200):
                    if (i + k) % 2:
                        _assert_model_input(_decode(good, max_pixels=2048))
                    else:
                        with pytest.raises(InvalidImage):
                            _decode(band, max_pixels=2048)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert warnings.filters == filters


# --------------------------------------------------------------------------- the fast PNG path (libspng)

#: corpus files that are plain 8-bit grayscale or RGB PNGs: the fast path must decode each of them
_FAST_PATH_FILES = ("rgb.png", "gray.png", "png_named.jpg", "min_side_8x8.png", "thin_8x2000.png")


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos + 8 <= len(png):
        length, kind = struct.unpack_from(">I4s", png, pos)
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with a correct CRC (so that only what is inside them is wrong)."""
    return PNG_SIGNATURE + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks)


def _outcome(data: bytes, *, fast: bool):
    try:
        return decode_pixels(data, fast_png=fast, **CORPUS_LIMITS)
    except InvalidImage as exc:
        return exc.code


def test_libspng_is_installed_for_the_fast_png_path():
    assert fast_png_available()  # pyspng is a dependency; without it every PNG silently went through Pillow
    from workers import imaging

    assert imaging._inflate_lib.__name__ == "zlib_ng.zlib_ng"  # zlib-ng too: without it the gate's inflate is slower


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_fast_png_path_gives_pillows_pixels_or_its_refusal_on_every_corpus_file(corpus, name):
    data = corpus[name][0].read_bytes()
    fast, slow = _outcome(data, fast=True), _outcome(data, fast=False)
    if isinstance(slow, str):
        assert fast == slow, name
    else:
        assert isinstance(fast, np.ndarray) and np.array_equal(fast, slow), name
        assert fast.flags.writeable == slow.flags.writeable, name
    took_fast = _fast_png(data, max_pixels=CORPUS_LIMITS["max_pixels"], min_side=CORPUS_LIMITS["min_side"]) is not None
    assert took_fast == (name in _FAST_PATH_FILES), name  # palette, alpha, 16-bit, APNG, bad CRC...: Pillow


def test_fast_png_path_refuses_a_corrupt_stream_whose_chunk_crcs_are_right():
    """pyspng tells libspng to skip checksums, so a stream whose Adler-32 is wrong would decode to whatever the
    corrupt data inflates to; the fast path checks the stream itself and leaves the refusal to Pillow."""
    png = _png(Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)))
    chunks = _chunks(png)
    i = next(j for j, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    stream = bytearray(chunks[i][1])
    stream[-1] ^= 0x5A  # the zlib stream's Adler-32
    chunks[i] = (b"IDAT", bytes(stream))
    bad = _build_png(chunks)
    assert pyspng.load(bad).shape == (24, 24, 3)  # libspng alone takes it
    assert _fast_png(bad, max_pixels=1 << 20, min_side=8) is None
    assert _outcome(bad, fast=True) == _outcome(bad, fast=False) == "corrupt"


def test_fast_png_path_leaves_large_images_to_pillow():
    """Past 128x128 Pillow's zlib-ng is as fast, and past ~256x256 faster than the gate and libspng together."""
    rng = np.random.default_rng(4)
    at_cap, over = (_png(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
                    for shape in ((128, 128, 3), (128, 129, 3)))
    assert _fast_png(at_cap, max_pixels=1 << 24, min_side=8) is not None
    assert _fast_png(over, max_pixels=1 << 24, min_side=8) is None
    assert np.array_equal(_outcome(over, fast=True), _outcome(over, fast=False))


def test_fast_png_path_leaves_png_exif_orientation_to_pillow():
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1)))  # 40 wide, 20 high, gray
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    data = _png(image, exif=exif.tobytes())
    assert _fast_png(data, max_pixels=1 << 20, min_side=8) is None
    pixels = decode_pixels(data, **{**CORPUS_LIMITS, "formats": ("PNG",)}, size=(20, 40))
    assert pixels.shape == (40, 20, 3)  # turned upright: 20 wide, 40 high


def test_fast_png_path_is_off_when_the_setting_says_so(monkeypatch):
    from umcd.settings import Settings
    from workers import imaging
    from workers.encoding import decode_pixels_for_model

    calls = []
    monkeypatch.setattr(imaging, "_fast_png", lambda data, **kw: calls.append(len(data)))
    decode_pixels_for_model(_VALID_PNG, Settings(fast_png=False), 32)
    assert calls == []
    decode_pixels_for_model(_VALID_PNG, Settings(fast_png=True), 32)
    assert calls == [len(_VALID_PNG)]


def test_fast_png_path_agrees_with_pillow_on_mutated_files_with_valid_crcs():
    """Mutations that keep every chunk's CRC right (so that they reach libspng): in the IDAT stream, IHDR's
    fields, IDAT split, padded or emptied, ancillary chunks of any length. Whatever the fast path decodes,
    Pillow decodes to the same pixels; everything else it leaves to Pillow. Seeded, so a failure repeats."""
    rng = np.random.default_rng(12)
    ancillary = [b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"sBIT", b"tEXt", b"bKGD"]
    taken = left = 0
    for _ in range(600):
        mode = ("L", "RGB")[rng.integers(2)]
        shape = (int(rng.integers(6, 48)), int(rng.integers(6, 48)))
        pixels = rng.integers(0, 256, shape if mode == "L" else (*shape, 3), dtype=np.uint8)
        chunks = _chunks(_png(Image.fromarray(pixels, mode), compress_level=int(rng.choice([0, 1, 6, 9]))))
        i = next(j for j, (kind, _) in enumerate(chunks) if kind == b"IDAT")
        what = rng.integers(5)
        if what == 1:  # bytes of the stream changed, cut or padded
            stream = bytearray(chunks[i][1])
            for _ in range(int(rng.integers(1, 4))):
                stream[int(rng.integers(len(stream)))] = int(rng.integers(256))
            if rng.random() < 0.3:
                stream = stream[: int(rng.integers(len(stream) + 1))]
            chunks[i] = (b"IDAT", bytes(stream))
        elif what == 2:  # one IHDR byte changed
            header = bytearray(chunks[0][1])
            header[int(rng.integers(13))] = int(rng.integers(256))
            chunks[0] = (b"IHDR", bytes(header))
        elif what == 3:  # the stream split over two IDAT chunks, maybe with an ancillary chunk between or before
            stream, cut = chunks[i][1], int(rng.integers(len(chunks[i][1]) + 1))
            extra = (ancillary[rng.integers(len(ancillary))], rng.bytes(int(rng.choice([0, 1, 4, 7, 9, 32, 40]))))
            chunks[i : i + 1] = [(b"IDAT", stream[:cut]), (b"IDAT", stream[cut:])]
            chunks.insert(int(rng.choice([1, i + 1])), extra)
        elif what == 4:  # data after the stream, or an empty IDAT after it
            chunks[i] = (b"IDAT", chunks[i][1] + rng.bytes(int(rng.integers(1, 6))))
            if rng.random() < 0.5:
                chunks[i] = (b"IDAT", chunks[i][1][: -len(chunks[i][1]) // 2 or None])
                chunks.insert(i + 1, (b"IDAT", b""))
        data = _build_png(chunks)
        fast = _fast_png(data, max_pixels=CORPUS_LIMITS["max_pixels"], min_side=CORPUS_LIMITS["min_side"])
        if fast is None:
            left += 1
            continue
        taken += 1
        slow = _outcome(data, fast=False)
        assert isinstance(slow, np.ndarray), slow  # the fast path never takes what Pillow refuses
        assert np.array_equal(_outcome(data, fast=True), slow)
    assert taken >= 100 and left >= 100  # both sides of the gate were exercised


def test_a_redis_image_over_the_limit_is_refused_by_its_size_without_reading_it():
    """A crafted reference to a huge value in the broker's Redis: its size is asked first (STRLEN), never its bytes."""
    from workers import imaging

    class Store:
        gets = 0

        def strlen(self, key):
            return 512 * 2**20

        def get(self, key):
            Store.gets += 1
            return b"x"

    with pytest.raises(InvalidImage) as info:
        resolve_image_ref({"redis_key": "umcd:img:huge"}, Store(), max_bytes=2**20)
    assert info.value.code == "too_many_bytes" and Store.gets == 0
    with pytest.raises(InvalidImage) as info:
        imaging.read_blob("umcd:img:huge", Store())
    assert info.value.code == "too_many_bytes" and Store.gets == 0
