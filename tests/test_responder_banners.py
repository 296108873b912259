"""The responder's banner path (`--banners`, issue 10 item 2) with real clients in a network
namespace: the banner goes out, the client's first data is timed (tapp_us) and capped (app_data),
a silent client costs only its own exchange, and a bad banners file is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from analyzer.handshake import MAX_APP_DATA, Handshake
from lab.netns import Namespace, Network
from lab.process import wait_for
from lab.redis import RedisServer
from responder.banners import MAX_BANNER, load_banners, parse_banners
from responder.cli import BANNERS_EXAMPLE
from tests import test_responder
from tests.test_responder import DARKNET, _start, _stop, _table, delayed_pair

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "responder" / "banners.example.toml"
SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"

# A server-first client: read the banner, think (its own processing time: the behaviour under
# test, not synchronisation), answer, then wait for the responder to close. Prints what it saw.
CLIENT = """
import json, socket, sys, time
addr, port, think, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.create_connection((addr, port), 5)
s.settimeout(30)
sport = s.getsockname()[1]
banner = s.recv(4096)
t0 = time.monotonic()
if think:
    time.sleep(think)
if payload:
    s.sendall(payload)
end = "close"
try:
    while s.recv(4096):
        pass
except ConnectionResetError:
    end = "reset"
print(json.dumps({"sport": sport, "banner": banner.hex(), "end": end, "held": time.monotonic() - t0}))
"""


pair = test_responder.pair  # the responder tests' sensor and client (a fixture)


def _banners(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "banners.toml"
    path.write_text(text)
    return path


def _client(client: Namespace, addr: str, port: int, think: float = 0.0, payload: bytes = b""
            ) -> subprocess.Popen[bytes]:
    return client.python("-c", CLIENT, addr, str(port), str(think), payload.hex(), stdout=subprocess.PIPE)


def _result(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)  # type: ignore[no-any-return]


def _open(sensor: Namespace) -> int:
    """Connections the responder holds open (the listener's port, 4, after the redirect)."""
    return len(sensor.run("ss", "-Htn", "state", "established", "sport", "= :4").splitlines())


def _handshakes(r: redis.Redis) -> list[Handshake]:  # type: ignore[type-arg]
    return [Handshake.from_fields(f) for _, f in r.xrange("stepstone:handshakes")]  # type: ignore[union-attr]


@pytest.mark.netns
def test_tapp_is_the_path_rtt_plus_the_clients_think_time(net: Network, tmp_path: Path,
                                                           redis_server: RedisServer) -> None:
    """Through a 2 x 10 ms delay line, a client that answers the banner 30 ms after reading it:
    tapp_us = 20 ms path RTT + 30 ms think; the answer's first 64 bytes come with it; one that
    answers at once shows the path RTT alone; a port without a banner is closed at once."""
    proc = None
    with delayed_pair(net, 10) as (sensor, client):
        try:
            banners = _banners(tmp_path, f'[banners]\n22 = "{SSH.decode().strip()}\\r\\n"\n'
                                         '25 = "220 mail.example.net ESMTP Postfix (Debian/GNU)\\r\\n"\n')
            proc = _start(sensor, redis_server.url, extra=("--banners", str(banners)))
            answer = b"SSH-2.0-OpenSSH_8.4p1 Debian-5+deb11u3\r\n" + b"\0" * 200  # longer than the cap
            slow = _result(_client(client, "198.18.0.22", 22, 0.030, answer))
            quick = _result(_client(client, "198.18.0.25", 25, 0.0, b"EHLO client.example\r\n"))
            plain = _result(_client(client, "198.18.0.80", 80))
            r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
            wait_for(lambda: r.xlen("stepstone:handshakes") >= 3, 10, "three handshakes")
            got = {h.dport: h for h in _handshakes(r)}
        finally:
            if proc is not None:
                code, err = _stop(proc)
                assert code == 0, err
    assert bytes.fromhex(str(slow["banner"])) == SSH
    assert bytes.fromhex(str(quick["banner"])).startswith(b"220 mail.example.net ESMTP")
    assert plain["banner"] == "" and plain["end"] == "close"  # no banner: closed at once
    h22, h25, h80 = got[22], got[25], got[80]
    assert h22.sport == slow["sport"] and h25.sport == quick["sport"]
    # Banner out -> 10 ms -> client -> 30 ms think -> 10 ms -> data in. Upper margin: the client's
    # sleep overshoot and a busy 2-core box.
    assert h22.tapp_us is not None and 50_000 <= h22.tapp_us <= 65_000, h22.tapp_us
    assert h22.app_data == answer[:MAX_APP_DATA] and len(h22.app_data) == MAX_APP_DATA
    assert h25.tapp_us is not None and 20_000 <= h25.tapp_us <= 30_000, h25.tapp_us
    assert h25.app_data == b"EHLO client.example\r\n"
    # tapp - T^p: the client's own processing, as the analyzer's cond_app reads it.
    assert h22.tp_us is not None and 28_000 <= h22.tapp_us - h22.tp_us <= 45_000
    assert h80.tapp_us is None and h80.app_data is None


@pytest.mark.netns
def test_a_silent_client_costs_its_own_exchange_only(pair: tuple[Namespace, Namespace], tmp_path: Path,
                                                     redis_server: RedisServer) -> None:
    """Clients that never answer the banner hold their exchange until --banner-timeout, then are
    reported with no tapp_us; meanwhile other ports' handshakes and another banner exchange are
    reported at once. Past --banner-sessions, a connection is reported at once without a banner."""
    sensor, client = pair
    banners = _banners(tmp_path, '[banners]\n22 = "SSH-2.0-OpenSSH_9.2p1\\r\\n"\n')
    timeout = 4.0
    proc = _start(sensor, redis_server.url, extra=("--banners", str(banners), "--banner-sessions", "4",
                                                   "--banner-timeout", str(timeout)))
    r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
    try:
        started = time.monotonic()
        silent = [_client(client, f"198.18.0.{i}", 22) for i in range(1, 4)]  # 3 of the 4 sessions
        wait_for(lambda: _open(sensor) >= 3, 10, "three silent exchanges open")
        answering = _result(_client(client, "198.18.0.50", 22, 0.0, b"SSH-2.0-x\r\n"))
        plain = _result(_client(client, "198.18.0.60", 80))
        wait_for(lambda: {h.dst for h in _handshakes(r)} >= {"198.18.0.50", "198.18.0.60"}, 10,
                 "the answering client and port 80 reported while the silent ones wait")
        assert time.monotonic() - started < timeout  # not queued behind the silent exchanges
        assert len(_handshakes(r)) == 2
        # The 4th session slot is free again; fill it, and one more is over the cap.
        fourth = _client(client, "198.18.0.4", 22)
        wait_for(lambda: _open(sensor) >= 4, 10, "four silent exchanges open")
        over = _result(_client(client, "198.18.0.99", 22))
        assert over["banner"] == "" and over["end"] == "close"  # no banner past the cap
        wait_for(lambda: "198.18.0.99" in {h.dst for h in _handshakes(r)}, 10, "the dropped one reported")
        held = [_result(p) for p in [*silent, fourth]]
        wait_for(lambda: r.xlen("stepstone:handshakes") >= 7, 10, "every handshake")
        got = {h.dst: h for h in _handshakes(r)}
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert answering["end"] == "close" and plain["banner"] == ""
    for result in held:
        assert bytes.fromhex(str(result["banner"])) == b"SSH-2.0-OpenSSH_9.2p1\r\n"
        assert result["end"] == "close" and timeout - 0.5 <= float(result["held"]) < timeout + 3  # type: ignore[arg-type]
    for i in (1, 2, 3, 4):
        h = got[f"198.18.0.{i}"]
        assert h.tapp_us is None and h.app_data is None and h.reply == "ack"
    assert got["198.18.0.50"].tapp_us is not None and got["198.18.0.50"].app_data == b"SSH-2.0-x\r\n"
    assert got["198.18.0.99"].tapp_us is None
    assert "banners: 5 sent, 1 answered, 4 silent, 0 spoke first, 1 dropped" in err, err


@pytest.mark.netns
def test_json_lines_carry_tapp_and_base64_app_data(pair: tuple[Namespace, Namespace], tmp_path: Path) -> None:
    """Without Redis (JSON lines on stdout) the client's bytes are base64 too, never raw."""
    sensor, client = pair
    banners = _banners(tmp_path, '[banners]\n21 = "220 (vsFTPd 3.0.3)\\r\\n"\n')
    out = tmp_path / "handshakes.jsonl"
    with out.open("wb") as sink:
        proc = _start(sensor, None, stdout=sink, extra=("--banners", str(banners)))
    try:
        _result(_client(client, "198.18.0.21", 21, 0.0, b"USER \xff\x00\x1b[31m\r\n"))
        wait_for(lambda: out.read_text().strip(), 10, "the handshake")
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["app_data"] == "VVNFUiD/ABtbMzFtDQo=" and isinstance(line["tapp_us"], int)


@pytest.mark.parametrize(("text", "message"), [
    (None, "cannot read"),
    ("[banners\n", "not TOML"),
    ("[banners]\n0 = \"x\"\n", "not a TCP port"),
    ("[banners]\n70000 = \"x\"\n", "not a TCP port"),
    ("[banners]\nssh = \"x\"\n", "not a TCP port"),
    ("[banners]\n22 = 5\n", "must be a string"),
    ("[banners]\n22 = \"\"\n", "1..1024 bytes"),
    (f"[banners]\n22 = \"{'x' * (MAX_BANNER + 1)}\"\n", "1..1024 bytes"),
    ("[banners]\n22 = \"\u20ac\"\n", "beyond U+00FF"),
    ("[banners]\n22 = \"a\"\n022 = \"b\"\n", "given twice"),
    ("[banner]\n22 = \"x\"\n", "unknown key"),
    ("", "no [banners] table"),
    (b"\xff\xfe[banners]", "not TOML"),
])
def test_a_bad_banners_file_is_one_line_and_exit_2(tmp_path: Path, text: str | bytes | None,
                                                   message: str) -> None:
    path = tmp_path / "banners.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "responder.cli", "run", "--darknet", DARKNET, "--banners",
                           str(path)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("stepstone-responder: --banners ")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "x", "301"])
def test_a_bad_banner_timeout_is_refused(value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "responder.cli", "run", "--darknet", DARKNET,
                           "--banner-timeout", value], capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 2 and "--banner-timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_help_teaches_the_example_file() -> None:
    """--help shows the example banners file, and it is the shipped one (SSH, FTP, SMTP, Telnet)."""
    out = subprocess.run([sys.executable, "-m", "responder.cli", "run", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for word in ("--banners FILE", "--banner-timeout", "--banner-sessions", "[banners]", "tapp_us"):
        assert word in out, word
    import tomllib

    indented = [line[2:] for line in BANNERS_EXAMPLE.splitlines() if line.startswith("  ")]
    shown = tomllib.loads("\n".join(indented))
    assert parse_banners(shown) == load_banners(EXAMPLE)
    assert set(load_banners(EXAMPLE)) == {21, 22, 23, 25}
    assert load_banners(EXAMPLE)[23].startswith(b"\xff\xfd")  # Telnet option negotiation: IAC DO


MANY = """
import json, selectors, socket, sys, time
n = int(sys.argv[1])
socks = [socket.create_connection((f"198.18.0.{1 + i % 200}", 22), 10) for i in range(n)]
banners = sum(1 for s in socks if s.recv(100).startswith(b"SSH-2.0-"))
print(json.dumps({"banners": banners}), flush=True)
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
open_ = n
deadline = time.monotonic() + 60
while open_ and time.monotonic() < deadline:
    for key, _ in sel.select(1):
        if key.fileobj.recv(100) == b"":
            sel.unregister(key.fileobj)
            open_ -= 1
print(json.dumps({"closed": n - open_}), flush=True)
"""


@pytest.mark.netns
def test_many_silent_clients_at_once_block_nobody(pair: tuple[Namespace, Namespace], tmp_path: Path,
                                                  redis_server: RedisServer) -> None:
    """300 clients hold their banner exchange open at once; port 80 handshakes made meanwhile are
    reported before any of the 300 times out, and then all 300 are, untimed."""
    sensor, client = pair
    n, timeout = 300, 6.0
    banners = _banners(tmp_path, '[banners]\n22 = "SSH-2.0-OpenSSH_9.2p1\\r\\n"\n')
    proc = _start(sensor, redis_server.url,
                  extra=("--banners", str(banners), "--banner-timeout", str(timeout)))
    r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
    many = client.python("-c", MANY, str(n), stdout=subprocess.PIPE)
    try:
        assert many.stdout is not None
        assert json.loads(many.stdout.readline()) == {"banners": n}
        held_since = time.monotonic()
        for i in range(5):
            _result(_client(client, f"198.18.0.{210 + i}", 80))
        wait_for(lambda: r.xlen("stepstone:handshakes") >= 5, 10, "the port 80 handshakes")
        assert time.monotonic() - held_since < timeout  # while all 300 exchanges are still open
        assert {h.dport for h in _handshakes(r)} == {80}
        assert json.loads(many.stdout.readline()) == {"closed": n}
        many.wait(30)
        wait_for(lambda: r.xlen("stepstone:handshakes") >= n + 5, 20, "every handshake")
    finally:
        if many.poll() is None:
            many.kill()
            many.wait()
        code, err = _stop(proc)
    assert code == 0, err
    got = [h for h in _handshakes(r) if h.dport == 22]
    assert len(got) == n and all(h.tapp_us is None for h in got)
    assert f"banners: {n} sent, 0 answered, {n} silent, 0 spoke first, 0 dropped" in err, err


def _silent_clients_under(nofile: str, pair: tuple[Namespace, Namespace], tmp_path: Path,
                          redis_server: RedisServer, n: int = 60) -> str:
    """`n` clients at once that never answer the banner, against a responder run under
    `prlimit --nofile=<nofile>` with --banner-sessions 500; every one must get its banner and be
    reported, and the responder must stop cleanly. Its stderr."""
    sensor, client = pair
    banners = _banners(tmp_path, '[banners]\n22 = "SSH-2.0-OpenSSH_9.2p1\\r\\n"\n')
    proc = sensor.popen("prlimit", f"--nofile={nofile}", "--", sys.executable, "-m", "responder.cli", "run",
                        "--darknet", DARKNET, "--redis", redis_server.url, "--banners", str(banners),
                        "--banner-sessions", "500", "--banner-timeout", "2",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
    many = None
    try:
        wait_for(lambda: "stepstone_responder" in _table(sensor), 15, "the responder's table",
                 alive=lambda: None if proc.poll() is None else f"responder exited {proc.returncode}")
        many = client.python("-c", MANY, str(n), stdout=subprocess.PIPE)
        assert many.stdout is not None
        assert json.loads(many.stdout.readline()) == {"banners": n}
        assert json.loads(many.stdout.readline()) == {"closed": n}
        many.wait(30)
        wait_for(lambda: r.xlen("stepstone:handshakes") >= n, 20, "every handshake",
                 alive=lambda: None if proc.poll() is None else f"responder exited {proc.returncode}")
        assert proc.poll() is None
    finally:
        if many is not None and many.poll() is None:
            many.kill()
            many.wait()
        code, err = _stop(proc)
    assert code == 0, err
    assert "Traceback" not in err, err
    assert f"banners: {n} sent, 0 answered, {n} silent" in err, err
    return err


@pytest.mark.netns
def test_running_out_of_file_descriptors_does_not_stop_the_responder(
        pair: tuple[Namespace, Namespace], tmp_path: Path, redis_server: RedisServer) -> None:
    """--banner-sessions above what the process may hold open (RLIMIT_NOFILE): when accept fails
    for want of a descriptor (EMFILE), the responder waits for exchanges to end and accepts again,
    instead of its accept loop dying; every client still gets its banner and every handshake is
    reported. 48 descriptors: the interpreter, Redis, the listener and the event loop take ~20."""
    err = _silent_clients_under("48", pair, tmp_path, redis_server)
    assert "cannot accept (Too many open files)" in err, err  # the limit was reached
    assert "--banner-sessions 500 needs 564 open files, the limit is 48" in err, err  # said at start


@pytest.mark.netns
def test_the_soft_descriptor_limit_is_raised_for_the_banner_sessions(
        pair: tuple[Namespace, Namespace], tmp_path: Path, redis_server: RedisServer) -> None:
    """A soft RLIMIT_NOFILE of 48 under a hard one of 4096 (a shell's default ulimit): the responder
    raises the soft limit to what --banner-sessions needs, so 60 silent clients at once never make
    accept fail."""
    err = _silent_clients_under("48:4096", pair, tmp_path, redis_server)
    assert "cannot accept" not in err and "needs 564 open files" not in err, err
