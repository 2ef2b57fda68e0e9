"""Image data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files)."""

from __future__ import annotations

import gzip
import pathlib
import zlib

import numpy as np

from ._common import AssetMissingError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "load_fashion_mnist"]

# Module-level so that tests (or unusual installs) can point the loader elsewhere.
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL = "apt-get install -y dataset-fashion-mnist"


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions, validating header and length.

    IDX layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one big-endian uint32 per
    dimension and the data.
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; truncation raises EOFError
        raise ValueError(f"corrupt Fashion-MNIST file {path}: cannot decompress it ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: bad IDX magic number {raw[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes after decompression, expected {expected} "
            f"for shape {shape}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()  # copy: writable array


def load_fashion_mnist(split: str, root: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000 or "test": 10,000) as uint8 images (N, 28, 28) and int64 labels.

    ``root`` defaults to :data:`FASHION_MNIST_DIR`. Class names are in :data:`FASHION_MNIST_CLASSES`.
    Raises :class:`AssetMissingError` if the files are not installed, ``ValueError`` if one is corrupt.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_FILES)}")
    root = pathlib.Path(root) if root is not None else FASHION_MNIST_DIR
    paths = [root / name for name in _FILES[split]]
    for path in paths:
        if not path.exists():
            raise AssetMissingError(
                f"Fashion-MNIST data not found: {path} does not exist. Run: {_INSTALL} (or run ./setup.sh)"
            )
    images = _read_idx(paths[0], 3)
    labels = _read_idx(paths[1], 1).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"corrupt Fashion-MNIST split {split!r} in {root}: images {images.shape} do not match labels {labels.shape}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"corrupt Fashion-MNIST file {paths[1]}: label {labels.max()} out of range")
    return images, labels
