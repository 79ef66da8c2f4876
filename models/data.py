"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: an IDX reader and preprocessing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.errors import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Training-set statistics of pixel/255; the bundle's manifest records them too.
MEAN = 0.2860
STD = 0.3530

_IDX_DTYPES: dict[int, npt.DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> npt.NDArray[np.generic]:
    """Read an IDX file (optionally gzip-compressed) into an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, gzip.BadGzipFile, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: {len(raw) - header} data bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(
    split: str = "test", root: Path = FASHION_MNIST_DIR
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Images (N, 28, 28) uint8 and labels (N,) of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.exists():
            raise DatasetError(
                f"{path} not found: install Debian's dataset-fashion-mnist package "
                "(apt-get install dataset-fashion-mnist)"
            )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"mismatched Fashion-MNIST files: {images.shape} vs {labels.shape}")
    return images.astype(np.uint8), labels.astype(np.int64)


def preprocess(images: npt.NDArray[np.uint8], upsample: int = 1) -> npt.NDArray[np.float32]:
    """uint8 images (N, H, W) -> normalised float32 tensors (N, 1, H*upsample, W*upsample).

    Upsampling repeats each pixel (nearest neighbour), as a camera of that resolution would see it.
    """
    if upsample < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    if upsample > 1:
        images = images.repeat(upsample, axis=-2).repeat(upsample, axis=-1)
    x = images.astype(np.float32) / 255.0
    return ((x - MEAN) / STD).reshape(-1, 1, *images.shape[-2:]).astype(np.float32)


def read_inputs(path: Path, shape: tuple[int, ...] | None = None, *,
                labels: bool = False) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    """Model inputs from a file, never unpickled: an ``.npz`` with ``x`` (N x the input shape without its batch)
    and optionally ``y`` (N class indices; required with ``labels``), or an ``.npy`` of ``x`` alone. ``shape``:
    the model's input shape (batch first), checked."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):  # an .npy file
            x, y = data, None
        else:
            with data:
                x = np.asarray(data["x"])
                y = np.asarray(data["y"], np.int64) if "y" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: expected an .npz with arrays x (and y) or an .npy of x ({exc})") from exc
    if labels and y is None:
        raise DatasetError(f"{path}: no labels: an .npz with arrays x and y is needed")
    if shape is not None:
        sample = tuple(shape[1:])
        if x.shape == sample:
            x = x[None]
        if x.shape[1:] != sample:
            raise DatasetError(f"{path}: x is {list(x.shape)}; the model takes N x {list(sample)} inputs")
    if y is not None and len(y) != len(x):
        raise DatasetError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return np.asarray(x, np.float32), y
