#!/usr/bin/env python3
"""A WebSocket client of Zeek's WebSocket API (JSON v1), standard library only, for the btests.

usage: ws-client.py PORT HANDSHAKES

Connects to ws://127.0.0.1:PORT/v1/messages/json (retrying until the listener is up), subscribes
to stepstone/handshake, publishes Test::go() to stepstone/verdict once Zeek has acknowledged the
subscription (the test script then lets Zeek read its trace), prints each StepStone::handshake
event it receives, and after HANDSHAKES of them publishes Test::done(n, uids) to
stepstone/verdict. Exits 1 with one line on stderr on any failure, after 60 s at most.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
from typing import Any

DEADLINE = time.monotonic() + 60


def fail(message: str) -> None:
    print(f"ws-client.py: {message}", file=sys.stderr)
    sys.exit(1)


def connect(port: int) -> socket.socket:
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError as exc:
            if time.monotonic() > DEADLINE:
                fail(f"no listener on port {port}: {exc}")
            time.sleep(0.1)  # polls for the listener, which Zeek opens in zeek_init
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /v1/messages/json HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            fail("connection closed during the WebSocket upgrade")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        fail(f"upgrade refused: {status.decode(errors='replace')}")
    return sock


def send(sock: socket.socket, message: Any) -> None:
    payload = json.dumps(message).encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        sock.settimeout(max(0.1, DEADLINE - time.monotonic()))
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            fail("timed out waiting for Zeek")
        if not chunk:
            fail("Zeek closed the connection")
        data += chunk
    return data


RAW = open(os.environ["WS_RAW"], "ab") if os.environ.get("WS_RAW") else None  # noqa: SIM115


def receive(sock: socket.socket) -> Any:
    """The next text message (answering pings, joining fragments)."""
    parts = b""
    while True:
        b0, b1 = recv_exact(sock, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", recv_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", recv_exact(sock, 8))[0]
        payload = recv_exact(sock, n)
        opcode = b0 & 0x0F
        if opcode == 0x9:  # ping: answer with the same payload
            mask = os.urandom(4)
            pong = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + mask + pong)
            continue
        if opcode == 0x8:
            fail("Zeek closed the WebSocket")
        if opcode in (0x1, 0x2, 0x0):
            parts += payload
            if b0 & 0x80:
                if RAW:
                    RAW.write(parts + b"\n")
                    RAW.flush()
                return json.loads(parts)


def value(data: dict[str, Any]) -> Any:
    """Broker JSON -> Python (the types these tests read)."""
    kind, v = data["@data-type"], data["data"]
    if kind == "vector":
        return [value(x) for x in v]
    if kind == "none":
        return None
    return v


def event(topic: str, name: str, *args: dict[str, Any]) -> dict[str, Any]:
    def count(n: int) -> dict[str, Any]:
        return {"@data-type": "count", "data": n}

    body = {"@data-type": "vector", "data": [{"@data-type": "string", "data": name},
                                             {"@data-type": "vector", "data": list(args)}]}  # fmt: skip
    return {"type": "data-message", "topic": topic, "@data-type": "vector",
            "data": [count(1), count(1), body]}  # fmt: skip


def main(port: int, expected: int) -> None:
    sock = connect(port)
    send(sock, ["stepstone/handshake"])
    ack = receive(sock)
    if ack.get("type") != "ack":
        fail(f"expected an ack, got {ack}")
    print("subscribed to stepstone/handshake")
    send(sock, event("stepstone/verdict", "Test::go"))
    uids = []
    while len(uids) < expected:
        message = receive(sock)
        if message.get("type") != "data-message":
            fail(f"unexpected message {message}")
        # Zeek 7.0 adds a third element (metadata) to [name, args].
        fmt, kind, body = value(message)[:3]
        name, args = body[:2]
        (info,) = args
        uid, orig_h, reply, synack_count, tp = info[0], info[3], info[16], info[14], info[18]
        syn = base64.b64decode(info[7])
        print(
            f"{message['topic']} {name} (format {fmt}, type {kind}) {uid} {orig_h} reply={reply or '-'} "
            f"synacks={synack_count} tp={tp or '-'} syn={len(syn)} bytes"
        )
        uids.append(uid)
    send(
        sock,
        event(
            "stepstone/verdict",
            "Test::done",
            {"@data-type": "count", "data": len(uids)},
            {"@data-type": "string", "data": " ".join(uids)},
        ),
    )
    print("sent Test::done")
    sock.close()


if __name__ == "__main__":
    main(int(sys.argv[1].split("/")[0]), int(sys.argv[2]))
