"""A pickle reader that admits only builtin containers, numbers, strings and numpy arrays.

The revisited Oxford/Paris ground truth ships as ``gnd_*.pkl``. Plain :func:`pickle.load` would run
whatever callable the file names (``os.system`` …), so the file is read with an unpickler whose
``find_class`` resolves only the names needed to rebuild those values and refuses everything else,
before anything is called.
"""
from __future__ import annotations

import builtins
import io
import pickle
from typing import Any

import numpy as np
from numpy._core import multiarray, numeric

from clipopt_core.suite.types import BenchmarkLayoutError

_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray")
# numpy array reconstruction, under both module names (numpy < 2 pickles say numpy.core, numpy 2 numpy._core):
# protocols 2-4 rebuild arrays with _reconstruct + ndarray + dtype; protocol 5 with _frombuffer; 0-d values
# with scalar. None of them can call anything but numpy's own constructors.
_NUMPY = {
    ("multiarray", "_reconstruct"): multiarray._reconstruct,
    ("multiarray", "scalar"): multiarray.scalar,
    ("numeric", "_frombuffer"): numeric._frombuffer,
}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What protocols 0-1 store bytes as (``_codecs.encode(text, "latin1")``); no other codec is admitted."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    **{(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__") for name in _BUILTINS},
    **{(f"numpy.{core}.{module}", name): value
       for core in ("core", "_core") for (module, name), value in _NUMPY.items()},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")  # latin1: Python-2 pickles of numpy arrays
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise BenchmarkLayoutError(
                f"{self.source}: refused to unpickle {module}.{name} (only builtin containers, numbers and "
                "numpy arrays are admitted); replace the file with the official one") from None


def load_restricted_pickle(data: bytes, source: str) -> Any:
    """Unpickle ``data`` admitting only builtin containers/numbers/strings and numpy arrays.

    ``source`` names the file in errors. Raises :class:`BenchmarkLayoutError` when the pickle names any
    other callable (nothing is called) or is not a readable pickle.
    """
    try:
        return _RestrictedUnpickler(data, source).load()
    except BenchmarkLayoutError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a corrupt pickle is a layout error
        raise BenchmarkLayoutError(f"{source}: not a readable pickle ({type(error).__name__}: {error}); "
                                   "replace the file with the official one") from error
