"""Reading Redis streams as bytes: every entry, group name and consumer name is hostile until it is
decoded, one at a time, here.

A client made with decode_responses=True decodes a whole reply before anyone looks at it: one
byte that is not UTF-8, in any field of any entry (or in a group or consumer name), raises
UnicodeDecodeError out of the read itself, and the entry, still pending, comes first again after
every restart. The calls below ask Redis for the reply undecoded (redis-py's NEVER_DECODE, which
works on any client, decoding or not), and `decode_entry` decodes one entry: a bad one is an
`EntryError` for that entry alone, which its reader rejects like any other malformed entry.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

# An entry is a handful of short fields on every stream of ours; far more is not one of ours.
MAX_FIELDS = 64
MAX_VALUE_BYTES = 4 * (65535 // 3 + 1)  # the base64 of the largest SYN (an IP packet) a handshake holds

RawFields = dict[bytes, bytes]
# (entry id, fields); fields None or empty: still pending, but deleted from the stream (trimmed).
RawEntry = tuple[str, RawFields | None]


class EntryError(ValueError):
    """A stream entry that cannot be decoded; the message says which field and why."""


def shown(raw: bytes | str, limit: int = 60) -> str:
    """A name or value for a message or a status line: text, with bytes that are not UTF-8 shown
    as \\xNN escapes (never an exception), cut to `limit` characters."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    if not text.isprintable():  # control characters too: one line, whatever the bytes
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def decode_entry(raw: RawFields) -> dict[str, str]:
    """The entry's fields as text; EntryError if there are too many, one is too long, or a name
    or value is not UTF-8."""
    if len(raw) > MAX_FIELDS:
        raise EntryError(f"{len(raw)} fields (at most {MAX_FIELDS})")
    # The common case in one pass (every entry of every stream comes through here); anything
    # wrong is found again below, field by field, for the message.
    try:
        if all(len(value) <= MAX_VALUE_BYTES for value in raw.values()):
            return {name.decode("utf-8"): value.decode("utf-8") for name, value in raw.items()}
    except UnicodeDecodeError:
        pass
    out: dict[str, str] = {}
    for name, value in raw.items():
        try:
            key = name.decode("utf-8")
        except UnicodeDecodeError:
            raise EntryError(f"field name '{shown(name)}' is not UTF-8") from None
        if len(value) > MAX_VALUE_BYTES:
            raise EntryError(f"field '{shown(key)}' is {len(value)} bytes long (at most {MAX_VALUE_BYTES})")
        try:
            out[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise EntryError(f"field '{shown(key)}' is not UTF-8: '{shown(value)}'") from None
    return out


def _id(raw: bytes | str) -> str:
    # Entry ids are made by Redis (or checked by it on XADD): ms-seq, ASCII digits.
    return raw.decode("ascii") if isinstance(raw, bytes) else raw


def _entries(rows: list[Any] | None) -> list[RawEntry]:
    return [(_id(entry_id), fields or None) for entry_id, fields in rows or [] if entry_id is not None]


async def read_group(redis: aioredis.Redis, group: str, consumer: str, stream: str, start: str, *,
                     count: int, block_ms: int | None = None) -> list[RawEntry]:
    """XREADGROUP of one stream, undecoded: from `start` ('>' = new entries, an id = this
    consumer's pending ones after it)."""
    args: list[Any] = ["GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    reply = await redis.execute_command("XREADGROUP", *args, "STREAMS", stream, start,
                                        **{NEVER_DECODE: []})
    return [entry for _stream, rows in reply or [] for entry in _entries(rows)]


async def autoclaim(redis: aioredis.Redis, stream: str, group: str, consumer: str, *, min_idle_ms: int,
                    start: str, count: int) -> tuple[str, list[RawEntry]]:
    """XAUTOCLAIM, undecoded: (the cursor to go on from, '0-0' at the end; the entries taken)."""
    reply = await redis.execute_command("XAUTOCLAIM", stream, group, consumer, min_idle_ms, start,
                                        "COUNT", count, **{NEVER_DECODE: []})
    return _id(reply[0]), _entries(reply[1])


async def newest(redis: aioredis.Redis, stream: str, *, count: int) -> list[RawEntry]:
    """The newest `count` entries, newest first (XREVRANGE), undecoded."""
    rows = await redis.execute_command("XREVRANGE", stream, "+", "-", "COUNT", count, **{NEVER_DECODE: []})
    return _entries(rows)


async def groups(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """XINFO GROUPS, undecoded: the names are bytes (compare with `name.encode()`, show with
    `shown`); ResponseError if there is no such stream."""
    reply: list[dict[str, Any]] = await redis.execute_command("XINFO GROUPS", stream, **{NEVER_DECODE: []})
    return reply


def find_group(found: list[dict[str, Any]], group: str) -> dict[str, Any] | None:
    name = group.encode()
    return next((g for g in found if g.get("name") == name), None)


async def consumers(redis: aioredis.Redis, stream: str, group: bytes | str) -> list[dict[str, Any]]:
    """XINFO CONSUMERS, undecoded (consumer names are bytes)."""
    reply: list[dict[str, Any]] = await redis.execute_command("XINFO CONSUMERS", stream, group,
                                                              **{NEVER_DECODE: []})
    return reply


async def pending_summary(redis: aioredis.Redis, stream: str, group: bytes | str) -> dict[str, Any]:
    """XPENDING summary, undecoded: pending, min and max id (str or None), consumers (names bytes)."""
    summary: dict[str, Any] = await redis.execute_command("XPENDING", stream, group, **{NEVER_DECODE: []})
    for end in ("min", "max"):
        if summary.get(end) is not None:
            summary[end] = _id(summary[end])
    return summary


def pending_range(pipe: Any, stream: str, group: str, ids: tuple[str, str], *, count: int) -> Any:
    """Queue (on a pipeline) or run XPENDING's detail form over ids (first, last), undecoded: rows
    of message_id (bytes), consumer (bytes), time_since_delivered, times_delivered."""
    return pipe.execute_command("XPENDING", stream, group, *ids, count, parse_detail=True,
                                **{NEVER_DECODE: []})
