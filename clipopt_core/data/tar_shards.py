"""Webdataset-format tar shards, read as a stream: local paths or any fsspec URL (``s3://…``).

A shard is a plain tar whose members are ``<key>.<ext>`` files; the members sharing a key, adjacent
in the archive, form one sample (``00042.jpg`` + ``00042.txt`` + ``00042.cls``). This is the layout
``webdataset``/``img2dataset`` write (CC12M, LAION, …); it is read here with the standard library's
``tarfile`` in streaming mode, so a shard is never held whole in memory or on disk.

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


def iter_samples(url: str, *, storage_options: dict[str, Any] | None = None,
                 offsets: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of one shard: dicts ``{"__key__": key, "__url__": url, ext: bytes, ...}`` in archive order.

    ``offsets``: each sample also carries ``"__offsets__": {ext: (byte offset, size)}``, where the member's
    bytes lie in the shard file, so a reader can later fetch one member with one range read. Only an
    uncompressed tar has such offsets: a compressed shard raises :class:`ShardError`.
    """
    current: dict[str, Any] | None = None
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            if offsets and not _uncompressed(tar):
                raise ShardError(f"shard {url} is compressed: member offsets need an uncompressed .tar; "
                                 "re-write it without compression")
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                handle = tar.extractfile(member)
                current[ext] = handle.read() if handle is not None else b""
                if offsets:
                    current.setdefault("__offsets__", {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as error:
        raise ShardError(f"shard {url} is not a readable tar ({error}); re-write or remove it") from error
    except FileNotFoundError as error:
        raise ShardError(f"shard {url} does not exist; check the shard list") from error
    if current is not None:
        yield current


def _uncompressed(tar: tarfile.TarFile) -> bool:
    """Whether a stream-mode archive reads its file as is (``comptype`` of the stdlib's stream is ``"tar"``)."""
    return getattr(tar.fileobj, "comptype", "tar") == "tar"


def iter_shards(spec: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of every shard of ``spec`` (:func:`expand_shards`), shard after shard."""
    for url in expand_shards(spec):
        yield from iter_samples(url, storage_options=storage_options)
