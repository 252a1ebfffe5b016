"""Large images from disk: crops read without decoding the whole file, uint8 batches, clear errors, and the
normalisation inside the converted backbone (no float copy of the whole input)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
import torch
from conftest import RecordOps
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.large_images import LargeImageDataModule, LargeImageError, find_images, probe, read_crop
from lightning_lrcnn.models import uint8_input

RGB = np.random.default_rng(0).integers(0, 256, (150, 130, 3), dtype=np.uint8)


def _write(path: Path, kind: str, pixels: np.ndarray = RGB) -> Path:
    if kind == "tiled":
        tifffile.imwrite(path, pixels, tile=(32, 48), compression="zlib")
    elif kind == "strips":
        tifffile.imwrite(path, pixels, rowsperstrip=7, compression="zlib")
    elif kind == "contiguous":
        tifffile.imwrite(path, pixels)
    elif kind == "bigtiff":
        tifffile.imwrite(path, pixels, bigtiff=True, tile=(64, 64))
    elif kind == "png":
        h, w, c = pixels.shape
        with path.open("wb") as f:
            png.Writer(w, h, greyscale=c == 1, alpha=c == 4, bitdepth=8).write(f, pixels.reshape(h, w * c).tolist())
    elif kind == "npy_hwc":
        np.save(path, pixels)
    elif kind == "npy_chw":
        np.save(path, pixels.transpose(2, 0, 1).copy())
    return path


SUFFIX = {"tiled": ".tif", "strips": ".tif", "contiguous": ".tiff", "bigtiff": ".tif", "png": ".png",
          "npy_hwc": ".npy", "npy_chw": ".npy"}


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_crops_match_the_image(kind: str, tmp_path: Path) -> None:
    image = probe(str(_write(tmp_path / f"im{SUFFIX[kind]}", kind)))
    assert (image.height, image.width) == (150, 130)
    for top, left, size in ((0, 0, 64), (37, 61, 64), (86, 66, 64), (5, 3, 101)):
        crop = read_crop(image, top, left, size)
        assert crop.dtype == np.uint8 and crop.shape == (3, size, size)
        np.testing.assert_array_equal(crop, RGB[top : top + size, left : left + size].transpose(2, 0, 1))


def test_a_tiled_tiff_crop_decodes_only_the_tiles_it_meets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = probe(str(_write(tmp_path / "im.tif", "tiled")))
    decoded: list[int] = []
    real = tifffile.TiffPage.decode

    def spy(self):  # type: ignore[no-untyped-def]
        fn = real.func(self)
        return lambda data, index, **kw: (decoded.append(index), fn(data, index, **kw))[1]

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(spy))
    read_crop(image, 40, 50, 20)  # rows 40..59 (tile row 1), columns 50..69 (tile column 1): one tile of 15
    assert decoded == [4]


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.full((150, 130, 1), 255, np.uint8)], axis=2)
    for kind in ("tiled", "png", "npy_hwc"):
        image = probe(str(_write(tmp_path / f"a{SUFFIX[kind]}", kind, rgba)))
        np.testing.assert_array_equal(read_crop(image, 1, 2, 30), RGB[1:31, 2:32].transpose(2, 0, 1))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "gone.tif", "gone.tif: no such file"),
    (lambda d: (d / "bad.tif").write_bytes(b"II*\x00garbage") and d / "bad.tif", "bad.tif: cannot read it"),
    (lambda d: (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken") and d / "bad.png", "bad.png: cannot read it"),
    (lambda d: (d / "bad.npy").write_bytes(b"\x93NUMPY nope") and d / "bad.npy", "bad.npy: cannot read it"),
    (lambda d: _write(d / "deep.tif", "tiled", (RGB.astype(np.uint16) * 257)), "deep.tif: uint16 pixels"),
    (lambda d: _write(d / "grey.png", "png", RGB[:, :, :1]), "grey.png: 1 channel(s)"),
    (lambda d: _write(d / "grey.tif", "contiguous", RGB[:, :, 0]), "grey.tif: 1 channel(s)"),
    (lambda d: (d / "x.jpg").write_bytes(b"jpeg") and d / "x.jpg", "unsupported file type '.jpg'"),
])
def test_bad_files_are_one_line_naming_the_file(make, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LargeImageError, match=re.escape(message)) as info:
        probe(str(make(tmp_path)))
    assert "\n" not in str(info.value)


def test_data_module_classes_uint8_batches_and_errors(tmp_path: Path) -> None:
    for c, kind in (("normal", "tiled"), ("tumour", "npy_hwc")):
        (tmp_path / c).mkdir()
        _write(tmp_path / c / f"slide{SUFFIX[kind]}", kind)
    dm = LargeImageDataModule(str(tmp_path), crop=96, batch_size=2, train_size=4, val_size=2, num_classes=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 96, 96)
    assert sorted(set(find_images(str(tmp_path))[1])) == ["normal", "tumour"]
    with pytest.raises(LargeImageError, match=r"crop 200 is larger than the image \(150x130\)"):
        LargeImageDataModule(str(tmp_path), crop=200)
    with pytest.raises(ValueError, match="data.num_classes=3 but"):
        LargeImageDataModule(str(tmp_path), crop=96, num_classes=3)
    with pytest.raises(LargeImageError, match="no such file or folder"):
        LargeImageDataModule(str(tmp_path / "nowhere"), crop=96)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_normalisation_runs_in_the_bands_no_float_copy_of_the_input(mode: str) -> None:
    """uint8 pixels into a converted uint8_input(network): same result as normalising outside, and no float
    tensor of the input's full size is ever made."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plain = uint8_input(net)
    converted = to_row_centric(copy.deepcopy(plain), mode=mode, rows=8)
    x = torch.randint(0, 256, (1, 3, 256, 192), dtype=torch.uint8)
    plan_for(converted, x)
    with RecordOps() as ops:
        y = converted(x)
        y.sum().backward()
    plain_y = plain(x)
    torch.testing.assert_close(y, plain_y)
    full = [shape for _, dtype, shape in ops.calls if shape == (1, 3, 256, 192) and dtype is not torch.uint8]
    assert not full, "a float copy of the whole input was made"
    assert any(shape is not None and len(shape) == 4 and shape[1] == 3 and shape[2] < 256 for _, _, shape in ops.calls)
