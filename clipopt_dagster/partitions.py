"""Gallery shards: the static partitions of ``gallery_embeddings`` and the run tags that cover all of them.

The shard count comes from ``CLIPOPT_GALLERY_SHARDS`` (default 4) when the code location loads: an
image's shard is a stable hash of its id (:func:`clipopt_core.serve.shards.shard_of`), so images arriving
later land in the existing shards and re-embed only those. Changing the count re-shards the gallery.
"""

import dagster as dg

from clipopt_core.serve.shards import shard_count  # noqa: F401  (re-exported: the code location's count)

def shard_keys(count: int) -> list[str]:
    """Partition keys ``00000`` … of ``count`` shards (the number in the shard's file name)."""
    return [f"{shard:05d}" for shard in range(count)]


def all_shards_tags(keys: list[str]) -> dict[str, str]:
    """Run tags that make one run materialise every shard (a single-run partition range)."""
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


SHARD_COUNT = shard_count()
GALLERY_SHARDS = dg.StaticPartitionsDefinition(shard_keys(SHARD_COUNT))
ALL_SHARDS_TAGS = all_shards_tags(GALLERY_SHARDS.get_partition_keys())
