"""raster.py: every input kind read to the same pixels, the bit-depth rule, bands, GeoTIFF tags, atomic writes."""

import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from raster import RasterError, atomic_path, palette_image, read_raster, select_bands, to_uint8, write_index_tiff
from spec import DataSpec, load_input

GEOTAGS = [(33550, "d", 3, (0.05, 0.05, 0.0), True),
           (33922, "d", 6, (0.0, 0.0, 0.0, 368000.0, 5808000.0, 0.0), True),
           (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 25833), True),
           (34736, "d", 2, (6378137.0, 298.257222101), True),
           (34737, "s", 0, "ETRS89 / UTM zone 33N|", True)]


def read_model_image(path):
    """A file as a 3-band 8-bit model (the default contract) sees it: (pixels, raster, notes)."""
    inp = load_input(path, DataSpec())
    return inp.image, inp.raster, inp.notes


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


@pytest.mark.parametrize("name, write", [
    ("a.png", lambda p, a: Image.fromarray(a).save(p)),
    ("a.tif", lambda p, a: tifffile.imwrite(p, a, photometric="rgb")),
    ("lzw_tiled_big.tiff", lambda p, a: tifffile.imwrite(p, a, photometric="rgb", compression="lzw",
                                                         tile=(16, 16), bigtiff=True)),
    ("deflate.tif", lambda p, a: tifffile.imwrite(p, a, photometric="rgb", compression="zlib", predictor=True)),
    ("planar.tif", lambda p, a: tifffile.imwrite(p, np.moveaxis(a, -1, 0), photometric="rgb",
                                                 planarconfig="separate")),
    ("rgba.png", lambda p, a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])).save(p)),
    ("rgba.tif", lambda p, a: tifffile.imwrite(p, np.dstack([a, np.full(a.shape[:2], 7, np.uint8)]),
                                               photometric="rgb", extrasamples=["unassalpha"])),
])
def test_lossless_kinds_read_to_the_same_rgb(tmp_path, rgb, name, write):
    write(tmp_path / name, rgb)
    arr, raster, notes = read_model_image(tmp_path / name)
    assert arr.dtype == np.uint8 and arr.shape == (37, 53, 3)
    np.testing.assert_array_equal(arr, rgb)
    assert notes == []  # alpha is dropped silently: it is not a band


def test_jpeg_reads_close_to_the_original(tmp_path, rgb):
    smooth = np.asarray(Image.fromarray(rgb).resize((6, 5)).resize((53, 37), Image.BILINEAR))
    Image.fromarray(smooth).save(tmp_path / "a.jpeg", quality=95)
    arr, _, _ = read_model_image(tmp_path / "a.jpeg")
    assert arr.shape == (37, 53, 3) and np.abs(arr.astype(int) - smooth).mean() < 3


def test_grayscale_and_palette_images(tmp_path, rgb):
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    arr, _, notes = read_model_image(tmp_path / "g.png")
    assert arr.shape == (37, 53, 3) and (arr == rgb[:, :, :1]).all()
    assert "replicated" in notes[0]
    palette_image(rgb[:, :, 0] % 6, [(255, 0, 0), (0, 255, 0), (0, 0, 255)] * 2).save(tmp_path / "p.png")
    arr, _, _ = read_model_image(tmp_path / "p.png")
    assert arr.shape == (37, 53, 3) and set(map(tuple, arr.reshape(-1, 3))) <= {(255, 0, 0), (0, 255, 0), (0, 0, 255)}


def test_bit_depth_rule():
    twelve = np.array([[0, 4095, 2048]], np.uint16)[..., None]
    out, notes = to_uint8(twelve)
    assert out.ravel().tolist() == [0, 255, 128] and "12-bit" in notes[0]
    full = np.array([[0, 65535, 257]], np.uint16)[..., None]
    assert to_uint8(full)[0].ravel().tolist() == [0, 255, 1]
    low = np.array([[0, 200, 255]], np.uint16)[..., None]  # 8-bit values in a 16-bit file: kept
    assert to_uint8(low)[0].ravel().tolist() == [0, 200, 255] and to_uint8(low)[1] == []
    assert to_uint8(twelve, bit_depth=16)[0].ravel().tolist() == [0, 16, 8]  # a fixed depth: constant scale
    assert to_uint8(np.array([[[0.0], [1.0], [0.5]]], np.float32))[0].ravel().tolist() == [0, 255, 128]
    with pytest.raises(RasterError, match="float"):
        to_uint8(np.array([[[0.0], [300.0]]], np.float32))


def test_16bit_tiff_file(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "a.tif", rgb.astype(np.uint16) * 16, photometric="rgb")  # 12-bit data
    inp = load_input(tmp_path / "a.tif", DataSpec())
    assert np.abs(inp.image.astype(int) - rgb).max() <= 1 and "12-bit" in inp.warnings[0]


def test_band_selection(rgb):
    five = np.dstack([rgb, rgb[:, :, :2] // 2])
    out, notes = select_bands(five, 3)
    np.testing.assert_array_equal(out, rgb)
    assert "first 3" in notes[0]
    out, notes = select_bands(five, 3, bands=[3, 0, 1])
    np.testing.assert_array_equal(out, np.dstack([rgb[:, :, 0] // 2, rgb[:, :, 0], rgb[:, :, 1]]))
    assert notes == []
    np.testing.assert_array_equal(select_bands(five, 5)[0], five)  # a 5-band model takes them all
    with pytest.raises(RasterError, match="unsupported band layout"):
        select_bands(rgb[:, :, :2], 3)  # two bands, no alpha: which would be what?
    with pytest.raises(RasterError, match="has 5"):
        select_bands(five, 3, bands=[0, 1, 7])
    with pytest.raises(RasterError, match="takes 3"):
        select_bands(five, 3, bands=[0, 1])


@pytest.mark.parametrize("content, match", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n garbage", "cannot read"),
                                            (b"II*\x00 not really a tiff", "cannot read")])
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / ("bad.tif" if content.startswith(b"II") else "bad.png")
    path.write_bytes(content)
    with pytest.raises(RasterError, match=match) as e:
        read_raster(path)
    assert str(path) in str(e.value)


def test_truncated_tiff(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "a.tif", np.tile(rgb, (4, 4, 1)), photometric="rgb", compression="lzw")
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "a.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(RasterError, match="a.tif"):
        read_raster(tmp_path / "a.tif")


def test_geotags_round_trip(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "geo.tif", rgb, photometric="rgb", extratags=GEOTAGS)
    r = read_raster(tmp_path / "geo.tif")
    assert r.is_georeferenced and set(r.geotags) == {t[0] for t in GEOTAGS}
    write_index_tiff(tmp_path / "mask.tif", rgb[:, :, 0] % 6, [(9, 9, 9)] * 6, r.geotags)
    back = read_raster(tmp_path / "mask.tif").geotags
    for code, _, _, value, _ in GEOTAGS:
        assert back[code][2] == value, code
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), rgb[:, :, 0] % 6)
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.PALETTE
    assert read_raster(tmp_path / "mask.tif").is_georeferenced


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("bands, alpha", [(3, None), (1, None), (2, 1), (4, 3)])  # RGB, gray, gray+alpha, RGBA
def test_16bit_png_reads_at_full_depth(tmp_path, bands, alpha):
    twelve = np.random.default_rng(1).integers(0, 4096, (5, 7, bands), dtype=np.uint16)  # 12-bit data
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(twelve))
    r = read_raster(tmp_path / "a.png")
    assert r.array.dtype == np.uint16 and r.alpha == alpha
    np.testing.assert_array_equal(r.array, twelve)



def jpeg_with_orientation(path, arr, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    jpeg_with_orientation(tmp_path / "a.jpg", np.zeros((8, 16, 3), np.uint8), 6)  # stored 16x8, shown 8x16
    assert read_raster(tmp_path / "a.jpg").array.shape == (16, 8, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_pillow_shows_it(tmp_path, rgb, orientation):
    jpeg_with_orientation(tmp_path / "a.jpg", rgb, orientation)
    with Image.open(tmp_path / "a.jpg") as im:
        shown = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(read_raster(tmp_path / "a.jpg").array, shown)


def test_16bit_png_exif_orientation_is_applied(tmp_path):
    stored = np.arange(4 * 6 * 3, dtype=np.uint16).reshape(4, 6, 3) * 50
    png = imagecodecs.png_encode(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes().removeprefix(b"Exif\x00\x00")  # a PNG eXIf chunk holds the TIFF-style block itself
    chunk = len(body).to_bytes(4, "big") + b"eXIf" + body + zlib.crc32(b"eXIf" + body).to_bytes(4, "big")
    (tmp_path / "a.png").write_bytes(png[:33] + chunk + png[33:])  # right after IHDR (8 + 25 bytes)
    np.testing.assert_array_equal(read_raster(tmp_path / "a.png").array, np.rot90(stored, -1))



@pytest.mark.parametrize("name", ["big.png", "big.jpg"])
def test_image_over_pillow_pixel_limit_is_read(tmp_path, rgb, monkeypatch, name):
    Image.fromarray(rgb).save(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 37x53 is a "decompression bomb" now
    assert read_raster(tmp_path / name).array.shape == (37, 53, 3)
    assert Image.MAX_IMAGE_PIXELS == 100  # the limit is back for everyone else



def test_negative_integers_are_clipped_with_a_note():
    arr = np.array([[[-5], [0], [-1]], [[100], [255], [7]]], np.int16)
    out, notes = to_uint8(arr)
    assert out.ravel().tolist() == [0, 0, 0, 100, 255, 7]
    assert any("2 pixels" in n and "negative" in n for n in notes)
    assert to_uint8(np.array([[[0], [4095]]], np.int16))[1] == ["int16 pixels scaled to 8 bits as 12-bit data "
                                                                "(x 255/4095)"]  # no negatives: no such note


def test_float_with_nan_says_how_many():
    arr = np.array([[[0.2], [np.nan], [0.5]], [[np.nan], [1.0], [0.0]]], np.float32)
    with pytest.raises(RasterError, match="2 NaN pixels"):
        to_uint8(arr)
    with pytest.raises(RasterError, match="NaN"):
        to_uint8(np.full((2, 2, 1), np.nan, np.float32))
