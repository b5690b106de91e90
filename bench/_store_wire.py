"""TCPStore's client protocol spoken over plain non-blocking sockets, for benchmarks that emulate
thousands of store clients from a few threads (one ``selectors`` loop drives many connections).

Wire format of torch 2.13's TCPStore (little-endian), observed from its own client (``strace``
of ``TCPStore.add/set/get/check/multi_get/delete_key``): a request is one query-type byte
followed by its arguments; a string or byte value is a u64 length and the bytes; keys carry
the store's "/" prefix. On connecting the client sends VALIDATE with the magic 0x3C85F7CE,
then PING with a u32 that the server echoes. Replies: ADD, DELETE_KEY -> i64; CHECK -> u8
(0 ready, 1 not ready); WAIT -> u8 (0 stop waiting); GET -> u64 length + bytes; MULTI_GET ->
that per key; SET -> nothing. TCPStore's own ``get`` and ``multi_get`` send WAIT for the keys
first; so does :meth:`Request.get` here.
"""
from __future__ import annotations

import socket
import struct
from typing import Callable, Optional, Sequence

VALIDATE, SET, GET, ADD, CHECK, WAIT, DELETE_KEY, APPEND, MULTI_GET, PING = 0, 1, 3, 4, 5, 6, 8, 9, 10, 13
MAGIC = 0x3C85F7CE
KEY_PREFIX = "/"


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _key(key: str) -> bytes:
    return _string((KEY_PREFIX + key).encode())


def _keys(keys: Sequence[str]) -> bytes:
    return struct.pack("<Q", len(keys)) + b"".join(_key(k) for k in keys)


class Request:
    """One request's bytes and how to read its reply from a byte buffer.

    ``parse(buffer, at)`` returns ``(value, next_at)`` when the reply is complete in
    ``buffer[at:]``, else None."""

    def __init__(self, data: bytes, parse: Callable[[bytes, int], Optional[tuple]]) -> None:
        self.data, self.parse = data, parse

    @staticmethod
    def add(key: str, delta: int) -> "Request":
        return Request(bytes([ADD]) + _key(key) + struct.pack("<q", delta), _i64)

    @staticmethod
    def set(key: str, value: bytes) -> "Request":
        return Request(bytes([SET]) + _key(key) + _string(value), _nothing)

    @staticmethod
    def append(key: str, value: bytes) -> "Request":
        return Request(bytes([APPEND]) + _key(key) + _string(value), _nothing)

    @staticmethod
    def check(keys: Sequence[str]) -> "Request":
        return Request(bytes([CHECK]) + _keys(keys), _ready)

    @staticmethod
    def get(key: str) -> "Request":
        """WAIT for the key, then GET it (as TCPStore.get does): the value's bytes."""
        def parse(buffer: bytes, at: int) -> Optional[tuple]:
            if len(buffer) < at + 1:
                return None
            return _bytes(buffer, at + 1)
        return Request(bytes([WAIT]) + _keys([key]) + bytes([GET]) + _key(key), parse)

    @staticmethod
    def multi_get(keys: Sequence[str]) -> "Request":
        """WAIT for ``keys``, then MULTI_GET them (as TCPStore.multi_get): the values in order."""
        def parse(buffer: bytes, at: int) -> Optional[tuple]:
            if len(buffer) < at + 1:
                return None
            at += 1
            values = []
            for _ in keys:
                parsed = _bytes(buffer, at)
                if parsed is None:
                    return None
                value, at = parsed
                values.append(value)
            return values, at
        return Request(bytes([WAIT]) + _keys(keys) + bytes([MULTI_GET]) + _keys(keys), parse)

    @staticmethod
    def delete_key(key: str) -> "Request":
        return Request(bytes([DELETE_KEY]) + _key(key), _i64)


def _nothing(buffer: bytes, at: int) -> Optional[tuple]:
    return None, at


def _i64(buffer: bytes, at: int) -> Optional[tuple]:
    if len(buffer) < at + 8:
        return None
    return struct.unpack_from("<q", buffer, at)[0], at + 8


def _ready(buffer: bytes, at: int) -> Optional[tuple]:
    if len(buffer) < at + 1:
        return None
    return buffer[at] == 0, at + 1


def _bytes(buffer: bytes, at: int) -> Optional[tuple]:
    if len(buffer) < at + 8:
        return None
    (size,) = struct.unpack_from("<Q", buffer, at)
    if len(buffer) < at + 8 + size:
        return None
    return bytes(buffer[at + 8:at + 8 + size]), at + 8 + size


def connect(host: str, port: int, nonce: int) -> socket.socket:
    """A validated, pinged connection to the TCPStore server at ``host:port`` (blocking while it
    connects; the caller makes it non-blocking)."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(bytes([VALIDATE]) + struct.pack("<I", MAGIC) + bytes([PING]) + struct.pack("<I", nonce))
    echo = b""
    while len(echo) < 4:
        chunk = sock.recv(4 - len(echo))
        if not chunk:
            raise ConnectionError("the store closed the connection while validating it")
        echo += chunk
    if struct.unpack("<I", echo)[0] != nonce:
        raise ConnectionError("the store answered the ping with another number")
    return sock

