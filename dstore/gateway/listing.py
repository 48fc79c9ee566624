"""Listings with a delimiter, for both APIs: names under a prefix in byte order, with the
names that go on past the delimiter rolled up into common prefixes (folders)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dstore.master.metadata import FileInfo, MetadataStore

PAGE = 1000  # names read from the engine at a time
BEYOND = "\U0010ffff"  # after a common prefix: above every name that starts with it


@dataclass
class Walk:
    files: list[FileInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # full names, ending in the delimiter
    truncated: bool = False
    last: str = ""  # the last name or prefix taken
    last_is_prefix: bool = False

    @property
    def count(self) -> int:
        return len(self.files) + len(self.prefixes)

    @property
    def resume(self) -> str:
        """What to start after for the next page (past a common prefix's names)."""
        return self.last + BEYOND if self.last_is_prefix else self.last


async def walk(meta: MetadataStore, prefix: str, delimiter: str, after: str, limit: int) -> Walk:
    """Up to ``limit`` names and common prefixes under ``prefix`` after ``after``."""
    out = Walk()
    cursor = after
    while True:
        names, more = await meta.list_files(prefix, cursor, PAGE)
        for info in names:
            cut = info.name.find(delimiter, len(prefix)) if delimiter else -1
            if out.count == limit:
                out.truncated = True
                return out
            if cut >= 0:
                common = info.name[: cut + len(delimiter)]
                out.prefixes.append(common)
                out.last, out.last_is_prefix = common, True
                cursor = common + BEYOND  # (the names under it are skipped)
                break
            out.files.append(info)
            out.last, out.last_is_prefix = info.name, False
            cursor = info.name
        else:
            if more is None:
                return out
            continue
        # after a common prefix: read again from past it
