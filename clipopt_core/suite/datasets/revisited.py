"""Revisited Oxford5k / Paris6k (Radenović et al. 2018): 70 queries each with easy/hard/junk ground truth.

Official layout (http://cmp.felk.cvut.cz/revisitop/, the ``revisitop`` download script)::

    <root>/<name>/gnd_<name>.pkl      {"imlist": [...], "qimlist": [...], "gnd": [{"bbx", "easy", "hard", "junk"}]}
    <root>/<name>/jpg/<image>.jpg     database images and queries (names from imlist / qimlist, no suffix)

with ``<name>`` ``roxford5k`` or ``rparis6k``; ``root`` may also be the ``<name>`` folder itself. The
pickle is read with a restricted unpickler (builtin containers, numbers and numpy arrays only).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np

from clipopt_core.suite.datasets._layout import BenchmarkRoot
from clipopt_core.suite.datasets._restricted_pickle import load_restricted_pickle
from clipopt_core.suite.types import BenchmarkLayoutError, RevisitedSet

NAMES = ("roxford5k", "rparis6k")
GROUND_TRUTH_KEYS = ("bbx", "easy", "hard", "junk")


def _fix(name: str) -> str:
    return (f"download gnd_{name}.pkl and the images from http://cmp.felk.cvut.cz/revisitop/ (the revisitop "
            f"download script) so that <root>/{name}/gnd_{name}.pkl and <root>/{name}/jpg/ exist")


def load_revisited(root: str, name: Literal["roxford5k", "rparis6k"]) -> RevisitedSet:
    """Database, uncropped queries, query boxes and per-query easy/hard/junk database indices.

    ``query_boxes``: [70, 4] float ``(x0, y0, x1, y1)`` pixels from ``bbx``; ``easy``/``hard``/``junk``:
    int64 arrays of indices into ``imlist`` (= ``database``).
    """
    if name not in NAMES:
        raise ValueError(f"revisited benchmark must be one of {NAMES}, got {name!r}")
    base = BenchmarkRoot(root, name, _fix(name))
    folder = name if base.exists(f"{name}/gnd_{name}.pkl") else ""
    gnd_rel = f"{folder}/gnd_{name}.pkl" if folder else f"gnd_{name}.pkl"
    if not base.exists(gnd_rel):
        raise base.error(f"missing file {base.uri(f'{name}/gnd_{name}.pkl')} (nor {base.uri(gnd_rel)})")
    gnd = load_restricted_pickle(base.read_bytes(gnd_rel), base.uri(gnd_rel))
    imlist, qimlist, boxes, truth = _validated(gnd, base.uri(gnd_rel))
    jpg = base.require(f"{folder}/jpg" if folder else "jpg", "folder")
    return RevisitedSet(name=name, database=tuple(base.uri(f"{jpg}/{image}.jpg") for image in imlist),
                        queries=tuple(base.uri(f"{jpg}/{image}.jpg") for image in qimlist), query_boxes=boxes,
                        easy=truth["easy"], hard=truth["hard"], junk=truth["junk"])


def _validated(gnd: Any, source: str) -> tuple[list[str], list[str], np.ndarray, dict[str, tuple[np.ndarray, ...]]]:
    """Image lists, [Q, 4] query boxes and per-query easy/hard/junk index arrays of the revisitop structure."""
    if not isinstance(gnd, dict) or not {"imlist", "qimlist", "gnd"} <= gnd.keys():
        raise BenchmarkLayoutError(f"{source}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist, qimlist, entries = list(gnd["imlist"]), list(gnd["qimlist"]), list(gnd["gnd"])
    if not all(isinstance(item, str) for item in imlist + qimlist):
        raise BenchmarkLayoutError(f"{source}: 'imlist' and 'qimlist' must hold image names (strings)")
    if len(entries) != len(qimlist):
        raise BenchmarkLayoutError(f"{source}: {len(qimlist)} queries but {len(entries)} ground-truth entries")
    boxes = np.zeros((len(entries), 4), dtype=np.float64)
    truth: dict[str, list[np.ndarray]] = {"easy": [], "hard": [], "junk": []}
    for q, entry in enumerate(entries):
        if not isinstance(entry, dict) or not set(GROUND_TRUTH_KEYS) <= entry.keys():
            raise BenchmarkLayoutError(f"{source}: gnd[{q}] must be a dict with keys {GROUND_TRUTH_KEYS}")
        try:
            boxes[q] = np.asarray(entry["bbx"], dtype=np.float64).reshape(4)
            for key, found in truth.items():
                found.append(np.asarray(entry[key], dtype=np.int64).reshape(-1))
        except (TypeError, ValueError) as error:
            raise BenchmarkLayoutError(
                f"{source}: gnd[{q}] has a malformed 'bbx'/'easy'/'hard'/'junk' ({error})") from error
        for key, found in truth.items():
            if found[q].size and (found[q].min() < 0 or found[q].max() >= len(imlist)):
                raise BenchmarkLayoutError(f"{source}: gnd[{q}]['{key}'] indexes outside imlist (0..{len(imlist) - 1})")
    return imlist, qimlist, boxes, {key: tuple(found) for key, found in truth.items()}
