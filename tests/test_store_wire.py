"""The raw TCPStore protocol the control-plane benchmark's light ranks speak (bench/_store_wire.py)
against a real TCPStore: every request means to the server what torch's own client means by it,
checked through torch's client (a PrefixStore view, as the nettest Coordinator uses)."""
from __future__ import annotations

import datetime
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _store_wire as wire  # noqa: E402

dist = pytest.importorskip("torch.distributed")


def ask(sock: socket.socket, request: wire.Request):
    """Send ``request`` and read its reply (None for SET and APPEND, which have none)."""
    sock.sendall(request.data)
    buffer = b""
    while True:
        parsed = request.parse(buffer, 0)
        if parsed is not None:
            value, used = parsed
            assert used == len(buffer), "a reply longer than its request's"
            return value
        chunk = sock.recv(1 << 16)
        assert chunk, "the store closed the connection"
        buffer += chunk


@pytest.mark.timeout(60)
def test_every_light_rank_request_means_what_torchs_client_means():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30),
                           wait_for_workers=False)
    view = dist.PrefixStore("run0/", server)   # keys "run0/" + "/" + key, as the Coordinator's
    sock = wire.connect("127.0.0.1", server.port, nonce=4242)
    try:
        assert ask(sock, wire.Request.add("run0//n", 5)) == 5 and view.add("n", 2) == 7
        assert ask(sock, wire.Request.set("run0//blob", b"\x00\x01payload")) is None
        assert view.get("blob") == b"\x00\x01payload"
        view.set("plan", b"{}")
        assert ask(sock, wire.Request.get("run0//plan")) == b"{}"
        assert ask(sock, wire.Request.check(["run0//plan", "run0//n"])) is True
        assert ask(sock, wire.Request.check(["run0//absent"])) is False
        assert ask(sock, wire.Request.append("run0//answered", b"3,")) is None
        view.append("answered", b"4,")
        assert view.get("answered") == b"3,4,"
        assert ask(sock, wire.Request.multi_get(["run0//plan", "run0//blob"])) == [b"{}", b"\x00\x01payload"]
        assert ask(sock, wire.Request.delete_key("run0//plan")) == 1 and not view.check(["plan"])
        assert ask(sock, wire.Request.delete_key("run0//plan")) == 0
    finally:
        sock.close()
