"""Checksummed `.npz` files: the weight files (`frcnn_jax.weights`) and exported detectors
(`frcnn_jax.export`) carry the SHA-256 of their arrays (names, dtypes, shapes and bytes) under
the key `__sha256__`, checked on every load, so a damaged or altered file is refused with an
error naming it rather than used. Needs only NumPy (an exported detector runs without the rest
of frcnn_jax)."""

import hashlib
import zipfile
import zlib

import numpy as np

from frcnn_jax.errors import DamagedFile

CHECKSUM = "__sha256__"


def digest(arrays):
    """SHA-256 hex of a {name: array} dict: names in sorted order, each with its dtype, shape
    and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def save(file, arrays):
    """Write `arrays` ({name: array}) and their checksum as an .npz to `file` (a path or an
    open binary file)."""
    np.savez(file, **{CHECKSUM: np.array(digest(arrays))}, **arrays)


def load(path, what):
    """{name: array} of an .npz written by `save`, its checksum verified (no pickles read).
    `what` names the file's role in errors ("config.model.init_checkpoint", ...):
    `DamagedFile` naming `path` when it does not parse, has no checksum or fails it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFile(f"{what} {path}: unreadable ({type(e).__name__}: {e})") from None
    stored = arrays.pop(CHECKSUM, None)
    if stored is None:
        raise DamagedFile(
            f"{what} {path}: no checksum ({CHECKSUM}): not written by this version of frcnn_jax"
        )
    if str(stored) != digest(arrays):
        raise DamagedFile(f"{what} {path}: its contents do not match their SHA-256 checksum")
    return arrays
