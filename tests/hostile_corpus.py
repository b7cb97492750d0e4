"""A corpus of crafted image files (valid, odd and hostile) for testing the worker's decoder."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: decoder limits the ``expected`` column assumes (pass these to ``decode_image``)
CORPUS_LIMITS = {
    "max_bytes": 1 << 20,
    "max_pixels": 4096 * 4096,
    "min_side": 8,
    "formats": ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"),
}

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, *, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_zero_bomb(side: int) -> bytes:
    """A real, complete 1-bit ``side x side`` PNG of zeros: ~100 KiB on disk, side² pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    block = row * 1000
    for _ in range(side // 1000):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    return _png_raw(side, side, bit_depth=1, color_type=0, idat=b"".join(parts))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB with one tiny IDAT (never a real image)."""
    return _png_raw(width, height, bit_depth=8, color_type=2, idat=zlib.compress(b"\x00" * 64))


def _png16_rgb(width: int, height: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) with a smooth gradient."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 65535 // max(1, width - 1), y * 65535 // max(1, height - 1),
                    np.full_like(x, 30000)], axis=-1).astype(">u2")
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(height))
    return _png_raw(width, height, bit_depth=16, color_type=2, idat=zlib.compress(raw))


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(size=(64, 48), seed=0) -> Image.Image:
    """A smooth RGB test picture with some texture (``size`` is Pillow's (width, height))."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(1, w - 1), y * 255 / max(1, h - 1), (x + y) % 64 * 4], axis=-1)
    img = img + rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG, left half black and right half white, with EXIF orientation 6 (rotate 90° CW)."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 frame header is rewritten to claim ``width x height``."""
    data = bytearray(_save(_photo((16, 16)), "JPEG", quality=80))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _gif_with_size(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("P", (16, 16), 3), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)  # logical screen
    desc = data.find(b"\x2c")  # image descriptor: left, top, width, height
    struct.pack_into("<HH", data, desc + 5, width, height)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (16, 16), (9, 9, 9)), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def _tiff(mode_image: Image.Image, compression: str | None) -> bytes:
    params = {} if compression is None else {"compression": compression}
    return _save(mode_image, "TIFF", **params)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _animated_png() -> bytes:
    frames = [Image.new("RGBA", (40, 40), c) for c in ((255, 0, 0, 255), (0, 0, 255, 128))]
    return _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)


def _ico(sizes, big_png=False) -> bytes:
    base = _photo((256, 256) if big_png else (64, 64)).convert("RGBA")
    return _save(base, "ICO", sizes=sizes)


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (32, 32), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    im.paste(1, (8, 8, 24, 24))
    return _save(im, "PNG", transparency=0)


def _ztxt_bomb_png() -> bytes:
    png = _save(_photo((16, 16)), "PNG")
    text = b"Comment\x00\x00" + zlib.compress(b"A" * 40_000_000, 9)
    return png[:33] + _chunk(b"zTXt", text) + png[33:]


def _bad_crc_png() -> bytes:
    data = bytearray(_save(_photo((16, 16)), "PNG"))
    data[29] ^= 0xFF  # last byte of IHDR's CRC
    return bytes(data)


def _random_png_magic(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()


def _huge_by_bytes() -> bytes:
    """A valid PNG padded past CORPUS_LIMITS['max_bytes'] with an ancillary chunk."""
    png = _save(_photo((16, 16)), "PNG")
    pad = _chunk(b"teXt", b"pad\x00" + b"x" * CORPUS_LIMITS["max_bytes"])
    return png[:33] + pad + png[33:]


def _f_tiff() -> bytes:
    arr = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    return _save(Image.fromarray(arr, mode="F"), "TIFF")


def _i16_tiff() -> bytes:
    arr = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    return _save(Image.fromarray(arr), "TIFF")


def _pgm16() -> bytes:
    arr = (np.arange(24 * 24).reshape(24, 24) * 100).astype(">u2")
    return b"P5\n24 24\n65535\n" + arr.tobytes()


# name, bytes factory, expected, expected code for invalid ones (None: any)
_ENTRIES: list[tuple[str, Callable[[], bytes], str, str | None]] = [
    # ---- valid, in every odd shape we accept
    ("rgb.png", lambda: _save(_photo(), "PNG"), "valid", None),
    ("rgb.jpg", lambda: _save(_photo(), "JPEG", quality=90), "valid", None),
    ("progressive.jpg", lambda: _save(_photo((80, 60)), "JPEG", progressive=True), "valid", None),
    ("png_named.jpg", lambda: _save(_photo(), "PNG"), "valid", None),  # wrong extension
    ("cmyk.jpg", lambda: _save(_photo().convert("CMYK"), "JPEG"), "valid", None),
    ("gray16.png", lambda: _save(Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)),
                                 "PNG"), "valid", None),
    ("rgb16.png", lambda: _png16_rgb(40, 30), "valid", None),
    ("gray.png", lambda: _save(_photo().convert("L"), "PNG"), "valid", None),
    ("bilevel.png", lambda: _save(_photo().convert("1"), "PNG"), "valid", None),
    ("palette.png", lambda: _save(_photo().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "valid", None),
    ("palette_transparency.png", _palette_with_transparency, "valid", None),
    ("la.png", lambda: _save(_photo().convert("LA"), "PNG"), "valid", None),
    ("rgba_alpha.png", lambda: _save(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "PNG"), "valid", None),
    ("animated.gif", _animated_gif, "valid", None),
    ("animated.png", _animated_png, "valid", None),
    ("tiff_raw.tif", lambda: _tiff(_photo(), None), "valid", None),
    ("tiff_lzw.tif", lambda: _tiff(_photo(), "tiff_lzw"), "valid", None),
    ("tiff_deflate.tif", lambda: _tiff(_photo(), "tiff_adobe_deflate"), "valid", None),
    ("tiff_packbits.tif", lambda: _tiff(_photo(), "packbits"), "valid", None),
    ("tiff_jpeg.tif", lambda: _tiff(_photo(), "jpeg"), "valid", None),
    ("tiff_group4.tif", lambda: _tiff(_photo().convert("1"), "group4"), "valid", None),
    ("tiff_float.tif", _f_tiff, "valid", None),
    ("tiff_i16.tif", _i16_tiff, "valid", None),
    ("ico_multi.ico", lambda: _ico([(16, 16), (32, 32), (48, 48)]), "valid", None),
    ("ico_png256.ico", lambda: _ico([(256, 256)], big_png=True), "valid", None),
    ("exif_rotated.jpg", _exif_rotated_jpeg, "valid", None),
    ("rgb.bmp", lambda: _save(_photo(), "BMP"), "valid", None),
    ("lossy.webp", lambda: _save(_photo(), "WEBP", quality=80), "valid", None),
    ("lossless_alpha.webp", lambda: _save(_photo().convert("RGBA"), "WEBP", lossless=True), "valid", None),
    ("rgb.ppm", lambda: _save(_photo(), "PPM"), "valid", None),
    ("gray16.pgm", _pgm16, "valid", None),
    ("min_side_8x8.png", lambda: _save(_photo((8, 8)), "PNG"), "valid", None),
    ("thin_8x2000.png", lambda: _save(_photo((8, 2000)), "PNG"), "valid", None),
    # ---- invalid
    ("zero_bytes.png", lambda: b"", "invalid", "empty"),
    ("text.txt", lambda: b"hello, this is plainly not an image\n" * 10, "invalid", "not_an_image"),
    ("page.html", lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
     "invalid", "not_an_image"),
    ("drawing.svg", lambda: (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" '
                             b'height="64"><rect width="64" height="64" fill="red"/></svg>'),
     "invalid", "not_an_image"),
    ("truncated.jpg", lambda: _save(_photo((128, 128)), "JPEG")[:1500], "invalid", "truncated"),
    ("truncated.png", lambda: (lambda d: d[: len(d) // 2])(_save(_photo((128, 128)), "PNG")), "invalid", None),
    ("bomb_30000.png", lambda: _png_zero_bomb(30000), "invalid", "decompression_bomb"),
    ("header_20000.png", lambda: _png_header_only(20000, 20000), "invalid", "decompression_bomb"),
    ("header_5000.png", lambda: _png_header_only(5000, 5000), "invalid", "decompression_bomb"),
    ("header_65000.jpg", lambda: _jpeg_with_size(65000, 65000), "invalid", "decompression_bomb"),
    ("header_60000.gif", lambda: _gif_with_size(60000, 60000), "invalid", "decompression_bomb"),
    ("header_30000.bmp", lambda: _bmp_with_size(30000, 30000), "invalid", None),
    ("one_by_one.png", lambda: _save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "invalid", "too_small"),
    ("tiny_4x4.gif", lambda: _save(Image.new("P", (4, 4), 1), "GIF"), "invalid", "too_small"),
    ("huge_bytes.png", _huge_by_bytes, "invalid", "too_many_bytes"),
    ("random_png_magic.png", lambda: _random_png_magic(1), "invalid", None),
    ("random.bin", lambda: np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
     "invalid", "not_an_image"),
    ("ztxt_bomb.png", _ztxt_bomb_png, "invalid", None),
    ("bad_crc.png", _bad_crc_png, "invalid", None),
    ("ihdr_only.png", lambda: _save(_photo(), "PNG")[:33] + _chunk(b"IEND", b""), "invalid", None),
    ("gif_header_only.gif", lambda: _save(Image.new("P", (32, 32), 1), "GIF")[:13], "invalid", None),
    ("jpeg2000.jp2", lambda: _save(_photo(), "JPEG2000"), "invalid", "not_an_image"),  # not accepted
    ("pdf.pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "invalid", "not_an_image"),
    ("jpeg_magic_only.jpg", lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 100, "invalid", None),
]


#: every file name, in corpus order (for test parametrisation)
CORPUS_NAMES: list[str] = [name for name, _, _, _ in _ENTRIES]
#: the InvalidImage code each invalid file must raise (names absent here: any code)
EXPECTED_CODES: dict[str, str] = {name: code for name, _, _, code in _ENTRIES if code is not None}


def build_hostile_corpus(directory: Path | str) -> list[tuple[str, Path, str]]:
    """Write every corpus file into ``directory``; returns ``[(name, path, 'valid'|'invalid')]``.

    ``expected`` assumes the decoder runs with :data:`CORPUS_LIMITS`;
    :data:`EXPECTED_CODES` gives the required ``InvalidImage.code`` of some invalid files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, factory, expected, code in _ENTRIES:
        path = directory / name
        path.write_bytes(factory())
        out.append((name, path, expected))
    return out
