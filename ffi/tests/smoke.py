#!/usr/bin/env python3
"""Smoke test of libdwcp from Python through ctypes (no third-party modules).

Two engines on loopback: a listener with a generated key, a session that
sends a 1 MiB buffer, which comes out of dwcp_listener_next with the same
name and bytes; then the session's metrics, a clean close and every handle
freed. Prints one line; exits 1 with the library's last error on failure.

Usage: smoke.py [path/to/libdwcp.so]   (or set DWCP_LIB)
"""

import ctypes
import os
import random
import sys
import tempfile
import time
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

DWCP_STATUS_OK = 0
DWCP_KEY_LEN = 32
SIZE = 1 << 20
NAME = b"smoke/one-mebibyte.bin"


class EngineOptions(Structure):
    _fields_ = [("workers", c_uint32), ("pin", c_bool)]


class ConnectOptions(Structure):
    _fields_ = [
        ("key", POINTER(c_uint8)),
        ("insecure_no_auth", c_bool),
        ("streams", c_uint32),
        ("mode", c_uint32),
        ("rate_limit", c_uint64),
        ("connect_timeout_ms", c_uint32),
        ("stall_timeout_ms", c_uint32),
        ("resume_ms", c_uint32),
    ]


class ListenOptions(Structure):
    _fields_ = [
        ("key", POINTER(c_uint8)),
        ("insecure_no_auth", c_bool),
        ("dir", c_char_p),
        ("memory_limit", c_uint64),
        ("grace_ms", c_uint32),
    ]


class Metrics(Structure):
    _fields_ = [
        ("bytes_in", c_uint64),
        ("bytes_acked", c_uint64),
        ("wire_bytes", c_uint64),
        ("retransmitted_chunks", c_uint64),
        ("stream_failures", c_uint64),
        ("resumes", c_uint64),
        ("streams", c_uint64),
        ("ratio", c_double),
        ("bandwidth_gbps", c_double),
    ]


class Failure(Exception):
    pass


def load(path):
    lib = ctypes.CDLL(path)
    status = c_uint32
    handle = c_void_p
    sigs = {
        "dwcp_version": (c_char_p, []),
        "dwcp_status_name": (c_char_p, [c_uint32]),
        "dwcp_last_error": (status, [POINTER(c_char), c_size_t, POINTER(c_size_t)]),
        "dwcp_last_error_len": (status, [POINTER(c_size_t)]),
        "dwcp_engine_options_default": (status, [POINTER(EngineOptions)]),
        "dwcp_engine_new": (status, [POINTER(EngineOptions), POINTER(handle)]),
        "dwcp_engine_free": (None, [handle]),
        "dwcp_key_generate": (status, [c_char_p, POINTER(c_uint8)]),
        "dwcp_listen_options_default": (status, [POINTER(ListenOptions)]),
        "dwcp_listen": (status, [handle, c_char_p, POINTER(ListenOptions), POINTER(handle)]),
        "dwcp_listener_local_addr": (
            status,
            [handle, POINTER(c_char), c_size_t, POINTER(c_size_t)],
        ),
        "dwcp_listener_next": (status, [handle, c_uint32, POINTER(handle)]),
        "dwcp_listener_free": (None, [handle]),
        "dwcp_received_name": (status, [handle, POINTER(c_char), c_size_t, POINTER(c_size_t)]),
        "dwcp_received_data": (status, [handle, POINTER(POINTER(c_uint8)), POINTER(c_uint64)]),
        "dwcp_received_free": (None, [handle]),
        "dwcp_connect_options_default": (status, [POINTER(ConnectOptions)]),
        "dwcp_connect": (status, [handle, c_char_p, POINTER(ConnectOptions), POINTER(handle)]),
        "dwcp_session_send_buffer": (status, [handle, c_char_p, c_char_p, c_size_t]),
        "dwcp_session_metrics": (status, [handle, POINTER(Metrics)]),
        "dwcp_session_close": (status, [handle, POINTER(Metrics)]),
        "dwcp_session_free": (None, [handle]),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes
    return lib


def last_error(lib):
    n = c_size_t(0)
    lib.dwcp_last_error_len(byref(n))
    buf = ctypes.create_string_buffer(n.value + 1)
    written = c_size_t(0)
    if lib.dwcp_last_error(buf, len(buf), byref(written)) != DWCP_STATUS_OK:
        return "(dwcp_last_error failed)"
    return buf.value.decode("utf-8", "replace")


def check(lib, what, st):
    """Raises on a status other than OK, with its name and message."""
    if st != DWCP_STATUS_OK:
        name = lib.dwcp_status_name(st).decode()
        raise Failure(f"{what}: {name} ({st}): {last_error(lib)}")


def text_out(lib, fn, h):
    buf = ctypes.create_string_buffer(256)
    n = c_size_t(0)
    check(lib, fn.__name__, fn(h, buf, len(buf), byref(n)))
    if n.value != len(buf.value):
        raise Failure(f"{fn.__name__}: written {n.value}, string of {len(buf.value)}")
    return buf.value


def run(lib, tmp):
    t0 = time.monotonic()
    key = (c_uint8 * DWCP_KEY_LEN)()
    check(lib, "dwcp_key_generate", lib.dwcp_key_generate(os.path.join(tmp, "key").encode(), key))

    eo = EngineOptions()
    check(lib, "dwcp_engine_options_default", lib.dwcp_engine_options_default(byref(eo)))
    eo.workers = 1
    eo.pin = False
    tx, rx = c_void_p(), c_void_p()
    check(lib, "dwcp_engine_new", lib.dwcp_engine_new(byref(eo), byref(tx)))
    check(lib, "dwcp_engine_new", lib.dwcp_engine_new(byref(eo), byref(rx)))
    listener, session, received = c_void_p(), c_void_p(), c_void_p()
    try:
        lo = ListenOptions()
        check(lib, "dwcp_listen_options_default", lib.dwcp_listen_options_default(byref(lo)))
        lo.key = ctypes.cast(key, POINTER(c_uint8))
        check(lib, "dwcp_listen", lib.dwcp_listen(rx, b"127.0.0.1:0", byref(lo), byref(listener)))
        addr = text_out(lib, lib.dwcp_listener_local_addr, listener)

        co = ConnectOptions()
        check(lib, "dwcp_connect_options_default", lib.dwcp_connect_options_default(byref(co)))
        co.key = ctypes.cast(key, POINTER(c_uint8))
        co.streams = 2
        check(lib, "dwcp_connect", lib.dwcp_connect(tx, addr, byref(co), byref(session)))

        # Half random, half patterned: something for the codec to do.
        rng = random.Random(7)
        data = bytes(rng.getrandbits(8) for _ in range(SIZE // 2))
        data += bytes((i * 7 + i // 4096) & 0xFF for i in range(SIZE - len(data)))
        check(lib, "dwcp_session_send_buffer",
              lib.dwcp_session_send_buffer(session, NAME, data, len(data)))
        check(lib, "dwcp_listener_next", lib.dwcp_listener_next(listener, 10000, byref(received)))
        name = text_out(lib, lib.dwcp_received_name, received)
        if name != NAME:
            raise Failure(f"received {name!r}, expected {NAME!r}")
        ptr, n = POINTER(c_uint8)(), c_uint64(0)
        check(lib, "dwcp_received_data", lib.dwcp_received_data(received, byref(ptr), byref(n)))
        if n.value != len(data):
            raise Failure(f"received {n.value} bytes, expected {len(data)}")
        if ctypes.string_at(ptr, n.value) != data:
            raise Failure("the received bytes differ from those sent")

        m = Metrics()
        check(lib, "dwcp_session_metrics", lib.dwcp_session_metrics(session, byref(m)))
        if m.bytes_acked < len(data) or m.wire_bytes == 0:
            raise Failure(f"metrics: bytes_acked {m.bytes_acked}, wire_bytes {m.wire_bytes}")
        fin = Metrics()
        check(lib, "dwcp_session_close", lib.dwcp_session_close(session, byref(fin)))
        if fin.bytes_acked < len(data):
            raise Failure(f"close: bytes_acked {fin.bytes_acked}")
    finally:
        lib.dwcp_received_free(received)
        lib.dwcp_session_free(session)
        lib.dwcp_listener_free(listener)
        lib.dwcp_engine_free(tx)
        lib.dwcp_engine_free(rx)
    ms = (time.monotonic() - t0) * 1e3
    return (
        f"smoke.py: libdwcp {lib.dwcp_version().decode()}: sent {len(data)} bytes to "
        f"{addr.decode()} as {name.decode()}, acked {m.bytes_acked}, "
        f"{m.wire_bytes} wire bytes (ratio {m.ratio:.2f}), in {ms:.0f} ms"
    )


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DWCP_LIB")
    if not path:
        print("usage: smoke.py path/to/libdwcp.so (or set DWCP_LIB)", file=sys.stderr)
        return 2
    try:
        lib = load(path)
    except (OSError, AttributeError) as e:
        print(f"smoke.py: FAILED loading {path}: {e}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dwcp-smoke-") as tmp:
        try:
            print(run(lib, tmp))
        except Failure as e:
            print(f"smoke.py: FAILED: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
