"""What a streamed ingest keeps between batches: fixed-width keys per row, never the rows.

:mod:`clipopt_core.data.ingest_stream` validates a source a batch at a time; the checks across rows
(a path listed twice, the same bytes under two labels, the data version) carry over batches in:

* :class:`SeenKeys`: a 128-bit key (BLAKE2b) per distinct row key seen (``root + path`` of a usable
  file row, a shard row's path): **16 bytes per row**;
* :class:`ContentOwners`: per accepted image, the first 128 bits of its SHA-256 and a code for its
  owner's label: **20 bytes per accepted row**, plus each distinct label once (:class:`LabelCodes`);
* :class:`StreamDigest`: :func:`clipopt_core.train.identity.frame_digest` of the accepted rows, fed
  a batch at a time (32 bytes).

At 10⁷ images that is ~0.35 GB (+ the labels) instead of ~14 GB of rows. A 128-bit key makes two
different keys equal with probability ~n²/2¹²⁹ (≈10⁻²⁵ at n = 10⁷); the manifest's ``image_id``
is already an 80-bit prefix of the content hash. docs/scaling.md, "Ingest in batches".
"""
from __future__ import annotations

import hashlib
from typing import Collection, Sequence

import numpy as np
import polars as pl

KEY_SCHEMA = {"hi": pl.UInt64, "lo": pl.UInt64}
DIGEST_SLICE_ROWS = 100_000  # the slices frame_digest serialises; any slicing gives the same bytes


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


class SeenKeys:
    """The keys seen so far in a stream of batches (16 bytes per distinct key)."""

    def __init__(self) -> None:
        self.keys = pl.DataFrame(schema=KEY_SCHEMA)

    def mark(self, keys: Sequence[str | None]) -> pl.Series:
        """Per key: whether it was seen before (earlier in ``keys`` or in an earlier call). ``None``
        is never seen and not remembered; every other key is remembered."""
        present = [number for number, key in enumerate(keys) if key is not None]
        hashed = string_keys([keys[number] for number in present]).with_columns(
            pl.Series("number", present, dtype=pl.UInt32))
        earlier = hashed.join(self.keys, on=["hi", "lo"], how="semi")["number"]
        repeated_here = hashed.filter(~pl.struct("hi", "lo").is_first_distinct())["number"]
        self.keys = pl.concat([self.keys, hashed.filter(pl.struct("hi", "lo").is_first_distinct())
                               .join(self.keys, on=["hi", "lo"], how="anti").select("hi", "lo")], rechunk=False)
        flags = np.zeros(len(keys), dtype=bool)
        flags[pl.concat([earlier, repeated_here]).to_numpy()] = True
        return pl.Series("repeated", flags)


class LabelCodes:
    """A ``UInt32`` code per distinct label, in order of first appearance (each label held once)."""

    def __init__(self) -> None:
        self.table = pl.DataFrame(schema={"label": pl.String, "code": pl.UInt32})

    def codes(self, labels: pl.Series) -> pl.Series:
        new = (labels.to_frame("label").unique(maintain_order=True).join(self.table, on="label", how="anti"))
        start = self.table.height
        self.table = pl.concat([self.table, new.with_columns(
            pl.int_range(start, start + new.height, dtype=pl.UInt32).alias("code"))], rechunk=False)
        return labels.to_frame("label").join(self.table, on="label", how="left", maintain_order="left")["code"]

    def labels(self, codes: pl.Series) -> pl.Series:
        return codes.to_frame("code").join(self.table, on="code", how="left", maintain_order="left")["label"]


class ContentOwners:
    """Per accepted image: its content key and its label's code (20 bytes per accepted row)."""

    def __init__(self) -> None:
        self.owners = pl.DataFrame(schema={**KEY_SCHEMA, "code": pl.UInt32})
        self.label_codes = LabelCodes()

    def owner_labels(self, sha256: pl.Series) -> pl.Series:
        """The label of the image already accepted with each content (null where none was)."""
        codes = content_keys(sha256).join(self.owners, on=["hi", "lo"], how="left", maintain_order="left")["code"]
        return self.label_codes.labels(codes).alias("owner")

    def add(self, accepted: pl.DataFrame) -> None:
        """Remember the owners among ``accepted`` (``sha256``, ``label``; contents not yet owned)."""
        rows = content_keys(accepted["sha256"]).with_columns(self.label_codes.codes(accepted["label"]).alias("code"))
        self.owners = pl.concat([self.owners, rows], rechunk=False)


class StreamDigest:
    """:func:`clipopt_core.train.identity.frame_digest` of the rows of every :meth:`update`, in order.

    Rows serialise as CSV lines one by one, so the digest of batches equals that of their
    concatenation (tests/unit/test_ingest_stream.py). ``leave_out``: the columns ``frame_digest``
    leaves out (its ``LOCATION_COLUMNS``; passed in, so that ingest does not import torch).
    """

    def __init__(self, columns: Sequence[str], leave_out: Collection[str]) -> None:
        self.columns = sorted(c for c in columns if c not in leave_out)
        self._digest = hashlib.sha256(",".join(self.columns).encode())

    def update(self, frame: pl.DataFrame) -> None:
        for start in range(0, frame.height, DIGEST_SLICE_ROWS):
            self._digest.update(frame.select(self.columns).slice(start, DIGEST_SLICE_ROWS)
                                .write_csv(include_header=False).encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
