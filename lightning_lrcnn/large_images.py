"""Crops of images larger than one would decode whole (slides, satellite scenes), read from disk as ``uint8``.

Only the rows and columns a sample needs are read: NumPy ``.npy`` files are memory-mapped; TIFF/BigTIFF files
(tifffile) are memory-mapped when stored uncompressed and contiguous, otherwise only the tiles or strips that
meet the crop are read and decoded; PNG files (pypng) are decoded row by row, keeping only the crop's rows.
Batches stay ``uint8``: put :class:`~lightning_lrcnn.models.InputNormalize` first in the network, so the
conversion to float and the mean/std normalisation run band by band inside the converted backbone and a float
copy of the whole input never exists (at 16384² it alone would be 3 GiB).

Every file is checked when the data module is built (readable, 8-bit, 3 or 4 channels, at least one crop in
size); a bad one stops the run before training starts with one line that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["LargeImage", "LargeImageError", "LargeImageCrops", "LargeImageDataModule", "read_crop", "SUFFIXES"]

SUFFIXES = (".tif", ".tiff", ".npy", ".png")


class LargeImageError(ValueError):
    """A large image cannot be used; the message names the file."""


@dataclass(frozen=True)
class LargeImage:
    """A file's path, its height and width, and its class index."""

    path: str
    height: int
    width: int
    label: int = 0


def _fail(path: str, why: str) -> LargeImageError:
    return LargeImageError(f"{path}: {why}")


def _check_pixels(path: str, dtype: Any, channels: int) -> None:
    if np.dtype(dtype) != np.uint8:
        raise _fail(path, f"{np.dtype(dtype)} pixels; only 8-bit (uint8) images are supported: convert it, e.g. "
                          "to 8 bits per channel")
    if channels not in (3, 4):
        raise _fail(path, f"{channels} channel(s); an RGB image (3 channels, or RGBA) is needed")


def probe(path: str, label: int = 0) -> LargeImage:
    """Read a file's header only and check it can be cropped.

    Raises:
        LargeImageError: missing, unreadable or corrupt file, an unsupported suffix, not 8-bit, not RGB(A).
    """
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            a = np.load(path, mmap_mode="r")
            height, width, channels = _npy_layout(path, a)
            _check_pixels(path, a.dtype, channels)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page: Any = tif.pages[0]
                height, width = int(page.imagelength), int(page.imagewidth)
                _check_pixels(path, page.dtype, int(page.samplesperpixel))
                if page.samplesperpixel > 1 and page.planarconfig != 1:
                    raise _fail(path, "planar (separate) channels are not supported; store RGB interleaved")
        elif suffix == ".png":
            import png  # type: ignore[import-untyped]

            reader = png.Reader(filename=path)
            reader.preamble()
            width, height = int(reader.width), int(reader.height)
            if reader.bitdepth != 8:
                raise _fail(path, f"{reader.bitdepth}-bit PNG; only 8-bit images are supported")
            _check_pixels(path, np.uint8, int(reader.planes) if not reader.greyscale else 1)
        else:
            raise _fail(path, f"unsupported file type {suffix!r}; use one of {SUFFIXES}")
    except LargeImageError:
        raise
    except Exception as exc:  # a corrupt or truncated file: the reader's own words, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"cannot read it ({type(exc).__name__}: {first})") from None
    return LargeImage(path, height, width, label)


def _npy_layout(path: str, a: np.ndarray) -> tuple[int, int, int]:
    """(height, width, channels) of an ``(H, W, C)`` or ``(C, H, W)`` array."""
    if a.ndim == 2:
        return a.shape[0], a.shape[1], 1
    if a.ndim != 3:
        raise _fail(path, f"array of shape {a.shape}; expected (H, W, 3) or (3, H, W)")
    if a.shape[-1] in (3, 4):
        return a.shape[0], a.shape[1], a.shape[2]
    if a.shape[0] in (3, 4):
        return a.shape[1], a.shape[2], a.shape[0]
    return a.shape[0], a.shape[1], a.shape[2]


def read_crop(image: LargeImage, top: int, left: int, size: int) -> np.ndarray:
    """Pixels ``[top, top + size) x [left, left + size)`` of ``image`` as a ``(3, size, size)`` uint8 array,
    reading only what the crop needs."""
    if not (0 <= top <= image.height - size and 0 <= left <= image.width - size):
        raise _fail(image.path, f"crop {size} at ({top}, {left}) is outside the {image.height}x{image.width} image")
    path, suffix = image.path, os.path.splitext(image.path)[1].lower()
    try:
        if suffix == ".npy":
            a = np.load(path, mmap_mode="r")
            if a.shape[-1] in (3, 4):
                crop = np.array(a[top : top + size, left : left + size, :3]).transpose(2, 0, 1)
            else:
                crop = np.array(a[:3, top : top + size, left : left + size])
        elif suffix in (".tif", ".tiff"):
            crop = _tiff_crop(path, top, left, size)
        else:
            crop = _png_crop(path, top, left, size)
    except LargeImageError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"cannot read a crop ({type(exc).__name__}: {first})") from None
    return np.ascontiguousarray(crop)


def _tiff_crop(path: str, top: int, left: int, size: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page: Any = tif.pages[0]
        if page.is_memmappable:
            a = tif.asarray(out="memmap")
            return np.array(a[top : top + size, left : left + size, :3]).transpose(2, 0, 1)
        # tiles (or strips: full-width tiles) meeting the crop, each read and decoded on its own
        tile_h = page.tilelength if page.is_tiled else page.rowsperstrip
        tile_w = page.tilewidth if page.is_tiled else page.imagewidth
        across = -(-page.imagewidth // tile_w)
        out = np.empty((size, size, page.samplesperpixel), np.uint8)
        fh = tif.filehandle
        for ty in range(top // tile_h, (top + size - 1) // tile_h + 1):
            for tx in range(left // tile_w, (left + size - 1) // tile_w + 1):
                index = ty * across + tx
                fh.seek(page.dataoffsets[index])
                segment, (_, _, y, x, _), _ = page.decode(fh.read(page.databytecounts[index]), index,
                                                          jpegtables=page.jpegtables)
                seg = segment[0]  # type: ignore[index]
                y0, x0 = max(top, y), max(left, x)
                y1, x1 = min(top + size, y + seg.shape[0], page.imagelength), min(left + size, x + seg.shape[1])
                out[y0 - top : y1 - top, x0 - left : x1 - left] = seg[y0 - y : y1 - y, x0 - x : x1 - x]
        return out[:, :, :3].transpose(2, 0, 1)


def _png_crop(path: str, top: int, left: int, size: int) -> np.ndarray:
    import png  # type: ignore[import-untyped]

    reader = png.Reader(filename=path)
    width, _, rows, info = reader.read()  # rows are decoded lazily, one at a time
    planes = int(info["planes"])
    out = np.empty((size, size, planes), np.uint8)
    for y, row in enumerate(rows):
        if y >= top + size:
            break
        if y >= top:
            out[y - top] = np.frombuffer(bytes(row), np.uint8).reshape(width, planes)[left : left + size]
    return out[:, :, :3].transpose(2, 0, 1)


def find_images(path: str) -> tuple[list[LargeImage], list[str]]:
    """The images under ``path`` and the class names: a single file (one class), a folder of images (one
    class), or a folder of class folders (``path/<class>/<image>``, like torchvision's ImageFolder).

    Raises:
        LargeImageError: ``path`` is missing, holds no image, or an image fails :func:`probe`.
    """
    if os.path.isfile(path):
        return [probe(path)], [os.path.splitext(os.path.basename(path))[0]]
    if not os.path.isdir(path):
        raise _fail(path, "no such file or folder")

    def images_in(folder: str) -> list[str]:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(SUFFIXES))

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        files, classes = [[*images_in(path)]], [os.path.basename(os.path.normpath(path))]
    else:
        files = [images_in(os.path.join(path, c)) for c in classes]
    images = [probe(f, label) for label, group in enumerate(files) for f in group]
    if not images:
        raise _fail(path, f"no image files ({', '.join(SUFFIXES)}) found")
    return images, classes


class LargeImageCrops(Dataset):
    """``length`` crops of ``crop`` x ``crop`` pixels, cycling over ``images``, each at a position drawn from
    ``(seed, index)``: ``{"image": uint8 (3, crop, crop), "label": class index}``."""

    def __init__(self, images: list[LargeImage], crop: int, length: int, seed: int = 0) -> None:
        too_small = [im for im in images if im.height < crop or im.width < crop]
        if too_small:
            im = too_small[0]
            raise _fail(im.path, f"crop {crop} is larger than the image ({im.height}x{im.width}); lower data.crop")
        self.images, self.crop, self.length, self.seed = images, crop, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i % len(self.images)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        top = int(torch.randint(image.height - self.crop + 1, (1,), generator=g))
        left = int(torch.randint(image.width - self.crop + 1, (1,), generator=g))
        return {"image": torch.from_numpy(read_crop(image, top, left, self.crop)), "label": image.label}


class LargeImageDataModule(pl.LightningDataModule):
    """Random crops of large images on disk (see the module docstring): train and validation crops from the
    same images at different positions.

    Args:
        path: an image file, a folder of images, or a folder of class folders.
        crop: side of the square crops, pixels.
        batch_size: crops per batch.
        train_size: training crops per epoch.
        val_size: validation crops.
        num_classes: expected number of classes (checked against the folders), or None.
        num_workers: DataLoader workers.
        seed: crop positions.

    Raises:
        LargeImageError: a bad file or folder, or a crop larger than an image.
        ValueError: a bad number.
    """

    def __init__(self, path: str, crop: int = 8192, batch_size: int = 1, train_size: int = 8, val_size: int = 2,
                 num_classes: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("crop", crop), ("batch_size", batch_size), ("train_size", train_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
        images, classes = find_images(path)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"data.num_classes={num_classes} but {path!r} has {len(classes)} class(es): {classes}")
        self.num_classes, self.classes, self.image_size = len(classes), classes, crop
        self.dtype = torch.uint8  # of the batches' images: the network must normalise them (InputNormalize)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = LargeImageCrops(images, crop, train_size, seed)
        self.val_set = LargeImageCrops(images, crop, val_size, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)
