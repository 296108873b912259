"""Capture timestamps that jump: one corrupt timestamp must not drive the tracker's clock.

The tracker expires connections against capture time (the latest timestamp seen). A single packet
stamped 2^31 s ahead (one flipped bit) would therefore end every open connection, and the replies
that follow would find nothing: 100 answered handshakes, 0 records. A packet stamped far back is
as bad the other way (a SYN+ACK of 1952 makes an absurd T^p).

`JumpGuard` sits in front of the tracker. A packet more than `far_ns` away from the capture clock,
ahead or back, is held back, and the packets after it decide:

- a later packet nearer the old clock than the held one: the held packets were outliers. They are
  dropped and reported (`outlier`), and the clock never moved.
- CONFIRM packets in a row on the held packet's side: time really jumped (a quiet hour in a sparse
  capture, captures concatenated). The held packets go through (`accept`) in file order; a jump
  back is announced first (`rewind`), so that the tracker can end the connections of the capture
  time it leaves.
- the end of the input: the held packets go through. Nothing comes after them that a wrong clock
  could lose, and an isolated last packet after a real gap is not dropped.

In a capture without jumps this is one comparison per packet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
CONFIRM = 3  # packets on the far side that make a jump real (a corrupt run of two is still refused)


class JumpGuard(Generic[T]):
    def __init__(
        self,
        far_ns: int,
        accept: Callable[[int, T], None],
        outlier: Callable[[int, T, int], None],
        rewind: Callable[[int, T], None],
    ) -> None:
        """`accept(ts, item)`: process it now. `outlier(ts, item, jump_ns)`: it was dropped (jump_ns
        > 0 ahead, < 0 back of the clock). `rewind(ts, item)`: time goes back to `ts` for good, from
        `item` on (before it is accepted)."""
        self.far_ns = far_ns
        self._accept = accept
        self._outlier = outlier
        self._rewind = rewind
        self.now: int | None = None  # the capture clock: the latest accepted timestamp
        self._held: list[tuple[int, T]] = []
        self.outliers = 0
        self.rewinds = 0

    def admit(self, ts: int) -> bool:
        """The per-packet fast path: True when `ts` is near the clock and nothing is held, so the
        caller processes the packet at once (the clock has taken `ts`); False: pass it to
        `packet`. Saves building the item for the ~all packets of a sane capture."""
        now = self.now
        if now is None or self._held or not -self.far_ns <= ts - now <= self.far_ns:
            return False
        if ts > now:
            self.now = ts
        return True

    def packet(self, ts: int, item: T) -> None:
        now = self.now
        if self._held:
            self._decide(ts, item)
        elif now is None:
            self.now = ts
            self._accept(ts, item)
        elif -self.far_ns <= ts - now <= self.far_ns:
            if ts > now:
                self.now = ts
            self._accept(ts, item)
        else:
            self._held.append((ts, item))

    def _decide(self, ts: int, item: T) -> None:
        now = self.now
        assert now is not None
        held = self._held
        jumped_to = held[0][0]
        if abs(ts - jumped_to) < abs(ts - now):
            held.append((ts, item))
            if len(held) >= CONFIRM:
                self._release()
            return
        # Back on the clock's side: what was held had corrupt timestamps.
        self._held = []
        for held_ts, held_item in held:
            self.outliers += 1
            self._outlier(held_ts, held_item, held_ts - now)
        self.packet(ts, item)

    def _release(self) -> None:
        held, self._held = self._held, []
        assert self.now is not None
        if held[0][0] < self.now:
            self.rewinds += 1
            self._rewind(*held[0])
            self.now = held[0][0]
        for ts, item in held:
            self.now = max(self.now, ts)
            self._accept(ts, item)

    def finish(self) -> None:
        """End of input: whatever is held goes through (see the module docstring)."""
        held, self._held = self._held, []
        for ts, item in held:
            if self.now is None or ts > self.now:
                self.now = ts
            self._accept(ts, item)
