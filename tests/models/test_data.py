import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from models.data import load_fashion_mnist, preprocess, read_idx
from models.errors import DatasetError


def test_real_test_split_loads() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
    x = preprocess(images[:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32


def test_idx_round_trip(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + data.tobytes()))
    assert np.array_equal(read_idx(path), data)


@pytest.mark.parametrize("raw", [b"", b"\x01\x00\x08\x01", b"\x00\x00\x07\x01\x00\x00\x00\x01\x00",
                                 b"\x00\x00\x08\x01\x00\x00\x00\x05\x00\x01"])
def test_malformed_idx_is_rejected(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(DatasetError):
        read_idx(path)


def test_missing_dataset_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(DatasetError, match="unknown split"):
        load_fashion_mnist("validation")


def test_preprocess_upsamples_by_repeating_pixels() -> None:
    from models.data import preprocess

    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    x = preprocess(images, upsample=2)
    assert x.shape == (2, 1, 56, 56) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :, ::2, ::2], preprocess(images))
    np.testing.assert_array_equal(x[:, :, 1::2, 1::2], preprocess(images))
    with pytest.raises(ValueError):
        preprocess(images, upsample=0)
