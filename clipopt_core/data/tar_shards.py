"""Webdataset-format tar shards, read as a stream: local paths or any fsspec URL (``s3://…``).

A shard is a plain tar whose members are ``<key>.<ext>`` files; the members sharing a key, adjacent
in the archive, form one sample (``00042.jpg`` + ``00042.txt`` + ``00042.cls``). This is the layout
``webdataset``/``img2dataset`` write (CC12M, LAION, …); it is read here with the standard library's
``tarfile`` in streaming mode, so a shard is never held whole in memory or on disk.

Each sample also records where its members' bytes lie (``"__members__": {ext: (offset, size)}``) when
the shard is an uncompressed tar, so one member can later be read by itself with one ranged read:
:func:`member_uri` names it (``<shard url>#<key>.<ext>@<offset>+<size>``) and :func:`read_member`
reads it, locally or from S3, without scanning the shard again.

Shard lists: a folder (every ``*.tar`` in it, sorted), one URL, a brace range
``.../cc12m-{00000..00099}.tar`` (zero-padded like the first bound), or several of these separated
by ``::``.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
MEMBER_URI = re.compile(r"^(?P<url>.+)#(?P<name>[^#@]+)@(?P<offset>\d+)\+(?P<size>\d+)$")


class ShardError(ValueError):
    """A shard list that names nothing, or a shard that is not a readable tar: names the shard and member."""


def expand_shards(spec: str) -> list[str]:
    """The shard URLs of ``spec`` (folder, URL, ``{a..b}`` range, or ``::``-separated list), in order."""
    urls: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split("::"))):
        match = BRACE_RANGE.search(part)
        if match:
            first, last = match.group(1), match.group(2)
            width = len(first)
            urls += [part[:match.start()] + str(i).zfill(width) + part[match.end():]
                     for i in range(int(first), int(last) + 1)]
            continue
        fs, path = fsspec.core.url_to_fs(part)
        if fs.isdir(path):
            protocol = part.split("://", 1)[0] + "://" if "://" in part else ""
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not found:
                raise ShardError(f"{part!r} is a folder without any .tar shard")
            urls += [protocol + p if protocol and not p.startswith(protocol) else p for p in found]
        else:
            urls.append(part)
    if not urls:
        raise ShardError(f"shard list {spec!r} names no shard")
    return urls


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/00042.jpg`` → (``dir/00042``, ``jpg``); the key stops at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        raise ShardError(f"tar member {name!r} has no '<key>.<extension>' name")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(url: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard: dicts ``{"__key__": key, "__url__": url, ext: bytes, ...}`` in archive order.

    An uncompressed shard's samples also carry ``"__members__": {ext: (byte offset, size)}`` (see :func:`member_uri`).
    """
    current: dict[str, Any] | None = None
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            uncompressed = getattr(tar.fileobj, "comptype", "") == "tar"  # offsets of a gzip stream are not file offsets
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url, **({"__members__": {}} if uncompressed else {})}
                if uncompressed:
                    current["__members__"][ext] = (member.offset_data, member.size)
                handle = tar.extractfile(member)
                current[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError) as error:
        raise ShardError(f"shard {url} is not a readable tar ({error}); re-write or remove it") from error
    except FileNotFoundError as error:
        raise ShardError(f"shard {url} does not exist; check the shard list") from error
    if current is not None:
        yield current


def iter_shards(spec: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of every shard of ``spec`` (:func:`expand_shards`), shard after shard."""
    for url in expand_shards(spec):
        yield from iter_samples(url, storage_options=storage_options)


def member_uri(sample: dict[str, Any], ext: str) -> str:
    """The URI of one member of a sample from :func:`iter_samples`: ``<shard url>#<key>.<ext>@<offset>+<size>``.

    Raises :class:`ShardError` for a compressed shard (its members have no byte range in the file).
    """
    members = sample.get("__members__")
    if members is None:
        raise ShardError(f"shard {sample['__url__']} is compressed: its members cannot be read one by one; "
                         "write the shards as plain (uncompressed) .tar files, as webdataset/img2dataset do by default")
    offset, size = members[ext]
    return f"{sample['__url__']}#{sample['__key__']}.{ext}@{offset}+{size}"


def is_member_uri(uri: str) -> bool:
    """Whether ``uri`` names one member of a tar shard (:func:`member_uri`)."""
    return MEMBER_URI.match(uri) is not None


def read_member(uri: str, *, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of the tar member named by ``uri`` (:func:`member_uri`): one ranged read, local or remote."""
    match = MEMBER_URI.match(uri)
    if match is None:
        raise ShardError(f"{uri!r} is not a tar member URI ('<shard>#<key>.<ext>@<offset>+<size>')")
    offset, size = int(match["offset"]), int(match["size"])
    try:
        if "://" not in match["url"]:  # a local shard: a plain seek + read (fsspec's set-up costs ~1 ms per call)
            with open(match["url"], "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        else:
            fs, path = fsspec.core.url_to_fs(match["url"], **(storage_options or {}))
            data = fs.cat_file(path, start=offset, end=offset + size)
    except FileNotFoundError as error:
        raise ShardError(f"shard {match['url']} of member {match['name']} does not exist; re-ingest the corpus") from error
    if len(data) != size:
        raise ShardError(f"shard {match['url']} ends before member {match['name']} ({len(data)} of {size} bytes): "
                         "the shard changed since it was ingested; re-ingest the corpus")
    return data
