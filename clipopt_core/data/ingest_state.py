"""What a streamed ingest keeps between batches: fixed-width keys per row, never the rows.

:mod:`clipopt_core.data.ingest_stream` validates a source a batch at a time; the checks across rows
(a path listed twice, the same bytes under two labels, the data version) carry over batches in:

* :class:`SeenKeys`: a 128-bit key (BLAKE2b) per distinct row key seen (``root + path`` of a usable
  file row, a shard row's path): **16 bytes per row**;
* :class:`ContentOwners`: per accepted image, the first 128 bits of its SHA-256 and a code for its
  owner's label: **20 bytes per accepted row**, plus each distinct label once (:class:`LabelCodes`:
  its text, a 16-byte key and a 4-byte code);
* the data version: :class:`clipopt_core.runtime.digest.FrameDigest` of the accepted rows, fed a
  batch at a time (32 bytes).

Keys are kept in sorted runs (:class:`KeyRuns`): a batch of B rows is checked with binary searches,
O(B log² n), never a pass over all n keys (~0.06 s per batch of 16,384 against 10⁷ keys here).
At 10⁷ images that is ~0.35 GB (+ the labels) instead of ~14 GB of rows. A 128-bit key makes two
different keys equal with probability ~n²/2¹²⁹ (≈10⁻²⁵ at n = 10⁷); the manifest's ``image_id``
is already an 80-bit prefix of the content hash. docs/scaling.md, "Ingest in batches".
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import polars as pl

KEY_SCHEMA = {"hi": pl.UInt64, "lo": pl.UInt64}


def string_keys(values: Sequence[str]) -> pl.DataFrame:
    """128-bit BLAKE2b keys of ``values`` as two ``UInt64`` columns ``hi``, ``lo`` (one row per value)."""
    raw = b"".join(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                   for value in values)
    pairs = np.frombuffer(raw, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return pl.DataFrame({"hi": pairs[:, 0], "lo": pairs[:, 1]}, schema=KEY_SCHEMA)


def content_keys(sha256: pl.Series) -> pl.DataFrame:
    """The first 128 bits of hex SHA-256 digests as ``hi``, ``lo`` (``UInt64``)."""
    hexes = sha256.to_frame("sha256")
    return hexes.select(pl.col("sha256").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).alias("hi"),
                        pl.col("sha256").str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64).alias("lo"))


class KeyRuns:
    """Distinct 128-bit keys (``hi``, ``lo``), each with an optional ``uint32`` value, as sorted runs.

    A batch of new keys becomes a run of its own; runs of similar sizes are merged as in a binary
    counter, so there are O(log n) runs, a lookup is a binary search per run (O(B log² n) per batch of
    B, whatever n), and each key is moved O(log n) times. Memory: 16 bytes per key (20 with values);
    a merge holds its two runs and the merged one for a moment (the peak: twice the keys).
    """

    def __init__(self, values: bool = False) -> None:
        self.values = values
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self.runs)

    def find(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Per query key: its value (0 without values), or -1 where the key is absent (``int64``)."""
        order = np.argsort(hi, kind="stable")  # sorted needles: the binary searches walk memory in order
        hi, lo = hi[order], lo[order]
        found = np.full(len(hi), -1, dtype=np.int64)
        for run_hi, run_lo, run_values in self.runs:
            left, right = np.searchsorted(run_hi, hi, "left"), np.searchsorted(run_hi, hi, "right")
            for offset in range(int((right - left).max(initial=0))):  # keys sharing ``hi``: almost never two
                at = left + offset
                hit = (at < right) & (run_lo[np.minimum(at, len(run_lo) - 1)] == lo)
                found[hit] = run_values[at[hit]] if run_values is not None else 0
        result = np.empty_like(found)
        result[order] = found
        return result

    def add(self, hi: np.ndarray, lo: np.ndarray, values: np.ndarray | None = None) -> None:
        """Add keys that are absent and distinct, with their ``values`` when the runs keep values."""
        if not len(hi):
            return
        order = np.argsort(hi, kind="stable")
        self.runs.append((hi[order], lo[order], values.astype(np.uint32)[order] if self.values else None))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer, older = self.runs.pop(), self.runs.pop()
            at = np.searchsorted(older[0], newer[0], "right")  # a linear merge of two sorted runs
            self.runs.append(tuple(np.insert(a, at, b) if a is not None else None  # type: ignore[arg-type]
                                   for a, b in zip(older, newer)))


class SeenKeys:
    """The keys seen so far in a stream of batches (16 bytes per distinct key)."""

    def __init__(self) -> None:
        self.keys = KeyRuns()

    def mark(self, keys: Sequence[str | None]) -> pl.Series:
        """Per key: whether it was seen before (earlier in ``keys`` or in an earlier call). ``None``
        is never seen and not remembered; every other key is remembered."""
        present = np.array([number for number, key in enumerate(keys) if key is not None], dtype=np.int64)
        hashed = string_keys([keys[number] for number in present])
        hi, lo = hashed["hi"].to_numpy(), hashed["lo"].to_numpy()
        first = hashed.select(pl.struct("hi", "lo").is_first_distinct()).to_series().to_numpy()
        repeated = ~first | (self.keys.find(hi, lo) >= 0)
        self.keys.add(hi[~repeated], lo[~repeated])
        flags = np.zeros(len(keys), dtype=bool)
        flags[present[repeated]] = True
        return pl.Series("repeated", flags)


class LabelCodes:
    """A code per distinct label, in order of first appearance; each label held once (its text and key)."""

    def __init__(self) -> None:
        self.keys = KeyRuns(values=True)
        self.names = pl.Series("label", [], dtype=pl.String)

    def codes(self, labels: pl.Series) -> np.ndarray:
        """The code of each label (``int64``), new labels numbered on."""
        distinct = labels.unique(maintain_order=True)
        keys = string_keys(distinct.to_list())
        hi, lo = keys["hi"].to_numpy(), keys["lo"].to_numpy()
        codes = self.keys.find(hi, lo)
        new = codes < 0
        codes[new] = np.arange(len(self.names), len(self.names) + int(new.sum()))
        self.keys.add(hi[new], lo[new], codes[new])
        self.names = pl.concat([self.names, distinct.filter(pl.Series(new))], rechunk=False)
        lookup = pl.DataFrame({"label": distinct, "code": codes})
        return labels.to_frame("label").join(lookup, on="label", how="left", maintain_order="left")["code"].to_numpy()

    def labels(self, codes: np.ndarray) -> pl.Series:
        """The label of each code; null where the code is negative."""
        index = pl.Series("code", codes, dtype=pl.Int64)
        return self.names.gather(pl.select(pl.when(index >= 0).then(index)).to_series())


class ContentOwners:
    """Per accepted image: its content key and its label's code (20 bytes per accepted row)."""

    def __init__(self) -> None:
        self.owners = KeyRuns(values=True)
        self.label_codes = LabelCodes()

    def owner_labels(self, sha256: pl.Series) -> pl.Series:
        """The label of the image already accepted with each content (null where none was)."""
        keys = content_keys(sha256)
        return self.label_codes.labels(self.owners.find(keys["hi"].to_numpy(), keys["lo"].to_numpy())).alias("owner")

    def add(self, accepted: pl.DataFrame) -> None:
        """Remember the owners among ``accepted`` (``sha256``, ``label``; contents not yet owned)."""
        keys = content_keys(accepted["sha256"])
        self.owners.add(keys["hi"].to_numpy(), keys["lo"].to_numpy(), self.label_codes.codes(accepted["label"]))
