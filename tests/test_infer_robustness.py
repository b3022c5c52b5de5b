"""infer.py against careless input (issue 20): stable mask names, --skip-existing that checks what it skips,
decompression bombs and lying headers, folders and broken links in the input, Ctrl-C, 16-bit data under an 8-bit
model, nodata left out of range checks."""

import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import infer
import raster
from checkpoint import save_checkpoint
from model import TinySegmentation
from spec import DataSpec, load_input
from tests.conftest import ctrl_c_on_second_image, run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.manual_seed(0)
    save_checkpoint(path, TinySegmentation(), DataSpec(scale=1.0))
    return path


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def height(path):
    with Image.open(path) as im:
        return im.size[1]


def text(path):
    """The text chunks of a PNG as Pillow reads them."""
    with Image.open(path) as im:
        return dict(im.text)


def patch_tiff_size(path, side):
    """Make a TIFF's header claim side x side pixels, its strips or tiles left as they are."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for code in (256, 257):
            tag = tif.pages.first.tags[code]
            struct.pack_into("<H" if tag.dtype == 3 else "<I", data, tag.valueoffset, side)
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- names and --skip-existing (3, 10)

def test_mask_names_come_from_the_input_name_alone(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(image(20, 24)).save(inp / "a.png")
    tifffile.imwrite(inp / "a.tif", image(21, 24), photometric="rgb")
    assert run(ckpt, inp, out) == 0
    assert height(out / "a_png_mask.png") == 20 and height(out / "a_tif_mask.png") == 21
    assert text(out / "a_png_mask.png")["Source"] == "a.png"  # which input a mask was made from
    Image.fromarray(image(22, 24)).save(inp / "a_png.png")  # a new file whose stem was a.png's mask name
    capsys.readouterr()
    assert run(ckpt, inp, out, "--skip-existing") == 0
    assert "1 images done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert height(out / "a_png_png_mask.png") == 22  # the new file got its own mask
    assert height(out / "a_png_mask.png") == 20  # a.png's mask is still a.png's


def test_skip_existing_refuses_a_mask_made_from_another_input(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(image(20, 24)).save(inp / "a.png")
    Image.fromarray(image(21, 24)).save(inp / "b.png")
    assert run(ckpt, inp, out) == 0
    (out / "b_png_mask.png").write_bytes((out / "a_png_mask.png").read_bytes())  # a's mask under b's name
    assert run(ckpt, inp, out, "--skip-existing") == 1
    err = capsys.readouterr().err
    assert "b_png_mask.png" in err and "made from a.png" in err and "without --skip-existing" in err
    assert height(out / "b_png_mask.png") == 20  # neither taken as b's nor replaced


def test_skip_existing_writes_outputs_asked_for_the_first_time(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(image(20, 24)).save(inp / "a.png")
    assert run(ckpt, inp, out) == 0
    capsys.readouterr()
    assert run(ckpt, inp, out, "--skip-existing", "--index", "--overlay") == 0
    assert "1 images done, 0 skipped" in capsys.readouterr().out
    assert (out / "a_png_mask.index.png").is_file() and (out / "a_png_mask.overlay.jpg").is_file()
    assert run(ckpt, inp, out, "--skip-existing", "--index", "--overlay") == 0  # now everything asked exists
    assert "0 images done, 1 skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------- decompression bombs, lying headers (9, 17)

def test_png_header_claiming_more_than_the_file_holds_is_refused_before_decoding(tmp_path):
    Image.fromarray(image(16, 16)).save(tmp_path / "bomb.png")
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    struct.pack_into(">II", data, 16, 6000, 6000)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # a valid header: only the size lies
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(raster.RasterError, match="bomb.png.*6000 x 6000.*can hold"):
        raster.read_raster(tmp_path / "bomb.png", max_pixels=0)  # no pixel limit: the file's size bounds it


def test_whole_image_decodes_are_bounded_with_an_override_streamed_tiffs_are_not(ckpt, tmp_path, capsys, monkeypatch):
    Image.fromarray(image(40, 40)).save(tmp_path / "a.png")
    with pytest.raises(raster.RasterError, match="a.png.*--max-pixels 1600"):
        raster.read_raster(tmp_path / "a.png", max_pixels=1000)
    assert raster.read_raster(tmp_path / "a.png", max_pixels=0).array.shape == (40, 40, 3)
    assert run(ckpt, tmp_path / "a.png", tmp_path / "out", "--max-pixels", "1000") == 1
    assert "--max-pixels" in capsys.readouterr().err and not (tmp_path / "out" / "a_png_mask.png").exists()
    assert run(ckpt, tmp_path / "a.png", tmp_path / "out", "--max-pixels", "2000") == 0
    tifffile.imwrite(tmp_path / "big.tif", image(64, 64), photometric="rgb", tile=(16, 16))
    monkeypatch.setattr(infer, "STREAM_PIXELS", 0)  # read by windows: not bounded
    assert run(ckpt, tmp_path / "big.tif", tmp_path / "out", "--max-pixels", "1000") == 0
    assert height(tmp_path / "out" / "big_tif_mask.png") == 64


@pytest.mark.parametrize("layout", [{"tile": (16, 16)}, {"rowsperstrip": 8, "compression": "zlib"}],
                         ids=["tiled", "strips"])
def test_tiff_header_claiming_more_than_its_strips_is_refused_clearly(ckpt, tmp_path, capsys, layout):
    tifffile.imwrite(tmp_path / "huge.tif", image(32, 32), photometric="rgb", **layout)
    patch_tiff_size(tmp_path / "huge.tif", 100000)
    with pytest.raises(raster.RasterError, match="huge.tif: its header says 100000 x 100000 pixels") as e:
        raster.read_raster(tmp_path / "huge.tif")
    assert "Error" not in str(e.value)  # no IndexError / MemoryError: what is wrong, in words
    assert run(ckpt, tmp_path / "huge.tif", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "huge.tif: its header says 100000 x 100000" in err and "IndexError" not in err


# --------------------------------------------------------------------------- the input folder (18)

def test_folders_and_broken_links_in_the_input_are_listed_as_skipped(ckpt, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(image(20, 24)).save(inp / "a.png")
    (inp / "x.tif").mkdir()
    os.symlink("loop.png", inp / "loop.png")
    os.symlink("missing.png", inp / "gone.png")
    images, skipped = infer.list_inputs(inp)
    assert images == [inp / "a.png"]
    assert {p.name for p, _ in skipped} == {"x.tif", "loop.png", "gone.png"}
    assert run(ckpt, inp, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "1 images done, 3 skipped" in out
    assert "x.tif: a folder" in out and "gone.png: a link to missing.png, which does not exist" in out
    assert "loop.png: a link that cannot be followed" in out


# --------------------------------------------------------------------------- Ctrl-C (19)

@pytest.mark.parametrize("mode", [[], ["--no-pipeline"]], ids=["pipelined", "serial"])
def test_ctrl_c_says_how_far_it_got_in_one_line_and_exits_130(ckpt, tmp_path, capsys, monkeypatch, mode):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(image(20, 24)).save(inp / f"{name}.png")
    ctrl_c_on_second_image(monkeypatch)
    try:
        code = run(ckpt, inp, tmp_path / "out", *mode)
    except KeyboardInterrupt:  # the old behaviour: a traceback
        code = "raised"
    assert code == 130
    written = len(list((tmp_path / "out").glob("*_mask.png")))
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"interrupted: {written} of 3 images written; rerun with --skip-existing to continue"
    assert "Traceback" not in err


# --------------------------------------------------------------------------- data that do not fit the model (21, 22)

def test_16_bit_input_under_an_8_bit_model_is_a_warning_in_the_summary_and_the_mask(ckpt, tmp_path, capsys):
    eleven = np.random.default_rng(0).integers(0, 2048, (24, 24, 3)).astype(np.uint16)  # 11-bit data
    eleven[0, 0] = 5000  # a few bright pixels make the image's own bit depth 13
    tifffile.imwrite(tmp_path / "atl.tif", eleven, photometric="rgb")
    assert run(ckpt, tmp_path / "atl.tif", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "1 with warnings" in captured.out
    last = captured.err.strip().splitlines()[-1]  # in the run's summary, after the images
    assert last.startswith("warning: ") and "atl.tif" in last and "13-bit" in last
    assert "--bit-depth N" in last and "train on the original files" in last
    assert "--bit-depth" in text(tmp_path / "out" / "atl_tif_mask.png")["Warning"]  # in the output's metadata
    assert run(ckpt, tmp_path / "atl.tif", tmp_path / "out2", "--bit-depth", "11") == 0  # the user chose: no warning
    captured = capsys.readouterr()
    assert "warning" not in captured.err.lower() and "with warnings" not in captured.out
    assert "Warning" not in text(tmp_path / "out2" / "atl_tif_mask.png")


def test_bit_depth_is_refused_for_a_model_that_scales_by_its_own_range(tmp_path, capsys):
    """--bit-depth is the 8-bit model's rule; a model trained on wider data applies the range in its checkpoint."""
    from spec import Intensity
    wide = tmp_path / "wide.pth"
    save_checkpoint(wide, TinySegmentation(), DataSpec(scale=1.0, intensity=Intensity("range", (0.0,) * 3,
                                                                                      (2047.0,) * 3)))
    tifffile.imwrite(tmp_path / "atl.tif", np.zeros((24, 24, 3), np.uint16), photometric="rgb")
    assert run(wide, tmp_path / "atl.tif", tmp_path / "out", "--bit-depth", "11") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --bit-depth applies to models trained on 8-bit images") and "range" in err
    assert not (tmp_path / "out").exists()
    assert run(wide, tmp_path / "atl.tif", tmp_path / "out") == 0


def test_nodata_is_left_out_of_every_range_check(tmp_path):
    nodata = [(42113, "s", 0, "-99999", True)]
    values = np.random.default_rng(0).uniform(0, 255, (20, 20, 3)).astype(np.float32)
    values[:5, :5] = -99999  # declared nodata
    tifffile.imwrite(tmp_path / "landsat.tif", values, photometric="rgb", extratags=nodata)
    with pytest.raises(raster.RasterError) as e:
        load_input(tmp_path / "landsat.tif", DataSpec())
    msg = str(e.value)
    assert "landsat.tif" in msg and "-99999" not in msg and "gdal_translate -ot Byte" in msg
    assert "scale it to [0, 1]" not in msg  # advice that does not fit a 0..255 raster
    tifffile.imwrite(tmp_path / "unit.tif", np.where(values < 0, values, values / 255), photometric="rgb",
                     extratags=nodata)
    inp = load_input(tmp_path / "unit.tif", DataSpec())  # [0, 1] apart from nodata: read
    assert not inp.valid[:5, :5].any() and inp.valid[5:].all()
    wide = np.random.default_rng(1).integers(0, 2048, (20, 20, 3)).astype(np.uint16)
    wide[:5, :5] = 65535  # nodata: not the largest value of an 11-bit image
    tifffile.imwrite(tmp_path / "wide.tif", wide, photometric="rgb", extratags=[(42113, "s", 0, "65535", True)])
    assert "as 11-bit data" in load_input(tmp_path / "wide.tif", DataSpec()).warnings[0]
