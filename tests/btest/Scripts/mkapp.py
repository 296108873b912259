#!/usr/bin/env python3
"""Writes the banner-exchange trace (Ethernet pcap) for tests/app-timing.zeek: handshakes to the
darknet 198.18.0.0/15 followed by the darknet's banner and the client's first data.

Standard library only (segments and frames from mkpcap.py beside it, real checksums). Times are
whole microseconds; every case starts 10 s after the one before, so StepStone::app_wait (5 s) ends
within the trace. A case's handshake: SYN at t, SYN+ACK 0.1 ms later, ACK 20 ms after that.

Cases (name: port, what follows the handshake):
  ssh        22  banner 0.1 ms after the ACK, the client's version string 37.5 ms after the banner
  ssh6       22  the same over IPv6 (2001:db8::40 -> 2001:db8:ffff::9), answer after 20.25 ms
  smtp-long  25  banner, then a 100-byte client line 80 ms later: only 64 bytes are kept
  telnet     23  binary option negotiation both ways (IAC bytes, not UTF-8), answer after 21 ms
  web        80  the server sends first and the client answers, but 80 is not server-first
  silent     22  banner, the client never sends: published app_wait after the ACK
  eager      22  the client sends its version before the banner (as OpenSSH, Go's x/crypto/ssh and
                 paramiko do), then its key exchange 30 ms after the banner: tapp 30 ms, app_data
                 the version (the client's first bytes)
  fin        23  the darknet closes (FIN) without a banner: published app_wait after the ACK (a FIN
                 is not waited on, see app.zeek)
  rst        22  banner, then the client resets: published app_wait after the ACK (as a FIN)
  rstreply   22  the SYN+ACK answered with a RST: published at once, as on any port
  speaker    22  the client sends before the banner and never after: published app_wait after the
                 ACK, no tapp (it answered nothing)
  race       22  the client's version arrives 0.5 ms after the banner, sooner than a quarter of the
                 handshake's RTT (20 ms): it cannot answer it; its key exchange 25 ms after the
                 banner does
  last       22  the trace ends 20 ms after the ACK: published when Zeek stops (app_wait's timer)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mkpcap import OPTIONS, Segment, write_frames

DARK4, DARK6 = "198.18.0.9", "2001:db8:ffff::9"
SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
SSH_CLIENT = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"
SMTP_BANNER = b"220 mail.example.net ESMTP Postfix (Debian/GNU)\r\n"
SMTP_LINE = b"EHLO " + b"x" * 93 + b"\r\n"  # 100 bytes
TELNET_SERVER = bytes.fromhex("fffd18fffd20fffd23fffd27")  # IAC DO TTYPE, TSPEED, XDISPLOC, NEW-ENVIRON
TELNET_CLIENT = bytes.fromhex("fffc18fffc20fffc23fffc27")  # IAC WONT ...
HTTP_SERVER = b"HTTP/1.1 400 Bad Request\r\n\r\n"
# An SSH binary packet: length, padding length, SSH_MSG_KEXINIT (20), the start of its cookie.
SSH_KEXINIT = bytes.fromhex("000005dc0a14") + bytes(range(16))
HTTP_CLIENT = b"GET / HTTP/1.0\r\n\r\n"


class Conn:
    """One connection's segments, with both sides' sequence numbers kept right."""

    def __init__(self, client: str, server: str, sport: int, dport: int, t: float) -> None:
        self.client, self.server, self.sport, self.dport = client, server, sport, dport
        self.cseq, self.sseq = 1000 + sport + 1, 5000 + dport + 1  # after the SYNs
        self.segments = [
            Segment(t, client, server, sport, dport, "S", self.cseq - 1, 0, 64240, OPTIONS, ttl=50),
            Segment(t + 0.0001, server, client, dport, sport, "SA", self.sseq - 1, self.cseq, 65160, OPTIONS),
        ]
        self.t = t + 0.0001

    def client_sends(self, after: float, flags: str = "A", payload: bytes = b"") -> Conn:
        self.t = round(self.t + after, 6)
        ack = 0 if flags == "R" else self.sseq
        self.segments.append(
            Segment(self.t, self.client, self.server, self.sport, self.dport, flags, self.cseq, ack, 502,
                    payload=payload, ttl=50)
        )
        self.cseq += len(payload) + ("F" in flags)
        return self

    def server_sends(self, after: float, flags: str = "PA", payload: bytes = b"") -> Conn:
        self.t = round(self.t + after, 6)
        self.segments.append(
            Segment(self.t, self.server, self.client, self.dport, self.sport, flags, self.sseq, self.cseq,
                    509, payload=payload)
        )
        self.sseq += len(payload) + ("F" in flags)
        return self

    def handshake(self) -> Conn:
        return self.client_sends(0.020)


def cases() -> dict[str, Conn]:
    def at(i: int) -> float:
        return 2000.0 + 10 * i

    return {
        "ssh": Conn("203.0.113.40", DARK4, 41001, 22, at(0)).handshake()
        .server_sends(0.0001, payload=SSH_BANNER).client_sends(0.0375, "PA", SSH_CLIENT),
        "ssh6": Conn("2001:db8::40", DARK6, 41002, 22, at(1)).handshake()
        .server_sends(0.0001, payload=SSH_BANNER).client_sends(0.02025, "PA", SSH_CLIENT),
        "smtp-long": Conn("203.0.113.41", DARK4, 41003, 25, at(2)).handshake()
        .server_sends(0.0001, payload=SMTP_BANNER).client_sends(0.080, "PA", SMTP_LINE),
        "telnet": Conn("203.0.113.42", DARK4, 41004, 23, at(3)).handshake()
        .server_sends(0.0001, payload=TELNET_SERVER).client_sends(0.021, "PA", TELNET_CLIENT),
        "web": Conn("203.0.113.43", DARK4, 41005, 80, at(4)).handshake()
        .server_sends(0.0001, payload=HTTP_SERVER).client_sends(0.030, "PA", HTTP_CLIENT),
        "silent": Conn("203.0.113.44", DARK4, 41006, 22, at(5)).handshake()
        .server_sends(0.0001, payload=SSH_BANNER).client_sends(0.020),  # ACKs the banner only
        "eager": Conn("203.0.113.45", DARK4, 41007, 22, at(6)).handshake()
        .client_sends(0.001, "PA", SSH_CLIENT).server_sends(0.0001, payload=SSH_BANNER)
        .client_sends(0.030, "PA", SSH_KEXINIT),
        "fin": Conn("203.0.113.46", DARK4, 41008, 23, at(7)).handshake()
        .server_sends(0.0001, "FA"),
        "rst": Conn("203.0.113.47", DARK4, 41009, 22, at(8)).handshake()
        .server_sends(0.0001, payload=SSH_BANNER).client_sends(0.050, "R"),
        "rstreply": Conn("203.0.113.48", DARK4, 41010, 22, at(9)).client_sends(0.030, "R"),
        "speaker": Conn("203.0.113.50", DARK4, 41012, 22, at(10)).handshake()
        .client_sends(0.001, "PA", HTTP_CLIENT).server_sends(0.0001, payload=SSH_BANNER),
        "race": Conn("203.0.113.51", DARK4, 41013, 22, at(11)).handshake()
        .server_sends(0.0001, payload=SSH_BANNER).client_sends(0.0005, "PA", SSH_CLIENT)
        .client_sends(0.0245, "PA", SSH_KEXINIT),
        "last": Conn("203.0.113.49", DARK4, 41011, 22, at(12)).handshake(),
    }


def ticks() -> list[Segment]:
    """A SYN outside the darknet 5.1 s into each case but the last: Zeek fires its timers as
    packets advance network time, so app_wait's end is seen 0.1 s late rather than at the next
    case."""
    return [Segment(2000.0 + 10 * i + 5.1, "192.0.2.7", "192.0.2.1", 42000 + i, 80, "S", 1)
            for i in range(len(cases()) - 1)]


def packets() -> list[tuple[float, bytes]]:
    out = [(s.t, s.frame()) for c in cases().values() for s in c.segments]
    out += [(s.t, s.frame()) for s in ticks()]
    return sorted(out, key=lambda p: p[0])


if __name__ == "__main__":
    n = write_frames(sys.argv[1] if len(sys.argv) > 1 else "app.pcap", packets())
    print(n, "packets")
