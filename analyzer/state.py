"""Per-source measurement state of the live analyzer, kept in Redis.

Everything an analyzer needs to finish a handshake lives here, not in the process, so a restart
loses nothing and several analyzers can share the work. Keys (all under the prefix, plain
`redis-cli` can read them):

- `hs:<hid>`     hash: one answered handshake (`hid` = its entry id on the `handshakes` stream):
                 `record` (the passive `Record` JSON), `sport`, `dport`, `feed`, `job`, and
                 `logged_handshakes` / `logged_records` / `logged_stepstone` = 1 once its line
                 is in that log (crash-idempotent logging). Only measured handshakes
                 (`--sample-per-source`) are stored. Kept two minutes after its verdict, for
                 redeliveries.
- `job:<job>`    set: the handshakes waiting for probe job `<job>` (its own, and deduped ones).
- `outcome:<job>` hash: how the job ended: the prober's `Result` fields, or `dead` = the reason.
- `probe:<src>`  string: the latest job probing `<src>` (deduped handshakes attach to it).
- `src:<src>`    sorted set (score = SYN time): the source's closed records, for the rules' window
                 (at most `max_records`, the newest).
- `cnt:<src>`    hash: what the analyzers know of a source beyond its records: `seen`, `answered`,
                 `sampled` (handshakes received, answered, measured fully; totals while the key
                 lives), `p_start` / `p_sampled` (the current probe period's start and how many of
                 its handshakes were measured: at most `--sample-per-source`), `g_hid` /
                 `g_take` (the first handshake of the last batch granted, and its grant: a redo
                 gets it back), and `sig` / `emitted_at` (the last verdict emitted for it, and
                 when). Kept as long as the source's window.
- `verdicts`     stream: one entry per verdict change or refresh, by any analyzer
                 (`analyzer.verdicts` encodes it); the `--zeek` analyzers read it with their own
                 groups and hand each entry to their sensor. Trimmed to about `VERDICTS_MAXLEN`
                 entries.

Unanswered handshakes are logged but not stored: nothing waits for them, and a darknet sees many.

Attaching a handshake to a job and storing a job's outcome are each one Lua script, so every
handshake is closed by exactly one side: whoever attaches after the outcome is stored closes it
itself; everything attached before is closed by whoever stored the outcome.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError

from analyzer.record import Record, RecordError
from prober.job import JobError, Result
from prober.streams import EntryError, decode_entry, shown

# KEYS: outcome:<job>, job:<job>, hs:<hid>, probe:<src>; ARGV: hid, job, ttl seconds, own (1/0).
# Also records the job on the handshake (and, for the job's own handshake, as the address's latest
# probe): one round trip.
_ATTACH = """
redis.call('HSET', KEYS[3], 'job', ARGV[2])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGETALL', KEYS[1])
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return false
"""

# The same for a whole batch in one call (one command to pack, not one per handshake). KEYS: per
# handshake outcome:<job>, job:<job>, hs:<hid>, probe:<src>; ARGV: ttl, then per handshake hid,
# job, own. Per handshake: {} (wait), or the outcome's fields (close it now).
_ATTACH_MANY = """
local out = {}
for i = 1, #KEYS / 4 do
  local k, a = 4 * (i - 1), 1 + 3 * (i - 1)
  local hid, job, own = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  redis.call('HSET', KEYS[k + 3], 'job', job)
  if own == '1' then
    redis.call('SET', KEYS[k + 4], job, 'EX', ARGV[1])
  end
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then
    out[i] = redis.call('HGETALL', KEYS[k + 1])
  else
    redis.call('SADD', KEYS[k + 2], hid)
    redis.call('EXPIRE', KEYS[k + 2], ARGV[1])
    out[i] = {}
  end
end
return out
"""

# KEYS: hs:<hid> ...; ARGV: ttl, then per key record, sport, dport, feed. Stores a batch of
# handshakes (again: a redelivery keeps its job and marks); per key {job, logged_handshakes,
# logged_records} as they were before ('' when unset).
_SAVE = """
local out = {}
for i, key in ipairs(KEYS) do
  local a = 1 + 4 * (i - 1)
  local before = redis.call('HMGET', key, 'job', 'logged_handshakes', 'logged_records')
  redis.call('HSET', key, 'record', ARGV[a + 1], 'sport', ARGV[a + 2], 'dport', ARGV[a + 3],
             'feed', ARGV[a + 4])
  redis.call('EXPIRE', key, ARGV[1])
  out[i] = {before[1] or '', before[2] or '', before[3] or ''}
end
return out
"""

# KEYS: src:<src> ...; ARGV: max records, ttl, then per key: the cutoff score (older records are
# trimmed), n, and n score/member pairs. Adds a batch's records to their sources' windows, trims
# each to its newest `max records`, and returns each window's members (one call per batch).
_WINDOWS = """
local maxr, ttl, a, out = tonumber(ARGV[1]), ARGV[2], 3, {}
for i, key in ipairs(KEYS) do
  local cutoff, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  -- In chunks: Lua's unpack refuses more than about 8,000 values (a scanner's job closing
  -- thousands of handshakes at once, with --sample-per-source 0).
  local last = a + 2 * n - 1
  for s = a, last, 1000 do
    redis.call('ZADD', key, unpack(ARGV, s, math.min(s + 999, last)))
  end
  a = a + 2 * n
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  redis.call('ZREMRANGEBYRANK', key, 0, -maxr - 1)
  redis.call('EXPIRE', key, ttl)
  out[i] = redis.call('ZRANGE', key, 0, -1)
end
return out
"""

# KEYS: outcome:<job>, job:<job>; ARGV: ttl seconds, field, value, ...
# The first outcome of a job wins (a redelivered result, or a dead entry after a result, must not
# change what earlier handshakes were closed with).
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return {redis.call('SMEMBERS', KEYS[2]), redis.call('HGETALL', KEYS[1])}
"""

# KEYS: hs:<hid> ...; ARGV: field, ttl seconds (0 = keep). Marks only handshakes still stored
# (HSET on an expired one would leave a hash without its fields).
_MARK = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, ARGV[1], '1')
    if ARGV[2] ~= '0' then
      redis.call('EXPIRE', key, ARGV[2])
    end
  end
end
return 0
"""


# KEYS: hs:<hid>, the verdicts stream; ARGV: maxlen, field, value, ... Appends the handshake's
# verdict entry unless one was appended before (its id is kept on the handshake): a redelivery or
# a claim that closes the handshake again appends nothing.
_APPEND = """
if redis.call('HEXISTS', KEYS[1], 'verdict_entry') == 1 then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'verdict_entry', id)
end
return id
"""

# KEYS: cnt:<src> ...; ARGV: now, period seconds, cap (0 = none), ttl seconds, then per key: seen,
# answered, the hid of the source's first handshake in the batch. Counts every handshake of the
# batch (one HINCRBY per source, not per handshake) and grants each source the handshakes it may
# still measure fully in its current probe period: the first `cap` of the period, whichever
# analyzer received them. The same first handshake again in the same period is a redo (the batch
# failed after this, e.g. Redis failed over, and is read again): it gets its grant back and is not
# counted again (`g_hid`, `g_take`), else the grant it used up would leave its handshakes unmeasured.
# Returns the grants, in key order.
_SAMPLE = """
local now, period, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local out = {}
for i, key in ipairs(KEYS) do
  local b = 4 + 3 * (i - 1)
  local seen, answered, first = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), ARGV[b + 3]
  local p = redis.call('HMGET', key, 'p_start', 'p_sampled', 'g_hid', 'g_take')
  local start, used, granted = tonumber(p[1]), tonumber(p[2]) or 0, tonumber(p[4])
  -- (Not a number, by a hand edit: a new period, not a script error.)
  local current = start and now - start < period and now >= start - period
  if current and p[3] == first and granted then
    out[i] = granted
  else
    if not current then
      redis.call('HSET', key, 'p_start', ARGV[1])
      used = 0
    end
    local take = seen
    if cap > 0 then
      take = math.max(0, math.min(seen, cap - used))
    end
    redis.call('HSET', key, 'p_sampled', used + take, 'g_hid', first, 'g_take', take)
    -- A count that is not a small whole number (a hand edit) starts again from 0: HINCRBY would
    -- fail the script, and with it every batch with this source.
    local c = redis.call('HMGET', key, 'seen', 'answered', 'sampled')
    for j, name in ipairs({'seen', 'answered', 'sampled'}) do
      if c[j] and not (string.match(c[j], '^%d+$') and #c[j] <= 18) then
        redis.call('HSET', key, name, 0)
      end
    end
    redis.call('HINCRBY', key, 'seen', seen)
    redis.call('HINCRBY', key, 'answered', answered)
    redis.call('HINCRBY', key, 'sampled', take)
    redis.call('EXPIRE', key, ttl)
    out[i] = take
  end
end
return out
"""

# KEYS: cnt:<src> ..., then the verdicts stream; ARGV: now, refresh seconds, maxlen, n (entry
# items per source), ttl seconds, then per source its verdict's signature, the handshake that
# stands for it and n field/value items. Appends a source's verdict when it differs from the last one emitted
# (`sig`), or when `refresh` seconds have passed since; atomically, so two analyzers judging one
# source emit one change. The same handshake again with the same verdict is a redo (its batch
# failed after this, e.g. Redis failed over): what was emitted for it is returned again, so its
# log line is still written. Per source {} (nothing to emit) or {change, entry id, seen,
# answered, sampled}.
_EMIT = """
local stream, now, refresh, n, out = KEYS[#KEYS], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]), {}
for i = 1, #KEYS - 1 do
  local base = 5 + (i - 1) * (n + 2)
  local sig, hid = ARGV[base + 1], ARGV[base + 2]
  local last = redis.call('HMGET', KEYS[i], 'sig', 'emitted_at', 'e_hid', 'e_entry', 'e_change')
  local change = false
  local id = false
  if last[1] == sig and last[3] == hid and last[4] and last[5] then
    change, id = last[5], last[4]
  elseif not last[1] then
    change = 'first'
  elseif last[1] ~= sig then
    change = 'changed'
  elseif now - (tonumber(last[2]) or 0) >= refresh then
    change = 'refresh'
  end
  if change and not id then
    id = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, base + 3, base + 2 + n))
    redis.call('HSET', KEYS[i], 'sig', sig, 'emitted_at', ARGV[1], 'e_hid', hid, 'e_entry', id,
               'e_change', change)
    -- Counted by `sample` (which sets the TTL) unless it expired, was evicted, or an older
    -- version sampled: never leave a key without one.
    redis.call('EXPIRE', KEYS[i], ARGV[5])
  end
  if change then
    local c = redis.call('HMGET', KEYS[i], 'seen', 'answered', 'sampled')
    out[i] = {change, id, c[1] or '0', c[2] or '0', c[3] or '0'}
  else
    out[i] = {}
  end
end
return out
"""

# The verdicts stream is a delivery buffer (for the Zeek sensors' analyzers), not an archive
# (stepstone.log is): about this many newest entries are kept, a day or more of a busy darknet.
VERDICTS_MAXLEN = 100_000


class StateError(ValueError):
    """Something stored in Redis that does not decode (another version, or edited by hand)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a probe job ended: a result, or the prober gave up (`dead` = its reason)."""

    result: Result | None
    dead: str | None = None

    def fields(self) -> dict[str, str]:
        return self.result.fields() if self.result is not None else {"dead": self.dead or "unknown"}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Outcome:
        if "dead" in fields:
            return cls(result=None, dead=fields["dead"])
        try:
            return cls(result=Result.from_fields(fields))
        except JobError as exc:
            raise StateError(f"stored outcome does not decode: {exc}") from None


@dataclass(frozen=True, slots=True)
class Stored:
    """A handshake as the analyzer stored it."""

    hid: str
    record: Record | None  # the passive record; None for an unanswered handshake
    sport: int
    dport: int
    feed: str
    job: str | None


@dataclass(frozen=True, slots=True)
class Window:
    """A source's records as read back from Redis, and the ones that did not read back (each
    dropped from the window, with why: a record stored by another version, or by hand)."""

    records: list[Record]
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Emitted:
    """A verdict that went onto the `verdicts` stream: why (`first`, `changed`, `refresh`), its
    entry, and the source's handshake counts at that moment (`cnt:<src>`)."""

    change: str
    entry: str
    seen: int
    answered: int
    sampled: int


def _count(text: str) -> int:
    # Counts written by our own HINCRBY; anything else (a hand edit) reads as 0, not a crash.
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0


RECORD_FIELDS = tuple(Record.__dataclass_fields__)
DECODED_MAX = 100_000  # window members kept decoded in the process (a few hundred bytes each)


def record_dict(record: Record) -> dict[str, Any]:
    """`Record.to_dict` for the hot path: the record is flat, so this equals `asdict` at a
    fraction of its cost."""
    return {name: getattr(record, name) for name in RECORD_FIELDS}


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _chunks(replies: list[Any], n: int) -> list[list[Any]]:
    return [replies[i : i + n] for i in range(0, len(replies), n)]


def read_member(raw: bytes) -> Record:
    """A record of a source's window as `add_records` stores it; the same checks as every other
    record reader (`Record.from_json`)."""
    obj = json.loads(raw.decode("utf-8"))
    return Record.from_json(obj["record"])


def _stored(hid: str, fields: dict[str, str]) -> Stored | StateError:
    try:
        record = Record.from_json(json.loads(fields["record"])) if fields.get("record") else None
        return Stored(
            hid=hid,
            record=record,
            sport=int(fields["sport"]),
            dport=int(fields["dport"]),
            feed=fields.get("feed", ""),
            job=fields.get("job") or None,
        )
    except (KeyError, ValueError, RecordError) as exc:
        return StateError(f"stored handshake {hid} does not decode: {exc}")


class State:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "stepstone:",
        window: float = 86400.0,
        dedup_window: float = 3600.0,
        max_records: int = 1000,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window = window
        self.max_records = max_records
        # After its verdict a handshake is only looked at again by a redelivered entry (a crash
        # before the acknowledgement, a claim after --claim-after, 30 s by default): two minutes
        # cover that (a later one is caught by the log's tail, `JsonLog.recover`), and keep
        # Redis's memory to the handshakes in flight: at a /8, 180k measured handshakes a second
        # would hold 92 GB for an hour (issue 11, bench/SCALE.md).
        self.closed_ttl = 120
        # A deduped handshake may attach to a probe up to one dedup window old: keep outcomes and
        # job sets at least that long, plus slack for a prober that is behind.
        self.outcome_ttl = int(max(2 * dedup_window, 3600))
        # A handshake waits for its probe; keep it at least as long as the rules look back.
        self.hs_ttl = int(max(window, 2 * dedup_window, 3600))
        self._attach = redis.register_script(_ATTACH)
        self._settle = redis.register_script(_SETTLE)
        self._mark = redis.register_script(_MARK)
        self._append = redis.register_script(_APPEND)
        self._sample = redis.register_script(_SAMPLE)
        self._attach_many = redis.register_script(_ATTACH_MANY)
        self._save = redis.register_script(_SAVE)
        self._windows = redis.register_script(_WINDOWS)
        self._emit = redis.register_script(_EMIT)
        self.src_ttl = int(2 * window) + 3600  # a source's window and counts live this long
        # Window members are immutable: each is checked and decoded once, not at every read of
        # its window (a busy source's window is read once per batch that closes its records).
        self._decoded: dict[bytes, Record] = {}

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # Every operation takes a batch and costs one round trip (a pipeline), whatever its size.

    async def save(self, batch: Sequence[Stored]) -> list[tuple[str | None, bool, bool]]:
        """Store answered handshakes (again: a redelivery keeps the job it got before); per
        handshake, that earlier job, if any, and whether its handshakes.log and records.log lines
        were written."""
        if not batch:
            return []
        args: list[Any] = [self.hs_ttl]
        for stored in batch:
            args += ["" if stored.record is None else json.dumps(record_dict(stored.record)),
                     str(stored.sport), str(stored.dport), stored.feed]
        replies = await self._save(keys=[self.key("hs", stored.hid) for stored in batch], args=args)
        return [(job or None, bool(logged), bool(recorded)) for job, logged, recorded in replies]

    async def load(self, hids: Sequence[str], *, unless_logged: str) -> list[Stored | StateError | None]:
        """The stored handshakes; None for one that is gone or whose line `unless_logged` (a log
        name) has already; a StateError for one that does not decode."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for hid in hids:
                # Undecoded: one hash edited by hand must fail alone, not the whole batch.
                pipe.execute_command("HGETALL", self.key("hs", hid), **{NEVER_DECODE: []})
            replies = await pipe.execute()
        out: list[Stored | StateError | None] = []
        for hid, raw in zip(hids, replies, strict=True):
            try:
                fields = decode_entry(raw or {})
            except EntryError as exc:
                out.append(StateError(f"stored handshake {hid} does not decode: {exc}"))
                continue
            out.append(None if not fields or fields.get(f"logged_{unless_logged}") else _stored(hid, fields))
        return out

    async def last_probes(self, srcs: Sequence[str]) -> list[str | None]:
        """The latest job of each address (None: no probe known)."""
        if not srcs:
            return []
        jobs: Any = await self.redis.mget([self.key("probe", src) for src in srcs])  # decoded: str
        return list(jobs)

    async def attach(self, batch: Sequence[tuple[str, str, str, bool]]) -> list[Outcome | None]:
        """For each (hid, job, src, own): wait for `job` with `hid` (`own`: this handshake's
        enqueue created the job, so it is now the address's latest probe). Per handshake, None,
        or the job's outcome if it already ended (close the handshake now)."""
        if not batch:
            return []
        keys: list[str] = []
        args: list[Any] = [self.outcome_ttl]
        for hid, job, src, own in batch:
            keys += [self.key("outcome", job), self.key("job", job), self.key("hs", hid),
                     self.key("probe", src)]
            args += [hid, job, int(own)]
        replies = await self._attach_many(keys=keys, args=args)
        return [Outcome.from_fields(_pairs(flat)) if flat else None for flat in replies]

    async def settle(self, batch: Sequence[tuple[str, Outcome]]) -> list[tuple[Outcome, list[str]]]:
        """Store how each job ended; per job, the outcome that counts (the first one stored) and
        the handshakes waiting for it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job, outcome in batch:
                args: list[Any] = [self.outcome_ttl]
                for name, value in outcome.fields().items():
                    args += [name, value]
                await self._settle(keys=[self.key("outcome", job), self.key("job", job)], args=args,
                                   client=pipe)
            replies = await pipe.execute()
        return [(Outcome.from_fields(_pairs(flat)), sorted(members)) for members, flat in replies]

    async def add_records(self, batch: Sequence[tuple[str, Record]]) -> dict[str, Window]:
        """Add closed records (hid, record) to their sources' windows; per source, its records in
        Redis right after the batch's were added (the rules apply the window themselves; much
        older ones are trimmed here). One ZRANGE per source per batch, however many of its
        records the batch closes. A stored record that does not read back is removed from its
        window (and named in `Window.dropped`): one bad record must not block its source."""
        by_src: dict[str, list[tuple[str, Record]]] = {}
        for hid, record in batch:
            by_src.setdefault(record.src, []).append((hid, record))
        if not by_src:
            return {}
        args: list[Any] = [self.max_records, self.src_ttl]
        for items in by_src.values():
            # Keep one extra window of slack: records may arrive out of order.
            newest = max(record.t for _, record in items)
            args += [repr(newest - 2 * self.window), len(items)]
            for hid, record in items:
                # The member is deterministic for a handshake, so closing it twice adds nothing.
                member = json.dumps({"hid": hid, "record": record_dict(record)}, sort_keys=True)
                args += [repr(record.t), member]
        keys = [self.key("src", src) for src in by_src]
        # Undecoded: each member is decoded (and checked) alone, below.
        raw = {NEVER_DECODE: []}
        sha = getattr(self._windows, "sha", None)
        if sha is None:  # a cluster client's script (prober.shards.EvalScript): EVAL, the text
            replies = await self.redis.execute_command("EVAL", _WINDOWS, len(keys), *keys, *args, **raw)
        else:
            try:
                replies = await self.redis.execute_command("EVALSHA", sha, len(keys), *keys, *args, **raw)
            except NoScriptError:  # a Redis restarted (or SCRIPT FLUSHed) since: load it again
                await self.redis.script_load(_WINDOWS)
                replies = await self.redis.execute_command("EVALSHA", sha, len(keys), *keys, *args, **raw)
        out: dict[str, Window] = {}
        bad: dict[str, set[bytes]] = {}
        for src, members in zip(by_src, replies, strict=True):
            window = Window([])
            for raw in members:
                known = self._decoded.get(raw)
                if known is not None:
                    window.records.append(known)
                    continue
                try:
                    window.records.append(record := read_member(raw))
                    if len(self._decoded) >= DECODED_MAX:
                        del self._decoded[next(iter(self._decoded))]  # the oldest first
                    self._decoded[raw] = record
                except (ValueError, KeyError, TypeError, RecordError, RecursionError) as exc:
                    window.dropped.append(f"{shown(raw)}: {exc}")
                    bad.setdefault(self.key("src", src), set()).add(raw)
            out[src] = window
        if bad:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, members in bad.items():
                    pipe.zrem(key, *members)
                await pipe.execute()
        return out

    async def sample(self, counts: Sequence[tuple[str, int, int, str]], *, now: float, period: float,
                     cap: int) -> list[int]:
        """Count a batch's handshakes per source (src, seen, answered, the hid of its first one in
        the batch) and grant each source how many of them it may still measure fully in its probe
        period of `period` seconds (the first `cap` of the period; 0 = no cap). A redo (the same
        first hid again in the period) gets its grant back and counts nothing. One round trip for
        the whole batch."""
        if not counts:
            return []
        args: list[Any] = [repr(now), repr(period), cap, self.src_ttl]
        for _, seen, answered, first in counts:
            args += [seen, answered, first]
        grants = await self._sample(keys=[self.key("cnt", src) for src, *_ in counts], args=args)
        return [int(x) for x in grants]

    async def emit(self, batch: Sequence[tuple[str, str, str, dict[str, str]]], *, now: float, refresh: float,
                   maxlen: int = VERDICTS_MAXLEN) -> list[Emitted | None]:
        """For each (src, verdict signature, hid, entry fields): append the entry to the
        `verdicts` stream if the source's verdict changed since the last one emitted (by any
        analyzer), or `refresh` seconds have passed since; per source, what was emitted, or None.
        The same (signature, hid) again, a redo, gets back what was emitted for it."""
        if not batch:
            return []
        n = 2 * len(batch[0][3])
        if any(2 * len(fields) != n for *_, fields in batch):  # entry_fields: always the same
            raise ValueError("verdict entries with different fields cannot be emitted together")
        args: list[Any] = [repr(now), repr(refresh), maxlen, n, self.src_ttl]
        for _, sig, hid, fields in batch:
            args += [sig, hid]
            for name, value in fields.items():
                args += [name, value]
        keys = [*(self.key("cnt", src) for src, *_ in batch), self.key("verdicts")]
        replies = await self._emit(keys=keys, args=args)
        out: list[Emitted | None] = []
        for reply in replies:
            if not reply:
                out.append(None)
                continue
            change, entry, seen, answered, sampled = (str(x) for x in reply)
            out.append(Emitted(change=change, entry=entry, seen=_count(seen), answered=_count(answered),
                               sampled=_count(sampled)))
        return out

    async def logged(self, log: str, hids: Sequence[str]) -> list[bool]:
        """Whether each handshake's line is in `log` already (as far as Redis knows)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for hid in hids:
                pipe.hexists(self.key("hs", hid), f"logged_{log}")
            return [bool(x) for x in await pipe.execute()]

    async def mark_logged(self, log: str, hids: Sequence[str], *, ttl: int = 0) -> None:
        """Note that these handshakes' lines are in `log`; `ttl`: keep them only that long now."""
        if hids:
            await self._mark(keys=[self.key("hs", hid) for hid in hids], args=[f"logged_{log}", ttl])

    async def append_verdicts(self, batch: Sequence[tuple[str, dict[str, str]]], *,
                              maxlen: int = VERDICTS_MAXLEN) -> list[str | None]:
        """Append each (hid, entry fields) to the `verdicts` stream, once per handshake ever; per
        handshake, the new entry's id, or None if its verdict was appended before."""
        if not batch:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for hid, fields in batch:
                args: list[Any] = [maxlen]
                for name, value in fields.items():
                    args += [name, value]
                await self._append(keys=[self.key("hs", hid), self.key("verdicts")], args=args,
                                   client=pipe)
            replies = await pipe.execute()
        return [str(x) if x else None for x in replies]
