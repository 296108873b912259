"""Handshake tracking: T^p, Karn's rule, RST replies, unanswered, IPv6, out-of-order, expiry."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from capfiles import Conn, ethernet, handshake_cases, write_pcap
from conftest import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer.capture import read_capture
from analyzer.handshake import Handshake
from analyzer.packet import ip_from_frame
from analyzer.tracker import HandshakeTracker

DARK = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8:ffff::/48")]
S = 1_000_000_000
MS = 1_000_000


def run(packets: Iterable[tuple[int, bytes]], tracker: HandshakeTracker | None = None) -> list[Handshake]:
    tracker = tracker or HandshakeTracker(DARK)
    out: list[Handshake] = []
    for ts, ip in packets:
        out.extend(tracker.packet(ts, ip))
    out.extend(tracker.flush())
    return out


def by_src(handshakes: Sequence[Handshake]) -> dict[str, Handshake]:
    return {h.src: h for h in handshakes}


def check_zeek_cases(hs: dict[str, Handshake]) -> None:
    """The answers the Zeek-side logic gives for tests/data/zeek-ws/handshakes-mkpcap.py's cases."""
    direct = hs["203.0.113.10"]
    assert (direct.reply, direct.tp_us, direct.sport, direct.dport) == ("ack", 20_000, 40001, 23)
    assert direct.t == pytest.approx(1000.0) and direct.synack_times == pytest.approx((1000.0001,))
    assert direct.reply_time == pytest.approx(1000.0201)
    retransmitted = hs["203.0.113.11"]
    assert retransmitted.answered and retransmitted.ambiguous and retransmitted.tp_us is None
    assert len(retransmitted.synack_times) == 2
    assert (hs["203.0.113.12"].reply, hs["203.0.113.12"].tp_us) == ("rst", 30_000)
    unanswered = hs["203.0.113.13"]
    assert not unanswered.answered and unanswered.reply is None and unanswered.tp_us is None
    assert (hs["2001:db8::10"].reply, hs["2001:db8::10"].tp_us) == ("ack", 40_000)
    assert hs["2001:db8::10"].dst == "2001:db8:ffff::5"
    assert (hs["203.0.113.14"].reply, hs["203.0.113.14"].tp_us) == ("ack", 10_000)  # ACK with data


def test_zeek_cases_written_by_the_test(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "cases.pcap", [(ts, ethernet(ip)) for ts, ip in handshake_cases()])
    tracker = HandshakeTracker(DARK)
    hs = run(((ts, ip_from_frame(lt, frame)) for _, ts, lt, frame, _ in read_capture(path)), tracker)
    assert len(hs) == 6
    check_zeek_cases(by_src(hs))
    stats = tracker.stats
    counts = (stats.connections, stats.answered, stats.timed, stats.ambiguous, stats.unanswered)
    assert counts == (6, 5, 4, 1, 1)
    assert len(stats.sources) == 5 and len(stats.darknet_addresses) == 2
    # The SYN bytes are kept whole for p0f.
    assert by_src(hs)["203.0.113.10"].syn == handshake_cases()[0][1]


def test_zeek_cases_from_the_shared_recording() -> None:
    """The very capture Zeek 8.0.10 was run on (tests/data/zeek-ws/handshakes.pcap)."""
    path = DATA / "zeek-ws" / "handshakes.pcap"
    hs = run((ts, ip_from_frame(lt, frame)) for _, ts, lt, frame, _ in read_capture(path))
    check_zeek_cases(by_src(hs))


def test_tp_is_exact_in_microseconds_and_rounded() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    hs = run([(10 * S, c.syn()), (10 * S + 1_000, c.synack()), (10 * S + 1_000 + 1_234_567, c.ack())])
    assert hs[0].tp_us == 1_235  # 1234.567 µs -> nearest


def test_repeated_syn_before_synack_keeps_the_latest() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    first, second = c.syn(ttl=50), c.syn(ttl=51)
    tracker = HandshakeTracker(DARK)
    hs = run([(1 * S, first), (2 * S, second), (2 * S + MS, c.synack()), (2 * S + 5 * MS, c.ack())], tracker)
    assert len(hs) == 1
    assert hs[0].t == 2.0 and hs[0].syn == second  # the SYN the darknet answered
    assert hs[0].tp_us == 4_000
    assert tracker.stats.connections == 1 and tracker.stats.repeated_syns == 1


def test_syn_repeated_after_synack_makes_timing_ambiguous_and_keeps_t() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    hs = run([(1 * S, c.syn()), (1 * S + MS, c.synack()), (2 * S, c.syn()), (2 * S + MS, c.synack()),
              (2 * S + 9 * MS, c.ack())])
    assert len(hs) == 1 and hs[0].answered and hs[0].tp_us is None and hs[0].t == 1.0


def test_new_sequence_number_on_same_four_tuple_is_a_new_connection() -> None:
    c = Conn("203.0.113.1", "198.18.0.1", isn=1000)
    again = Conn("203.0.113.1", "198.18.0.1", isn=90_000, server_isn=7)
    tracker = HandshakeTracker(DARK)
    hs = run([(1 * S, c.syn()), (1 * S + MS, c.synack()),
              (3 * S, again.syn()), (3 * S + MS, again.synack()), (3 * S + 3 * MS, again.ack())], tracker)
    assert [(h.t, h.answered, h.tp_us) for h in hs] == [(1.0, False, None), (3.0, True, 2_000)]
    assert tracker.stats.connections == 2 and tracker.stats.unanswered == 1


def test_synack_for_another_sequence_number_is_not_an_answer() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    tracker = HandshakeTracker(DARK)
    hs = run([(1 * S, c.syn()), (1 * S + MS, c.synack(ack=12345)), (1 * S + 2 * MS, c.ack())], tracker)
    assert hs == []
    assert tracker.stats.stray == 1 and tracker.stats.no_synack == 1 and tracker.stats.answered == 0


def test_reply_stamped_before_its_synack_gives_no_negative_tp() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    tracker = HandshakeTracker(DARK)
    # File order SYN, SYN+ACK, ACK but the ACK's stamp is older than the SYN+ACK's (skewed taps).
    hs = run([(1 * S, c.syn()), (1 * S + 5 * MS, c.synack()), (1 * S + 2 * MS, c.ack())], tracker)
    assert len(hs) == 1 and hs[0].answered and hs[0].tp_us is None
    assert tracker.stats.misordered == 1 and tracker.stats.timed == 0


def test_reply_before_synack_in_file_order_is_held_and_timed() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    hs = run([(1 * S, c.syn()), (1 * S + 7 * MS, c.ack()), (1 * S + 2 * MS, c.synack())])
    assert len(hs) == 1 and hs[0].reply == "ack" and hs[0].tp_us == 5_000


def test_synack_before_syn_in_file_order_waits_for_its_syn() -> None:
    # tests/data/captures/vnc-scanner.pcap has these: two taps merged, SYN+ACK first.
    c = Conn("203.0.113.1", "198.18.0.1")
    tracker = HandshakeTracker(DARK)
    hs = run([(1 * S + 1 * MS, c.synack()), (1 * S + 40 * MS, c.syn()), (1 * S + 100 * MS, c.ack())], tracker)
    assert len(hs) == 1 and hs[0].t == pytest.approx(1.04) and hs[0].tp_us == 99_000
    assert tracker.stats.connections == 1 and tracker.stats.stray == 0
    # Without its SYN the SYN+ACK never becomes a handshake.
    tracker = HandshakeTracker(DARK)
    assert run([(1 * S, c.synack()), (2 * S, c.ack())], tracker) == []
    assert tracker.stats.stray == 1 and tracker.stats.connections == 0


def test_idle_connections_expire_in_capture_time() -> None:
    c = Conn("203.0.113.1", "198.18.0.1")
    other = Conn("203.0.113.2", "198.18.0.2")
    tracker = HandshakeTracker(DARK, idle_timeout=30)
    assert list(tracker.packet(1 * S, c.syn())) == []
    assert list(tracker.packet(1 * S + MS, c.synack())) == []
    # 30 s later (exactly the timeout) it is still waiting; past it, it ends as unanswered.
    assert list(tracker.packet(31 * S + MS, other.syn())) == []
    assert tracker.active == 2
    ended = list(tracker.packet(31 * S + MS + 1, other.synack()))
    assert [(h.src, h.answered) for h in ended] == [("203.0.113.1", False)]
    assert tracker.active == 1
    # A late ACK for the expired connection is not attributed to anything.
    assert list(tracker.packet(32 * S, c.ack())) == []
    assert tracker.stats.unanswered == 1


def test_table_is_bounded() -> None:
    tracker = HandshakeTracker(DARK, max_connections=10)
    for i in range(25):
        c = Conn(f"203.0.113.{i + 1}", "198.18.0.1")
        list(tracker.packet(S + i, c.syn()))
        assert tracker.active <= 10
    assert tracker.stats.evicted == 15 and tracker.stats.no_synack == 15


def test_only_the_darknet_is_tracked() -> None:
    inside = Conn("203.0.113.1", "198.18.0.1")
    outside = Conn("203.0.113.1", "192.0.2.1")
    tracker = HandshakeTracker([ipaddress.ip_network("198.18.0.0/24")])
    hs = run([(S, outside.syn()), (S + MS, outside.synack()), (S + 2 * MS, outside.ack()),
              (S, inside.syn()), (S + MS, inside.synack()), (S + 2 * MS, inside.ack())], tracker)
    assert [h.dst for h in hs] == ["198.18.0.1"]
    assert tracker.stats.connections == 1 and tracker.stats.stray == 0


def test_packet_at_takes_seconds() -> None:
    c = Conn("2001:db8::1", "2001:db8:ffff::1")
    tracker = HandshakeTracker(DARK)
    out = [*tracker.packet_at(5.0, c.syn()), *tracker.packet_at(5.000_1, c.synack()),
           *tracker.packet_at(5.030_1, c.ack())]
    assert [(h.src, h.tp_us) for h in out] == [("2001:db8::1", 30_000)]


_CONNS = [Conn(f"203.0.113.{i}", "198.18.0.1", 40000 + i, 23, isn=1000 * i, server_isn=77 * i)
          for i in range(1, 4)]
_KINDS = ["syn", "synack", "ack", "rst"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(_KINDS), st.integers(0, 60 * S)), max_size=14))
def test_any_order_of_packets_keeps_the_invariants(events: list[tuple[int, str, int]]) -> None:
    """Shuffled, repeated, out-of-order packets: never a negative T^p, every connection accounted."""
    tracker = HandshakeTracker(DARK, idle_timeout=30)
    out = run(((ts, getattr(_CONNS[i], kind)()) for i, kind, ts in events), tracker)
    for h in out:
        if h.tp_us is not None:
            assert h.tp_us >= 0 and h.reply_time is not None
            assert sum(1 for t in h.synack_times if t <= h.reply_time) == 1
            answered = max(t for t in h.synack_times if t <= h.reply_time)
            assert abs(h.tp_us - (h.reply_time - answered) * 1e6) <= 1
        assert h.synack_times  # a handshake always has the darknet's answer
    s = tracker.stats
    assert s.connections == s.answered + s.unanswered + s.no_synack
    assert s.answered == s.timed + s.ambiguous + s.misordered
    assert len(out) == s.answered + s.unanswered and tracker.active == 0


def test_addresses_are_written_as_ipaddress_writes_them() -> None:
    """IPv4-mapped IPv6 clients: the text must match what records and probe results normalise to."""
    c = Conn("::ffff:203.0.113.5", "2001:db8:ffff::1")
    (h,) = run([(S, c.syn()), (S + MS, c.synack()), (S + 3 * MS, c.ack())])
    assert h.src == str(ipaddress.ip_address("::ffff:203.0.113.5"))
    assert h.dst == "2001:db8:ffff::1" and h.tp_us == 2_000
