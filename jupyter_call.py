#!/usr/bin/env python3
"""jupyter_call: run code on a Jupyter kernel and get the results back.

One file, standard library only: copy it into a project, import it, or run it.

    python jupyter_call.py --url http://127.0.0.1:8888/ --token T "print(1)"

    from jupyter_call import run_code
    print(run_code("1 + 1").data["text/plain"])

It speaks the Jupyter server REST API (start, interrupt, restart and delete kernels) through urllib,
and the kernel channels over its own RFC 6455 websocket client on plain sockets; one time budget
bounds every step of both (but the system's name lookup). Sections, top to bottom, each using only
those above it: errors; time budget and sockets; websocket frames (no I/O); websocket connection;
Jupyter REST API (urllib); Jupyter messages and results (no I/O); server discovery; JupyterHub
servers on demand; the public API (Kernel, run_code); notebooks; what the front ends share; the
Model Context Protocol server for AI agents (--mcp); the command line, main() last. A section
reaches those above through names without a leading underscore (``__all__`` lists the API kept
stable), and keeps its own names underscored; one friendship: the notebooks section calls
``Kernel._send_ahead`` and ``Kernel._execute``.

MIT License. Copyright (c) 2026 the jupyter_call authors. See LICENSE.
"""
from __future__ import annotations

# Start-up policy: a short command-line call spends more time importing than talking to the server,
# so what only some calls need loads where it is used: ssl (https and wss), urllib.request and
# http.client (REST; they import ssl and email); dataclasses never (Result is a plain class). The
# one SHA-1 of the handshake comes from CPython's _sha1 rather than OpenSSL's hashlib, ASCII host
# names skip the idna codec, and the command line has its own small option parser (argparse would
# cost more than 5% of a call) and skips the collector's last pass at exit.
import base64
import codecs
import collections
import contextlib
import enum
import errno
import functools
import gc
import io
import json
import os
import posixpath
import re
import socket
import struct
import sys
import time
import types
from collections.abc import Callable, Iterable
from urllib.parse import quote, unquote, urlsplit

__version__ = "0.1.0"

__all__ = ["run_code", "run_notebook", "read_notebook", "edit_notebook", "run_cells", "Kernel",
           "Result", "list_servers", "WebSocket", "JupyterError", "ServerError", "AuthError",
           "ConfigError", "ExecutionError", "KernelDied", "ExecutionTimeout", "WebSocketError",
           "WebSocketClosed"]


# ---- Errors --------------------------------------------------------------------------------------

class JupyterError(Exception):
    """Root of every error jupyter_call raises."""


def duration(timeout: float) -> str:
    # a budget that began a moment after the call's reads as the call's
    return f"{round(timeout, 2):g} s"


class ServerError(JupyterError):
    """The server could not be reached or answered with an error.

    Attributes: ``url`` (the server's base URL), ``status`` (the HTTP status, or None without
    an HTTP answer), ``reason``, ``fix`` (None or a key of ``FIXES``: what the caller can do).
    """

    def __init__(self, url: str, reason: str, status: int | None = None, *, fix: str | None = None):
        self.url, self.reason, self.status, self.fix = url, reason, status, fix
        super().__init__(self.describe(FIXES))

    def describe(self, fixes: dict) -> str:
        """The message, with the remedy in ``fixes``' words (the API's FIXES, a front end's own)."""
        suffix = f" (HTTP {self.status})" if self.status is not None else ""
        remedy = f": {fixes[self.fix]}" if self.fix else ""
        return f"server at {self.url} {self.reason}{suffix}{remedy}"


# What a caller can do about a ServerError, in the API's words (the command
# line says the same in its own: _CLI_FIXES).
FIXES = {
    "token": "pass token= or set JUPYTER_TOKEN",
    "tls": "pass an ssl_context that trusts its CA, or set SSL_CERT_FILE",
    "tls-context": ("the ssl_context given does not trust it; load the CA that signed its "
                    "certificate"),
    "tls-store": ("this Python has no CA certificates (on macOS, run 'Install "
                  "Certificates.command' in the Python folder); set SSL_CERT_FILE, or pass an "
                  "ssl_context"),
    "tls-strict": ("Python 3.13+ checks certificates strictly (ssl.VERIFY_X509_STRICT): reissue "
                   "the certificate or its CA with what is named, or clear that flag in an "
                   "ssl_context"),
    "notebook": "open it in JupyterLab first, or use session=",
    "protocol": "use protocol='legacy'",
}


class AuthError(ServerError):
    """The server refused the token (HTTP 401 or 403)."""


class ConfigError(JupyterError, ValueError):
    """A setting cannot be used as given (a token or header with a control character, a
    malformed URL); nothing was sent. Also a ValueError."""


class WebSocketError(JupyterError):
    """The websocket failed; ``code`` is the RFC 6455 close code, ``reason`` says why."""

    def __init__(self, code: int, reason: str):
        self.code, self.reason = int(code), reason
        super().__init__(f"websocket closed with code {self.code}: {reason}")


class WebSocketClosed(WebSocketError):
    """The peer closed the websocket, or the connection dropped (code 1006)."""


class ExecutionError(JupyterError):
    """The code raised in the kernel; ``result`` holds everything it produced."""

    def __init__(self, result: Result):
        self.result = result
        super().__init__("execution was aborted by the kernel" if result.status == "aborted"
                         else error_line(result.error))


def error_line(error: dict | None) -> str:
    """A kernel's error in one line, 'ename: evalue' (of an error output or reply)."""
    ename, evalue = (str((error or {}).get(key) or "") for key in ("ename", "evalue"))
    return f"{ename or 'Error'}: {evalue}" if evalue else ename or "Error"


class KernelDied(JupyterError):
    """The kernel died while running the code; ``result`` holds what arrived."""

    def __init__(self, kernel_id: str, reason: str, result: Result | None = None):
        self.kernel_id, self.reason, self.result = kernel_id, reason, result
        super().__init__(f"kernel {kernel_id} died: {reason}")


class ExecutionTimeout(JupyterError, TimeoutError):
    """The code did not finish in time; the kernel was interrupted.

    ``result`` holds what arrived before the deadline; ``timeout`` is the limit. (Running out
    of time before the code was sent is a ServerError.)
    """

    def __init__(self, timeout: float, result: Result | None = None):
        self.timeout, self.result = timeout, result
        super().__init__(f"the code did not finish within {duration(timeout)}")


# ---- Time budget and sockets (Deadline, sliced waits, TLS, proxies) ------------------------------

_MAX_HANDSHAKE = 64 * 1024  # bound on the head of the answer to a handshake or a CONNECT
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # never allowed in a header value (RFC 9110 5.5)


class Deadline:
    """One time budget shared by every step of a call; ``None`` means no limit."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self, cap: float | None = None) -> float | None:
        """Seconds left (at most ``cap``), or ``cap`` when there is no limit."""
        if self._end is None:
            return cap
        left = max(0.0, self._end - time.monotonic())
        return left if cap is None else min(left, cap)

    @property
    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def cut(self, cap: float | None) -> Deadline:
        """A budget for one step: what is left, at most ``cap`` seconds."""
        return Deadline(self.remaining(cap))


def within(timeout: float | None) -> str:
    return f" within {duration(timeout)}" if timeout is not None else " (the system's timeout)"


# Windows runs a Python signal handler only when the blocking call in progress returns, and a socket
# wait is one call. There every wait is cut into slices of this many seconds, so Ctrl-C, Ctrl-Break
# and the console's close act within half a second; elsewhere a signal ends the wait itself.
_WAIT_SLICE = 0.5 if sys.platform == "win32" else None


def sliced_io(sock: socket.socket, deadline: Deadline, call, *args):
    """``call(*args)`` on ``sock`` within ``deadline``, waiting at most _WAIT_SLICE at a time.

    For calls that may be made again after a timeout: recv, send, the TLS handshake.
    """
    while True:
        left = deadline.remaining()
        if left is not None and left <= 0:
            raise socket.timeout("timed out")  # (a zero timeout would make the socket non-blocking)
        last = _WAIT_SLICE is None or (left is not None and left <= _WAIT_SLICE)
        sock.settimeout(left if last else _WAIT_SLICE)
        try:
            return call(*args)
        except socket.timeout:
            if last:
                raise


def recv_within(sock: socket.socket, size: int, deadline: Deadline) -> bytes:
    return sliced_io(sock, deadline, sock.recv, size)


def sendall_within(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    """Send all of ``data`` within ``deadline``; after a timeout part of it may be out."""
    if _WAIT_SLICE is None:
        sliced_io(sock, deadline, sock.sendall, data)
        return
    view = memoryview(data)
    while view:
        view = view[sliced_io(sock, deadline, sock.send, view):]


_CONNECTING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035}  # 10035: WSAEWOULDBLOCK


def _connect(sock: socket.socket, address, deadline: Deadline) -> None:
    """Connect within ``deadline``; in _WAIT_SLICE slices where they are set."""
    if _WAIT_SLICE is None:
        sliced_io(sock, deadline, sock.connect, address)
        return
    import select
    sock.setblocking(False)
    code = sock.connect_ex(address)
    while code in _CONNECTING:
        left = deadline.remaining(_WAIT_SLICE)
        if left <= 0:
            raise socket.timeout("timed out")
        # Windows reports a refusal in `failed`
        _, writable, failed = select.select([], [sock], [sock], left)
        if writable or failed:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def _proxy_parts(proxy: str):
    """The parts of a proxy URL; a bare host:port means http://host:port."""
    return urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _open_socket(host: str, port: int, unix_socket: str | None, proxy: str | None,
                 deadline: Deadline) -> socket.socket:
    """A connected stream socket: to a Unix socket, a proxy, or the host itself."""
    if unix_socket:
        if not hasattr(socket, "AF_UNIX"):
            raise OSError(errno.EAFNOSUPPORT, "Unix sockets are not available on this platform")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _connect(sock, unix_socket, deadline)
        except BaseException:
            sock.close()
            raise
        return sock
    if proxy:
        proxy_parts = _proxy_parts(proxy)
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    # getaddrinfo() encodes a str host with the idna codec, an import of ~1.5 ms
    # that plain ASCII names do not need.
    name = host.encode("ascii") if host.isascii() else host
    failure: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
    for family, kind, proto, _, address in socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:  # every address in the one budget, not a budget each as socket.create_connection
            _connect(sock, address, deadline)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        # Each message leaves in one sendall; no reason to let Nagle hold it back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise failure


def open_stream(host: str, port: int, secure: bool, ssl_context: object, unix_socket: str | None,
                proxy: str | None, deadline: Deadline, *, tunnel: bool = True) -> socket.socket:
    """A socket connected to host:port, through a proxy's CONNECT if ``tunnel``, TLS if secure."""
    sock = _open_socket(host, port, unix_socket, proxy, deadline)
    try:
        if proxy and tunnel:
            _connect_tunnel(sock, proxy, host, port, deadline)
        if secure:
            import ssl  # (~17 ms: loaded where https and wss need it)
            context = ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            sliced_io(sock, deadline, sock.do_handshake)
        return sock
    except BaseException:
        sock.close()
        raise


def _connect_tunnel(sock: socket.socket, proxy: str, host: str, port: int,
                    deadline: Deadline) -> None:
    """Ask an HTTP proxy for a tunnel to host:port (RFC 9110 9.3.6 CONNECT)."""
    parts = _proxy_parts(proxy)
    where = f"{parts.scheme}://{parts.hostname}:{parts.port or 80}/"
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = proxy_authorization(proxy)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += [f"Proxy-Authorization: {credentials}"] if credentials else []
    try:
        status = http_exchange(sock, lines, deadline)[0]
    except ConfigError:
        raise
    except (ValueError, EOFError) as exc:
        raise ServerError(where, f"(the proxy) broke HTTP answering CONNECT: {exc}") from None
    if status != 200:
        raise ServerError(where, f"(the proxy) refused a tunnel to {target}", status)


def proxy_authorization(proxy: str) -> str | None:
    """The Proxy-Authorization value for a proxy URL with credentials, else None."""
    parts = _proxy_parts(proxy)
    if not parts.username:
        return None
    creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")


def check_header_text(texts: Iterable[str]) -> None:
    """Refuse header text HTTP cannot carry, before anything is sent (ConfigError)."""
    for text in texts:
        if CONTROL_CHARS.search(text):
            raise ConfigError("a request header holds a control character (CR, LF, NUL, ...); "
                              "nothing was sent")
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            raise ConfigError("a request header holds a character HTTP cannot carry (beyond "
                              "Latin-1); nothing was sent") from None


def http_exchange(sock: socket.socket, lines: list, deadline: Deadline) -> tuple[int, dict, bytes]:
    """Send a request head; return the answer's status, header fields and the bytes after its head.

    For the two exchanges that precede a byte stream, the websocket handshake and a proxy's
    CONNECT; REST is urllib's. Raises ValueError for an answer that is not HTTP or whose head
    is too long, EOFError when the connection closes first.
    """
    check_header_text(lines)
    sendall_within(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), deadline)
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_HANDSHAKE:
            raise ValueError(f"HTTP answer head longer than {_MAX_HANDSHAKE} bytes")
        chunk = recv_within(sock, 4096, deadline)
        if not chunk:
            raise EOFError("connection closed during the handshake")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (len(parts) < 2 or not parts[0].startswith("HTTP/")
            or not (parts[1].isascii() and parts[1].isdigit())):
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    fields: dict = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
    return int(parts[1]), fields, rest


def error_reason(body: bytes) -> str:
    """': <message>' from a Jupyter JSON error body (or its 'reason'), or '' when there is none."""
    try:
        info = json.loads(body.decode("utf-8"))
        message = info.get("message") or info.get("reason")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return f": {str(message)[:300]}" if message else ""


def os_reason(exc: BaseException) -> str:
    """A short lower-case reason for a network error."""
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
        return f"connection {'refused' if isinstance(exc, ConnectionRefusedError) else 'reset'}"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if _untrusted(exc):
        return f"its TLS certificate is not trusted ({getattr(exc, 'verify_message', exc)})"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason",
                                                     None) or str(exc) or type(exc).__name__
    return str(text)


def _untrusted(exc: BaseException) -> bool:
    return type(exc).__name__ == "SSLCertVerificationError"  # asked without importing ssl


def unreachable(url: str, exc: BaseException, ssl_context: object = None) -> ServerError:
    """The ServerError for a network error."""
    return ServerError(url, f"is not reachable: {os_reason(exc)}",
                       fix=_tls_fix(exc, ssl_context is not None))


# OpenSSL's X509_V_ERR codes 80-94 come from the checks that VERIFY_X509_STRICT turns on;
# ssl.create_default_context() sets it from Python 3.13 on, so private CAs that older
# Pythons accepted fail there ("Basic Constraints of CA cert not marked critical").
_STRICT_VERIFY_CODES = range(80, 95)


def _tls_fix(exc: BaseException, custom_context: bool, platform: str = sys.platform) -> str | None:
    """The FIXES key for a certificate that failed to verify: what actually failed."""
    if not _untrusted(exc):
        return None
    if getattr(exc, "verify_code", None) in _STRICT_VERIFY_CODES:
        return "tls-strict"
    if custom_context:
        return "tls-context"
    if platform != "win32" and _no_ca_store():  # Windows reads its own store, not files
        return "tls-store"
    return "tls"


def _no_ca_store() -> bool:
    """Whether the default context finds no CA file or folder (a python.org macOS install
    before its certificate step, a container without ca-certificates)."""
    import ssl
    paths = ssl.get_default_verify_paths()
    return paths.cafile is None and paths.capath is None


def is_loopback(host: str | None) -> bool:
    host = (host or "").strip("[]").lower()
    return (host == "localhost" or host.endswith(".localhost") or host.startswith("127.")
            or host == "::1")


def proxy_for(url: str) -> str | None:
    """The proxy URL the environment sets for ``url`` (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or is_loopback(parts.hostname):
        return None
    import urllib.request
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    kind = "https" if parts.scheme in ("https", "wss") else "http"
    proxy = urllib.request.getproxies().get(kind)
    if proxy:
        try:
            given = _proxy_parts(proxy)
            if not given.hostname or given.port == 0:
                raise ValueError("no host")
        except ValueError:
            raise ConfigError(f"the {kind.upper()}_PROXY setting is malformed (it needs "
                              "http://[user:password@]host:port)") from None
    return proxy


def daemon(target, *args):
    """``target(*args)`` in a daemon thread, started; returns the thread."""
    import threading
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


# ---- WebSocket frames (RFC 6455, no I/O) ---------------------------------------------------------

class Opcode(enum.IntEnum):
    """RFC 6455 5.2 opcodes; 3-7 and 0xB-0xF are reserved."""
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_CONT, TEXT, BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
CONTROL_OPCODES = (CLOSE, PING, PONG)


class CloseCode(enum.IntEnum):
    """RFC 6455 7.4.1 status codes, those we send or read."""
    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005          # never sent: stands for a close frame without a code
    ABNORMAL = 1006           # never sent: stands for a connection lost without a close frame
    INVALID_DATA = 1007
    MESSAGE_TOO_BIG = 1009


# 7.4: codes a peer may put on the wire (1012-1014 are registered with IANA since).
_SENDABLE_CLOSE_CODES = frozenset([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                   1012, 1013, 1014])

# 5.2 Base Framing Protocol
_FIN_MASK = 0x80
_RSV_MASK = 0x70
_OPCODE_MASK = 0x0F
_MASK_MASK = 0x80
_PAYLOAD_LENGTH_MASK = 0x7F
_PAYLOAD_LENGTH_TWO_BYTE = 126
_PAYLOAD_LENGTH_EIGHT_BYTE = 127
_MAX_CONTROL_PAYLOAD = 125  # 5.5: control frames carry at most 125 bytes

# 1.3: the server proves it read our key by hashing it with this GUID.
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

MAX_MESSAGE_SIZE = 256 * 2**20  # default bound on one message: fits a 100 MB notebook output
CLOSE_TIMEOUT = 2.0             # how long to wait for the peer's side of the close handshake


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value a server must answer to ``key`` (4.2.2)."""
    try:
        # CPython's own SHA-1: hashlib would load OpenSSL (~4 ms) for this one digest.
        from _sha1 import sha1
    except ImportError:
        from hashlib import sha1
    digest = sha1((key + _WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _mask_bytes(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (5.3); masking and unmasking are one."""
    n = len(data)
    if not n:
        return b""
    stream = key * (n // 4) + key[: n % 4]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class Frame(collections.namedtuple("Frame", "opcode payload fin rsv", defaults=(b"", True, 0))):
    """One websocket frame; ``rsv`` holds the three reserved bits in place (0x70)."""
    __slots__ = ()

    def serialize(self, *, mask_key: bytes | None = None) -> bytes:
        """Encode the frame; clients pass a fresh 4-byte ``mask_key`` (5.3)."""
        n = len(self.payload)
        head = bytearray([(_FIN_MASK if self.fin else 0) | self.rsv | self.opcode])
        mask_bit = _MASK_MASK if mask_key is not None else 0
        if n < _PAYLOAD_LENGTH_TWO_BYTE:
            head.append(mask_bit | n)
        elif n < 2**16:
            head.append(mask_bit | _PAYLOAD_LENGTH_TWO_BYTE)
            head += n.to_bytes(2, "big")
        else:
            head.append(mask_bit | _PAYLOAD_LENGTH_EIGHT_BYTE)
            head += n.to_bytes(8, "big")
        if mask_key is None:
            return bytes(head) + self.payload
        return bytes(head) + mask_key + _mask_bytes(self.payload, mask_key)


class _FrameHead(collections.namedtuple("_FrameHead", "opcode fin rsv start end key")):
    """A parsed frame header: the payload lies at ``data[start:end]``, masked with ``key``."""
    __slots__ = ()

    def frame(self, data: bytes | bytearray) -> Frame:
        """The whole frame, once ``data`` holds ``end`` bytes."""
        with memoryview(data) as view:
            payload = bytes(view[self.start:self.end])
        return Frame(self.opcode, _mask_bytes(payload, self.key) if self.key else payload, self.fin,
                     self.rsv)


def parse_head(data: bytes | bytearray, *, max_size: int | None = MAX_MESSAGE_SIZE,
               masked: bool = False) -> tuple[_FrameHead | None, int]:
    """``(head, head.end)`` once the header at the start of ``data`` is whole, else
    ``(None, needed)``.

    ``masked``: whether frames must be masked (a server reading a client) or
    must not be. Raises WebSocketError with the close code a violation calls for.
    """
    have = len(data)
    if have < 2:
        return None, 2
    b0, b1 = data[0], data[1]
    fin, rsv, op = bool(b0 & _FIN_MASK), b0 & _RSV_MASK, b0 & _OPCODE_MASK
    is_masked, length = bool(b1 & _MASK_MASK), b1 & _PAYLOAD_LENGTH_MASK
    # 5.2: a nonzero RSV bit without a negotiated meaning MUST fail the connection (no extension
    # is ever negotiated).
    if rsv:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"reserved bits 0x{rsv:02x} set")
    # 5.2: an unknown opcode MUST fail the connection.
    try:
        opcode = Opcode(op)
    except ValueError:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"reserved opcode 0x{op:x}") from None
    # 5.1: a client MUST close on a masked frame; a server on an unmasked one.
    if is_masked != masked:
        state = "masked" if is_masked else "unmasked"
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"{state} frame from the peer")
    if opcode in CONTROL_OPCODES:
        # 5.5: control frames MUST NOT be fragmented and carry at most 125 bytes.
        if not fin:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
        if length > _MAX_CONTROL_PAYLOAD:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "control frame longer than 125 bytes")
    pos = 2
    if length == _PAYLOAD_LENGTH_TWO_BYTE:
        if have < 4:
            return None, 4
        length, pos = int.from_bytes(data[2:4], "big"), 4
    elif length == _PAYLOAD_LENGTH_EIGHT_BYTE:
        if have < 10:
            return None, 10
        length, pos = int.from_bytes(data[2:10], "big"), 10
        if length >> 63:  # 5.2: the most significant bit MUST be 0
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "64-bit payload length with top bit set")
    if max_size is not None and length > max_size:
        raise WebSocketError(CloseCode.MESSAGE_TOO_BIG,
                             f"frame of {length} bytes exceeds the limit of {max_size}")
    key = b""
    if is_masked:
        if have < pos + 4:
            return None, pos + 4
        key, pos = bytes(data[pos:pos + 4]), pos + 4
    return _FrameHead(opcode, fin, rsv, pos, pos + length, key), pos + length


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The body of a close frame (5.5.1): a 2-byte code then UTF-8 reason, or nothing."""
    if code is None or code == CloseCode.NO_STATUS:
        return b""
    return int(code).to_bytes(2, "big") + reason.encode("utf-8")[:_MAX_CONTROL_PAYLOAD - 2]


def parse_close(payload: bytes) -> tuple[int, str]:
    """Code and reason of a received close frame; raises WebSocketError if malformed."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte body")
    code = int.from_bytes(payload[:2], "big")
    if not (code in _SENDABLE_CLOSE_CODES or 3000 <= code < 5000):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


class MessageReader:
    """Whole messages from data frames (no I/O): joins fragments, checks UTF-8 as it arrives,
    enforces ``max_size`` (a message being joined costs at most that, however many frames carry
    it). Errors are WebSocketErrors with their close code.
    """

    def __init__(self, *, max_size: int | None = MAX_MESSAGE_SIZE):
        self.max_size = max_size
        self._opcode: Opcode | None = None  # of a fragmented message in progress
        self._joined = bytearray()
        self._text = codecs.getincrementaldecoder("utf-8")()   # the message's fragments so far
        self._partial = codecs.getincrementaldecoder("utf-8")()  # a text frame still arriving
        self._checked = 0  # payload bytes of that frame already checked

    def receive(self, frame: Frame) -> str | bytes | None:
        """Take a data frame; return the message it completes, else None."""
        if frame.opcode == _CONT:
            if self._opcode is None:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                     "continuation frame with no message to continue")
        elif self._opcode is not None:
            # 5.4: fragments of one message MUST NOT interleave with another message.
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 "new message began inside a fragmented one")
        else:
            self._opcode = frame.opcode
            self._text.reset()
        self._checked = 0
        payload = frame.payload
        if self.max_size is not None and len(payload) > self.max_size - len(self._joined):
            raise WebSocketError(CloseCode.MESSAGE_TOO_BIG,
                                 f"message exceeds the limit of {self.max_size} bytes")
        if frame.fin and not self._joined:  # the common case: a message in one frame
            opcode, self._opcode = self._opcode, None
            return _utf8(payload) if opcode == TEXT else payload
        if self._opcode == TEXT:
            # 8.1: text MUST be UTF-8; checked per fragment so a bad byte fails at once.
            _utf8(payload, self._text, frame.fin)
        self._joined += payload
        if not frame.fin:
            return None
        data, self._joined, opcode, self._opcode = self._joined, bytearray(), self._opcode, None
        return data.decode("utf-8") if opcode == TEXT else bytes(data)

    def check_partial(self, head: _FrameHead, buf: bytes | bytearray) -> None:
        """8.1 fail fast: check a plain text frame's UTF-8 while its payload still arrives."""
        if head.key or not (head.opcode == TEXT and self._opcode is None
                            or head.opcode == _CONT and self._opcode == TEXT):
            return
        start = head.start + self._checked
        if len(buf) <= start:
            return
        if self._checked == 0:
            self._partial.setstate(self._text.getstate() if head.opcode == _CONT else (b"", 0))
        with memoryview(buf) as view:
            _utf8(view[start:], self._partial)
        self._checked = len(buf) - head.start


def _utf8(data, decoder=None, final: bool = False) -> str:
    """Decode UTF-8 (through an incremental ``decoder`` if given); bad bytes: close code 1007."""
    try:
        return decoder.decode(data, final) if decoder is not None else str(data, "utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None


# ---- WebSocket connection (socket I/O) -----------------------------------------------------------

# Linux delays ACKs by up to 40 ms; a server that leaves Nagle on then holds its
# next small frame until our ACK arrives. TCP_QUICKACK asks for an immediate ACK,
# but the kernel clears it again, so it is set before every receive.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_RECV_SIZE = 256 * 1024          # bytes asked of one recv() while waiting for a frame
RECV_SIZE_MAX = 4 * 2**20       # at most this much in one recv() for a large frame


class WebSocket(contextlib.AbstractContextManager):
    """A blocking RFC 6455 client: whole messages in, whole messages out.

    Use ``WebSocket.connect(url)``; then ``send``, ``recv``, ``ping`` and
    ``close``. Pings from the server are answered inside ``recv``.
    """

    def __init__(self, sock: socket.socket, *, subprotocol: str | None = None,
                 max_size: int | None = MAX_MESSAGE_SIZE, buffered: bytes = b""):
        self.sock = sock
        self.subprotocol = subprotocol
        self.max_size = max_size
        self.close_timeout = CLOSE_TIMEOUT
        self.close_code: int | None = None
        self.close_reason = ""
        self._closing = False
        self._buf = bytearray(buffered)
        self._reader = MessageReader(max_size=max_size)

    # -- opening --

    @classmethod
    def connect(cls, url: str, *, headers: dict | None = None,
                subprotocols: Iterable[str] | None = None, timeout: float | None = None,
                ssl_context: object = None, max_size: int | None = MAX_MESSAGE_SIZE,
                unix_socket: str | None = None, proxy: str | None = None) -> WebSocket:
        """Open a websocket to a ``ws://`` or ``wss://`` URL.

        Args:
            url: the endpoint; ``wss://`` verifies the certificate by default.
            headers: extra handshake headers (e.g. ``Authorization``).
            subprotocols: offered in ``Sec-WebSocket-Protocol``; see ``.subprotocol``.
            timeout: seconds for connect, TLS and handshake together (None: no limit).
            ssl_context: an ``ssl.SSLContext`` to use instead of the default one.
            max_size: largest message accepted; larger ones fail with code 1009.
            unix_socket: connect to this Unix socket path instead of the URL's host.
            proxy: an ``http://[user:pass@]host:port`` proxy to tunnel through (HTTP CONNECT).
        Raises:
            ServerError (AuthError for 401/403) when the server answers another
            status than 101, for network errors and when time runs out;
            WebSocketError when the answer breaks RFC 6455.
        """
        deadline = Deadline(timeout)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = scheme == "wss"
        port = parts.port or (443 if secure else 80)
        origin = f"{scheme}://{parts.netloc}/"
        sock = None
        try:
            sock = open_stream(parts.hostname, port, secure, ssl_context, unix_socket, proxy,
                               deadline)
            return cls._handshake(sock, parts, list(subprotocols or []), dict(headers or {}),
                                  deadline, max_size)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, socket.timeout):
                step = ("complete the websocket handshake" if sock is not None
                        else "accept a connection")
                raise ServerError(origin, f"did not {step}{within(timeout)}") from None
            if isinstance(exc, OSError):
                raise unreachable(origin, exc, ssl_context) from exc
            raise

    @classmethod
    def _handshake(cls, sock, parts, offered, headers, deadline, max_size) -> WebSocket:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}",
                 "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if offered:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(offered)}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            status, fields, rest = http_exchange(sock, lines, deadline)
        except ConfigError:
            raise
        except EOFError as exc:
            raise WebSocketClosed(CloseCode.ABNORMAL, str(exc)) from None
        except ValueError as exc:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, str(exc)) from None
        origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"
        if status != 101:
            error = AuthError if status in (401, 403) else ServerError
            raise error(origin, f"refused the websocket handshake{error_reason(rest)}", status)
        # 4.1: the client MUST fail the connection when these checks fail.
        if fields.get("upgrade", "").lower() != "websocket":
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 "handshake answer lacks 'Upgrade: websocket'")
        if "upgrade" not in fields.get("connection", "").lower():
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 "handshake answer lacks 'Connection: Upgrade'")
        if fields.get("sec-websocket-accept") != accept_key(key):
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 "handshake answer has a wrong Sec-WebSocket-Accept")
        if fields.get("sec-websocket-extensions"):  # 4.1: none is ever offered
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 "server chose an extension that was not offered")
        chosen = fields.get("sec-websocket-protocol") or None
        if chosen is not None and chosen not in offered:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                 f"server chose subprotocol {chosen!r}, which was not offered")
        return cls(sock, subprotocol=chosen, max_size=max_size, buffered=rest)

    # -- sending --

    def send(self, message: str | bytes, *, timeout: float | None = None) -> None:
        """Send a whole message: text for ``str``, binary for ``bytes``.

        With ``timeout``, a send that cannot finish in time closes the connection
        and raises WebSocketClosed.
        """
        opcode, payload = ((TEXT, message.encode("utf-8")) if isinstance(message, str)
                           else (BINARY, bytes(message)))
        self._send_frame(Frame(opcode, payload), Deadline(timeout))

    def ping(self, payload: bytes = b"", *, timeout: float | None = None) -> None:
        """Send a ping; the pong is consumed inside ``recv``."""
        self._send_frame(Frame(PING, bytes(payload)), Deadline(timeout))

    def _send_frame(self, frame: Frame, deadline: Deadline) -> None:
        if self.close_code is not None or (self._closing and frame.opcode != CLOSE):
            raise WebSocketClosed(self.close_code or CloseCode.ABNORMAL, "the websocket is closed")
        # 5.3: the masking key MUST be unpredictable: a fresh one per frame.
        data = frame.serialize(mask_key=os.urandom(4))
        try:
            sendall_within(self.sock, data, deadline)
        except socket.timeout:  # part of the frame may be out: the connection is unusable
            self._lost(f"a send did not finish{within(deadline.timeout)}")
        except OSError as exc:
            self._lost(f"send failed: {os_reason(exc)}")

    # -- receiving --

    def recv(self, *, timeout: float | None = None) -> str | bytes:
        """Return the next whole message: ``str`` for text, ``bytes`` for binary.

        Fragments are joined, text is checked as UTF-8 as it arrives, pings are answered. With
        ``timeout``, raises TimeoutError if no whole message arrives in time; the connection stays
        usable. Raises WebSocketClosed when the peer closes or the connection drops, WebSocketError
        after failing the connection on a protocol violation.
        """
        deadline = Deadline(timeout)
        try:
            while True:
                frame = self._read_frame(deadline)
                if frame.opcode in CONTROL_OPCODES:
                    self._on_control(frame, deadline)
                else:
                    message = self._reader.receive(frame)
                    if message is not None:
                        return message
                if deadline.expired:  # a flood of pings or fragments must not outlast the timeout
                    raise socket.timeout("timed out")
        except socket.timeout:
            raise TimeoutError(f"no websocket message{within(timeout)}") from None
        except WebSocketError as exc:
            # 7.1.7: fail the connection, with the code the error carries
            if self.close_code is None:
                self.close(exc.code, exc.reason)
            raise

    def _read_frame(self, deadline: Deadline, *, closing: bool = False) -> Frame:
        """The next frame; the payload of a text frame is checked while it arrives."""
        while True:
            head, needed = parse_head(self._buf, max_size=self.max_size)
            if head is not None and len(self._buf) >= needed:
                frame = head.frame(self._buf)
                del self._buf[:needed]
                return frame
            if head is not None and not closing:
                self._reader.check_partial(head, self._buf)
            self._fill(needed, deadline)

    def _fill(self, needed: int, deadline: Deadline) -> None:
        """One receive towards ``needed`` buffered bytes; a timeout loses nothing."""
        sock = self.sock
        if _TCP_QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        try:
            chunk = recv_within(sock, min(max(needed - len(self._buf), _RECV_SIZE), RECV_SIZE_MAX),
                                deadline)
        except socket.timeout:
            raise
        except OSError as exc:
            self._lost(f"connection lost: {os_reason(exc)}")
        if not chunk:
            self._lost("connection closed without a close frame")
        self._buf += chunk

    def _on_control(self, frame: Frame, deadline: Deadline) -> None:
        if frame.opcode == PING:
            # 5.5.2: on a Ping an endpoint MUST send a Pong with the same payload, whatever
            # is left of the caller's wait: a few bytes that a live connection takes at once.
            self._send_frame(Frame(PONG, frame.payload), Deadline(self.close_timeout))
        elif frame.opcode == CLOSE:
            code, reason = parse_close(frame.payload)
            # 5.5.1: answer a Close with a Close, echoing its code.
            self._closing = True
            deadline = Deadline(self.close_timeout)
            self._send_close(code, "", deadline)
            self._finish(code, reason, deadline)
            raise WebSocketClosed(code, reason or "closed by the server")

    # -- closing --

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close: send a close frame with ``code``, wait for the peer's, close the socket.

        All of it takes at most ``close_timeout`` seconds. This is also how a
        protocol error fails the connection (7.1.7).
        """
        if self.close_code is not None:
            return
        deadline = Deadline(self.close_timeout)
        if not self._closing:
            self._closing = True
            self._send_close(code, reason, deadline)
        # read to the peer's close or EOF, dropping data
        with contextlib.suppress(OSError, WebSocketError):
            while self._read_frame(deadline, closing=True).opcode != CLOSE:
                pass
        self._finish(code, reason, deadline)

    def _send_close(self, code: int, reason: str, deadline: Deadline) -> None:
        with contextlib.suppress(OSError):
            frame = Frame(CLOSE, close_payload(code, reason))
            sendall_within(self.sock, frame.serialize(mask_key=os.urandom(4)), deadline)

    def _finish(self, code: int, reason: str, deadline: Deadline) -> None:
        """7.1.1: after the close handshake the client waits for the server's TCP close."""
        self.close_code, self.close_reason = code, reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while recv_within(self.sock, _RECV_SIZE, deadline):
                pass
        self.sock.close()

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection at once, without the close handshake (code 1006)."""
        if self.close_code is None:
            self.close_code, self.close_reason = CloseCode.ABNORMAL, reason
        self.sock.close()

    def _lost(self, reason: str) -> None:
        """7.1.5: the connection is gone (code 1006); raise WebSocketClosed."""
        self.abort(reason)
        raise WebSocketClosed(CloseCode.ABNORMAL, reason)

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---- Jupyter REST API (urllib, over the budgeted sockets) ----------------------------------------
#
# REST goes through urllib.request. Left to itself urllib bounds each socket read, not the
# call, and http.client reads a chunk size of -1 as "read to the end". Both are closed where
# http.client touches the network: its connection's socket is opened by open_stream (one
# budget over name lookup results, connect, a proxy's tunnel and TLS) and handed over in a
# _CappedSocket, whose reads wait at most what is left of the call's deadline and stop at
# _MAX_REST_READ bytes. http.client parses the answer; it cannot read past either bound.

HTTP_TIMEOUT = 90.0         # a request's limit when the call has none (gateways: 40 s+ to start)
_MAX_REST_BODY = 16 * 2**20  # bound on one REST answer's body
_MAX_REST_READ = _MAX_REST_BODY + 2**20  # bound on all one request reads: head, chunk lines, body
_MAX_ERROR_BODY = 4096       # what is read of an error answer for its message
_MAX_REDIRECTS = 10          # as urllib allows
_DELETE_RETRIES = 5          # a DELETE racing an automatic restart answers 500; try again
_DELETE_BACKOFF = 0.2        # first pause between DELETE attempts; doubles
SIDE_REQUEST_TIMEOUT = 10.0 # a request that only diagnoses or lists must not hold a call up longer
HANDSHAKE_TIMEOUT = 120.0   # connect + websocket handshake without a deadline (a 101 may take 60 s)


def strict_json(obj: object, **options) -> str:
    """JSON that every parser takes: NaN and the infinities (a server's 1e400 reads as one) are
    written as the strings "NaN", "Infinity" and "-Infinity"."""
    try:
        return json.dumps(obj, allow_nan=False, **options)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **options)


def _finite(value: object) -> object:
    if isinstance(value, float) and value - value != 0:  # NaN or an infinity
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return [_finite(item) for item in value] if isinstance(value, (list, tuple)) else value


class _BadAnswer(Exception):
    """An HTTP answer broke HTTP or one of our bounds; the REST layer names the request."""


class _CappedSocket(io.RawIOBase):
    """The socket http.client is handed: sends and reads keep to the call's deadline (in
    _WAIT_SLICE slices, through sliced_io) and reads stop at _MAX_REST_READ bytes. urllib closes the
    connection once the head is read and goes on reading through the answer's file, so the
    socket closes when both have let go, as a real socket's makefile() arranges."""

    def __init__(self, sock: socket.socket, deadline: Deadline):
        super().__init__()
        self.sock, self.deadline, self.left, self._users = sock, deadline, _MAX_REST_READ, 1
        self._unsent: list = []

    def sendall(self, data: bytes) -> None:
        # Held until the first read, so that head and body leave in one send as a request
        # did before urllib: a server that answers without reading the body then resets
        # no connection under an answer still on its way.
        self._unsent.append(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        self._users += 1
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._unsent:
            sendall_within(self.sock, b"".join(self._unsent), self.deadline)
            self._unsent.clear()
        if self.left <= 0:
            raise _BadAnswer(f"more than {_MAX_REST_BODY} bytes")
        got = sliced_io(self.sock, self.deadline, self.sock.recv_into,
                        memoryview(buffer)[:self.left])
        self.left -= got
        return got

    def close(self) -> None:
        if not self.closed:
            self._users -= 1
            if self._users <= 0:
                self.sock.close()
                super().close()


@functools.cache
def _opener():
    """The urllib opener for every REST call, made at first use: urllib.request imports ssl,
    http.client and email, which a caller who only imports the module does not pay for.

    Its handlers carry a request's budget, client and redirect count on the Request itself.
    """
    import http.client
    import urllib.request

    class Answer(http.client.HTTPResponse):
        def _read_next_chunk_size(self) -> int:
            try:
                size = super()._read_next_chunk_size()
            except ValueError:  # (http.client would call this an IncompleteRead)
                size = -1
            if size < 0:
                raise _BadAnswer(f"bad chunk size {size}")
            if size > _MAX_REST_BODY:
                raise _BadAnswer(f"more than {_MAX_REST_BODY} bytes")
            return size

    class Connection(http.client.HTTPConnection):
        response_class = Answer

        def __init__(self, host: str, *, call, proxy: str | None, **kwargs):
            super().__init__(host, **kwargs)
            self.call, self.proxy = call, proxy

        def connect(self) -> None:
            rest, parts = self.call.rest, urlsplit(self.call.full_url)
            secure = parts.scheme == "https"
            sock = open_stream(parts.hostname, parts.port or (443 if secure else 80), secure,
                               rest.ssl_context, rest.unix_socket, self.proxy, self.call.deadline,
                               tunnel=secure)
            self.sock = _CappedSocket(sock, self.call.deadline)

    class Handler(urllib.request.AbstractHTTPHandler):
        def http_open(self, call):
            proxy = None if call.rest.unix_socket else proxy_for(call.full_url)
            if proxy and call.type == "http":  # RFC 9112 3.2.2: the absolute form, to a proxy
                parts = urlsplit(call.full_url)
                call.selector = f"http://{parts.netloc.rpartition('@')[2]}{call.selector}"
                credentials = proxy_authorization(proxy)
                if credentials:
                    call.add_unredirected_header("Proxy-Authorization", credentials)
            return self.do_open(
                lambda host, **kwargs: Connection(host, call=call, proxy=proxy, **kwargs), call)

        https_open = http_open
        http_request = https_request = urllib.request.AbstractHTTPHandler.do_request_

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_repeats = max_redirections = _MAX_REDIRECTS + 1  # our own count ends a loop first
        http_error_308 = urllib.request.HTTPRedirectHandler.http_error_302  # (Python < 3.11)

        def redirect_request(self, call, answer, code, msg, headers, new_url):
            call.rest._keep_xsrf(headers)
            if call.redirects >= _MAX_REDIRECTS:
                raise _BadAnswer(f"more than {_MAX_REDIRECTS} redirects")
            if urlsplit(new_url).scheme not in ("http", "https"):
                raise _BadAnswer(f"a redirect to {new_url[:200]}, which is not HTTP")
            fields = dict(call.headers)  # (urllib keeps Host and Content-Length apart)
            if not same_origin(new_url, call.full_url):
                if call.rest.unix_socket:
                    raise _BadAnswer(f"a redirect away from the Unix socket, to {new_url[:200]}")
                # what urllib's own handler would carry to the other origin
                for name in ("Authorization", "Cookie", "X-xsrftoken", "Host"):
                    fields.pop(name, None)
            method, data = call.get_method(), call.data
            if code == 303 or code in (301, 302) and method == "POST":  # as browsers and urllib do
                method, data = "GET", None
                fields.pop("Content-type", None)
            return call.rest._call(method, new_url, fields, data, call.deadline, call.redirects + 1)

    opener = urllib.request.OpenerDirector()
    for handler in (Handler(), Redirects(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


class RestClient:
    """The few calls of the Jupyter server REST API that jupyter_call needs.

    Each request goes through urllib (``_opener``) on a connection of its own, over the same
    sockets as the websocket (TCP, TLS, Unix sockets, HTTP proxies), every read bounded in
    size and every request, redirects included, in one time budget.
    """

    def __init__(self, url: str, token: str | None, *, ssl_context: object = None):
        self.url, self.token, self.ssl_context = url, token, ssl_context
        parts = urlsplit(url)  # (http+unix://<percent-encoded socket path>/...)
        self.unix_socket = unquote(parts.netloc) if parts.scheme == "http+unix" else None
        # Requests over a Unix socket go to http://localhost/ (the Host the server expects).
        self._base = f"http://localhost{parts.path}" if self.unix_socket else url
        self._xsrf: str | None = None

    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def websocket(self, path: str, deadline: Deadline, subprotocols=()) -> WebSocket:
        """A websocket to ``path`` on the server, over the sockets and with the token of REST."""
        parts = urlsplit(self.url)
        netloc = "localhost" if self.unix_socket else parts.netloc
        return WebSocket.connect(f"{'wss' if parts.scheme == 'https' else 'ws'}://{netloc}"
                                 f"{parts.path}{path}", headers=self.headers(),
                                 subprotocols=subprotocols,
                                 timeout=deadline.remaining(HANDSHAKE_TIMEOUT),
                                 ssl_context=self.ssl_context, unix_socket=self.unix_socket,
                                 proxy=proxy_for(self.url))

    def request(self, method: str, path: str, body: object = None, *,
                deadline: Deadline, host: str | None = None, diagnose: bool = True,
                missing: str | None = None, on_line=None) -> object:
        """Send one request; return the decoded JSON answer (None for an empty one).

        ``missing`` is the reason a 404 gives (e.g. "has no kernel K"). With ``on_line``, the
        answer is a stream (text/event-stream): each line goes to ``on_line`` as it comes, until
        it returns true or the stream ends, all within ``deadline`` (not capped at HTTP_TIMEOUT).
        """
        data = strict_json(body).encode("utf-8") if body is not None else None
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        headers = {"Accept": "application/json", **self.headers()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if host:
            headers["Host"] = host
        check_header_text([path, *headers.values()])
        if method != "GET" and not self.token:
            # Without a token the server checks the _xsrf cookie on changes instead.
            xsrf = self._xsrf_cookie(deadline)
            if xsrf:
                headers.update({"Cookie": f"_xsrf={xsrf}", "X-XSRFToken": xsrf})
        budget = deadline if on_line else deadline.cut(HTTP_TIMEOUT)
        if budget.expired:
            raise ServerError(self.url, f"could not be asked {method} {path}: no time left")
        try:
            status, raw = self._fetch(method, self._base + path, headers, data, budget, on_line)
        except socket.timeout:
            raise ServerError(self.url, f"did not answer {method} {path} within "
                                        f"{duration(budget.timeout)}") from None
        except _BadAnswer as exc:  # not HTTP, too big, too many redirects
            raise ServerError(self.url, f"broke HTTP answering {method} {path}: {exc}") from None
        except OSError as exc:
            raise unreachable(self.url, exc, self.ssl_context) from exc
        if status == 404 and missing:
            raise ServerError(self.url, missing, 404)
        if status >= 300:  # an error, or a redirect that did not say where to
            raise self._http_error(status, raw, method, path, diagnose=diagnose)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ServerError(self.url, f"answered {path} with something that is not JSON (is this "
                                        "a Jupyter server?)") from None

    def _call(self, method: str, url: str, headers: dict, data: bytes | None, deadline: Deadline,
              redirects: int = 0):
        """A urllib Request that carries what the opener's handlers need."""
        import urllib.request
        call = urllib.request.Request(url, data, headers, method=method)
        call.rest, call.deadline, call.redirects = self, deadline, redirects
        return call

    def _fetch(self, method: str, url: str, headers: dict, data: bytes | None,
               deadline: Deadline, on_line=None) -> tuple[int, bytes]:
        """One request through urllib, following redirects; the status and the (bounded) body."""
        import http.client
        import urllib.error
        try:
            try:
                answer = _opener().open(self._call(method, url, headers, data, deadline))
            except urllib.error.HTTPError as exc:  # an error status: its body says why
                answer = exc
            except urllib.error.URLError as exc:  # what failed while connecting or sending
                raise exc.reason if isinstance(exc.reason,
                                               OSError) else OSError(str(exc.reason)) from None
            with contextlib.closing(answer):
                self._keep_xsrf(answer.headers)
                status = answer.getcode()
                if status >= 300:
                    return status, answer.read(_MAX_ERROR_BODY)
                if on_line is not None:  # (a line at most 64 KiB, the stream _MAX_REST_READ)
                    while not on_line(answer.readline(2**16) or None):
                        pass
                    return status, b""
                if (answer.length or 0) > _MAX_REST_BODY:
                    raise _BadAnswer(f"more than {_MAX_REST_BODY} bytes")
                body = answer.read()
        except http.client.HTTPException as exc:  # (before OSError: RemoteDisconnected is both)
            raise _BadAnswer(str(exc) or type(exc).__name__) from None
        if len(body) > _MAX_REST_BODY:
            raise _BadAnswer(f"more than {_MAX_REST_BODY} bytes")
        return status, body

    def _keep_xsrf(self, headers) -> None:
        """Keep the _xsrf cookie a server hands out (token-less servers check it on changes)."""
        cookies = ", ".join(headers.get_all("Set-Cookie") or ())
        for match in re.finditer(r"(?:^|,)\s*_xsrf=([^;,\s\x00-\x1f\x7f]+)", cookies):
            self._xsrf = match.group(1)

    def _xsrf_cookie(self, deadline: Deadline) -> str | None:
        if self._xsrf is None:
            # jupyter_server sets the cookie even on its 404 login page
            with contextlib.suppress(OSError, _BadAnswer):
                self._fetch("GET", self._base + "login", {}, None, deadline.cut(HTTP_TIMEOUT))
            self._xsrf = self._xsrf or ""
        return self._xsrf or None

    def _http_error(self, status: int, body: bytes, method: str, path: str, *,
                    diagnose: bool = True) -> ServerError:
        detail = error_reason(body)
        if status in (401, 403):
            return self._auth_error(status, detail, method, path, diagnose)
        if status == 424:
            return ServerError(self.url,
                               "is a JupyterHub server that is not running: start it from the "
                               "hub's home page (/hub/home) or with the hub's REST API", status)
        if status == 404:
            return ServerError(self.url, f"has no {path}{detail}", status)
        if status < 400:  # urllib follows the redirects it can
            return ServerError(self.url, f"redirected {method} {path} where it cannot be followed",
                               status)
        return ServerError(self.url, f"answered an error for {method} {path}{detail}", status)

    def _auth_error(self, status: int, detail: str, method: str, path: str,
                    diagnose: bool) -> ServerError:
        """Say which rule refused us: the token, the Host header, the xsrf check, or another one."""
        if not self.token:
            if "xsrf" in detail.lower():
                return AuthError(self.url,
                                 f"rejected the request: its _xsrf cookie check failed{detail}",
                                 status)
            return AuthError(self.url, "requires a token", status, fix="token")
        if diagnose:
            # A refusal does not say why; a plain authenticated GET tells the causes apart.
            try:
                self.request("GET", "api/kernelspecs", deadline=Deadline(SIDE_REQUEST_TIMEOUT),
                             diagnose=False)
                # the token worked there: this request was refused for another reason
                return AuthError(self.url, f"refused {method} {path}{detail}", status)
            except ServerError as exc:
                if exc.status == 424:  # JupyterHub: the user's server is stopped
                    return ServerError(self.url, exc.reason, 424)
            host = urlsplit(self.url).hostname
            if not self.unix_socket and not is_loopback(host):
                # A server that allows only local names refuses a right token too.
                try:
                    self.request("GET", "api/status", deadline=Deadline(SIDE_REQUEST_TIMEOUT),
                                 host="localhost", diagnose=False)
                    return AuthError(self.url,
                                     f"blocked the request because its Host '{host}' is not a "
                                     "local name: connect as localhost, or start the server with "
                                     "--ServerApp.allow_remote_access=True", status)
                except JupyterError:
                    pass
        return AuthError(self.url, "refused the token", status)

    # -- kernels --

    def start_kernel(self, name: str | None, *, env: dict | None = None, path: str | None = None,
                     deadline: Deadline) -> dict:
        body: dict = {"name": name} if name else {}
        # the working directory, relative to the server's root (jupyter_server 2)
        if path is not None:
            body["path"] = session_path(path)
        if env:
            body["env"] = {str(k): str(v) for k, v in env.items()}
        try:
            info = self.request("POST", "api/kernels", body, deadline=deadline)
        # (a server without that kernel spec may just say "Unhandled error")
        except ServerError as exc:
            if name and exc.status in (400, 404, 500) and not isinstance(exc, AuthError):
                raise ServerError(self.url, f"{exc.reason} (kernel {name!r})", exc.status) from None
            raise
        if not isinstance(info, dict) or info.get("id") is None:
            raise ServerError(self.url, "answered a kernel start without a kernel id")
        self._plain_id(info["id"])
        return _kernel_model(info)

    def _plain_id(self, kernel_id: object) -> str:
        """A kernel id from the server: a plain token (servers make UUIDs), else ServerError."""
        if isinstance(kernel_id, str) and re.fullmatch(r"[A-Za-z0-9._~:-]{1,128}", kernel_id):
            return kernel_id
        raise ServerError(self.url, "answered a kernel id that is not a plain token: "
                                    f"{str(kernel_id)[:80]!r}")

    def get_kernel(self, kernel_id: str, *, deadline: Deadline) -> dict:
        info = self.request("GET", f"api/kernels/{quote(kernel_id, safe='')}", deadline=deadline,
                            missing=f"has no kernel {kernel_id}")
        if not isinstance(info, dict):
            raise ServerError(self.url,
                              f"answered kernel {kernel_id} with something that is not a kernel")
        return _kernel_model(info)

    def find_session(self, path: str, *, deadline: Deadline) -> str | None:
        """The kernel id of the session at ``path`` (relative to the server root), or None."""
        wanted = session_path(path)
        for session in self.list_sessions(deadline=deadline):
            if session["kernel"] and session_path(session["path"] or "") == wanted:
                return self._plain_id(session["kernel"].get("id"))
        return None

    def list_sessions(self, *, deadline: Deadline) -> list:
        """The server's sessions, each with ``path`` (a str or None) and ``kernel`` (a dict, maybe
        empty); entries of another shape are skipped."""
        sessions = self.request("GET", "api/sessions", deadline=deadline)
        found = []
        for session in sessions if isinstance(sessions, list) else []:
            if isinstance(session, dict):
                notebook = session.get("notebook")
                notebook = notebook if isinstance(notebook, dict) else {}
                path = session.get("path") or notebook.get("path")
                kernel = session.get("kernel")
                found.append({"path": path if isinstance(path, str) else None,
                              "kernel": kernel if isinstance(kernel, dict) else {}})
        return found

    def create_session(self, path: str, kernel_name: str | None, *, deadline: Deadline) -> str:
        body = {"path": session_path(path), "name": os.path.basename(path),
                "type": "notebook" if path.endswith(".ipynb") else "console",
                "kernel": {"name": kernel_name} if kernel_name else {}}
        info = self.request("POST", "api/sessions", body, deadline=deadline)
        kernel = info.get("kernel") if isinstance(info, dict) else None
        if not isinstance(kernel, dict) or not kernel.get("id"):
            raise ServerError(self.url, "answered a session start without a kernel")
        return self._plain_id(kernel["id"])

    def status(self, *, deadline: Deadline) -> None:
        """``GET api/status``: raises unless the server answers."""
        self.request("GET", "api/status", deadline=deadline)

    def contents(self, path: str, *, deadline: Deadline, content: bool = True) -> dict:
        """The contents API's model of the file at ``path``, with the ``hash`` of its bytes where
        the server keeps hashes (jupyter_server 2.11+; others ignore the question)."""
        model = self.request("GET", f"api/contents/{quote(session_path(path))}?content="
                                    f"{int(content)}&hash=1", deadline=deadline,
                             missing=f"has no file {path}")
        return model if isinstance(model, dict) else {}

    def read_file(self, path: str, *, deadline: Deadline) -> str:
        """A notebook (as JSON text) or a text file at ``path`` in the contents API."""
        model = self.contents(path, deadline=deadline)
        content = model.get("content")
        if model.get("type") == "notebook" and isinstance(content, dict):
            return json.dumps(content)
        if (model.get("type") == "file" and model.get("format") == "text"
                and isinstance(content, str)):
            return content
        raise ServerError(self.url,
                          f"has no notebook or text file at {path} (it is a {model.get('type')})")

    def save_notebook(self, path: str, notebook: dict, *, deadline: Deadline) -> None:
        """Write ``notebook`` (plain JSON) at ``path`` through the contents API."""
        self.request("PUT", f"api/contents/{quote(session_path(path))}",
                     {"type": "notebook", "format": "json", "content": notebook}, deadline=deadline)

    def list_kernels(self, *, deadline: Deadline) -> list:
        """The server's kernels; entries that are not objects with a string id are skipped."""
        kernels = self.request("GET", "api/kernels", deadline=deadline)
        return [_kernel_model(kernel) for kernel in kernels if isinstance(kernel, dict)
                and isinstance(kernel.get("id"), str)] if isinstance(kernels, list) else []

    def interrupt_kernel(self, kernel_id: str, *, deadline: Deadline) -> None:
        self.request("POST", f"api/kernels/{quote(kernel_id, safe='')}/interrupt",
                     deadline=deadline)

    def restart_kernel(self, kernel_id: str, *, deadline: Deadline) -> None:
        self.request("POST", f"api/kernels/{quote(kernel_id, safe='')}/restart", deadline=deadline)

    def delete_kernel(self, kernel_id: str, *, deadline: Deadline) -> None:
        """Delete a kernel; gone already is fine. Retries the 500 a restart race answers."""
        for attempt in range(_DELETE_RETRIES):
            try:
                self.request("DELETE", f"api/kernels/{quote(kernel_id, safe='')}",
                             deadline=deadline)
                return
            except ServerError as exc:
                if exc.status == 404:
                    return
                if (exc.status is None or exc.status < 500 or attempt == _DELETE_RETRIES - 1
                        or deadline.expired):
                    raise
            time.sleep(deadline.remaining(_DELETE_BACKOFF * 2**attempt))


def _kernel_model(info: dict) -> dict:
    """A kernel model from the server: its name, state and last activity None unless strings."""
    return {**info, **{key: None for key in ("name", "execution_state", "last_activity")
                       if not isinstance(info.get(key), str)}}


def session_path(path: str) -> str:
    """A session path as the server keeps it: relative, with forward slashes."""
    path = path.replace("\\", "/").strip()
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


# ---- Jupyter messages and results (no I/O) -------------------------------------------------------

_PROTOCOL_VERSION = "5.3"                      # the message spec version we speak
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
_OUTPUT_TYPES = ("stream", "display_data", "execute_result", "error")
_RATE_LIMIT_MARKERS = ("IOPub data rate exceeded", "IOPub message rate exceeded")
_SEEN_IDS = 10_000  # message ids remembered to drop replays (bounds memory on long cells)
EOF_ANSWER = "\x04"  # sent when scripted stdin runs out: the kernel raises EOFError


def new_id() -> str:
    """A random 128-bit id in hex, as uuid4().hex gives (without importing uuid)."""
    return os.urandom(16).hex()


def new_message(msg_type: str, content: dict, *, session: str, channel: str = "shell",
                parent_header: dict | None = None) -> dict:
    """A Jupyter message in the shape the websocket expects (all keys present)."""
    return {"header": {"msg_id": new_id(), "msg_type": msg_type, "username": "jupyter_call",
                       "session": session, "version": _PROTOCOL_VERSION,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                       "parent_header": parent_header or {}, "metadata": {}, "content": content,
                       "channel": channel, "buffers": [],}


def execute_request(code: str, *, session: str, silent: bool = False, store_history: bool = True,
                    allow_stdin: bool = False, stop_on_error: bool = True) -> dict:
    return new_message("execute_request", {
        "code": code, "silent": silent, "store_history": store_history,
        "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": stop_on_error,
    }, session=session)


def input_reply(value: str, *, session: str, parent_header: dict) -> dict:
    return new_message("input_reply", {"value": value}, session=session, channel="stdin",
                       parent_header=parent_header)


def encode_message(msg: dict, *, protocol: str = "legacy") -> str | bytes:
    """Serialize a message for the websocket: JSON text (legacy) or v1 binary."""
    if protocol == "v1":
        parts = [json.dumps(msg[key]).encode("utf-8")
                 for key in ("header", "parent_header", "metadata", "content")]
        return _pack_v1(msg["channel"], parts + list(msg.get("buffers") or []))
    return json.dumps(msg)


def _pack_v1(channel: str, parts: list) -> bytes:
    """v1 framing: uint64 LE count, uint64 LE offsets, then channel and parts."""
    chunks = [channel.encode("utf-8"), *parts]
    offsets = [8 * (len(chunks) + 2)]
    for chunk in chunks:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(chunks)


def decode_message(data: str | bytes, *, protocol: str = "legacy") -> dict:
    """Parse a websocket message into a message dict; raises ValueError if malformed.

    Every field jupyter_call reads is checked for its type here, where messages
    enter, so that an odd message is a ValueError and never a crash further on.
    """
    if protocol != "v1" and not isinstance(data, str):
        raise ValueError("a legacy message that is not text")
    try:
        msg = _unpack_v1(data) if protocol == "v1" else _loads(data)
    except RecursionError:
        raise ValueError("message nested too deeply") from None
    if not isinstance(msg, dict) or "header" not in msg:
        raise ValueError("message is not an object with a header")
    for key in ("header", "parent_header", "metadata", "content"):
        if not isinstance(msg.setdefault(key, {}), dict):
            raise ValueError(f"message {key} is not an object")
    header, content = msg["header"], msg["content"]
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str):
        raise ValueError("message header has no msg_type")
    read = _CONTENT_TYPES.get(msg_type, ())
    # Only the JSON objects kept (outputs, replies) are ever written back; only they are walked.
    if any(kind is dict for _, kind in read) and not shallow(content):
        raise ValueError(f"{msg_type} message nested deeper than {MAX_JSON_DEPTH} levels")
    fields = [("msg_id", header.get("msg_id"), str),
              ("parent msg_id", msg["parent_header"].get("msg_id"), str)]
    fields += [(key, content.get(key), kind) for key, kind in read]
    transient = content.get("transient")
    if isinstance(transient, dict):
        fields.append(("display_id", transient.get("display_id"), str))
    if isinstance(content.get("data"), dict) and ("data", dict) in read:
        fields += [(mime, value, _MIME_JSON if mime == "application/json" or mime.endswith("+json")
                    else MIME_TEXT) for mime, value in content["data"].items()]
    for name, value, kind in fields:
        if value is not None and not is_kind(value, kind):
            raise ValueError(f"{msg_type} message with a {type(value).__name__} as {name}")
    return msg


MAX_JSON_DEPTH = 200  # deeper JSON from outside is refused: writing it back would recurse too far
_TEXTS = "a list of strings"  # (nbformat's multiline string, and a traceback's lines)
MIME_TEXT = "a string or a list of strings"  # nbformat: every mimebundle value but JSON's
_MIME_JSON = "any JSON"  # application/json and */*+json


def is_kind(value: object, kind: object) -> bool:
    """Whether ``value`` from outside has ``kind``: a type (bool is no int), or a rule above."""
    if kind is _MIME_JSON or kind is MIME_TEXT and isinstance(value, str):
        return True
    if kind is _TEXTS or kind is MIME_TEXT:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def shallow(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``value`` nests at most ``limit`` levels (walked by level, not recursion)."""
    level = [value]
    for _ in range(limit + 1):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return True
    return False


_OUTPUT_FIELDS = (("data", dict), ("metadata", dict), ("transient", dict))
# The content fields read, by message type, and the kinds they must have (None is let through).
# A mimebundle's values are checked too (nbformat's rule), wherever ("data", dict) is read.
_CONTENT_TYPES = {
    "stream": (("name", str), ("text", str)),
    "display_data": _OUTPUT_FIELDS,
    "update_display_data": _OUTPUT_FIELDS,
    "execute_result": (*_OUTPUT_FIELDS, ("execution_count", int)),
    "error": (("ename", str), ("evalue", str), ("traceback", _TEXTS)),
    "execute_reply": (("status", str), ("execution_count", int), ("ename", str), ("evalue", str),
                      ("traceback", _TEXTS)),
    "status": (("execution_state", str),),
    "input_request": (("prompt", str),),
    "kernel_info_reply": (("language_info", dict),),
}


def _unpack_v1(data: str | bytes) -> dict:
    if isinstance(data, str) or len(data) < 8:
        raise ValueError("v1 message is not binary")
    (count,) = struct.unpack_from("<Q", data)
    if count < 6 or 8 * (count + 1) > len(data):
        raise ValueError("v1 message with a bad part count")
    offsets = struct.unpack_from(f"<{count}Q", data, 8)
    if list(offsets) != sorted(offsets) or offsets[-1] > len(data) or offsets[0] < 8 * (count + 1):
        raise ValueError("v1 message with bad offsets")
    part = [data[offsets[i]:offsets[i + 1]] for i in range(count - 1)]
    msg = {"channel": part[0].decode("utf-8"), "buffers": part[5:]}
    for key, raw in zip(("header", "parent_header", "metadata", "content"), part[1:5]):
        msg[key] = _loads(raw.decode("utf-8")) if raw else {}
    return msg


_JSON = json.JSONDecoder()


def _loads(text: str) -> object:
    """json.loads without its per-call overhead, which four small parts a message pay in v1."""
    try:
        value, end = _JSON.raw_decode(text)
    except ValueError:
        return json.loads(text)  # leading whitespace, or json.loads's own error
    if end < len(text) and text[end:].strip(" \t\n\r"):
        raise ValueError(f"extra data after the JSON value (char {end})")
    return value


def _output_from_msg(msg: dict) -> dict | None:
    """The nbformat v4 output dict for an iopub output message, else None."""
    msg_type, content = msg["header"].get("msg_type"), msg["content"]
    if msg_type == "stream":
        return {"output_type": "stream", "name": content.get("name") or "stdout",
                "text": content.get("text") or ""}
    if msg_type in ("display_data", "execute_result"):
        out = {"output_type": msg_type, "data": content.get("data") or {},
               "metadata": content.get("metadata") or {}}
        if msg_type == "execute_result":
            out["execution_count"] = content.get("execution_count")
        return out
    if msg_type == "error":
        return {"output_type": "error", "ename": content.get("ename") or "",
                "evalue": content.get("evalue") or "", "traceback": content.get("traceback") or []}
    return None


ANSI_ESCAPE = r"\x1b\[[0-9;?]*[ -/]*[@-~]"  # compiled by re on first use


def text_form(data: dict) -> str | None:
    """The best text form of a mimebundle: text/plain, then JSON pretty-printed."""
    if "text/plain" in data:
        text = data["text/plain"]
        return "".join(text) if isinstance(text, list) else str(text)
    if "application/json" in data:
        return json.dumps(data["application/json"], indent=2)
    return None


def output_text(out: dict) -> str:
    """An output as text: a stream's, a result's or display's text form, an error's traceback
    (its colours removed); "" for one without text."""
    kind, data, trace = out.get("output_type"), out.get("data"), out.get("traceback")
    if kind == "error":
        trace = "\n".join(map(str, trace)) if isinstance(trace, list) and trace else error_line(out)
        return re.sub(ANSI_ESCAPE, "", trace) + "\n"
    text = (out.get("text") if kind == "stream" else text_form(data) if isinstance(data, dict)
            and kind in ("execute_result", "display_data") else None) or ""
    text = "".join(map(str, text)) if isinstance(text, list) else str(text)  # (nbformat's lines)
    return text if not text or text.endswith("\n") or kind == "stream" else text + "\n"


def clip(text: str, limit: int) -> str:
    """``text``, or its head and tail around a line saying how much was left out."""
    keep = limit // 3
    return text if len(text) <= limit else (f"{text[:limit - keep]}\n[... {len(text) - limit:,} "
                                            f"characters left out ...]\n{text[len(text) - keep:]}")


class Result:
    """What one execution produced (a plain class, as subprocess.CompletedProcess is).

    ``status`` is "ok", "error" or "aborted" (or "incomplete" on the partial result that
    ExecutionTimeout and KernelDied carry when no reply arrived). ``outputs`` are nbformat v4 output
    dicts in arrival order, with ``clear_output`` and ``update_display_data`` applied and adjacent
    stream chunks of one name merged. ``error`` is None or a dict with ``ename``, ``evalue`` and
    ``traceback``. ``truncated`` is True when the server dropped output because of its IOPub rate
    limits.
    """

    def __init__(self, status: str = "incomplete", execution_count: int | None = None,
                 outputs: list | None = None, error: dict | None = None, truncated: bool = False):
        self.status, self.execution_count, self.error = status, execution_count, error
        self.outputs = [] if outputs is None else outputs
        self.truncated = truncated

    def __repr__(self) -> str:
        return (f"Result(status={self.status!r}, execution_count={self.execution_count!r}, outputs="
                f"<{len(self.outputs)}>, error={self.error!r}, truncated={self.truncated!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def stdout(self) -> str:
        return self._stream("stdout")

    @property
    def stderr(self) -> str:
        return self._stream("stderr")

    def _stream(self, name: str) -> str:
        return "".join(o["text"] for o in self.outputs
                       if o["output_type"] == "stream" and o["name"] == name)

    @property
    def data(self) -> dict | None:
        """The execute_result mimebundle (e.g. ``{"text/plain": "2"}``) or None."""
        for out in self.outputs:
            if out["output_type"] == "execute_result":
                return out["data"]
        return None

    def raise_for_error(self) -> None:
        """Raise ExecutionError unless the status is "ok"."""
        if not self.ok:
            raise ExecutionError(self)

    def to_dict(self) -> dict:
        """Every field and property as plain JSON data (what ``--json`` prints)."""
        return {"status": self.status, "ok": self.ok, "execution_count": self.execution_count,
                "stdout": self.stdout, "stderr": self.stderr, "data": self.data,
                "error": self.error, "outputs": self.outputs, "truncated": self.truncated}


class Execution:
    """Follows one execute_request through the messages that answer it (no I/O): ``feed`` takes
    every message; ``done`` once both the execute_reply and the idle status for it are in."""

    def __init__(self, msg_id: str, on_output: Callable[[dict], object] | None = None,
                 keep_outputs: bool = True, displays: dict | None = None):
        self.msg_id = msg_id
        self.on_output = on_output
        self.keep_outputs = keep_outputs  # False: a streaming caller keeps nothing it has seen
        self.reply: dict | None = None
        self.idle = False
        self.died: str | None = None
        self.input_request: dict | None = None
        self.heard = False  # any message answering our request has arrived
        self.result = Result()
        self._seen = collections.OrderedDict()  # recent msg_ids, to drop replays
        # display_id -> the outputs showing it
        self.displays: dict = {} if displays is None else displays
        self._clear_pending = self._shown_error = False  # (_shown_error: an error output came)

    @property
    def done(self) -> bool:
        return self.reply is not None and self.idle

    @property
    def answered(self) -> bool:
        """One of execute_reply and the idle status is in."""
        return self.reply is not None or self.idle

    def feed(self, msg: dict) -> None:
        header = msg["header"]
        msg_id = header.get("msg_id")
        if msg_id:
            if msg_id in self._seen:  # a replay after a reconnect
                return
            self._seen[msg_id] = None
            if len(self._seen) > _SEEN_IDS:
                self._seen.popitem(last=False)
        msg_type = header.get("msg_type")
        content = msg["content"]
        parent = (msg.get("parent_header") or {}).get("msg_id")
        if (msg_type == "status" and not parent
                and content.get("execution_state") in ("restarting", "dead")):
            self.died = f"the server reports it {content['execution_state']}"
            return
        if parent != self.msg_id:
            return  # another client's traffic, or the server's own kernel_info
        self.heard = True
        channel = msg.get("channel")
        if msg_type == "execute_reply" and channel != "iopub":
            self._on_reply(content)
        elif msg_type == "status":
            self.idle = self.idle or content.get("execution_state") == "idle"
        elif msg_type == "input_request":
            self.input_request = msg
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self._clear()
            self._notify({"output_type": "clear_output", "wait": bool(content.get("wait"))})
        elif msg_type == "update_display_data":
            self._update_display(content)
        elif msg_type in _OUTPUT_TYPES:
            self._add_output(msg)

    def _on_reply(self, content: dict) -> None:
        self.reply = content
        res = self.result
        res.status = content.get("status") or "error"
        res.execution_count = content.get("execution_count", res.execution_count)
        if res.status == "error":
            res.error = {"ename": content.get("ename") or "", "evalue": content.get("evalue") or "",
                         "traceback": content.get("traceback") or []}

    def _add_output(self, msg: dict) -> None:
        if self._clear_pending:
            self._clear()
        out = _output_from_msg(msg)
        kind, res = out["output_type"], self.result
        if kind == "stream" and out["name"] == "stderr" and any(m in out["text"]
                                                                for m in _RATE_LIMIT_MARKERS):
            res.truncated = True
        elif kind == "execute_result":
            res.execution_count = out["execution_count"]
        elif kind == "error":
            self._shown_error = True
            res.error = res.error or {k: out[k] for k in ("ename", "evalue", "traceback")}
        if self.keep_outputs:
            self._keep(out, msg)
        self._notify(out)

    def _keep(self, out: dict, msg: dict) -> None:
        outputs = self.result.outputs
        if out["output_type"] == "stream":
            last = outputs[-1] if outputs else None
            if last is not None and last["output_type"] == "stream" and last["name"] == out["name"]:
                # Take the text out of the dict so ours is its only reference: CPython
                # then grows it in place instead of copying it for every chunk.
                text, last["text"] = last["text"], ""
                text += out["text"]
                last["text"] = text
                return
            outputs.append(dict(out))
            return
        outputs.append(out)
        if out["output_type"] == "error":  # only displays are updated by their display id
            return
        display_id = (msg["content"].get("transient") or {}).get("display_id")
        if display_id:  # as nbclient does: every output showing this id shows the latest data
            for earlier in self.displays.get(display_id, ()):
                earlier["data"], earlier["metadata"] = out["data"], out["metadata"]
            self.displays.setdefault(display_id, []).append(out)

    def _update_display(self, content: dict) -> None:
        display_id = (content.get("transient") or {}).get("display_id")
        for out in self.displays.get(display_id, ()):
            out["data"], out["metadata"] = content.get("data") or {}, content.get("metadata") or {}
        self._notify({"output_type": "update_display_data", "display_id": display_id,
                      "data": content.get("data") or {}, "metadata": content.get("metadata") or {}})

    def _clear(self) -> None:
        cleared = {id(out) for out in self.result.outputs}
        for shown in self.displays.values():
            shown[:] = [out for out in shown if id(out) not in cleared]
        self.result.outputs.clear()
        self._clear_pending = False

    def _notify(self, out: dict) -> None:
        if self.on_output is not None:
            self.on_output(out)

    def finish(self) -> Result:
        """The result so far."""
        res = self.result
        if self.reply is None and self.idle and not self.died:
            # idle without a reply (lost with a dropped connection): judge by the outputs
            res.status = "error" if res.error else "ok"
        if self.reply is not None and res.error and not self._shown_error:
            # the reply's error, whose output never came (iopub drops what a kernel says while
            # the server subscribes again after a restart)
            self._add_output({"header": {"msg_type": "error"}, "content": res.error})
        return res


# ---- Server discovery ----------------------------------------------------------------------------

def read_text(path: str, what: str = "") -> str:
    """A small UTF-8 text file (a leading BOM dropped, as Windows editors write one); one that
    cannot be read is a ConfigError naming it (``what``: "--log ", ...)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {what}{path}: it is not UTF-8 text") from None


def _data_dir(platform: str = sys.platform, environ=os.environ) -> str:
    """Jupyter's data dir, by jupyter_core's rules (JUPYTER_PLATFORM_DIRS=1: the platform's own)."""
    if environ.get("JUPYTER_DATA_DIR"):
        return environ["JUPYTER_DATA_DIR"]
    platform_dirs = environ.get("JUPYTER_PLATFORM_DIRS", "").lower() not in (
        "", "no", "n", "false", "off", "0", "0.0")
    home = os.path.expanduser("~")
    if platform == "darwin":
        return os.path.join(home, "Library",
                            *(("Application Support", "jupyter") if platform_dirs
                              else ("Jupyter",)))
    if platform == "win32":
        if platform_dirs:  # the local, not the roaming, application data
            return os.path.join(environ.get("LOCALAPPDATA")
                                or os.path.join(home, "AppData", "Local"), "jupyter")
        return os.path.join(environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming"),
                            "jupyter")
    xdg = environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(xdg, "jupyter")


def _pid_alive(pid: object, platform: str = sys.platform) -> bool:
    if not is_kind(pid, int) or not 0 < pid < 2**31:  # (os.kill overflows past a C int)
        return False
    if platform == "win32":
        return _windows_process_alive(pid)  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, run by another user
    except OSError:
        return False
    return True


def _windows_process_alive(pid: int, kernel32=None) -> bool:
    """Whether process ``pid`` still runs, as Windows says (a dead server's file must not win)."""
    import ctypes
    kernel32 = kernel32 or ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return getattr(ctypes, "get_last_error", int)() == 5  # ERROR_ACCESS_DENIED: another user's
    try:
        code = ctypes.c_ulong()
        failed = not kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return not failed and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


DEFAULT_URL = "http://localhost:8888/"  # where `jupyter server` listens by default
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]", "*")


def _server_url(info: dict) -> str:
    """A URL to reach a server described by a runtime file; wildcards mean loopback."""
    base = ("/" + (info.get("base_url") or "/").strip("/") + "/").replace("//", "/")
    if info.get("sock"):
        return f"http+unix://{quote(info['sock'], safe='')}{base}"
    host = info.get("hostname") or info.get("ip") or "localhost"
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if info.get("secure") else "http"
    return f"{scheme}://{host}:{info.get('port')}{base}"


# The fields of a runtime file that are read, and their JSON types. A file with a field of another
# type is not a server's and is skipped, but for the fields that are only shown, which are dropped.
_RUNTIME_FIELDS = {"hostname": str, "ip": str, "port": int, "sock": str, "base_url": str,
                   "secure": bool,
                   "token": str, "pid": int, "root_dir": str, "notebook_dir": str, "version": str}
_SHOWN_FIELDS = ("root_dir", "notebook_dir", "version")


def _runtime_info(info: object) -> dict | None:
    """A runtime file's JSON with each field read of its type, or None when it is not a server's."""
    if not isinstance(info, dict):
        return None
    wrong = [key for key, kind in _RUNTIME_FIELDS.items() if info.get(key) is not None
             and not is_kind(info[key], kind)]
    if any(key not in _SHOWN_FIELDS for key in wrong) or not 0 <= (info.get("port") or 0) < 65536:
        return None
    if CONTROL_CHARS.search((info.get("token") or "").strip()):
        return None
    info = {key: value for key, value in info.items() if key not in wrong}
    info.setdefault("root_dir", info.get("notebook_dir"))
    return info


def list_servers(runtime_dir: str | None = None) -> list:
    """Running Jupyter servers, most recently started first.

    Reads ``jpserver-*.json`` (jupyter_server) and ``nbserver-*.json``
    (notebook 6) in the Jupyter runtime dir (``$JUPYTER_RUNTIME_DIR``, else the
    data dir + ``/runtime``). Skips unreadable files and servers whose process
    is gone. Each entry is the file's dict with ``url`` set to a reachable URL.
    """
    folder = (runtime_dir or os.environ.get("JUPYTER_RUNTIME_DIR")
              or os.path.join(_data_dir(), "runtime"))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith(("jpserver-", "nbserver-")) and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        try:
            info = _runtime_info(json.loads(read_text(path)))
            mtime = os.path.getmtime(path)
            if info is None or not (info.get("port")
                                    or info.get("sock")) or not _pid_alive(info.get("pid")):
                continue
            info["url"] = _normalize_url(_server_url(info))[0]  # a host making no URL: ConfigError
        except (OSError, ValueError, RecursionError):
            continue  # unreadable, or not the shape a server writes
        found.append((mtime, info))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [info for _, info in found]


# The schemes a server URL may have, and what REST speaks for each (the websocket follows).
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https",
            "http+unix": "http+unix"}


def _normalize_url(url: str) -> tuple[str, str | None]:
    """The base URL (scheme, trailing slash, no query) and a ``?token=`` it carried.

    URLs copied from Jupyter's log carry the token in the query; it moves to the Authorization
    header and never appears in a URL or a message. A wildcard host (0.0.0.0, ::) means loopback.
    """
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (checks it)
    except ValueError as exc:
        raise ConfigError(f"the server URL is malformed ({exc})") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigError(f"the server URL's scheme {parts.scheme[:20]!r} is not one of "
                          f"{', '.join(_SCHEMES)}")
    if not (parts.netloc if scheme == "http+unix" else parts.hostname):
        raise ConfigError("the server URL names no host")
    token = None
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if key == "token" and value:
            token = unquote(value)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.hostname in ("0.0.0.0", "::") and parts.port:
        netloc = f"127.0.0.1:{parts.port}"
    path = parts.path
    if token is not None:  # a link from Jupyter's log points into the UI: /lab, /tree, /notebooks
        path = re.sub(r"/(lab|tree|notebooks)(/.*)?$", "/", path)
    # a request line is ASCII: the rest is percent-encoded
    path = quote(path if path.endswith("/") else path + "/", safe="/%:@!$&'()*+,;=~")
    return f"{scheme}://{netloc}{path}", token


def _env_token() -> str | None:
    if os.environ.get("JUPYTER_TOKEN", "").strip():
        return os.environ["JUPYTER_TOKEN"]
    if os.environ.get("JUPYTER_TOKEN_FILE"):
        return read_text(os.environ["JUPYTER_TOKEN_FILE"], "JUPYTER_TOKEN_FILE ")
    # inside a JupyterHub single-user server
    return os.environ.get("JUPYTERHUB_API_TOKEN") or None


def resolve_server(url: str | None = None,
                   token: str | None = None) -> tuple[str, str, str | None]:
    """The server URL and token to use, from the arguments, then the environment, then the
    runtime files of running servers (discovery), and the server's root folder on this machine
    when its runtime file says (else None).

    The token is "" when there is none to send; passed back in, it asks nothing more.
    """
    if url is None:
        url = os.environ.get("JUPYTER_URL") or os.environ.get("JUPYTERHUB_SERVICE_URL") or None
    if token is None:
        token = _env_token()
    servers = list_servers()
    if url is None:
        found = servers[0] if servers else {"url": DEFAULT_URL}
        url = found["url"]
    else:
        wanted = _normalize_url(url)[0]  # (a runtime file's URL is normalized: see list_servers)
        found = next((info for info in servers if same_origin(info["url"], wanted)
                      and urlsplit(info["url"]).path == urlsplit(wanted).path), {})
    url, url_token = _normalize_url(url)
    if token is None:
        token = url_token if url_token is not None else found.get("token") or ""
    # Sent without surrounding whitespace (the newline a file or secret ends with); a control
    # character left is refused, and never shown.
    token = str(token).strip()
    if CONTROL_CHARS.search(token):
        raise ConfigError("the token holds a control character (CR, LF, NUL, ...); nothing was "
                          "sent")
    return url, token, found.get("root_dir")


# ---- JupyterHub: a user's server, started and stopped on demand ---------------------------------
#
# A hub serves a user's server at <prefix>/user/NAME/[SERVER/], its REST API at <prefix>/hub/api/.
# A stopped server answers 424; a POST asks the hub to start it, and the start's progress comes as
# an event stream whose last event is marked ready or failed.

_HUB_START_TIMEOUT = 600.0  # a start's limit when the call has none (KubeSpawner gives up at 300)


def _hub_server(url: str, token: str | None, ssl_context: object) -> tuple[RestClient, str]:
    """The hub's REST client and the API path of the user's server at ``url``."""
    parts = urlsplit(url)
    found = re.fullmatch(r"(.*/)user/([^/]+)/(?:([^/]+)/)?", parts.path)
    if found is None:
        raise ConfigError(f"{url} is not a JupyterHub user's server (.../user/NAME/), which "
                          "the hub could start")
    prefix, name, server = found.groups()
    hub = RestClient(f"{parts.scheme}://{parts.netloc}{prefix}hub/", token,
                     ssl_context=ssl_context)
    return hub, f"api/users/{name}/" + (f"servers/{server}" if server else "server")


def _start_hub_server(url: str, token: str | None, *, user_options: dict | None = None,
                     timeout: float | None = None, ssl_context: object = None,
                     on_progress=None) -> bool:
    """Have JupyterHub start the user's server at ``url`` (``user_options`` for its spawner) and
    wait until it is ready, ``on_progress(message)`` seeing each step. False if it ran already; a
    failed start is a ServerError with the hub's message, a token without the scope an AuthError."""
    deadline = Deadline(_HUB_START_TIMEOUT if timeout is None else timeout)
    hub, path = _hub_server(url, token, ssl_context)
    if on_progress is not None:
        on_progress("asking the hub to start the server")
    try:  # (the body is the options: JupyterHub reads it so before 5.0 and still does)
        hub.request("POST", path, user_options or {}, deadline=deadline, diagnose=False)
    except ServerError as exc:
        if exc.status == 400 and "already running" in exc.reason:
            return False
        if exc.status == 403:
            user = unquote(path.split("/")[2])
            raise AuthError(url, "could not be started: the token lacks the scope servers!user="
                            f"{user} (start:servers!user={user} on JupyterHub 5+); make a token "
                            f"with it on the hub's token page, {hub.url}token", 403) from None
        if exc.status is None or exc.status < 500:
            raise  # (a start that fails at once answers 500; the progress stream says why)
    last: dict = {}

    def on_line(line: bytes | None) -> bool:
        event = None
        with contextlib.suppress(ValueError, RecursionError):
            event = json.loads(line[5:]) if line and line.startswith(b"data:") else None
        if isinstance(event, dict):
            last.update(event)
            if on_progress is not None and isinstance(event.get("message"), str):
                on_progress(re.sub(r"[\x00-\x1f\x7f]", " ", event["message"])[:300])
        return line is None or bool(last.get("ready") or last.get("failed"))

    hub.request("GET", path + "/progress", deadline=deadline, diagnose=False, on_line=on_line)
    if not last.get("ready") or last.get("failed"):
        why = last.get("message") if last.get("failed") else "its progress stream ended early"
        raise ServerError(url, f"could not be started by the hub: {str(why)[:300]}")
    return True


def start_if_stopped(url: str, token: str | None, user_options: dict | None,
                     deadline: Deadline, ssl_context: object = None, on_progress=None) -> bool:
    """Start the hub user's server at ``url`` if it answers that it is not running; if it did."""
    try:
        RestClient(url, token, ssl_context=ssl_context).status(
            deadline=deadline.cut(SIDE_REQUEST_TIMEOUT))
        return False
    except ServerError as exc:
        if exc.status != 424:
            return False  # (what else is wrong, the call itself will say)
    return _start_hub_server(url, token, user_options=user_options, timeout=deadline.remaining(),
                            ssl_context=ssl_context, on_progress=on_progress)


def stop_hub_server(url: str, token: str | None, *, timeout: float | None = None,
                    ssl_context: object = None) -> None:
    """Ask JupyterHub to stop the user's server at ``url`` (one not running is fine)."""
    hub, path = _hub_server(url, token, ssl_context)
    try:
        hub.request("DELETE", path, deadline=Deadline(timeout), diagnose=False)
    except ServerError as exc:
        if exc.status not in (400, 404):
            raise


# ---- Public API: Kernel, run_code ----------------------------------------------------------------

# Strategy. While code runs, four clocks tick: the caller's deadline (the only one the caller sets);
# the completion grace (once one of execute_reply and the idle status is in, _COMPLETION_GRACE of
# silence ends the wait for the other, which a dropped connection may have lost; silence, since a
# server that lags behind the kernel still streams output after the reply); the silence check (after
# _SILENCE_CHECK without a message, ask REST whether the kernel lives: a dead one says nothing); the
# status tick of a waiting caller's hook. A dropped websocket is reopened with the same session id,
# so the server replays what it buffered: _RECONNECTS_PER_CALL drops a call, _CONNECT_TRIES attempts
# each; a request sent into a dying connection is sent again once the kernel idles without having
# heard it. After a timeout, Ctrl-C or a failure, cleanup runs outside the caller's budget, as
# subprocess.run kills and reaps after its timeout, on one small budget of its own, CLEANUP_TIMEOUT:
# interrupt, settle, close the websocket, delete a kernel we started (_DELETE_RESERVE is kept for
# that), and delete a kernel whose start was answered too late.
_COMPLETION_GRACE = 3.0     # silence that ends the wait for the second of reply and idle
CLEANUP_TIMEOUT = 6.0      # interrupt, settle, close and delete, all told (in the README)
_DELETE_RESERVE = 2.5       # of that budget, kept for the DELETE
_SILENCE_CHECK = 10.0       # with no message for this long, ask the server if the kernel lives
_STATUS_TICK = 0.5          # how often a waiting caller's on_wait hook runs
_RECONNECTS_PER_CALL = 5    # websocket drops survived during one call
_CONNECT_TRIES = 5          # attempts to reopen the websocket after one drop
_RECONNECT_BACKOFF = 0.1    # first pause between attempts; doubles, up to _RECONNECT_BACKOFF_MAX
_RECONNECT_BACKOFF_MAX = 2.0
_NUDGE_INTERVAL = 0.5       # resend kernel_info_request this often while a kernel starts


class Kernel(contextlib.AbstractContextManager):
    """A kernel on a Jupyter server, with one open websocket to it.

    ``Kernel(url, token)`` starts a kernel (``name`` picks the kernel spec) and deletes it on
    ``close()``; ``Kernel(url, token, kernel_id=ID)`` attaches to a running kernel and never deletes
    it. Use it as a context manager. State persists across ``execute`` calls.

    Args:
        url: the server's base URL; None uses $JUPYTER_URL, the most recent running server, then
            http://localhost:8888/.
        token: the server's token; None uses $JUPYTER_TOKEN, $JUPYTER_TOKEN_FILE, or the token of
            the discovered server.
        kernel_id: attach to this running kernel instead of starting one.
        name: the kernel spec to start (the server's default when None).
        env: environment variables for a kernel it starts (gateways pass ``KERNEL_*`` ones on to
            their launchers).
        session: use the kernel of the server session at this path (as JupyterLab's consoles and
            notebooks do), creating the session if there is none; the kernel outlives this object.
        notebook: use the kernel of this open notebook (a path relative to the server's root),
            sharing the state its user sees.
        path: start the kernel in this directory (relative to the server's root; jupyter_server 2
            and its gateways honour it, Notebook 6 does not).
        timeout: seconds for starting and connecting, and the default for each ``execute`` (None: no
            limit); the ``timeout`` attribute may be changed later.
        ssl_context: an ``ssl.SSLContext`` for https servers with a private CA.
        protocol: "auto" (offer the v1 binary protocol, fall back to legacy), "v1" or "legacy".
        start_server: have the hub start a stopped JupyterHub user's server first (with
            ``user_options`` for its spawner), in ``timeout``; ``started_server`` says if it did.
    Raises:
        ServerError (AuthError for a refused token; also when starting or
        connecting runs out of time), WebSocketError, JupyterError (an
        unreadable $JUPYTER_TOKEN_FILE), ValueError (an unknown ``protocol``).
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 kernel_id: str | None = None, name: str | None = None,
                 timeout: float | None = None, env: dict | None = None,
                 session: str | None = None, notebook: str | None = None, path: str | None = None,
                 ssl_context: object = None, protocol: str = "auto", start_server: bool = False,
                 user_options: dict | None = None):
        if protocol not in ("auto", "v1", "legacy"):
            raise ValueError(f"protocol must be 'auto', 'v1' or 'legacy', not {protocol!r}")
        self.url, token, _ = resolve_server(url, token)
        self.timeout = timeout
        self.session_id = new_id()
        self.protocol = protocol
        self._rest = RestClient(self.url, token, ssl_context=ssl_context)
        self._ws: WebSocket | None = None
        self._owned = False
        self._cleanup: Deadline | None = None  # the cleanup budget, once cleanup has begun
        self._ahead: dict = {}  # msg_id of a request sent ahead -> its messages that came early
        self.id: str | None = None
        deadline = Deadline(timeout)
        try:
            self.started_server = start_server and start_if_stopped(
                self.url, token, user_options, deadline, ssl_context)
            if notebook:
                kernel_id = self._rest.find_session(notebook, deadline=deadline)
                if kernel_id is None:
                    raise ServerError(self.url, f"has no open notebook {notebook}", 404,
                                      fix="notebook")
            elif session:
                kernel_id = (self._rest.find_session(session, deadline=deadline)
                             or self._rest.create_session(session, name, deadline=deadline))
            if kernel_id:
                # No REST call: the websocket handshake answers 404 for an unknown
                # kernel, and attaching stays one round trip.
                self.id, self._name = kernel_id, None
            else:
                info = self._start(name, env, path, deadline)
                self._owned = True
                self.id, self._name = info["id"], info.get("name")
            try:
                self._connect(deadline)
            except ServerError as exc:
                if exc.status == 404:
                    raise ServerError(self.url, f"has no kernel {self.id}", 404) from None
                raise
        except BaseException:
            self.close()
            raise

    def _start(self, name: str | None, env: dict | None, path: str | None,
               deadline: Deadline) -> dict:
        """Start a kernel; one whose start is answered after ``deadline`` is deleted, not left."""
        late = Deadline(None if deadline.timeout is None else deadline.remaining()
                        + CLEANUP_TIMEOUT)
        info = None
        try:
            info = self._rest.start_kernel(name, env=env, path=path, deadline=late)
        except ServerError as exc:
            if exc.status is not None or not deadline.expired:
                raise
        if deadline.expired:
            if info is not None:
                with contextlib.suppress(JupyterError):
                    self._rest.delete_kernel(info["id"], deadline=late)
            raise ServerError(self.url, f"did not start a kernel within "
                                        f"{duration(deadline.timeout)}")
        return info

    def __repr__(self) -> str:
        return f"<Kernel {self.id} at {self.url}>"

    @property
    def name(self) -> str | None:
        """The kernel spec name (asked of the server when attached by id)."""
        if self._name is None and self.id:
            self._name = self._rest.get_kernel(self.id, deadline=Deadline(self.timeout)).get("name")
        return self._name

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except JupyterError:
            if exc_type is None:
                raise  # else the error that ended the block matters more than the cleanup's

    # -- connection --

    def _connect(self, deadline: Deadline) -> None:
        self._ws = self._rest.websocket(f"api/kernels/{quote(self.id, safe='')}/channels"
                                        f"?session_id={self.session_id}", deadline,
                                        [] if self.protocol == "legacy" else [V1_SUBPROTOCOL])
        if self.protocol == "v1" and self._ws.subprotocol != V1_SUBPROTOCOL:
            self._ws.close()
            raise ServerError(self.url, "does not speak the v1 kernel websocket protocol",
                              fix="protocol")
        self._wire = "v1" if self._ws.subprotocol == V1_SUBPROTOCOL else "legacy"

    def _reconnect(self, deadline: Deadline) -> None:
        """Reopen the websocket with the same session, so the server replays what we missed."""
        if self._ws is not None:
            self._ws.abort()
        last: BaseException | None = None
        for attempt in range(_CONNECT_TRIES):
            if attempt:
                time.sleep(min(_RECONNECT_BACKOFF * 2**attempt, _RECONNECT_BACKOFF_MAX,
                               deadline.remaining(_RECONNECT_BACKOFF_MAX) or 0))
            try:
                self._connect(deadline)
                return
            except (ServerError, WebSocketError) as exc:
                self._if_gone(exc)
                last = exc
        raise last  # type: ignore[misc]

    def _send(self, msg: dict, deadline: Deadline) -> None:
        self._ws.send(encode_message(msg, protocol=self._wire),
                      timeout=deadline.remaining(HTTP_TIMEOUT))

    def _next_message(self, timeout: float | None, run: Execution | None = None) -> dict | None:
        """The next kernel message, or None if ``timeout`` passes first: the one receive path.

        A message of a request sent ahead (``_send_ahead``), but ``run``'s own, is kept in
        ``_ahead`` for its turn and not returned. Raises WebSocketClosed when the connection
        drops, ServerError for a message that is not a kernel message.
        """
        deadline = Deadline(timeout)
        while True:
            try:
                raw = self._ws.recv(timeout=deadline.remaining())
            except TimeoutError:
                return None
            if self._wire == "legacy" and not isinstance(raw, str):
                continue  # (there only comm messages with buffers are binary: widgets, not ours)
            try:
                msg = decode_message(raw, protocol=self._wire)
            except (ValueError, UnicodeDecodeError, KeyError) as exc:
                raise ServerError(self.url, f"sent a malformed kernel message ({exc})") from None
            parent = msg["parent_header"].get("msg_id")
            if parent in self._ahead and (run is None or parent != run.msg_id):
                self._ahead[parent].append(msg)
                continue
            return msg

    # -- execution --

    def execute(self, code: str, *, timeout: float | None = None,
                on_output: Callable[[dict], object] | None = None,
                stdin: Iterable[str] | Callable[[str, bool], str] | None = None,
                silent: bool = False, store_history: bool = True,
                keep_outputs: bool = True) -> Result:
        """Run ``code`` and return its Result once the kernel is done with it.

        Args:
            code: the source to run.
            timeout: seconds (default: the Kernel's timeout; None: no limit). On expiry the kernel
                is interrupted and ExecutionTimeout raised.
            on_output: called with each output dict as it arrives (stream chunks, display data,
                results, errors; also ``clear_output`` and ``update_display_data`` events).
            stdin: answers for ``input()``: a list/iterable of strings, or a callable ``(prompt,
                password) -> str``. Without it, ``input()`` raises in the kernel at once.
            silent, store_history: as in the Jupyter execute_request.
            keep_outputs: False keeps no outputs in the Result (``on_output`` saw them), so memory
                stays bounded however much the code prints.
        Returns:
            the Result; its ``status`` may be "error": see ``raise_for_error``.
        Raises:
            ExecutionTimeout (with the partial ``.result``), KernelDied,
            ServerError, WebSocketError, JupyterError (the Kernel is closed).
            On Ctrl-C the kernel is interrupted and KeyboardInterrupt re-raised.
        """
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        return self._execute(code, deadline, on_output=on_output, stdin=stdin, silent=silent,
                             store_history=store_history, keep_outputs=keep_outputs)

    def _execute(self, code: str, deadline: Deadline, *, on_output=None, stdin=None,
                 silent: bool = False, store_history: bool = True, keep_outputs: bool = True,
                 on_wait=None, stop_on_error: bool = True, displays: dict | None = None,
                 sent: dict | None = None, outputs: list | None = None) -> Result:
        """``execute`` within a deadline shared with other steps of a call. A friend of the
        notebooks section (``execute_notebook``), as ``_send_ahead`` is.

        ``keep_outputs=False`` keeps no output in the Result (a streaming caller
        has seen them); ``on_wait(quiet, elapsed)`` runs every _STATUS_TICK;
        ``displays`` (display_id -> outputs) is shared by the cells of a notebook;
        ``sent`` is a request that ``_send_ahead`` sent already (``code`` unused); ``outputs``
        is the list the Result fills as outputs come (a notebook cell's: seen as they come).
        """
        if self._ws is None:
            raise JupyterError("the kernel is closed")
        self._cleanup = None
        answer = _stdin_answerer(stdin)
        request = sent or self._send_ahead(code, deadline, silent=silent,
                                           store_history=store_history,
                                           allow_stdin=answer is not None,
                                           stop_on_error=stop_on_error)
        run = Execution(request["header"]["msg_id"], on_output, keep_outputs=keep_outputs,
                        displays=displays)
        run.result.outputs = run.result.outputs if outputs is None else outputs
        try:
            for msg in self._ahead.pop(run.msg_id, ()):  # what arrived while earlier cells ran
                run.feed(msg)
                self._serve_input(run, answer, deadline)
            self._wait(run, deadline, answer, on_wait, request)
        except ExecutionTimeout as exc:
            self._interrupt_and_settle(run)
            exc.result = run.finish()
            raise
        except KeyboardInterrupt:
            self._interrupt_and_settle(run)
            raise
        except KernelDied as exc:
            exc.result = run.finish()
            raise
        except JupyterError:
            self._interrupt_and_settle(run, settle=False)  # the connection or server misbehaved
            raise
        except Exception:
            if not run.done:  # e.g. on_output raised: stop the cell, leave the kernel usable
                self._interrupt_and_settle(run)
            raise
        return run.finish()

    def _send_ahead(self, code: str, deadline: Deadline, **options) -> dict:
        """Send an execute_request now, to be waited for later by ``_execute(sent=...)``; the kernel
        queues it, so a notebook's cells run back to back instead of a round trip apart."""
        request = execute_request(code, session=self.session_id, **options)
        self._ahead[request["header"]["msg_id"]] = []
        try:
            self._send(request, deadline)
        except WebSocketClosed:  # the idle connection dropped since the last call
            self._reconnect(deadline)
            self._send(request, deadline)
        return request

    def _wait(self, run: Execution, deadline: Deadline, answer, on_wait,
              request: dict | None) -> None:
        """Feed ``run`` until it is done, under the clocks of the Strategy above."""
        drops = 0
        started = quiet_since = time.monotonic()
        while not run.done:
            if deadline.expired:
                raise ExecutionTimeout(deadline.timeout)
            wait = deadline.remaining(_STATUS_TICK if on_wait else _SILENCE_CHECK)
            if run.answered:
                wait = min(wait, max(0.0, quiet_since + _COMPLETION_GRACE - time.monotonic()))
            try:
                msg = self._next_message(wait, run)
            except WebSocketClosed:
                drops += 1
                if drops > _RECONNECTS_PER_CALL:
                    raise
                try:
                    self._reconnect(deadline)
                except (ServerError, WebSocketError):
                    if deadline.expired:  # the time ran out while reconnecting
                        raise ExecutionTimeout(deadline.timeout) from None
                    raise
                continue
            now = time.monotonic()
            if msg is not None:
                quiet_since = now
                run.feed(msg)
                if run.died:
                    raise KernelDied(self.id, run.died)
                self._serve_input(run, answer, deadline)
                continue
            if deadline.expired:
                raise ExecutionTimeout(deadline.timeout)
            if on_wait is not None:
                on_wait(now - quiet_since, now - started)
            ending = run.answered and now >= quiet_since + _COMPLETION_GRACE
            if ending or now - quiet_since >= _SILENCE_CHECK:
                state = self._check_alive(deadline)
                quiet_since = time.monotonic()
                if drops and not run.heard and state == "idle" and request is not None:
                    # it went into a dying connection and never arrived
                    self._send(request, deadline)
                    request = None
            if ending:
                return  # one of reply/idle never came; what arrived is the result

    def _serve_input(self, run: Execution, answer, deadline: Deadline) -> None:
        """Answer the kernel's input_request, if one came (EOF without an ``answer``)."""
        if run.input_request is None:
            return
        request, run.input_request = run.input_request, None
        content = request["content"]
        value = answer(content.get("prompt", ""),
                       bool(content.get("password"))) if answer else EOF_ANSWER
        self._send(input_reply(value, session=self.session_id, parent_header=request["header"]),
                   deadline)

    def _check_alive(self, deadline: Deadline) -> str | None:
        """Ask the server about the kernel: raise KernelDied if gone; else its state."""
        try:
            info = self._rest.get_kernel(self.id, deadline=deadline.cut(HTTP_TIMEOUT))
        except ServerError as exc:
            self._if_gone(exc)
            return None  # the server is busy or unreachable; the websocket will tell
        if info.get("execution_state") == "dead":
            raise KernelDied(self.id, "the server reports it dead")
        return info.get("execution_state")

    def _if_gone(self, exc: JupyterError) -> None:
        """A 404 for the kernel, once it ran: it is gone (KernelDied)."""
        if isinstance(exc, ServerError) and exc.status == 404:
            raise KernelDied(self.id, "the server no longer has the kernel") from None

    def _interrupt_and_settle(self, run: Execution, *, settle: bool = True) -> None:
        """Interrupt the kernel; with ``settle``, wait (bounded) for the cell to unwind.

        The kernel aborts requests that arrive while it still unwinds, so the
        next execute would fail if we returned at once.
        """
        budget = self._cleanup = self._cleanup or Deadline(CLEANUP_TIMEOUT)
        # best effort: the caller is leaving with an error
        with contextlib.suppress(JupyterError, OSError):
            left = max(0.0, budget.remaining() - _DELETE_RESERVE)
            self._rest.interrupt_kernel(self.id, deadline=Deadline(left))
            until = Deadline(max(0.0, budget.remaining() - _DELETE_RESERVE) if settle else 0.0)
            while not run.done and not run.died and not until.expired:
                msg = self._next_message(until.remaining(), run)
                if msg is None:
                    break
                run.feed(msg)
                self._serve_input(run, None, until)

    # -- control --

    def interrupt(self) -> None:
        """Send SIGINT to the kernel (through the server)."""
        self._rest.interrupt_kernel(self.id, deadline=Deadline(self.timeout))

    def restart(self) -> None:
        """Restart the kernel and wait until it answers: its state is lost; the connection stays."""
        deadline = Deadline(self.timeout if self.timeout is not None else HANDSHAKE_TIMEOUT)
        self._rest.restart_kernel(self.id, deadline=deadline)
        # A kernel's iopub messages before the server's subscription is in place are lost, so the
        # first output after a (re)start could go missing: wait until one reaches us.
        self._kernel_info(deadline, "iopub")

    def info(self, *, timeout: float | None = None) -> dict:
        """The kernel_info reply (``language_info``, ``banner``, ...) within ``timeout``."""
        return self._kernel_info(Deadline(timeout if timeout is not None else self.timeout))

    def _kernel_info(self, deadline: Deadline, channel: str = "shell") -> dict:
        """Ask kernel_info until a message answering it comes on ``channel`` (its reply, or on
        iopub the sign that iopub reaches us); asked again every _NUDGE_INTERVAL on iopub, where
        answers can be lost, and after _SILENCE_CHECK on shell, once the kernel is known alive."""
        if self._ws is None:
            raise JupyterError("the kernel is closed")
        asked: set = set()
        while True:
            request = new_message("kernel_info_request", {}, session=self.session_id)
            asked.add(request["header"]["msg_id"])
            self._send(request, deadline)
            again = deadline.cut(_NUDGE_INTERVAL if channel == "iopub" else _SILENCE_CHECK)
            while not again.expired:
                msg = self._next_message(again.remaining())
                if msg is None:
                    break
                if msg.get("channel") == channel and msg["parent_header"].get("msg_id") in asked:
                    return msg["content"]
            if deadline.expired:
                raise ServerError(self.url, f"kernel {self.id} did not answer within "
                                            f"{duration(deadline.timeout)}")
            if channel == "shell":
                self._check_alive(deadline)

    def detach(self) -> None:
        """Leave the kernel running after ``close()``, as an attached one is (``.id`` names it)."""
        self._owned = False

    def drop(self) -> None:
        """Let go of the connection at once (no close handshake); the kernel keeps running."""
        self._owned = False
        ws, self._ws = self._ws, None
        self._ahead.clear()
        if ws is not None:
            ws.abort("dropped")

    @property
    def owned(self) -> bool:
        """Whether this object started the kernel, and so deletes it on ``close()``."""
        return self._owned

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (``close()`` or ``drop()``); the kernel may run on."""
        return self._ws is None

    def close(self) -> None:
        """Close the connection, and delete the kernel if this object started it.

        Takes at most CLEANUP_TIMEOUT seconds (after a timeout or Ctrl-C, the
        rest of the budget its interrupt began).
        """
        budget = self._cleanup if self._cleanup is not None and not self._cleanup.expired else None
        budget, self._cleanup = budget or Deadline(CLEANUP_TIMEOUT), None
        ws, self._ws = self._ws, None
        self._ahead.clear()
        try:
            if ws is not None:
                ws.close_timeout = min(ws.close_timeout,
                                       max(0.0, budget.remaining() - _DELETE_RESERVE))
                with contextlib.suppress(Exception):
                    ws.close()
        finally:
            if self._owned and self.id:
                self._owned = False
                self._rest.delete_kernel(self.id, deadline=budget)


def _stdin_answerer(stdin) -> Callable[[str, bool], str] | None:
    """Turn the ``stdin`` argument into ``(prompt, password) -> answer`` or None."""
    if stdin is None:
        return None
    if callable(stdin):
        return stdin
    if isinstance(stdin, str):
        stdin = stdin.splitlines()
    answers = iter(stdin)
    return lambda prompt, password: next(answers, EOF_ANSWER)


def run_code(code: str, url: str | None = None, token: str | None = None, *,
             kernel_id: str | None = None, kernel_name: str | None = None,
             timeout: float | None = None,
             stdin: Iterable[str] | Callable[[str, bool], str] | None = None,
             on_output: Callable[[dict], object] | None = None, start_server: bool = False,
             user_options: dict | None = None) -> Result:
    """Run ``code`` on a Jupyter kernel and return its Result.

    Starts a kernel (``kernel_name`` picks the spec) or attaches to
    ``kernel_id``, runs the code, and deletes a kernel it started on every path.
    ``timeout`` covers the whole call: connecting, starting and running. See
    ``Kernel`` for ``url``/``token`` defaults, ``start_server`` and ``user_options``, and
    ``Kernel.execute`` for the rest.

    Raises:
        ServerError, AuthError, KernelDied, ExecutionTimeout, WebSocketError.
        An error raised by the code is not raised: check ``result.ok`` or call
        ``result.raise_for_error()``.
    """
    deadline = Deadline(timeout)  # one budget for the whole call
    with Kernel(url, token, kernel_id=kernel_id, name=kernel_name, timeout=timeout,
                start_server=start_server, user_options=user_options) as kernel:
        return kernel._execute(code, deadline, on_output=on_output, stdin=stdin)


# ---- Notebooks -----------------------------------------------------------------------------------
#
# A notebook runs as nbclient runs it (cell by cell on one kernel, display ids
# spanning the notebook) and takes parameters as papermill does.

_SKIP_TAG = "skip-execution"      # nbclient: the cell is not run; its stored outputs stay
_PIPELINE_DEPTH = 16              # cells sent ahead of the one waited for (the kernel queues them)
_RAISES_TAG = "raises-exception"  # nbclient: the cell may fail and the run goes on
_PARAMETERS_TAG = "parameters"    # papermill: parameters are injected after this cell
_INJECTED_TAG = "injected-parameters"
_PERCENT_CELL = re.compile(r"^# %%(.*)$", re.M)  # a cell marker of the '# %%' (percent) format


def _cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _cell_tags(cell: dict) -> list:
    tags = (cell.get("metadata") or {}).get("tags")
    return tags if isinstance(tags, list) else []


def new_cell(kind: str, source: str, tags: list | None = None) -> dict:
    cell = {"cell_type": kind, "id": new_id()[:8], "metadata": {"tags": tags} if tags else {},
            "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


SERVER_PREFIX = "server:"  # a notebook path in the server's contents API, relative to its root


def load_notebook(path: str, rest: RestClient, deadline: Deadline,
                  root: str | None = None) -> tuple[dict, str | None]:
    """The notebook at ``path`` (a local .ipynb or '# %%' .py file, or ``server:PATH``) and the
    folder, relative to the server's root, its kernel should start in (None: the server's)."""
    if path.startswith(SERVER_PREFIX):
        where = path[len(SERVER_PREFIX):]
        return notebook_from(rest.read_file(where, deadline=deadline), where), \
            posixpath.dirname(session_path(where)) or None
    return notebook_from(read_text(path), path), _kernel_dir(path, root)


def notebook_from(text: str, path: str | None = None) -> dict:
    """An nbformat 4 notebook from a file's text: .ipynb, '# %%' cells (.py), else one cell."""
    suffix = (path or "").lower().rpartition(".")[2]
    if suffix == "ipynb":
        try:
            notebook = json.loads(text)
            if not _is_notebook(notebook):
                raise ValueError("not the shape of a notebook")
        except (ValueError, RecursionError):
            raise ConfigError(f"{path} is not a Jupyter notebook (nbformat 4 JSON)") from None
        return _upgrade_notebook(notebook)
    cells = []
    if suffix == "py" and _PERCENT_CELL.search(text):
        parts = _PERCENT_CELL.split(text)  # [before, marker, body, marker, body, ...]
        if parts[0].strip():
            cells.append(new_cell("code", parts[0]))
        for marker, body in zip(parts[1::2], parts[2::2]):
            kind = "markdown" if "[markdown]" in marker else "raw" if "[raw]" in marker else "code"
            tags = re.search(r"tags=(\[.*?\])", marker)
            try:
                tags = [str(t) for t in json.loads(tags.group(1))] if tags else None
            except ValueError:
                tags = None
            if kind != "code":  # their lines are comments: '# text'
                body = re.sub(r"^# ?", "", body.strip("\n"), flags=re.M)
            cells.append(new_cell(kind, body.lstrip("\n"), tags))
    else:
        cells.append(new_cell("code", text))
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _upgrade_notebook(notebook: dict) -> dict:
    """``notebook`` as nbformat 4.5, as papermill upgrades it on load: every cell gets an id
    (4.4 and older have none, and refuse one), so whatever is written validates as 4.5. The ids
    given are the cells' places ("cell-3"): reading a notebook twice gives the same ids."""
    notebook["nbformat"], notebook["nbformat_minor"] = 4, max(notebook.get("nbformat_minor", 5), 5)
    used: set = set()
    for number, cell in enumerate(notebook["cells"]):
        if not is_kind(cell.get("id"), str) or cell["id"] in used:  # (none, or a broken one)
            cell["id"] = next(i for i in (f"cell-{number}", new_id()[:8]) if i not in used)
        used.add(cell["id"])
    return notebook


def _is_notebook(notebook: object) -> bool:
    """Whether JSON has the parts of a notebook that running and writing it use, of their types
    (those nbformat's schema gives them), and nests no deeper than can be written back."""
    if not (isinstance(notebook, dict) and isinstance(notebook.get("cells"), list)
            and shallow(notebook)):
        return False
    meta = notebook.get("metadata", {})
    return (isinstance(meta, dict) and is_kind(notebook.get("nbformat_minor", 0), int)
            and all(is_kind(meta.get(key, {}), dict)
                    for key in ("kernelspec", "language_info", "papermill"))
            and all(is_kind(part.get(key, ""), str) for part, key in (
                (meta.get("kernelspec", {}), "name"), (meta.get("kernelspec", {}), "language"),
                (meta.get("language_info", {}), "name")))
            and all(isinstance(c, dict) and isinstance(c.get("metadata", {}), dict)
                    and is_kind(c.get("source", ""), MIME_TEXT) for c in notebook["cells"]))


def _python_literal(value: object) -> str:
    """``value`` in Python source, written exactly as papermill's Python translator writes it."""
    if value is None or isinstance(value, int):  # (bools too)
        return str(value)
    if isinstance(value, float):
        if value - value == 0:
            return str(value)
        return ("float('nan')" if value != value else "float('inf')" if value > 0
                else "float('-inf')")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(str(k))}: {_python_literal(v)}" for k,
                               v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    escaped = str(value).encode("unicode_escape").decode("utf-8").replace('"', r'\"')
    return f'"{escaped}"'


def parameter_value(text: str) -> object:
    """A ``-p`` value as papermill reads it: True, False, None, an int, a float, else text."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _inject_parameters(notebook: dict, parameters: dict) -> None:
    """Put papermill's parameters cell in ``notebook``: after the first cell tagged 'parameters'
    (at the top without one), or in place of a cell injected before. They are written as Python,
    so a notebook in another language is refused (ConfigError)."""
    meta = notebook.get("metadata") or {}
    language = ((meta.get("kernelspec") or {}).get("language")
                or (meta.get("language_info") or {}).get("name") or "python")
    if language.lower() != "python":
        raise ConfigError("parameters are written as Python (as papermill writes them); this "
                          f"notebook's language is {language}")
    if not shallow(parameters):
        raise ConfigError(f"parameters nest deeper than {MAX_JSON_DEPTH} levels")
    cell = new_cell("code", "# Parameters\n" + "".join(f"{name} = {_python_literal(value)}\n"
                                                       for name, value in parameters.items()),
                                                       [_INJECTED_TAG])
    cells = notebook["cells"]
    tagged = [[i for i, c in enumerate(cells) if tag in _cell_tags(c)]
              for tag in (_INJECTED_TAG, _PARAMETERS_TAG)]
    if tagged[0]:
        cells[tagged[0][0]] = cell
    else:
        cells.insert(tagged[1][0] + 1 if tagged[1] else 0, cell)
    notebook.setdefault("metadata", {}).setdefault("papermill", {})["parameters"] = parameters


def _kernel_dir(path: str, root: str | None) -> str | None:
    """The directory of the local file ``path`` relative to the server's ``root`` folder (as
    ``resolve_server`` finds it), when the file lies inside it; else None."""
    if not root:
        return None
    try:
        where = os.path.relpath(os.path.dirname(os.path.realpath(path)), os.path.realpath(root))
    except ValueError:  # Windows: on another drive
        return None
    if where == "." or where == os.pardir or where.startswith(os.pardir + os.sep):
        return None
    return where.replace(os.sep, "/")


def kernel_for(notebook: dict, parameters: dict | None,
               kernel_name: str | None = None) -> str | None:
    """Ready a loaded notebook to run (parameters injected); the kernel spec to start for it:
    ``kernel_name``, else the notebook's, else None (the server's default). Every front end
    runs a notebook through this and ``execute_notebook``; they only choose where output goes."""
    if parameters:
        _inject_parameters(notebook, parameters)
    return kernel_name or ((notebook.get("metadata") or {}).get("kernelspec") or {}).get("name")


def execute_notebook(kernel: Kernel, notebook: dict, deadline: Deadline, *,
                     keep_going: bool = False, cell_timeout: float | None = None, on_cell=None,
                     language_info: bool = True, **execute):
    """Run the code cells in order, as nbclient does, writing outputs and counts into them, and
    yield ``(cell, result)`` as each ends (also for the cell that ends the run by an exception,
    before it propagates).

    Empty cells and cells tagged 'skip-execution' are left as they are; the others lose their old
    outputs before the run starts. A cell that fails without a 'raises-exception' tag ends the run
    unless ``keep_going``. ``on_cell(number, total)`` hears which code cell starts; ``execute``
    goes to ``Kernel._execute`` (``stdin``, ``on_output``, ``keep_outputs``, ``on_wait``).
    ``metadata.language_info`` comes from the kernel unless ``language_info`` is false (a notebook
    nobody will see).
    """
    if language_info:
        notebook.setdefault("metadata", {})["language_info"] = kernel.info(
            timeout=deadline.remaining(HTTP_TIMEOUT)).get("language_info", {})
    code = [cell for cell in notebook["cells"] if cell.get("cell_type") == "code"]
    queue = [(number, cell) for number, cell in enumerate(code, 1)
             if _cell_source(cell).strip() and _SKIP_TAG not in _cell_tags(cell)]
    for _, cell in queue:
        cell["outputs"], cell["execution_count"] = [], None
    displays, sent = {}, {}

    def may_fail(cell: dict) -> bool:  # (and the run goes on)
        return keep_going or _RAISES_TAG in _cell_tags(cell)

    for position, (number, cell) in enumerate(queue):
        allowed = may_fail(cell)
        # keep the kernel's queue full (not with a cell's clock: it would start in the queue)
        if not cell_timeout:
            for _, ahead in queue[len(sent):position + _PIPELINE_DEPTH]:
                sent[id(ahead)] = kernel._send_ahead(_cell_source(ahead), deadline,
                                                     stop_on_error=not may_fail(ahead),
                                                     allow_stdin=execute.get("stdin") is not None)
        if on_cell is not None:
            on_cell(number, len(code))
        limit = deadline.cut(cell_timeout) if cell_timeout else deadline
        try:
            result = kernel._execute(_cell_source(cell), limit, stop_on_error=not allowed,
                                     displays=displays, sent=sent.get(id(cell)),
                                     outputs=cell["outputs"], **execute)
        except (ExecutionTimeout, KernelDied) as exc:
            result = exc.result or Result()
            if not isinstance(exc, ExecutionTimeout) or not cell_timeout or deadline.expired:
                cell["outputs"], cell["execution_count"] = result.outputs, result.execution_count
                yield cell, result
                raise
            # the cell's own limit ran out: an error of that cell, as in nbclient
            if result.error is None:
                result.error = {"ename": "CellTimeoutError", "traceback": [], "evalue":
                                f"the cell did not finish within {duration(cell_timeout)}"}
                result.outputs.append({"output_type": "error", **result.error})
            result.status = "error"
        cell["outputs"], cell["execution_count"] = result.outputs, result.execution_count
        yield cell, result
        if not result.ok and not allowed:
            return


def failures(ran: list) -> list:
    """The results in ``ran`` (cell, result pairs) that failed, but in 'raises-exception' cells."""
    return [result for cell, result in ran
            if not result.ok and _RAISES_TAG not in _cell_tags(cell)]


def run_notebook(notebook: str | dict, url: str | None = None, token: str | None = None, *,
                 parameters: dict | None = None, keep_going: bool = False,
                 cell_timeout: float | None = None,
                 timeout: float | None = None, kernel_name: str | None = None,
                 start_server: bool = False, user_options: dict | None = None) -> dict:
    """Run a notebook on a new kernel, as nbclient and papermill do; return the executed one.

    Args:
        notebook: a path (.ipynb, a .py file of '# %%' cells, or ``server:PATH`` in the server's
            contents API) or a notebook dict (not changed).
        url, token: the server, as for ``Kernel``.
        parameters: injected as papermill injects them (after the cell tagged 'parameters').
        keep_going: run every cell even after one fails (nbclient's allow_errors).
        cell_timeout: seconds for each cell; a cell that runs longer is interrupted and is an error.
        timeout: seconds for the whole run, kernel start included.
        kernel_name: the kernel spec (default: the notebook's, else the server's).
        start_server, user_options: as for ``Kernel`` (a stopped JupyterHub server is started).
    Returns:
        the executed notebook: outputs and execution counts filled in, ``metadata.language_info``
        from the kernel, ``metadata.papermill.parameters`` when there were parameters.
    Raises:
        ExecutionError unless ``keep_going``: ``.result`` is the failing cell's, ``.notebook``
        the notebook as far as it ran; otherwise as ``Kernel``.
    """
    deadline = Deadline(timeout)
    url, token, root = resolve_server(url, token)
    if start_server:
        start_if_stopped(url, token, user_options, deadline)
    where = None
    if isinstance(notebook, dict):
        if not _is_notebook(notebook):
            raise ConfigError("the notebook given is not the shape of a notebook (nbformat 4)")
        notebook = _upgrade_notebook(json.loads(json.dumps(notebook)))  # a deep, plain JSON copy
    else:
        notebook, where = load_notebook(notebook, RestClient(url, token), deadline, root)
    name = kernel_for(notebook, parameters, kernel_name)
    with Kernel(url, token, name=name, timeout=deadline.remaining(), path=where) as kernel:
        failed = failures(list(execute_notebook(kernel, notebook, deadline, keep_going=keep_going,
                                                cell_timeout=cell_timeout)))
    if failed and not keep_going:
        error = ExecutionError(failed[0])
        error.notebook = notebook  # what ran, up to the failing cell
        raise error
    return notebook


# A person's JupyterLab on a server with jupyter-collaboration shows the notebook's shared document.
# The server saves it to the file a second after typing stops, and merges the file into it when the
# file changes (by cell id: unchanged cells keep their identity), reverting keystrokes not saved
# yet: so a write waits for the quiet of the notebook's room.
MAX_OUTPUT = 20_000  # characters of outputs as text in an answer (--max-output for --mcp)
ROOM_QUIET = 1.5     # no update in the room this long: the person's last keystrokes are saved
ROOM_WAIT = 30.0     # a write that must land waits at most this long for the quiet, then goes on
LIVE_EVERY = 2.0     # outputs of the cells being run are written at most this often
_EDITS = {"insert": ("cell_type", "source", "after", "before"), "delete": ("id",),
          "replace": ("id", "source", "cell_type"), "move": ("id", "after", "before")}
_EDIT_SHAPES = ("{op: insert, source, cell_type?, after? or before?: id}, {op: replace, id, "
                "source?, cell_type?}, {op: delete, id}, {op: move, id, after? or before?} "
                "(strings; cell_type code, markdown or raw)")


def _revision(model: dict) -> str:
    """A contents model's revision: the hash of its bytes, where the server gives one."""
    return str(model.get("hash") or model.get("last_modified"))


class LiveNotebook(contextlib.AbstractContextManager):
    """A notebook on the server, changed in place through the contents API, cells by id. ``live``:
    the server runs jupyter-collaboration; with ``listen`` it then joins the notebook's room, sends
    nothing, and writes only once the room has been quiet for ROOM_QUIET (until the with ends)."""

    def __init__(self, rest: RestClient, path: str, deadline: Deadline, *, listen: bool = False):
        self.rest, self.path, self._ws, self._heard = rest, session_path(path), None, -1e300
        self.notebook, self.revision = self.read(deadline)  # (a room is joined for a file only)
        try:
            room = rest.request("PUT", f"api/collaboration/session/{quote(self.path, safe='')}",
                                {"format": "json", "type": "notebook"},
                                deadline=deadline.cut(HTTP_TIMEOUT), diagnose=False)
        except ServerError as exc:
            if exc.status != 404:  # (404: no collaboration on this server)
                raise
            room = None
        self.live = isinstance(room, dict) and all(is_kind(room.get(key), str)
                                                   for key in ("fileId", "sessionId"))
        if self.live and listen:
            self._ws = rest.websocket("api/collaboration/room/json:notebook:"
                                      f"{quote(room['fileId'])}?sessionId="
                                      f"{quote(room['sessionId'])}", deadline)
            daemon(self._listen, self._ws)

    def _listen(self, ws: WebSocket) -> None:
        with contextlib.suppress(JupyterError, OSError):
            while True:
                if ws.recv()[:2] == b"\x00\x02":  # y-protocols: a sync message, a document update
                    self._heard = time.monotonic()
        self._heard = -1e300  # (the room is gone: writes go ahead, as without one)

    def __exit__(self, *exc_info) -> None:
        if self._ws is not None:
            self._ws.abort("done")  # (its listening thread ends with it)

    def read(self, deadline: Deadline) -> tuple[dict, str]:
        """The notebook as the server has it (an id on every cell), and its revision."""
        model = self.rest.contents(self.path, deadline=deadline.cut(HTTP_TIMEOUT))
        if model.get("type") != "notebook" or not _is_notebook(model.get("content")):
            raise ServerError(self.rest.url, f"has no notebook at {self.path}")
        return _upgrade_notebook(model["content"]), _revision(model)

    def write(self, change, deadline: Deadline, wait: float = ROOM_WAIT, *,
              revision: str | None = None) -> object:
        """Save ``change(notebook)`` of the notebook as it is then (unless no longer ``revision``),
        once the room is quiet, after ``wait`` seconds at most (0: now or not at all: None);
        what ``change`` returned."""
        give_up = time.monotonic() + deadline.remaining(wait)
        while True:
            asked = time.monotonic()
            if self._heard + ROOM_QUIET > asked:  # (the room is not quiet)
                if not wait:
                    return None
                if asked < give_up:
                    time.sleep(min(self._heard + ROOM_QUIET, give_up) - asked)
                    continue
            notebook, now = self.read(deadline)
            if revision is not None and now != revision:
                raise JupyterError("the notebook changed since you read it: read it again")
            changed = change(notebook)
            if self._heard < asked or wait and time.monotonic() >= give_up:  # (else: typed)
                self.rest.save_notebook(self.path, notebook, deadline=deadline.cut(HTTP_TIMEOUT))
                self.notebook = notebook
                return changed

    def cells(self, ids: list | str | None) -> list:
        """The cells ``ids`` names (None, "all": all) in order; ConfigError for an id not there."""
        ids = None if ids == "all" else ids
        known = {cell["id"] for cell in self.notebook["cells"]}
        unknown = [i for i in ids or () if not is_kind(i, str) or i not in known]
        if unknown:
            raise ConfigError(f"the notebook has no cell {str(unknown[0])[:80]!r}")
        return [cell for cell in self.notebook["cells"] if ids is None or cell["id"] in ids]

    def run(self, kernel: Kernel, ids: list | str, deadline: Deadline, *, on_output=None,
            on_wait=None, on_cell=None, **options):
        """Run code cells ``ids`` ("all") as execute_notebook does (``on_cell(n, total, cell)``),
        their outputs written as they come (every LIVE_EVERY s at most, in quiet) and at the end."""
        chosen = [cell for cell in self.cells(ids) if cell.get("cell_type") == "code"]
        ours, wrote = {cell["id"]: cell for cell in chosen}, [time.monotonic()]

        def change(notebook: dict) -> bool:  # (only the cells run: the person's edits stay)
            for cell in (cell for cell in notebook["cells"] if cell["id"] in ours):
                cell.update({key: ours[cell["id"]][key] for key in ("outputs", "execution_count")})
            return True

        def then(hook, *args) -> None:
            if hook is not None:
                hook(*args)
            with contextlib.suppress(JupyterError):  # (not now, then at the next or at the end)
                if time.monotonic() - wrote[0] >= LIVE_EVERY and self.write(change, deadline, 0):
                    wrote[0] = time.monotonic()

        options.update(language_info=False, keep_outputs=True)
        try:
            yield from execute_notebook(
                kernel, {"cells": chosen}, deadline, on_output=functools.partial(then, on_output),
                on_wait=functools.partial(then, on_wait), **options,
                on_cell=on_cell and (lambda n, total: on_cell(n, total, chosen[n - 1])))
        finally:
            self.write(change, Deadline(ROOM_WAIT + HTTP_TIMEOUT))


def _apply_edits(cells: list, edits: list) -> list:
    """Apply edit_notebook's ``edits`` to ``cells`` in order; the ids of the cells inserted.
    ConfigError names a malformed edit or an unknown id."""
    inserted: list = []

    def at(edit: dict, key: str) -> int:
        found = [i for i, cell in enumerate(cells) if cell["id"] == edit[key]]
        if not found:
            raise ConfigError(f"edit {number}: the notebook has no cell {edit[key][:80]!r}")
        return found[0]

    for number, edit in enumerate(edits, 1):
        op = edit.get("op") if isinstance(edit, dict) else None
        fields = _EDITS.get(op, ()) if isinstance(op, str) else ()
        given = {key for key, value in edit.items() if isinstance(value, str)} - {"op"}
        if (not fields or len(given) < len(edit) - 1 or not given <= set(fields)
                or "id" in fields and "id" not in given or op == "insert" and "source" not in given
                or {"after", "before"} <= given
                or edit.get("cell_type", "code") not in ("code", "markdown", "raw")):
            raise ConfigError(f"edit {number} is none of {_EDIT_SHAPES}")
        if op == "replace":  # (a new cell of the same id: a code cell's outputs are gone)
            old = cells[at(edit, "id")]
            cells[cells.index(old)] = {**new_cell(edit.get("cell_type", old.get("cell_type")),
                                                  edit.get("source", _cell_source(old))),
                                       "id": old["id"], "metadata": old.get("metadata", {})}
            continue
        cell = (new_cell(edit.get("cell_type", "code"), edit["source"]) if op == "insert"
                else cells.pop(at(edit, "id")))
        inserted += [cell["id"]] if op == "insert" else []
        if op != "delete":
            cells.insert(at(edit, "after") + 1 if "after" in edit else at(edit, "before")
                         if "before" in edit else len(cells), cell)
    return inserted


def read_notebook(path: str, url: str | None = None, token: str | None = None, *,
                  cells: list | None = None, outputs: str = "text", max_output: int = MAX_OUTPUT,
                  timeout: float | None = None, ssl_context: object = None) -> dict:
    """The notebook at ``path`` on the server (from its root) as a person's JupyterLab shows it:
    ``{"path", "revision" (for edit_notebook), "live" (the server runs jupyter-collaboration: a
    person who has it open sees changes as they land), "kernel"? (its session's), "cells"}``; each
    cell (all, or those ``cells`` names) with ``id``, ``cell_type``, ``source``,
    ``execution_count`` and unless ``outputs`` is "none" its ``outputs``: as text, at most
    ``max_output`` characters, or "full", as nbformat has them. ConfigError for an unknown id."""
    deadline = Deadline(timeout)
    rest = RestClient(*resolve_server(url, token)[:2], ssl_context=ssl_context)
    with LiveNotebook(rest, path, deadline) as notebook:
        kernel = rest.find_session(notebook.path, deadline=deadline.cut(HTTP_TIMEOUT))
        found = []
        for cell in notebook.cells(cells):
            count = cell.get("execution_count")
            found.append({"id": cell["id"], "cell_type": str(cell.get("cell_type")),
                          "source": _cell_source(cell),
                          "execution_count": count if is_kind(count, int) else None})
            outs = [out for out in cell.get("outputs") or () if isinstance(out, dict)]
            if cell.get("cell_type") == "code" and outputs != "none":
                found[-1]["outputs"] = (outs if outputs == "full" else
                                        clip("".join(map(output_text, outs)), max_output))
        return {"path": notebook.path, "revision": notebook.revision, "live": notebook.live,
                **({"kernel": kernel} if kernel else {}), "cells": found}


def edit_notebook(path: str, edits: list, url: str | None = None, token: str | None = None, *,
                  revision: str | None = None, timeout: float | None = None,
                  ssl_context: object = None) -> dict:
    """Apply ``edits`` in order, all or none, to the notebook at ``path`` on the server, in place
    (where a person may type in it, after their pause); ``{"revision", "ids"}`` (of the cells
    inserted). An edit: ``{"op": "insert", "source", "cell_type"?, "after"? or "before"?: ID}``,
    ``{"op": "replace", "id", "source"?, "cell_type"?}`` (outputs cleared), ``{"op": "delete",
    "id"}``, ``{"op": "move", "id", "after"? or "before"?}``. A notebook without ids gets them
    (nbformat 4.5). A ``revision`` not the notebook's now is refused (JupyterError); a malformed
    edit or an unknown id is a ConfigError; then nothing is written."""
    deadline = Deadline(timeout)
    rest = RestClient(*resolve_server(url, token)[:2], ssl_context=ssl_context)
    with LiveNotebook(rest, path, deadline, listen=True) as notebook:
        ids = notebook.write(lambda notebook: _apply_edits(notebook["cells"], edits), deadline,
                             revision=revision)
        model = notebook.rest.contents(notebook.path, deadline=deadline, content=False)
    return {"revision": _revision(model), "ids": ids}


def run_cells(path: str, cells: list | str = "all", url: str | None = None,
              token: str | None = None, *, timeout: float | None = None,
              keep_going: bool = False, on_output=None, ssl_context: object = None) -> list:
    """Run code cells (ids, or "all") of the notebook at ``path`` on the server in notebook order
    in its own session kernel (started if it has none), their outputs written into it as they
    come; their Results. A failing cell stops the rest unless ``keep_going``."""
    deadline = Deadline(timeout)
    rest = RestClient(*resolve_server(url, token)[:2], ssl_context=ssl_context)
    with LiveNotebook(rest, path, deadline, listen=True) as notebook:
        notebook.cells(cells)  # (an unknown id, before a kernel starts)
        with Kernel(rest.url, rest.token, session=notebook.path, timeout=deadline.remaining(),
                    name=kernel_for(notebook.notebook, None)) as kernel:
            return [result for _, result in notebook.run(kernel, cells, deadline,
                                                         keep_going=keep_going,
                                                         on_output=on_output)]


# ---- Front ends: what the command line and the MCP server share ----------------------------------

# FIXES, in the command line's words.
_CLI_FIXES = {
    "token": "set JUPYTER_TOKEN or pass --token",
    "tls": "pass --cafile or set SSL_CERT_FILE for a private CA, or --insecure",
    "tls-context": "the --cafile given did not sign its certificate; pass the CA that did, or "
                   "--insecure",
    "tls-store": ("this Python has no CA certificates: on macOS run 'Install Certificates.command' "
                  "in the Python folder, or set SSL_CERT_FILE; --cafile for a private CA"),
    "tls-strict": ("Python 3.13+ checks certificates strictly: reissue the certificate or its CA "
                   "with what is named, or pass --insecure"),
    "notebook": "open it in JupyterLab first, or use --session",
    "protocol": "use --protocol legacy",
}


def error_text(exc: JupyterError) -> str:
    """An error's message, a ServerError's remedy in the command line's words."""
    return exc.describe(_CLI_FIXES) if isinstance(exc, ServerError) else str(exc)


def human_size(n: int) -> str:
    return (f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1024**2
            else f"{n / 1024**2:.1f} MB")


def write_notebook(path: str, notebook: dict, remote: RestClient | None = None,
                   deadline: Deadline | None = None) -> None:
    """Write a notebook to a local file, replaced whole (never half written), or server:PATH."""
    if path.startswith(SERVER_PREFIX):
        remote.save_notebook(path[len(SERVER_PREFIX):], notebook,
                             deadline=deadline.cut(HTTP_TIMEOUT))
        return
    part = f"{path}.{os.getpid()}.part"
    try:
        with open(part, "w", encoding="utf-8") as f:
            f.write(_notebook_text(notebook))
        os.replace(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(part)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def _notebook_text(notebook: dict) -> str:
    """A notebook file's text, as nbformat writes it; a lone surrogate stays escaped."""
    text = strict_json(notebook, indent=1, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = strict_json(notebook, indent=1)
    return text + "\n"


# ---- Model Context Protocol server (--mcp) -------------------------------------------------------
#
# `jupyter_call.py --mcp` gives an AI agent's host (Claude Code, Claude Desktop, VS Code,
# any MCP client) tools to run code on Jupyter kernels. The transport is stdio: JSON-RPC
# 2.0, one message per line in UTF-8; stdout carries protocol messages and nothing else,
# logs go to stderr, and stdin closing ends the process once its kernels are deleted.
# Two eras of the specification are served, in the era its client speaks first:
#   - the handshake era, revisions 2024-11-05 to 2025-11-25 (basic/lifecycle): `initialize`
#     picks the version, then `notifications/initialized`, `ping`, `tools/*`;
#   - revision 2026-07-28 (basic/versioning, basic/index): no handshake; every request names
#     its version in `_meta`; `server/discover`; every result has `resultType` and the
#     server's info in `_meta`; list results have the caching hints `ttlMs` and `cacheScope`.
# Requests run concurrently: each call in a thread; the cells of run_code on one kernel one after
# another, in a lane (a thread while it has work); the reading thread answers the rest. A run_code
# call waits for its cell at most `wait` seconds; a cell that runs on is a _Run, kept in _Runs
# until get_execution returns its final status (or 10 minutes after it ends).

_MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
_MCP_STATELESS_VERSIONS = ("2026-07-28",)
_MCP_VERSIONS = _MCP_STATELESS_VERSIONS + _MCP_HANDSHAKE_VERSIONS
_MCP_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"  # in a 2026-07-28 request's _meta
_MCP_SERVER_KEY = "io.modelcontextprotocol/serverInfo"        # in a 2026-07-28 result's _meta
_MCP_TOOLS_TTL_MS = 3_600_000  # the tools do not change while the process runs
_MAX_MCP_LINE = 64 * 2**20     # bound on one incoming message
_MCP_PROGRESS_EVERY = 2.0      # seconds between progress notifications (at most 5, as promised)
MCP_MAX_IMAGE_BYTES = 1_000_000  # an image inlined at most (--max-image-bytes)
_MCP_MAX_IMAGES = 10           # images inlined in one result at most
_MCP_START_TIMEOUT = HTTP_TIMEOUT  # starting or attaching a kernel (gateways can take 40 s+)
MCP_WAIT = 45.0               # run_code waits this long for a cell (--wait): hosts give a call 60 s
_MCP_KEEP_ENDED = 600.0        # an execution not collected is dropped this long after it ends
# Hosts close stdin, send SIGTERM 2 s later and SIGKILL at 4 s (the official SDKs and the
# Inspector): the kernels this process started are deleted in parallel within this budget.
_MCP_CLEANUP = 2.5
_MCP_DELETE_RESERVE = 1.0  # of which kept for the deletes, when kernels are still starting

_PARSE_ERROR, _INVALID_REQUEST, _METHOD_NOT_FOUND, _INVALID_PARAMS = -32700, -32600, -32601, -32602
_UNSUPPORTED_VERSION = -32022  # revision 2026-07-28, basic/versioning

_MCP_INSTRUCTIONS = (
    "Runs code on Jupyter kernels. run_code without a kernel uses one default kernel that keeps "
    "its state between calls, like a notebook: define things once, then use them. Output comes "
    "back as text and images; very long output is cut in the middle. Use a timeout for code that "
    "may run long; interrupt_kernel stops a runaway cell, restart_kernel clears all state. A cell "
    "that outlasts run_code's wait keeps running: its status is running, and get_execution with "
    "its execution id returns what follows.")


_KERNEL_ID = "^[A-Za-z0-9_~:-][A-Za-z0-9._~:-]{0,127}$"  # a plain token, as servers make kernel ids


def _schema(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_KERNEL_ARG = {"type": "string", "pattern": _KERNEL_ID,
               "description": "A kernel id (from list_kernels or start_kernel). Default: the "
                              "default kernel."}
_KERNEL_PROPERTY = {"kernel": {**_KERNEL_ARG, "description": "The kernel id."}}
_STATUS = {"type": "string", "enum": ["ok", "error", "aborted", "timeout"]}


def _nullable(kind: str) -> dict:
    # (anyOf, not "type": [kind, "null"], which hosts with a one-type schema dialect refuse)
    return {"anyOf": [{"type": kind}, {"type": "null"}]}


_WAIT_ARG = {"type": "number", "minimum": 0, "description": "Seconds this call waits for the cell "
             "to end (default 45; 0: return at once). A cell still running keeps running."}
_TIMEOUT_ARG = {"type": "number", "exclusiveMinimum": 0,
                "description": "Seconds before the kernel is interrupted."}
_IDS = {"type": "array", "items": {"type": "string"}, "description": "Cell ids."}
_RUN_OUTPUT = _schema({"status": {**_STATUS, "enum": ["running", *_STATUS["enum"]]},
                       "execution": {"type": "string"}, "kernel": {"type": "string"},
                       "execution_count": _nullable("integer"), "truncated": {"type": "boolean"}},
                      ("status", "execution_count", "truncated"))

_MCP_TOOLS: dict = {}  # name -> (declaration, method), in tools/list order; _tool fills it


def _tool(name: str, title: str, description: str, properties: dict, required: tuple = (), *,
          output: dict | None = None, read_only: bool = False, destructive: bool = False,
          idempotent: bool = False):
    """Make the method below the body of MCP tool ``name``, declared by the rest: its schema
    stands beside it, and tools/list gives the tools in the order they are defined."""
    declaration = {"name": name, "title": title, "description": description,
                   "inputSchema": _schema(properties, required),
                   **({"outputSchema": output} if output else {}),
                   "annotations": {"title": title, "readOnlyHint": read_only,
                                   "destructiveHint": destructive, "idempotentHint": idempotent,
                                   "openWorldHint": False}}

    def register(method):
        _MCP_TOOLS[name] = (declaration, method)
        return method
    return register


class _ToolError(Exception):
    """A tool call that cannot be done: its text is the result's, with isError set."""


_JSON_TYPES = {"null": type(None), "boolean": bool, "integer": int, "number": (int, float),
               "string": str, "array": list, "object": dict}


def _json_type(value: object) -> str:
    return next((kind for kind, types in _JSON_TYPES.items() if is_kind(value, types)),
                type(value).__name__)


def _check_arguments(schema: dict, args: object) -> str | None:
    """What is wrong with ``args`` for an input schema of _MCP_TOOLS, or None."""
    if not isinstance(args, dict):
        return "the arguments must be an object"
    properties = schema["properties"]
    for name in schema["required"]:
        if name not in args:
            return f"argument '{name}' is required"
    for name, value in args.items():
        rule = properties.get(name)
        if rule is None:
            takes = ", ".join(properties) or "nothing"
            return f"unknown argument '{name}' (this tool takes: {takes})"
        branches = rule.get("anyOf", [rule])
        if not any(is_kind(value, _JSON_TYPES[branch["type"]])
                   and value in branch.get("enum", [value]) for branch in branches):
            kinds = " or ".join(" or ".join(map(json.dumps, branch["enum"])) if "enum" in branch
                                else branch["type"] for branch in branches)
            return f"argument '{name}' must be {kinds}, not {_json_type(value)}"
        if "pattern" in rule and isinstance(value, str) and not re.search(rule["pattern"], value):
            return f"argument '{name}' is not a kernel id: {value[:80]!r}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in rule and value < rule["minimum"] or "exclusiveMinimum" in rule and not (
                    value > rule["exclusiveMinimum"] and value < float("inf")):
                return (f"argument '{name}' must be a positive number" if "exclusiveMinimum" in rule
                        else f"argument '{name}' must be at least {rule['minimum']}")
    return None


class _ToolContent:
    """A cell's outputs as MCP content blocks, collected as they arrive, in bounded memory.

    In order: text for streams, results' and displays' text forms and tracebacks (ANSI
    colours removed); image blocks for PNG and JPEG up to ``max_image_bytes`` each, at most
    _MCP_MAX_IMAGES of them. Text over ``max_output`` characters keeps its head and tail
    around one line saying how much was left out; with ``output_dir``, the whole text and
    the images left out are saved there, and the line says where.
    """

    def __init__(self, max_output: int = MAX_OUTPUT, max_image_bytes: int = MCP_MAX_IMAGE_BYTES,
                 output_dir: str | None = None):
        self.max_output, self.max_image_bytes = max_output, max_image_bytes
        self.output_dir = output_dir
        self.missing = False  # an output is not in the content: cut, saved or described
        self._spill = None    # with output_dir: every character of text, in case it does not fit
        self._clear()

    def _clear(self) -> None:
        self._parts: list = []        # str for text, dict for an image block, while the text fits
        self._head: str | None = None  # once it does not: its first two thirds of the budget...
        self._tail = ""               # ...and the last third
        self._total = 0               # characters of text
        self._images = 0
        self._clear_pending = False
        if self._spill is not None:
            self._spill[0].seek(0)
            self._spill[0].truncate()

    def add(self, out: dict) -> None:
        """Take one output as ``Kernel.execute``'s ``on_output`` gets it."""
        kind = out.get("output_type")
        if kind == "clear_output":  # (wait: at the next output)
            self._clear_pending = True
            if not out.get("wait"):
                self._clear()
            return
        if kind == "update_display_data":
            return  # the display stays as first shown
        if self._clear_pending:
            self._clear()
        data = out.get("data") if kind in ("execute_result", "display_data") else None
        data = data if isinstance(data, dict) else {}
        mime = next((m for m in ("image/png", "image/jpeg") if isinstance(data.get(m), str)), None)
        if mime:
            self._image(mime, re.sub(r"\s+", "", data[mime]))
            return
        shown = output_text(out)
        if not shown and kind != "stream":
            shown = next((data[m] for m in ("text/markdown", "text/html") if isinstance(
                data.get(m), str)), f"[{', '.join(sorted(data)) or 'empty'} output]")
            shown += "" if shown.endswith("\n") else "\n"
        self._text(shown)

    def _image(self, mime: str, encoded: str) -> None:
        size = len(encoded) * 3 // 4 - encoded[-2:].count("=")
        if size <= self.max_image_bytes and self._images < _MCP_MAX_IMAGES:
            self._images += 1
            self._parts.append({"type": "image", "data": encoded, "mimeType": mime})
            return
        self.missing = True
        where = None
        if self.output_dir is not None:
            try:
                where = self._file("." + mime.split("/")[1].replace("jpeg", "jpg"), "wb")
                with where[0]:
                    where[0].write(base64.b64decode(encoded))
            except (OSError, ValueError):
                where = None
        saved = f"saved to {where[1]}" if where else "omitted"
        self._text(f"[{mime} {human_size(size)} {saved}]\n")

    def _file(self, suffix: str, mode: str):
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.abspath(os.path.join(self.output_dir, f"mcp-{new_id()[:12]}{suffix}"))
        return open(path, mode, **({"encoding": "utf-8"} if "b" not in mode else {})), path

    def _text(self, piece: str) -> None:
        if not piece:
            return
        self._total += len(piece)
        if self.output_dir is not None:
            try:
                self._spill = self._spill or self._file(".txt", "w")
                self._spill[0].write(piece)
            except OSError:
                self.output_dir = None
        keep = self.max_output // 3
        if self._head is not None:
            self._tail = (self._tail + piece[-keep:])[-keep:]
            return
        if self._parts and isinstance(self._parts[-1], str):
            self._parts[-1] += piece
        else:
            self._parts.append(piece)
        if self._total > self.max_output:  # from here on only the head and the tail are kept
            whole = "".join(p for p in self._parts if isinstance(p, str))
            self._head, self._tail = whole[:self.max_output - keep], whole[-keep:] if keep else ""
            self._parts = [p for p in self._parts if isinstance(p, dict)]

    def finish(self) -> tuple[list, bool]:
        """The content blocks, and whether any output is missing from them."""
        spill, self._spill = self._spill, None
        if spill is not None:
            spill[0].close()
        if self._head is None:
            if spill is not None:
                with contextlib.suppress(OSError):
                    os.remove(spill[1])
            return [p if isinstance(p, dict) else {"type": "text", "text": p}
                    for p in self._parts], self.missing
        left_out = self._total - len(self._head) - len(self._tail)
        where = f"; the whole text is in {spill[1]}" if spill is not None else ""
        note = f"\n[... {left_out:,} characters left out{where} ...]\n"
        return [{"type": "text", "text": self._head + note + self._tail}, *self._parts], True


def _tool_content(outputs: list, **options) -> tuple[list, bool]:
    """The content blocks of a list of outputs (see _ToolContent)."""
    content = _ToolContent(**options)
    for out in outputs:
        content.add(out)
    return content.finish()


class NotebookLog:
    """--log: every cell the agent ran, with its outputs, appended to a notebook that a person
    can open; the file is replaced whole after each cell, so it is never half written."""

    def __init__(self, path: str):
        self.path = path
        self.notebook = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        text = read_text(path, "--log ") if os.path.exists(path) else ""
        if text.strip():
            try:
                self.notebook = notebook_from(text, ".ipynb")  # (whatever its name ends with)
            except ConfigError:
                raise ConfigError(f"--log {path} exists and is not a notebook; give a new "
                                  "file") from None
        write_notebook(path, self.notebook)

    def add(self, code: str, result: Result) -> None:
        cell = new_cell("code", code)
        cell.update(execution_count=result.execution_count, outputs=result.outputs)
        self.notebook["cells"].append(cell)
        write_notebook(self.path, self.notebook)


class _Call:
    """One tools/call in progress."""

    def __init__(self, request_id: object, progress_token: object):
        self.id, self.progress_token = request_id, progress_token
        self.cancelled = False
        self.kernel_id: str | None = None  # the kernel it runs on, once known (for cancellation)
        self.started = time.monotonic()
        self.last_line, self.progress = "", 0.0  # (progress: the last notification's)
        self.run: _Run | None = None  # run_code's or get_execution's cell

    def say(self, line: str) -> None:
        """Show ``line`` in the call's progress notifications."""
        self.last_line = line


class _Run:
    """A run_code cell, from the call that sends it until a result with its final status: the
    output since the last result (in a _ToolContent, so bounded), its status, its end."""

    def __init__(self, new_content):
        import threading
        self.id = new_id()  # 128 random bits: unguessable
        self.kernel: str | None = None
        self.new_content, self.content = new_content, new_content()
        self.status, self.execution_count, self.truncated = "running", None, False
        self.note = self.failure = None  # a line to add to the last result; what went wrong
        self.last_line = ""
        self.queued, self.ended = time.monotonic(), None  # (ended: when it did)
        self.changed = threading.Condition()

    def add(self, out: dict) -> None:
        with self.changed:
            self.content.add(out)
        if out.get("output_type") == "stream":
            lines = [line for line in str(out.get("text", ""))[-1000:].splitlines() if line.strip()]
            if lines:
                self.say(lines[-1][:200])

    say = _Call.say

    def end(self, status: str, result: Result | None = None, note: str | None = None,
            failure: str | None = None) -> None:
        with self.changed:
            self.status, self.note, self.failure = status, note, failure
            if result is not None:
                self.execution_count, self.truncated = result.execution_count, result.truncated
            self.ended = time.monotonic()
            self.changed.notify_all()

    def take(self) -> tuple[list, bool]:
        """The content blocks since the last take; whether output is missing (hold ``changed``)."""
        blocks, missing = self.content.finish()
        self.content = self.new_content()
        return blocks, missing


class _Runs:
    """The long work of agents, kept in one place: the _Runs a result left running, until a result
    with their final status collects them (or _MCP_KEEP_ENDED after they end, pruned in
    ``settle``), and when a cell last failed on each kernel."""

    def __init__(self):
        import threading
        self._lock = threading.Lock()
        self._kept: dict = {}    # execution id -> _Run, until collected
        self.failed: dict = {}   # kernel key -> when a cell there last ended in an error

    def settle(self, run: _Run, ended: bool) -> None:
        """After a result for ``run``: keep it for get_execution, or collect it if ``ended``."""
        now = time.monotonic()
        with self._lock:
            self._kept = {key: kept for key, kept in self._kept.items()
                          if kept.ended is None or now - kept.ended < _MCP_KEEP_ENDED}
            if ended:
                self._kept.pop(run.id, None)
            else:
                self._kept[run.id] = run

    def kept(self) -> list:
        with self._lock:
            return list(self._kept.values())


class _JsonRpcStdio:
    """The MCP transport: JSON-RPC 2.0 on stdio, one message a line, and the rules of both eras
    (the handshake of 2024-11-05..2025-11-25, or 2026-07-28's version in every request's
    _meta), fixed by the first request. It knows no kernels: ``app`` is given each tools/call
    (``app.call_tool(request_id, params)``), each cancellation (``app.cancel(request_id)``) and
    what to log (``app.log_line(text)``); it answers through ``result``, ``error``, ``notify``.
    """

    def __init__(self, app, out):
        import threading
        self.app, self.out = app, out
        self.era: str | None = None  # "handshake" or "stateless", fixed by the first request
        self.version = _MCP_HANDSHAKE_VERSIONS[0]
        self._write_lock = threading.Lock()  # one message at a time on stdout

    def serve(self, stdin) -> None:
        """Answer requests until stdin closes (the caller cleans up)."""
        while True:
            line = stdin.readline(_MAX_MCP_LINE + 1)
            if not line:
                return
            if len(line) > _MAX_MCP_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drop the rest of the line, unread
                    line = stdin.readline(RECV_SIZE_MAX)
                self.error(None, _INVALID_REQUEST, f"message longer than {_MAX_MCP_LINE} bytes")
                continue
            if line.strip():
                try:
                    self._receive(line)
                except Exception as exc:  # a bug must not end the server: say so, go on
                    self.app.log_line(f"internal error on a message: {type(exc).__name__}: {exc}")
                    self.error(None, -32603, f"Internal error: {type(exc).__name__}")

    def _write(self, message: dict) -> None:
        data = (strict_json(message, ensure_ascii=False, separators=(",", ":"))
                + "\n").encode("utf-8", "replace")
        with self._write_lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):  # the host went away; stdin closing ends the process
                pass

    def result(self, request_id: object, result: dict, *, cacheable: bool = False) -> None:
        # revision 2026-07-28: resultType on every result, serverInfo in _meta
        if self.era == "stateless":
            result = {**result, "resultType": "complete",
                      "_meta": {_MCP_SERVER_KEY: {"name": "jupyter_call", "version": __version__}}}
            if cacheable:
                result.update(ttlMs=_MCP_TOOLS_TTL_MS, cacheScope="public")
        self._write({"jsonrpc": "2.0", "id": request_id, "result": result})

    def error(self, request_id: object, code: int, message: str, data: object = None) -> None:
        error = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self._write({"jsonrpc": "2.0", "id": request_id, "error": error})

    def notify(self, method: str, params: dict) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def _receive(self, line: bytes) -> None:
        try:
            msg = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            self.error(None, _PARSE_ERROR, "Parse error: not a JSON message")
            return
        if not isinstance(msg, dict):
            self.error(None, _INVALID_REQUEST,
                       "a message must be a JSON object (batches are not supported)")
            return
        method, request_id, params = msg.get("method"), msg.get("id"), msg.get("params")
        if not isinstance(method, str):
            # (answers to us: none are asked)
            if "id" in msg and "result" not in msg and "error" not in msg:
                self.error(request_id, _INVALID_REQUEST, "a request needs a method")
            return
        if params is None:
            params = {}
        if not isinstance(params, dict):
            if "id" in msg:
                self.error(request_id, _INVALID_PARAMS, "params must be an object")
            return
        if "id" not in msg:
            self._on_notification(method, params)
        elif isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
            self._on_request(request_id, method, params)
        else:
            self.error(None, _INVALID_REQUEST, "a request id must be a string or an integer")

    def _on_notification(self, method: str, params: dict) -> None:
        if method == "notifications/cancelled":
            self.app.cancel(params.get("requestId"))
        # notifications/initialized and others need nothing

    def _on_request(self, request_id: object, method: str, params: dict) -> None:
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        asked = meta.get(_MCP_VERSION_KEY)
        if self.era is None:
            stateless = asked is not None or method == "server/discover"
            self.era = "stateless" if stateless else "handshake"
        if self.era == "stateless":
            if asked is None and method != "initialize":
                self.error(request_id, _INVALID_PARAMS,
                           f"params._meta is missing {_MCP_VERSION_KEY}")
                return
            if method == "initialize" or asked not in _MCP_STATELESS_VERSIONS:
                # (a handshake on a 2026-07-28 connection: answered as the official SDK does)
                self.error(request_id, _UNSUPPORTED_VERSION, "Unsupported protocol version", {
                    "supported": list(_MCP_STATELESS_VERSIONS),
                    "requested": params.get("protocolVersion") if asked is None else asked})
                return
        handlers = {"tools/list": self._tools_list, "tools/call": self.app.call_tool}
        if self.era == "handshake":
            handlers.update(initialize=self._initialize, ping=lambda i, _: self.result(i, {}))
        else:  # 2026-07-28 has no ping
            handlers["server/discover"] = self._discover
        handler = handlers.get(method)
        if handler is None:
            self.error(request_id, _METHOD_NOT_FOUND, f"Method not found: {method}")
            return
        handler(request_id, params)

    def _initialize(self, request_id: object, params: dict) -> None:
        # 2025-11-25 basic/lifecycle: the client's version when supported, else the latest.
        asked = params.get("protocolVersion")
        self.version = asked if asked in _MCP_HANDSHAKE_VERSIONS else _MCP_HANDSHAKE_VERSIONS[0]
        self.result(request_id,
                    {"protocolVersion": self.version,
                     "capabilities": {"tools": {"listChanged": False}},
                     "serverInfo": {"name": "jupyter_call", "title": "Jupyter kernels",
                                    "version": __version__}, "instructions": _MCP_INSTRUCTIONS})

    def _discover(self, request_id: object, params: dict) -> None:
        # 2026-07-28 server/discover: the versions, capabilities and instructions, cacheable.
        self.result(request_id, {"supportedVersions": list(_MCP_VERSIONS),
                                 "capabilities": {"tools": {"listChanged": False}},
                                 "instructions": _MCP_INSTRUCTIONS}, cacheable=True)

    def _tools_list(self, request_id: object, params: dict) -> None:
        tools = [tool for tool, _ in _MCP_TOOLS.values()]
        if self.version < "2025-06-18" and self.era != "stateless":
            tools = [{k: v for k, v in tool.items() if k not in ("outputSchema", "title")}
                     for tool in tools]
        self.result(request_id, {"tools": tools}, cacheable=True)


class _KernelRegistry:
    """The kernels an MCP server uses, through the public ``Kernel`` API: the default kernel
    (started or attached on first use), those start_kernel starts, those named by id.

    A kernel it starts is ours to delete from the moment it exists: its id joins ``started``
    as ``Kernel(...)`` returns, before any tool can hand it out, and a start that ends after
    ``close`` began deletes its kernel there and then. A kernel it attached to is never deleted.
    With ``start_server``, a stopped JupyterHub server is started before a kernel is opened, within
    ``timeout`` (None: _HUB_START_TIMEOUT), as the command line does.
    """

    def __init__(self, url: str | None, token: str | None, *, ssl_context=None,
                 kernel_name: str | None = None, attach: dict | None = None, log=None,
                 start_server: bool = False, user_options: dict | None = None,
                 timeout: float | None = None, **kernel_options):
        import threading
        self.url, self.token, self.ssl_context = url, token, ssl_context
        self.kernel_name, self.attach, self.log = kernel_name, attach or {}, log
        self.start_server, self.user_options, self.timeout = start_server, user_options, timeout
        self.kernel_options = kernel_options  # env, protocol: as for Kernel
        self.root: str | None = None  # the server's root folder on this machine, when known
        self.default: str | None = None  # the default kernel's id, once it has one
        self._lock = threading.Lock()     # the tables below
        self._settled = threading.Condition(self._lock)  # notified when a start has ended
        self._kernels: dict = {}    # kernel id -> Kernel connected by this process
        self._started: set = set()  # ids of kernels this process started
        self._starting = 0          # kernels being started or attached right now
        self._closed = False        # close has begun: a kernel started now deletes itself
        self._rest = None

    def rest(self) -> RestClient:
        """The server's REST client, its URL and token found once (arguments, environment, ...)."""
        if self._rest is None:
            url, token, self.root = resolve_server(self.url, self.token)
            self._rest = RestClient(url, token, ssl_context=self.ssl_context)
        return self._rest

    def get(self, kernel_id: str | None, on_progress=None) -> Kernel:
        """The connected Kernel for an id, or the default kernel (started or attached on first
        use); ``on_progress`` hears the steps of a hub server's start."""
        with self._lock:
            key = kernel_id or self.default
            kernel = self._kernels.get(key) if key else None
        if kernel is not None and not kernel.closed:
            return kernel
        kernel = None
        if key:
            try:
                kernel = self.open(kernel_id=key, on_progress=on_progress)
            except ServerError as exc:
                if exc.status != 404 or kernel_id:
                    raise
                self.log(f"default kernel {key} is gone")
                self.forget(key)
        if kernel is None:
            kernel = self.open(name=self.kernel_name, on_progress=on_progress, **self.attach)
            kernel_id = None
            self.log(f"default kernel {kernel.id} {'started' if kernel.owned else 'attached'}")
        with self._lock:
            if not kernel_id and not self.default:
                self.default = kernel.id
        return kernel

    def open(self, *, keep: bool = True, on_progress=None, **options) -> Kernel:
        """A Kernel started or attached as ``options`` say, kept for ``get`` unless not ``keep``."""
        with self._lock:
            self._starting += 1
        try:
            rest = self.rest()
            if self.start_server:
                start_if_stopped(rest.url, rest.token, self.user_options, Deadline(self.timeout),
                                 self.ssl_context, on_progress)
            kernel = Kernel(rest.url, rest.token, timeout=_MCP_START_TIMEOUT,
                            ssl_context=self.ssl_context, **self.kernel_options, **options)
            kernel.timeout = None  # each call brings its own
            with self._lock:
                closed = self._closed
                if kernel.owned and not closed:
                    self._started.add(kernel.id)
                if keep and not closed:
                    self._kernels[kernel.id] = kernel
            if closed:  # its start outlasted close's wait: do not leave it behind
                kernel.close()
                raise JupyterError("the MCP server is stopping")
            return kernel
        finally:
            with self._lock:
                self._starting -= 1
                self._settled.notify_all()

    def table(self) -> tuple[set, str | None]:
        """The ids of the kernels started here, and the default kernel's id."""
        with self._lock:
            return set(self._started), self.default

    def drop(self, kernel_id: str) -> None:
        """Let go of a kernel's connection; the kernel stays (and stays ours to delete)."""
        with self._lock:
            kernel = self._kernels.pop(kernel_id, None)
        if kernel is not None:
            kernel.drop()

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone, or no longer ours: drop it and every mention of it."""
        self.drop(kernel_id)
        with self._lock:
            self._started.discard(kernel_id)
            if self.default == kernel_id:
                self.default = None

    def shutdown(self, kernel_id: str, deadline: Deadline | None = None) -> None:
        self.forget(kernel_id)
        self.rest().delete_kernel(kernel_id, deadline=deadline or Deadline(CLEANUP_TIMEOUT))

    def close(self, deadline: Deadline) -> tuple[list, list]:
        """Delete the kernels started here, each in a thread; a kernel still starting is waited
        for, leaving _MCP_DELETE_RESERVE of ``deadline``. Returns their ids and the threads."""
        with self._lock:
            self._closed = True
            self._settled.wait_for(lambda: not self._starting,
                                   deadline.remaining() - _MCP_DELETE_RESERVE)
            started = list(self._started)
        return started, [daemon(self._delete_quietly, k, deadline) for k in started]

    def _delete_quietly(self, kernel_id: str, deadline: Deadline) -> None:
        try:
            self.shutdown(kernel_id, deadline)
        except JupyterError as exc:
            self.log(f"could not delete kernel {kernel_id}: {error_text(exc)}")


class McpServer:
    """The MCP server of ``--mcp``: the app of a ``_JsonRpcStdio`` on ``out`` (binary) that
    serves ``stdin`` (binary). Its tools (_MCP_TOOLS) run on the kernels of a ``_KernelRegistry``,
    each call in a thread of its own and run_code's cells in a lane of their kernel."""

    def __init__(self, url: str | None, token: str | None, *, ssl_context=None,
                 kernel_name: str | None = None, kernel_id: str | None = None,
                 session: str | None = None, notebook: str | None = None,
                 timeout: float | None = None, max_output: int = MAX_OUTPUT,
                 max_image_bytes: int = MCP_MAX_IMAGE_BYTES, output_dir: str | None = None,
                 log: NotebookLog | None = None, err=None, out=None, wait: float = MCP_WAIT,
                 **kernel_options):
        import threading
        self.kernels = _KernelRegistry(url, token, ssl_context=ssl_context,
                                       kernel_name=kernel_name, log=self.log_line, timeout=timeout,
                                       attach={"kernel_id": kernel_id, "session": session,
                                               "notebook": notebook}, **kernel_options)
        self.timeout, self.max_output, self.max_image_bytes = timeout, max_output, max_image_bytes
        self.output_dir, self.log, self.err, self.wait = output_dir, log, err or sys.stderr, wait
        self.rpc = _JsonRpcStdio(self, out)  # the transport; this object is its app
        self._lock = threading.Lock()        # the tables below, and the --log notebook
        self._lanes: dict = {}      # kernel key -> deque of waiting work, while a lane thread runs
        self._calls: dict = {}      # request id -> _Call
        self._runs = _Runs()

    def log_line(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.err.write(f"jupyter_call: {self._private(text)}\n")
            self.err.flush()

    # -- tools/call: each in a thread of its own, run_code's cells in a lane of their kernel --

    def call_tool(self, request_id: object, params: dict) -> None:
        name, args = params.get("name"), params.get("arguments")
        args = {} if args is None else args
        declaration, work = _MCP_TOOLS.get(name if isinstance(name, str) else "", (None, None))
        if declaration is None:
            self.rpc.error(request_id, _INVALID_PARAMS, f"Unknown tool: {str(name)[:100]}")
            return
        problem = _check_arguments(declaration["inputSchema"], args)
        # 2025-11-25: input errors are tool results, so that the model can correct itself
        if problem:
            self.rpc.result(request_id, self._failure(f"{name}: {problem}"))
            return
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        call = _Call(request_id, meta.get("progressToken"))
        with self._lock:
            self._calls[request_id] = call
        daemon(self._finish, call, work, args)

    def _finish(self, call: _Call, work, args: dict) -> None:
        """Run a tool and answer its call, unless it was cancelled."""
        try:
            result = work(self, call, args) if not call.cancelled else None
        except Exception as exc:
            result = self._failure(self._explain(exc))
        with self._lock:
            self._calls.pop(call.id, None)
        if not call.cancelled and result is not None:
            self.rpc.result(call.id, result)

    def _explain(self, exc: Exception) -> str:
        if isinstance(exc, (_ToolError, ValueError)):
            return str(exc)
        if isinstance(exc, KernelDied):  # the next call connects again (the server may restart it)
            self.kernels.drop(exc.kernel_id)
            return f"{exc}; its state is lost"
        if isinstance(exc, JupyterError):
            return error_text(exc)
        return f"internal error: {type(exc).__name__}: {exc}"  # a bug must not end the server

    def _failure(self, text: str) -> dict:
        return {"content": [{"type": "text", "text": self._private(text)}], "isError": True}

    def _private(self, text: str) -> str:
        """Text without the server's URL and token: they stay out of every result and log line
        (any URL on the server's host and port is "the Jupyter server")."""
        try:
            url, token = self.kernels.rest().url, self.kernels.rest().token
        except JupyterError:  # (an unreadable token file: said elsewhere)
            url, token = self.kernels.url or "", self.kernels.token
        if token:
            text = text.replace(token, "[token]")
        host = urlsplit(url).netloc
        return re.sub(rf"(server at )?\S*{re.escape(host)}\S*", "the Jupyter server",
                      text) if host else text

    # -- lanes, cancellation, progress --

    def _lane_key(self, kernel_id: str | None) -> str:
        return "" if kernel_id in (None, self.kernels.default) else kernel_id

    def _enqueue(self, key: str, job) -> None:
        """Run ``job`` after the jobs queued for kernel ``key`` ("" is the default kernel)."""
        with self._lock:
            queue = self._lanes.get(key)
            if queue is not None:
                queue.append(job)
                return
            self._lanes[key] = collections.deque([job])
        daemon(self._lane, key)

    def _lane(self, key: str) -> None:
        while True:
            with self._lock:
                queue = self._lanes[key]
                if not queue:
                    del self._lanes[key]
                    return
                job = queue.popleft()
            job()

    def cancel(self, request_id: object) -> None:
        """notifications/cancelled: nothing more is sent for the call; its kernel is interrupted."""
        if not isinstance(request_id, (str, int)):
            return
        with self._lock:
            call = self._calls.get(request_id)
        if call is None:
            return
        call.cancelled = True
        if call.run is not None:  # a wait for a cell ends
            with call.run.changed:
                call.run.changed.notify_all()
        if call.kernel_id:
            daemon(self._interrupt_quietly, call.kernel_id)

    def _interrupt_quietly(self, kernel_id: str, deadline: Deadline | None = None) -> None:
        try:
            self.kernels.rest().interrupt_kernel(
                kernel_id, deadline=deadline or Deadline(SIDE_REQUEST_TIMEOUT))
        except JupyterError as exc:
            self.log_line(f"could not interrupt kernel {kernel_id}: {error_text(exc)}")

    def _progress(self, call: _Call):
        """Notify ``call``'s progress every _MCP_PROGRESS_EVERY, if it asked; the event to stop."""
        import threading
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(_MCP_PROGRESS_EVERY) and not call.cancelled:
                self._tell(call)

        if call.progress_token is not None:
            daemon(tick)
        return stop

    def _tell(self, call: _Call, line: str | None = None) -> None:
        """A progress notification for ``call``, if it asked: the seconds it has run and ``line``
        (else the last line its cell printed), at once (a hub server's start says each step)."""
        if line is not None:
            (call.run or call).say(line)
        if call.progress_token is None or call.cancelled:
            return
        with self._lock:  # (strictly increasing, as the specification asks)
            call.progress = max(round(time.monotonic() - call.started, 3), call.progress + 0.001)
            line = (call.run or call).last_line
            params = {"progressToken": call.progress_token, "progress": call.progress,
                      "message": f"running for {call.progress:.0f} s" + (f": {line}" if line
                                                                         else "")}
        self.rpc.notify("notifications/progress", params)

    # -- the tools --

    @_tool("run_code", "Run code",
           "Run code on a Jupyter kernel and return what it printed, its result, images it "
           "displayed and the traceback if it raised. Without `kernel`, the default kernel is "
           "used; its variables, imports and files persist between calls, so build on earlier "
           "calls rather than repeating them. The code runs as a notebook cell: the value of its "
           "last line is shown. `timeout` (seconds) interrupts code that runs longer. A cell still "
           "running after `wait` seconds (default 45) runs on: the result has what it printed so "
           "far, status running and an `execution` id; call get_execution with it for the rest. "
           "Cells on one kernel run one after another. structuredContent.status is ok, error, "
           "aborted, timeout or running.",
           {"code": {"type": "string",
                     "description": "The code to run (Python for Python kernels)."},
            "kernel": _KERNEL_ARG, "timeout": _TIMEOUT_ARG, "wait": _WAIT_ARG}, ("code",),
           output=_RUN_OUTPUT)
    def _tool_run_code(self, call: _Call, args: dict) -> dict:
        timeout = args.get("timeout", self.timeout)
        # Only what the content keeps stays in memory (and, for --log, every output).
        return self._queue(call, args.get("kernel"), args, lambda kernel: kernel.execute(
            args["code"], timeout=timeout, on_output=call.run.add,
            keep_outputs=self.log is not None))

    def _queue(self, call: _Call, kernel_id: str | None, args: dict, work) -> dict | None:
        """Run ``work(kernel)`` (its Result) in the lane of kernel ``kernel_id`` (None: the default
        kernel) for ``call``; the report of its _Run after ``args``' wait."""
        call.run = _Run(lambda: _ToolContent(self.max_output, self.max_image_bytes,
                                             self.output_dir))
        call.run.kernel = kernel_id or self.kernels.default  # (None: not started yet)
        key = self._lane_key(kernel_id)
        self._enqueue(key, lambda: self._execute(call, args, key, kernel_id, work))
        return self._report(call, call.run, args.get("wait", self.wait))

    def _execute(self, call: _Call, args: dict, key: str, kernel_id: str | None, work) -> None:
        """Run ``work`` in its kernel's lane (its call may have returned meanwhile)."""
        run, timeout, result = call.run, args.get("timeout", self.timeout), None
        if self._runs.failed.get(key, -1.0) > run.queued:  # (as a kernel aborts what waits)
            run.end("aborted", note="[aborted: a cell before it on this kernel failed]")
            return
        try:
            kernel = None if call.cancelled else self.kernels.get(
                kernel_id, functools.partial(self._tell, call))
            if kernel is None or call.cancelled:  # before its turn, or while its kernel started
                run.end("aborted")
                return
            run.kernel = call.kernel_id = kernel.id
            result = work(kernel)
            run.end(result.status, result, "[the kernel aborted this code]"
                    if result.status == "aborted" else None)
        except ExecutionTimeout as exc:
            result = exc.result or Result()
            run.end("timeout", result, f"[timed out after {duration(timeout)}; the kernel was "
                    "interrupted and keeps its state]")
        except Exception as exc:
            result = getattr(exc, "result", None)
            run.end("error", result, failure=self._explain(exc))
        if run.status in ("error", "timeout") and not call.cancelled:  # (a cancel is asked for)
            self._runs.failed[key] = run.ended
        if self.log is not None and result is not None and "code" in args:  # (if cancelled too)
            with self._lock:
                self.log.add(args["code"], result)

    def _report(self, call: _Call, run: _Run, wait: float) -> dict | None:
        """Wait up to ``wait`` seconds for ``run`` to end; the result of what it printed since the
        last report, its status final or running (then kept for get_execution)."""
        wait = min(wait, 86_400.0)  # (a day: a longer wait overflows the platform's clock)
        stop = self._progress(call)
        with run.changed:  # (what is read below, read as of one moment)
            run.changed.wait_for(lambda: run.ended is not None or call.cancelled, wait)
            blocks, missing = run.take()
            ended, line = run.ended is not None, run.failure or run.note
            structured = {"status": run.status, "execution_count": run.execution_count,
                          "truncated": bool(run.truncated or missing),
                          **({"kernel": run.kernel} if run.kernel else {}),
                          **({} if ended else {"execution": run.id})}
        stop.set()
        if call.cancelled:
            return None
        self._runs.settle(run, ended)
        if not ended:
            line = (f"[still running after {duration(wait)}: call get_execution with execution "
                    f"\"{run.id}\" for what follows]")
        blocks += [{"type": "text", "text": self._private(line)}] if line else []
        if not blocks:
            blocks = [{"type": "text", "text": json.dumps(structured)}]
        return {"content": blocks, "structuredContent": structured,
                "isError": ended and run.status != "ok"}

    @_tool("get_execution", "Get a running cell's output",
           "What a cell that run_code left running printed since the last call for it (nothing "
           "twice), once it ends or after `wait` seconds (default 45). structuredContent.status is "
           "running until a final ok, error, aborted or timeout, which collects the execution: its "
           "id is then unknown. Ids are kept 10 minutes after their cell ends.",
           {"execution": {"type": "string",
                          "description": "The id of a run_code result that is running."},
            "wait": _WAIT_ARG}, ("execution",), output=_RUN_OUTPUT, read_only=True)
    def _tool_get_execution(self, call: _Call, args: dict) -> dict:
        call.run = next((run for run in self._runs.kept() if run.id == args["execution"]), None)
        if call.run is None:
            raise _ToolError(f"no execution {args['execution'][:80]!r}: unknown, or collected "
                             "already by a result with its final status")
        return self._report(call, call.run, args.get("wait", self.wait))

    @_tool("read_notebook", "Read a notebook",
           "A notebook on the Jupyter server (`path` from its root) as the person's JupyterLab "
           "shows it: each cell's `id`, type, source, execution count and `outputs` (none; text, "
           "the default: streams, errors, text results; full: images too); `cells` picks ids. "
           "Pass its `revision` to edit_notebook; `live`: a person who has it open sees changes "
           "as they land; `kernel`: the notebook's own.",
           {"path": {"type": "string"}, "cells": _IDS,
            "outputs": {"type": "string", "enum": ["none", "text", "full"]}}, ("path",),
           output=_schema({"path": {"type": "string"}, "revision": {"type": "string"}, "live":
                           {"type": "boolean"}, "kernel": {"type": "string"}, "cells": {
                               "type": "array"}}, ("path", "revision", "live", "cells")),
           read_only=True)
    def _tool_read_notebook(self, call: _Call, args: dict) -> dict:
        rest = self.kernels.rest()
        found = read_notebook(args["path"], rest.url, rest.token, cells=args.get("cells"),
                              outputs=args.get("outputs", "text"), max_output=self.max_output,
                              timeout=self.timeout, ssl_context=rest.ssl_context)
        full = []
        for cell in (cell for cell in found["cells"] if isinstance(cell.get("outputs"), list)):
            full += cell["outputs"]  # ("full": text here, and its images beside)
            cell["outputs"] = clip("".join(map(output_text, cell["outputs"])), self.max_output)
        return {"content": [{"type": "text", "text": json.dumps(found, indent=1)}, *(
            block for block in _tool_content(full, max_image_bytes=self.max_image_bytes)[0]
            if block["type"] == "image")], "structuredContent": found}

    @_tool("edit_notebook", "Edit a notebook",
           "Change a notebook on the Jupyter server in place, where a person may have it open: "
           f"`edits`, in order and all or none, each one of {_EDIT_SHAPES}, by read_notebook's "
           "ids. With its `revision`, a notebook changed since is left alone (read it again). "
           "Returns the new revision and the ids of the inserted cells.",
           {"path": {"type": "string"}, "edits": {"type": "array", "items": {"type": "object"}},
            "revision": {"type": "string"}}, ("path", "edits"),
           output=_schema({"revision": {"type": "string"}, "ids": _IDS}, ("revision", "ids")))
    def _tool_edit_notebook(self, call: _Call, args: dict) -> dict:
        rest = self.kernels.rest()
        done = edit_notebook(args["path"], args["edits"], rest.url, rest.token,
                             revision=args.get("revision"), timeout=self.timeout,
                             ssl_context=rest.ssl_context)
        return {"content": [{"type": "text", "text": json.dumps(done)}], "structuredContent": done}

    @_tool("run_cells", "Run notebook cells",
           "Run code cells (ids, or \"all\") of a notebook on the Jupyter server in order, in its "
           "own kernel (the person's JupyterLab's: both share variables), writing their outputs "
           "into the notebook as they come, for the person to watch; a failing cell stops the "
           "rest unless `keep_going`. The result is run_code's, cell by cell (past `wait`: "
           "running, and get_execution has the rest).",
           {"path": {"type": "string"}, "cells": {"anyOf": [_IDS, {"type": "string",
                                                                  "enum": ["all"]}]},
            "timeout": _TIMEOUT_ARG, "wait": _WAIT_ARG, "keep_going": {"type": "boolean"}},
           ("path", "cells"), output=_RUN_OUTPUT)
    def _tool_run_cells(self, call: _Call, args: dict) -> dict:
        rest, deadline, ids = self.kernels.rest(), Deadline(_MCP_START_TIMEOUT), args["cells"]
        with LiveNotebook(rest, args["path"], deadline) as notebook:  # (it must be there)
            notebook.cells(ids)
            kernel_id = rest.find_session(notebook.path, deadline=deadline) or self.kernels.open(
                session=notebook.path, name=kernel_for(notebook.notebook, None)).id  # (started)

        def work(kernel: Kernel) -> Result:
            run, deadline = call.run, Deadline(args.get("timeout", self.timeout))
            with LiveNotebook(rest, notebook.path, deadline, listen=True) as live:
                ran = list(live.run(kernel, ids, deadline, keep_going=args.get("keep_going", False),
                                    on_output=run.add, on_cell=lambda number, total, cell: run.add(
                                        {"output_type": "stream", "name": "stdout",
                                         "text": f"[cell {cell['id']}]\n"})))
            return Result("error" if failures(ran) else "ok",
                          ran[-1][1].execution_count if ran else None,
                          truncated=any(result.truncated for _, result in ran))

        return self._queue(call, kernel_id, args, work)

    @_tool("list_kernels", "List kernels",
           "List the Jupyter server's running kernels (id, kernel name, execution state, last "
           "activity) and its sessions (the notebooks and consoles open in JupyterLab, with their "
           "kernel). `started` marks kernels this MCP server started, `default` the one run_code "
           "uses without `kernel`; `executions` are the cells run_code left running, not yet "
           "collected by get_execution.", {},
           output=_schema({
               "kernels": {"type": "array", "items": _schema({
                   "id": {"type": "string"}, "name": _nullable("string"),
                   "state": _nullable("string"), "last_activity": _nullable("string"),
                   "started": {"type": "boolean"}, "default": {"type": "boolean"},
                   "executions": {"type": "array", "items": {"type": "string"}}},
                   ("id", "name", "state", "last_activity", "started", "default", "executions"))},
               "sessions": {"type": "array", "items": _schema({
                   "path": _nullable("string"), "kernel": _nullable("string")},
                   ("path", "kernel"))}}, ("kernels", "sessions")), read_only=True)
    def _tool_list_kernels(self, call: _Call, args: dict) -> dict:
        rest = self.kernels.rest()
        deadline = Deadline(SIDE_REQUEST_TIMEOUT)
        kernels = rest.list_kernels(deadline=deadline)
        try:
            sessions = rest.list_sessions(deadline=deadline)
        except ServerError as exc:  # kernel gateways have no sessions
            if exc.status is None:
                raise
            sessions = []
        started, default = self.kernels.table()
        runs = self._runs.kept()
        rows = [{"id": str(k.get("id")), "name": k.get("name"), "state": k.get("execution_state"),
                 "last_activity": k.get("last_activity"),  # (str or None: _kernel_model)
                 "started": k.get("id") in started, "default": k.get("id") == default,
                 "executions": [run.id for run in runs if run.kernel == k.get("id")]}
                for k in kernels if isinstance(k, dict)]
        paths = [{"path": s["path"], "kernel": None if s["kernel"].get("id") is None
                  else str(s["kernel"]["id"])}
                 for s in sessions]
        structured = {"kernels": rows, "sessions": paths}
        return {"content": [{"type": "text", "text": json.dumps(structured, indent=1)}],
                "structuredContent": structured}

    @_tool("start_kernel", "Start a kernel",
           "Start a new kernel, separate from the default one, and return its id to pass as "
           "`kernel` to run_code. `name` is a kernel spec (e.g. python3; default: the server's). "
           "It is shut down when this MCP server stops, or by shutdown_kernel.",
           {"name": {"type": "string", "description": "The kernel spec name."}},
           output=_schema({"kernel": {"type": "string"}, "name": _nullable("string")},
                          ("kernel", "name")))
    def _tool_start_kernel(self, call: _Call, args: dict) -> dict:
        stop = self._progress(call)
        try:
            kernel = self.kernels.open(name=args.get("name") or self.kernels.kernel_name,
                                       on_progress=functools.partial(self._tell, call))
        finally:
            stop.set()
        if call.cancelled:  # nobody will learn its id: do not leave it behind
            self.kernels.shutdown(kernel.id)
            return None
        structured = {"kernel": kernel.id, "name": kernel.name}
        return {"content": [{"type": "text", "text": json.dumps(structured)}],
                "structuredContent": structured}

    @_tool("interrupt_kernel", "Interrupt a kernel",
           "Interrupt the code a kernel is running (as Ctrl-C does): the running call ends with a "
           "KeyboardInterrupt error; the kernel and its state stay.", _KERNEL_PROPERTY,
           ("kernel",), idempotent=True)
    def _tool_interrupt_kernel(self, call: _Call, args: dict) -> dict:
        self.kernels.rest().interrupt_kernel(args["kernel"],
                                             deadline=Deadline(SIDE_REQUEST_TIMEOUT))
        return {"content": [{"type": "text", "text": f"kernel {args['kernel']} interrupted"}]}

    @_tool("restart_kernel", "Restart a kernel",
           "Restart a kernel: all its variables and imports are lost, it keeps its id. Use it when "
           "the kernel is stuck or its state is broken.", _KERNEL_PROPERTY, ("kernel",),
           destructive=True)
    def _tool_restart_kernel(self, call: _Call, args: dict) -> dict:
        self.kernels.rest().restart_kernel(args["kernel"], deadline=Deadline(_MCP_START_TIMEOUT))
        return {"content": [{"type": "text",
                             "text": f"kernel {args['kernel']} restarted: its state is gone"}]}

    @_tool("shutdown_kernel", "Shut down a kernel",
           "Shut down a kernel this MCP server started (the default one or one from start_kernel); "
           "its state is lost. Kernels of other people and notebooks are refused.",
           _KERNEL_PROPERTY, ("kernel",), destructive=True, idempotent=True)
    def _tool_shutdown_kernel(self, call: _Call, args: dict) -> dict:
        kernel_id = args["kernel"]
        if kernel_id not in self.kernels.table()[0]:
            raise _ToolError(f"kernel {kernel_id} was not started by this MCP server, so it is not "
                             "shut down (it may be a person's notebook); interrupt_kernel or "
                             "restart_kernel work on it")
        self.kernels.shutdown(kernel_id)
        return {"content": [{"type": "text", "text": f"kernel {kernel_id} shut down"}]}

    @_tool("run_notebook", "Run a notebook",
           "Run a notebook's code cells in order on a new kernel, as papermill does, and return a "
           "summary of each cell (status, the start of its output, the first error). `path` is a "
           ".ipynb (or '# %%' .py) file on this machine, or server:PATH for a file on the Jupyter "
           "server. `parameters` are injected after the cell tagged 'parameters'. `write` saves "
           "the executed notebook: a path, server:PATH, or true for the notebook itself.",
           {"path": {"type": "string"},
            "parameters": {"type": "object", "description": "Names and values to inject."},
            "write": {"anyOf": [{"type": "string"}, {"type": "boolean"}]}}, ("path",),
           output=_schema({"status": {"type": "string", "enum": ["ok", "error"]},
                           "cells": {"type": "array", "items": _schema({
                               "cell": {"type": "integer"}, "status": {"type": "string"},
                               "execution_count": _nullable("integer"),
                               "output": {"type": "string"}, "error": _nullable("string")},
                               ("cell", "status", "execution_count", "output", "error"))},
                           "written": _nullable("string")}, ("status", "cells", "written")))
    def _tool_run_notebook(self, call: _Call, args: dict) -> dict:
        path, write = args["path"], args.get("write")
        deadline = Deadline(self.timeout)
        remote = self.kernels.rest()
        notebook, where = load_notebook(path, remote, deadline, self.kernels.root)
        name = kernel_for(notebook, args.get("parameters")) or self.kernels.kernel_name
        code = [cell for cell in notebook["cells"] if cell.get("cell_type") == "code"]
        ran, timed_out = [], False
        stop = self._progress(call)
        try:  # (cleanup deletes the kernel too, should the process end first)
            with self.kernels.open(name=name, path=where, keep=False,
                                   on_progress=functools.partial(self._tell, call)) as kernel:
                call.kernel_id = kernel.id
                try:
                    for pair in execute_notebook(kernel, notebook, deadline, on_cell=lambda n, t:
                                                 call.say(f"cell {n} of {t}")):
                        ran.append(pair)
                except ExecutionTimeout:
                    timed_out = True  # (the last cell of ran)
                finally:
                    self.kernels.forget(kernel.id)
        finally:
            stop.set()
        if call.cancelled:
            return None
        written = None
        if write:
            written = path if write is True else write
            write_notebook(written, notebook, remote, deadline)  # (a ConfigError: the tool's)
        cells = [{"cell": code.index(cell) + 1, "status": result.status,
                  "execution_count": result.execution_count,
                  "output": clip("".join(map(output_text, result.outputs)), 300),
                  "error": error_line(result.error) if result.error else None}
                 for cell, result in ran]
        failed = timed_out or bool(failures(ran))
        structured = {"status": "error" if failed else "ok", "cells": cells, "written": written}
        lines = [f"cell {c['cell']}: {c['status']}" + (f" ({c['error']})" if c["error"] else "")
                 for c in cells]
        summary = f"{len(cells)} cells ran, {'one failed' if failed else 'all ok'}" + (
            f"; written to {written}" if written else "")
        return {"content": [{"type": "text", "text": "\n".join([summary, *lines])}],
                "structuredContent": structured, "isError": bool(failed)}

    # -- the end --

    def cleanup(self) -> None:
        """Delete the kernels this process started, in parallel, within _MCP_CLEANUP seconds;
        interrupt cells still running in kernels it attached to."""
        deadline = Deadline(_MCP_CLEANUP)
        with self._lock:
            for call in self._calls.values():
                call.cancelled = True  # nothing more is sent
        started, threads = self.kernels.close(deadline)
        with self._lock:
            running = {call.kernel_id for call in self._calls.values() if call.kernel_id}
        running |= {run.kernel for run in self._runs.kept() if run.ended is None} - {None}
        threads += [daemon(self._interrupt_quietly, k, deadline) for k in running - set(started)]
        for thread in threads:
            thread.join(deadline.remaining())


# ---- Command line --------------------------------------------------------------------------------

# Exit codes, one per way a call can end; _EXIT_CODES says what each means (the help's table).
_EXIT_OK, _EXIT_ERROR, _EXIT_USAGE, _EXIT_SERVER, _EXIT_DIED = 0, 1, 2, 3, 4
_EXIT_TIMEOUT, _EXIT_INTERRUPTED, _EXIT_BROKEN_PIPE = 124, 130, 141
_EXIT_CODES = (
    (_EXIT_OK, "ok"),
    (_EXIT_ERROR, "the code raised (traceback on stderr)"),
    (_EXIT_USAGE, "usage error, or input that cannot be read"),
    (_EXIT_SERVER, "cannot reach the server, token refused, server or protocol error"),
    (_EXIT_DIED, "the kernel died"),
    (_EXIT_TIMEOUT, "timeout: the kernel was interrupted (as timeout(1))"),
    (_EXIT_INTERRUPTED, "Ctrl-C: the kernel was interrupted (a second Ctrl-C gives up at once)"),
    (_EXIT_BROKEN_PIPE, "the reader of stdout went away, as with | head (128 + SIGPIPE)"),
    (143, "SIGTERM, 129 SIGHUP: as Ctrl-C (the kernel interrupted, what was started deleted)"),
    (149, "Windows: Ctrl-Break or the console closed, as SIGTERM"),
)

_USAGE_EXAMPLES = """\
recipes:
  jupyter_call.py --spawn "print('hello')"         private local server for one call
  JUPYTER_TOKEN=T jupyter_call.py --url http://127.0.0.1:8888/ "1 + 1"
  jupyter_call.py -f script.py                       run a file ('-f -' reads stdin)
  jupyter_call.py -f analysis.ipynb --write out.ipynb
                                                     run a notebook's code cells, save the results
  jupyter_call.py --kernel-id ID "x"                 run in a running kernel
  jupyter_call.py --session work "x = 1"             a named kernel that stays for later calls
  jupyter_call.py --notebook analysis.ipynb "df.shape"
                                                     the kernel of a notebook open in JupyterLab
  jupyter_call.py --output-dir plots -f plot.py      save images and other rich outputs
  jupyter_call.py --list                             running servers and their kernels

environment: JUPYTER_URL, JUPYTER_TOKEN, JUPYTER_TOKEN_FILE, JUPYTER_RUNTIME_DIR,
  HTTPS_PROXY/HTTP_PROXY/NO_PROXY, SSL_CERT_FILE, NO_COLOR
"""

# One command-line option: its flags; the name of the value it takes (None: a switch); its help;
# how its value is read (a key of _KINDS; None: as text); the values it allows (the first is the
# default); whether it may be repeated (a list); how many values it takes; where it may be used:
# "run" not with --mcp, "mcp" only with --mcp, "hub" only with --start-server, and so on.
_Option = collections.namedtuple("_Option", "flags metavar help kind choices repeat values scope",
                                 defaults=(None, (), False, 1, ""))
_KINDS = {"seconds": "a positive number of seconds", "wait": "a number of seconds, 0 or more",
          "count": "a positive whole number", "json": "a JSON object", "pair": "KEY=VALUE"}

_OPTIONS = (
    _Option(("-f", "--file"), "FILE",
            "run FILE: code, a notebook (.ipynb) or '# %%' cells (.py); '-' reads stdin; "
            "server:PATH is a file on the server"),
    _Option(("--url",), "URL",
            "server base URL (default: $JUPYTER_URL, a running server, or http://localhost:8888/)"),
    _Option(("--token",), "TOKEN",
            "server token (default: $JUPYTER_TOKEN, $JUPYTER_TOKEN_FILE, or the discovered "
            "server's); other users can see it in the process list, so prefer the variables"),
    _Option(("--kernel",), "NAME", "kernel spec to start (default: the server's)"),
    _Option(("--kernel-id",), "ID", "run in this running kernel (never deleted)"),
    _Option(("--session",), "NAME",
            "run in the kernel of the server session NAME, creating it if needed (kept)"),
    _Option(("--notebook",), "PATH", "run in the kernel of this open notebook"),
    _Option(("--cells",), "IDS", "with --notebook: run these cells of it (ID,ID,... or all) in "
            "its kernel, writing their outputs into it on the server", scope="run notebook"),
    _Option(("--keep",), None, "keep the started kernel; print its id on stderr", scope="run"),
    _Option(("--timeout",), "SECS", "give up after SECS, interrupting the kernel", "seconds"),
    _Option(("--env",), "KEY=VALUE", "environment variable for the started kernel (repeatable)",
            "pair", repeat=True),
    _Option(("--cafile",), "PATH", "CA certificates (PEM) to verify an https server with"),
    _Option(("--insecure",), None, "do not verify the server's TLS certificate"),
    _Option(("--start-server",), None, "a stopped JupyterHub user's server: have the hub start "
            "it first (within --timeout: spawns can take minutes)"),
    _Option(("--stop-server",), None, "stop it after the run if this call started it",
            scope="run hub"),
    _Option(("--user-options",), "JSON", "--start-server: the spawner's options, a JSON object",
            "json", scope="hub"),
    _Option(("--profile",), "SLUG", "--start-server: the spawner's profile ({\"profile\": SLUG})",
            scope="hub"),
    _Option(("--input",), "TEXT", "answer for input() (repeatable)", repeat=True, scope="run"),
    _Option(("--output-dir",), "DIR", "save images and other rich outputs in DIR"),
    _Option(("--keep-going",), None, "with cells: go on after a cell fails"),
    _Option(("--write",), "OUT.ipynb",
            "write the executed notebook (server:PATH saves it on the server)", scope="run"),
    _Option(("-p", "--parameters"), "NAME VALUE",
            "a parameter, injected as papermill does (True, False, None, numbers, else text; "
            "repeatable)", repeat=True, values=2, scope="run code"),
    _Option(("-r", "--parameters-raw"), "NAME VALUE",
            "a parameter whose value is always text (repeatable)", repeat=True, values=2,
            scope="run code"),
    _Option(("--parameters-file",), "FILE",
            "parameters from a JSON object (papermill's YAML files hold the same)",
            scope="run code"),
    _Option(("--cell-timeout",), "SECS", "interrupt a cell that runs longer; it counts as an error",
            "seconds"),
    _Option(("--color",), "WHEN",
            "colour tracebacks and streams; auto: on a terminal unless NO_COLOR is set",
            choices=("auto", "always", "never")),
    _Option(("--protocol",), "NAME", "kernel websocket protocol", choices=("auto", "v1", "legacy")),
    _Option(("--json",), None, "print the result as one JSON object", scope="run"),
    _Option(("--list",), None, "list running servers and their kernels"),
    _Option(("--spawn",), None,
            "start a private local Jupyter server for this call (needs jupyter_server)",
            scope="run"),
    _Option(("--mcp",), None,
            "serve AI agents: a Model Context Protocol server on stdin and stdout"),
    _Option(("--max-output",), "CHARS", "--mcp: characters of text per result (default 20000)",
            "count", scope="mcp"),
    _Option(("--max-image-bytes",), "BYTES",
            "--mcp: larger images are saved in --output-dir or left out (default 1000000)", "count",
            scope="mcp"),
    _Option(("--wait",), "SECS",
            "--mcp: how long run_code waits for a cell before it answers 'running' with an id "
            "for get_execution (default 45; 0: at once)", "wait", scope="mcp"),
    _Option(("--log",), "FILE.ipynb",
            "--mcp: append each cell run and its outputs to this notebook", scope="mcp"),
    _Option(("--version",), None, "print the version and exit"),
    _Option(("-h", "--help"), None, "show this help and exit"),
)


def _dest(option: _Option) -> str:
    return option.flags[-1][2:].replace("-", "_")


def _parse_args(argv: list) -> types.SimpleNamespace:
    """The command line as attributes named after the long flags (--kernel-id: kernel_id), each
    value read as its option's kind says and the options' scopes checked (ConfigError).

    The usual forms: ``--flag VALUE`` and ``--flag=VALUE``, ``-f FILE`` and ``-fFILE``,
    unique prefixes of long flags, and ``--`` before code that starts with a dash.
    (argparse would cost a short call more than 5% of its time in imports and set-up.)
    """
    args = {_dest(o): (o.choices[0] if o.choices else None if o.metavar else False)
            for o in _OPTIONS}
    code, given = [], []
    words = iter(argv)
    for word in words:
        if word == "--":
            code.extend(words)
            break
        if not word.startswith("-") or word == "-" or _is_number(word):
            code.append(word)
            continue
        if word.startswith("--"):
            name, equals, value = word.partition("=")
        else:
            name, value = word[:2], word[2:]
            equals = value
        option = _find_option(name)
        flag, dest = option.flags[-1], _dest(option)
        given.append(option)
        if option.metavar is None:
            if equals:
                raise ConfigError(f"{flag} takes no value")
            args[dest] = True
            continue
        if not equals:
            value = next(words, None)
            if value is None or value.startswith("-") and value != "-" and not _is_number(value):
                raise ConfigError(f"{flag} needs a value: {flag} {option.metavar}")
        if option.values > 1:
            value = [value, *(next(words, None) for _ in range(option.values - 1))]
            if None in value:
                raise ConfigError(f"{flag} needs {option.values} values: {flag} {option.metavar}")
        if option.choices and value not in option.choices:
            raise ConfigError(f"{flag} must be one of {', '.join(option.choices)}, not {value!r}")
        if option.kind is not None:
            value = _read_value(option, value)
        args[dest] = (args[dest] or []) + [value] if option.repeat else value
    if len(code) > 1:
        raise ConfigError(f"unexpected argument {code[1]!r}: give the code as one quoted argument, "
                          "or use -f")
    args = types.SimpleNamespace(**args, code=code[0] if code else None)
    for option in given:
        for scope, ok, rule in (("run", not args.mcp, "cannot be used with --mcp"),
                                ("mcp", args.mcp, "goes with --mcp"),
                                ("hub", args.start_server, "goes with --start-server"),
                                ("notebook", args.notebook, "goes with --notebook"),
                                ("code", not args.cells, "cannot be used with --cells")):
            if scope in option.scope.split() and not ok:
                raise ConfigError(f"{option.flags[-1]} {rule}")
    return args


def _read_value(option: _Option, text: str) -> object:
    """An option's value, read as its kind says: a number, a JSON object, a (KEY, VALUE) pair."""
    kind, value = option.kind, None
    with contextlib.suppress(ValueError, RecursionError):
        if kind in ("seconds", "wait"):
            value = float(text)
            value = value if 0 <= value < float("inf") and (value or kind == "wait") else None
        elif kind == "count":
            value = int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None
        elif kind == "json":
            value = json.loads(text)
            value = value if isinstance(value, dict) else None
        elif kind == "pair":
            key, sep, rest = text.partition("=")
            value = (key, rest) if key and sep else None
    if value is None:
        raise ConfigError(f"{option.flags[-1]} must be {_KINDS[kind]}, not {text[:80]!r}")
    return value


def _is_number(word: str) -> bool:
    """True for -1 and -.5: code, not options (as argparse has it)."""
    return word[1:].replace(".", "", 1).isdigit()


def _find_option(name: str) -> _Option:
    """Option ``name``, or the one whose long flag ``name`` starts."""
    found = [option for option in _OPTIONS if name in option.flags]
    if not found and name.startswith("--"):
        found = [option for option in _OPTIONS if option.flags[-1].startswith(name)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"{name} is ambiguous: it could be "
                          f"{', '.join(o.flags[-1] for o in found)}")
    raise ConfigError(f"unknown option {name} (see --help)")


def _help() -> str:
    import textwrap
    lines = ["usage: jupyter_call.py [options] CODE", "       jupyter_call.py [options] -f FILE",
             "", "Run code on a Jupyter kernel and print the results.", "", "arguments:",
             "  CODE                  the code to run (or use -f)", "", "options:"]
    for option in _OPTIONS:
        left, text = "  " + ", ".join(option.flags), option.help
        if option.choices:
            left += " {" + ",".join(option.choices) + "}"
            text += f" (default: {option.choices[0]})"
        elif option.metavar:
            left += f" {option.metavar}"
        wrapped = textwrap.wrap(text, 79 - 24) or [""]
        if len(left) > 21:
            lines.append(left)
        else:
            lines.append(left.ljust(24) + wrapped.pop(0))
        lines += [" " * 24 + more for more in wrapped]
    lines += ["", "exit codes:", *(f"  {code:<4} {meaning}" for code, meaning in _EXIT_CODES)]
    return "\n".join(lines) + "\n\n" + _USAGE_EXAMPLES


# Rich outputs: (mime type, file extension, stored as base64 in the mimebundle)
_RICH_TYPES = (("image/png", "png", True), ("image/jpeg", "jpg", True), ("image/gif", "gif", True),
              ("application/pdf", "pdf", True), ("image/svg+xml", "svg", False),
              ("text/html", "html", False), ("text/markdown", "md", False),
              ("text/latex", "tex", False))
_STATUS_DELAY = 2.0   # seconds of silence before the live status line shows
_SPAWN_TIMEOUT = 60.0 # --spawn: a new jupyter_server answers within seconds; give up after this
_SPAWN_POLL = 0.05    # how often to ask whether the spawned server answers yet
_SPAWN_STOP_GRACE = 10.0  # a server that has not exited this long after SIGTERM is killed


class _Printer:
    """Streams outputs to the terminal as they arrive: text, notes or saved files, status."""

    def __init__(self, out, err, *, color: str = "auto", output_dir: str | None = None):
        self.out, self.err = out, err
        self.color = {"out": _use_color(out, color), "err": _use_color(err, color)}
        self.at_line_start = {"out": True, "err": True}
        self.output_dir = output_dir
        self.cell: int | None = None   # set when running several cells
        self.count = 0                 # rich outputs of the current cell
        # a terminal that takes escapes shows a status line
        self.live = self.color["err"] and _isatty(err)
        self.status_shown = False
        self.position = ""             # "cell 3/40 | " while the cells of a notebook run

    def _write(self, which: str, text: str) -> None:
        if not text:
            return
        self.show_status()
        if not self.color[which] and "\x1b" in text:
            text = re.sub(ANSI_ESCAPE, "", text)
        stream = self.out if which == "out" else self.err
        stream.write(text)
        stream.flush()
        self.at_line_start[which] = text.endswith("\n")

    def __call__(self, out: dict) -> None:
        kind = out["output_type"]
        if kind == "stream":
            self._write("err" if out["name"] == "stderr" else "out", out["text"])
        elif kind in ("execute_result", "display_data", "update_display_data"):
            self._rich(out.get("data") or {})
        elif kind == "error":
            lines = out.get("traceback") or [error_line(out)]
            self._write("err", "\n".join(map(str, lines)) + "\n")

    def _rich(self, data: dict) -> None:
        text = text_form(data)
        if text is not None:
            self._write("out", text + "\n")
        for mime, ext, encoded in _RICH_TYPES:
            if mime not in data:
                continue
            raw = "".join(data[mime]) if isinstance(data[mime], list) else data[mime]
            try:
                blob = base64.b64decode(raw) if encoded else str(raw).encode("utf-8")
            except (ValueError, TypeError):
                continue
            if self.output_dir:
                self.count += 1
                prefix = f"cell-{self.cell}-" if self.cell is not None else ""
                path = os.path.join(self.output_dir, f"{prefix}out-{self.count}.{ext}")
                try:
                    os.makedirs(self.output_dir, exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(blob)
                except OSError as exc:
                    raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
                self._write("out", f"[{mime} {human_size(len(blob))} saved to {path}]\n")
            elif encoded or text is None:
                self._write("out", f"[{mime} {human_size(len(blob))}: use --output-dir to save]\n")

    def header(self, cell: int, total: int) -> None:
        self.cell, self.count = cell, 0
        self.finish()
        line = f"-- cell {cell}/{total} --"
        self._write("out", f"\x1b[2m{line}\x1b[0m\n" if self.color["out"] else line + "\n")

    def progress(self, cell: int, total: int) -> None:
        """Which cell runs, on a terminal's status line (never in pipes)."""
        if total > 1:
            self.position = f"cell {cell}/{total} | "
            self.show_status(f"[cell {cell}/{total}]")

    def status(self, quiet: float, elapsed: float) -> None:
        """The transient status line on a terminal, after a while without output."""
        if quiet >= _STATUS_DELAY:
            self.show_status(f"[{self.position}running {elapsed:.0f}s | kernel busy | Ctrl-C "
                             "to interrupt]")

    def show_status(self, line: str = "") -> None:
        """``line`` on a terminal's status line; "" clears it."""
        if self.live and (line or self.status_shown):
            self.err.write(f"\r\x1b[2K{line}")
            self.err.flush()
            self.status_shown = bool(line)

    def finish(self) -> None:
        self.show_status()
        for which in ("out", "err"):
            if not self.at_line_start[which]:
                self._write(which, "\n")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _use_color(stream, choice: str) -> bool:
    """Whether ``stream`` gets escapes: --color, else a terminal that shows them (on Windows a
    console that speaks VT already, as Python 3.13 asks for its own colours), unless NO_COLOR or
    TERM=dumb."""
    if choice != "auto":
        return choice == "always"
    return (_isatty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
            and (sys.platform != "win32" or _speaks_vt()))


def _speaks_vt() -> bool:
    try:
        import nt
        return bool(nt._supports_virtual_terminal())  # (Python 3.13+; older ones: no colours)
    except (ImportError, AttributeError):
        return False


def _read_code(args) -> str:
    """The code to run from the argument or stdin (``-f -``); files are load_notebook's."""
    if args.file == "-":  # UTF-8, whatever the console's code page (a BOM is accepted)
        stdin = getattr(sys.stdin, "buffer", None)
        try:
            return stdin.read().decode("utf-8-sig") if stdin is not None else sys.stdin.read()
        except UnicodeDecodeError:
            raise ConfigError("the code on stdin is not valid UTF-8") from None
    if args.code is None:
        raise ConfigError("no code given: pass CODE, or -f FILE (see --help)")
    return args.code


def _parameters(args) -> dict:
    """The parameters, merged as papermill merges them: the file, then -p, then -r."""
    parameters: dict = {}
    if args.parameters_file:
        text = read_text(args.parameters_file, "--parameters-file ")
        try:
            loaded = json.loads(text)
        except (ValueError, RecursionError):
            loaded = None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--parameters-file {args.parameters_file} does not hold a JSON "
                              "object")
        parameters.update(loaded)
    parameters.update((name, parameter_value(value)) for name, value in args.parameters or ())
    parameters.update((name, value) for name, value in args.parameters_raw or ())
    for name in parameters:
        if not name.isidentifier():
            raise ConfigError(f"parameter name {name!r} is not a Python name")
    return parameters


def _spawn_server(deadline: Deadline):
    """Start a private jupyter_server on a free loopback port: (process, url, token, folder)."""
    import subprocess
    import tempfile
    import importlib.util
    if importlib.util.find_spec("jupyter_server") is None:
        raise JupyterError("--spawn needs jupyter_server: pip install notebook (or jupyter_server)")
    token = os.urandom(24).hex()
    folder = tempfile.mkdtemp(prefix="jupyter_call-")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=os.path.join(folder, "runtime"))
    log = open(os.path.join(folder, "server.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--ServerApp.root_dir={os.getcwd()}"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    url = f"http://127.0.0.1:{port}/"
    rest = RestClient(url, token)
    wait = deadline.cut(_SPAWN_TIMEOUT)
    try:
        while True:
            if proc.poll() is not None:
                with open(os.path.join(folder, "server.log"), "rb") as f:
                    tail = f.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                raise JupyterError(f"the spawned Jupyter server exited: {' '.join(tail)}")
            try:
                rest.status(deadline=wait.cut(2.0))
                return proc, url, token, folder
            except ServerError:
                if wait.expired:
                    raise JupyterError("the spawned Jupyter server did not answer within "
                                       f"{duration(wait.timeout)}") from None
            time.sleep(_SPAWN_POLL)
    except BaseException:
        _stop_server(proc, folder)
        raise


def _stop_server(proc, folder: str | None = None) -> None:
    """Terminate a server process (killed if it lingers), then remove its ``folder``."""
    import shutil
    import subprocess
    proc.terminate()
    try:
        proc.wait(_SPAWN_STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _list(args, out, ssl_context=None) -> int:
    servers = list_servers()
    if args.url:
        url, token, _ = resolve_server(args.url, args.token)
        servers = [{"url": url, "token": token}]
    rows = []
    for info in servers:
        entry = {"url": info["url"], "version": info.get("version"),
                 "root_dir": info.get("root_dir"), "kernels": None, "error": None}
        rest = RestClient(info["url"], info.get("token") or None, ssl_context=ssl_context)
        try:
            if not entry["version"]:
                about = rest.request("GET", "api", deadline=Deadline(SIDE_REQUEST_TIMEOUT))
                # gateways report their own version beside that of the server they build on
                about = about if isinstance(about, dict) else {}
                version = about.get("gateway_version") or about.get("version")
                entry["version"] = version if isinstance(version, str) else None
            entry["kernels"] = rest.list_kernels(deadline=Deadline(SIDE_REQUEST_TIMEOUT))
        except (JupyterError, OSError) as exc:
            entry["error"] = str(exc)
        rows.append(entry)
    if args.json:
        out.write(strict_json(rows, indent=2) + "\n")
        return _EXIT_OK
    if not rows:
        out.write("no running Jupyter servers found\n")
    for entry in rows:
        root = f"  root {entry['root_dir']}" if entry["root_dir"] else ""
        out.write(f"{entry['url']}  version {entry['version'] or '?'}{root}\n")
        if entry["error"]:
            out.write(f"  ({entry['error']})\n")
        for k in entry["kernels"] or []:
            name, state, seen = (str(k.get(key) or "?")
                                 for key in ("name", "execution_state", "last_activity"))
            out.write(f"  {k.get('id')}  {name:<12} {state:<8} {seen}\n")
    return _EXIT_OK


def _ssl_context_from(args, err):
    """The TLS context the options ask for, or None for the verified default."""
    if not args.cafile and not args.insecure:
        return None
    import ssl
    if args.insecure:
        err.write("jupyter_call: warning: --insecure: the server's TLS certificate is not "
                  "verified\n")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --cafile {args.cafile}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def _kernel_options(args) -> dict:
    """The options the command line gives every Kernel it opens, and the MCP server's kernels."""
    return {"kernel_id": args.kernel_id, "session": args.session or args.cells and args.notebook,
            "notebook": None if args.cells else args.notebook,
            "env": dict(args.env) if args.env else None, "ssl_context": args.ssl_context,
            "protocol": args.protocol}


def _terminal_stdin(prompt: str, password: bool) -> str:
    import getpass
    try:
        return getpass.getpass(prompt) if password else input(prompt)
    except EOFError:
        return EOF_ANSWER


class _Signalled(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGBREAK, handled as Ctrl-C is (the kernel interrupted, and so on)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def _signals(handler, names=("SIGTERM", "SIGHUP", "SIGBREAK")):
    """Inside the block, ``handler`` (None: ignore them) handles the signals ``names`` that the
    platform has (none outside the main thread); yields those it handles. The default: CI
    cancellations, timeout(1), systemd, closed terminals, and Ctrl-Break on Windows."""
    import signal
    previous = {}
    for name in names:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            previous[name] = signal.signal(getattr(signal, name), handler or signal.SIG_IGN)
    try:
        yield previous
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


# A Windows console that is closed (or a logoff, a shutdown) ends its programs once their
# handler returns, and in any case after 5 s. The handler holds the process that long:
# it raises SIGBREAK, which the main thread acts on within a _WAIT_SLICE as on Ctrl-Break,
# and returns when the run has cleaned up.
_CONSOLE_ENDING_EVENTS = (2, 5, 6)  # CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT
_CONSOLE_CLOSE_GRACE = 4.5           # seconds of the 5 that Windows gives


def _console_handler(raise_signal, finished):
    """A console control handler: ending events end the run as a signal does; Ctrl-C and
    Ctrl-Break are left to Python's own handlers."""
    def handle(event: int) -> bool:
        if event not in _CONSOLE_ENDING_EVENTS:
            return False
        raise_signal()
        finished.wait(_CONSOLE_CLOSE_GRACE)
        return True
    return handle


def _watch_console():
    """On Windows, install the console handler. Returns the event to set when the run has
    cleaned up and the handler (to keep referenced), or None elsewhere."""
    if sys.platform != "win32":
        return None
    import ctypes
    import signal
    import threading
    finished = threading.Event()
    handler = ctypes.WINFUNCTYPE(ctypes.c_int, ctypes.c_uint)(
        _console_handler(lambda: signal.raise_signal(signal.SIGBREAK), finished))
    if not ctypes.WinDLL("kernel32", use_last_error=True).SetConsoleCtrlHandler(handler, True):
        return None
    return finished, handler


def _open_kernel(args, path: str | None, name: str | None) -> Kernel:
    try:
        return Kernel(args.rest.url, args.rest.token, name=name,
                      timeout=args.deadline.remaining(), path=path, **_kernel_options(args))
    except ServerError as exc:
        if (exc.status is None and args.url is None and not args.spawn
                and args.rest.url == DEFAULT_URL):
            raise JupyterError(f"no Jupyter server found (nothing answers at {DEFAULT_URL}): start "
                               "one with 'jupyter lab' or 'jupyter server', pass --url and "
                               "--token, or use --spawn") from exc
        raise


def _main(argv, out, err) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        out.write(_help())
        return _EXIT_OK
    if args.version:
        out.write(f"jupyter_call {__version__}\n")
        return _EXIT_OK
    if sum(bool(x) for x in (args.kernel_id, args.session, args.notebook)) > 1:
        raise ConfigError("choose one of --kernel-id, --session and --notebook")
    if args.keep and args.spawn:
        raise ConfigError("--keep cannot keep a kernel of the server that --spawn stops afterwards")
    if sum(x is not None for x in (args.file, args.code, args.cells)) > 1:
        raise ConfigError("give the code as an argument, with -f or as --cells, not two")
    args.ssl_context = _ssl_context_from(args, err)
    args.user_options = {**(args.user_options or {}), **(
        {"profile": args.profile} if args.profile else {})} if args.start_server else None
    if args.list:
        return _list(args, out, args.ssl_context)
    if args.mcp:
        return _serve_mcp(args, err)
    args.parameters = _parameters(args)
    args.deadline = Deadline(args.timeout)
    spawned, started = None, []  # started: the hub was asked to start the server
    if args.spawn:
        spawned = _spawn_server(args.deadline)
    url, token = (spawned[1], spawned[2]) if spawned else (args.url, args.token)
    try:
        url, token, args.root = resolve_server(url, token)  # once: every request uses it
        args.root = os.getcwd() if spawned else args.root
        args.rest = RestClient(url, token, ssl_context=args.ssl_context)
        if args.start_server:
            shown = _Printer(out, err, color=args.color)

            def on_progress(message: str) -> None:
                started[:] = [True]  # (from the moment it is asked: a Ctrl-C now stops it too)
                shown.show_status(f"[{message}]")  # (on a terminal)

            try:
                if not start_if_stopped(url, token, args.user_options, args.deadline,
                                        args.ssl_context, on_progress):
                    started.clear()
            finally:
                shown.show_status()
        return _run(args, out, err)
    finally:
        if spawned is not None:
            _stop_server(spawned[0], spawned[3])
        if started and args.stop_server:  # (a server running before this call is never stopped)
            try:
                stop_hub_server(url, token, timeout=CLEANUP_TIMEOUT, ssl_context=args.ssl_context)
            except JupyterError as exc:
                err.write(f"jupyter_call: could not stop the server: {error_text(exc)}\n")


def _run(args, out, err) -> int:
    """Read the code or notebook, run it, print and write what it produced; ``args`` holds the
    settings (the parsed options, the server's ``rest`` client and ``root``, the ``deadline``)."""
    code_from_stdin = args.file == "-"
    live = args.cells and LiveNotebook(args.rest, args.notebook, args.deadline, listen=True)
    if live:  # (the server's notebook, its cells run in place)
        notebook, where = live.notebook, None
        ids = "all" if args.cells == "all" else args.cells.split(",")
        live.cells(ids)  # (an unknown id, before a kernel starts)
    elif args.file is not None and not code_from_stdin:
        notebook, where = load_notebook(args.file, args.rest, args.deadline, args.root)
    else:
        notebook, where = notebook_from(_read_code(args).lstrip("\ufeff")), None
    if args.kernel_id or args.session or args.notebook:
        where = None  # (an attached kernel runs where it runs)
    code_cells = [c for c in notebook["cells"] if c.get("cell_type") == "code"]
    many = (args.file or "").lower().endswith(".ipynb") or len(code_cells) > 1
    name = kernel_for(notebook, args.parameters, args.kernel)
    if args.input is not None:
        stdin = iter(args.input)  # one iterator: later cells get the answers that are left
    elif not code_from_stdin and _isatty(sys.stdin):
        stdin = _terminal_stdin
    else:
        stdin = None
    printer = None if args.json else _Printer(out, err, color=args.color,
                                              output_dir=args.output_dir)

    def on_cell(number: int, total: int, cell: dict | None = None) -> None:
        if printer is not None:
            if many:
                printer.header(number, total)
            printer.progress(number, total)

    ran: list = []
    try:
        # (the with deletes a kernel it started, on every path)
        with live or contextlib.nullcontext(), _open_kernel(args, where, name) as kernel:
            if args.keep and not (args.kernel_id or args.session or args.notebook):
                kernel.detach()
                err.write(f"jupyter_call: kernel {kernel.id} kept running at {kernel.url}\n")
            # Streaming to a terminal keeps nothing already printed (bounded memory),
            # unless the outputs are wanted again for --json or --write.
            ran += (functools.partial(live.run, ids=ids) if live else functools.partial(
                execute_notebook, notebook=notebook, language_info=bool(args.write)))(
                kernel=kernel, deadline=args.deadline, keep_going=args.keep_going,
                cell_timeout=args.cell_timeout, on_cell=on_cell, stdin=stdin, on_output=printer,
                keep_outputs=bool(args.json or args.write),
                on_wait=printer.status if printer is not None and printer.live else None)
    except BaseException:
        # What did arrive is still printed (--json) and written (--write).
        if args.json:
            _print_json(out, ran, many, failed=True)
        if args.write:
            try:
                write_notebook(args.write, notebook, args.rest, args.deadline)
            except JupyterError as write_error:
                err.write(f"jupyter_call: {write_error}\n")
        raise
    finally:
        if printer is not None:
            printer.finish()
    if args.write:
        write_notebook(args.write, notebook, args.rest, args.deadline)
    failed = bool(failures(ran))
    if args.json:
        _print_json(out, ran, many, failed=failed)
    elif any(r.truncated for _, r in ran):
        err.write("jupyter_call: warning: the server dropped output (IOPub rate limit); raise it "
                  "with --ZMQChannelsWebsocketConnection.iopub_data_rate_limit (--ServerApp. on "
                  "older servers)\n")
    if any(r.status == "aborted" for _, r in ran):
        err.write("jupyter_call: the kernel aborted the execution\n")
    return _EXIT_ERROR if failed else _EXIT_OK


def _print_json(out, ran: list, many: bool, *, failed: bool) -> None:
    """One Result.to_dict(), or for cells {"status", "ok", "cells": [Result.to_dict(), ...]}."""
    results = [result for _, result in ran]
    if many:
        status = next((r.status for r in results if not r.ok), "error") if failed else "ok"
        out.write(strict_json({"status": status, "ok": not failed,
                               "cells": [r.to_dict() for r in results]}) + "\n")
    elif results:
        out.write(strict_json(results[0].to_dict()) + "\n")


def _serve_mcp(args, err) -> int:
    """--mcp: serve until stdin closes, SIGTERM or Ctrl-C; delete what it started; exit code."""
    if args.code is not None or args.file is not None:
        raise ConfigError("--mcp takes no code: the MCP client sends it")
    log = NotebookLog(args.log) if args.log else None
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed by mistake must not break the protocol
    server = McpServer(args.url, args.token, kernel_name=args.kernel, timeout=args.timeout,
                       output_dir=args.output_dir, log=log, err=err, out=out,
                       max_output=args.max_output or MAX_OUTPUT,
                       max_image_bytes=args.max_image_bytes or MCP_MAX_IMAGE_BYTES,
                       wait=MCP_WAIT if args.wait is None else args.wait,
                       start_server=args.start_server, user_options=args.user_options,
                       **_kernel_options(args))
    ended = None
    try:
        server.rpc.serve(sys.stdin.buffer)
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM/SIGHUP as _Signalled
        ended = exc
    finally:
        # The host's SIGTERM comes 2 s after it closed stdin, its SIGKILL at 4 s: cleanup goes on
        # through the first, and what is still running ends with the second.
        with _signals(None, ("SIGTERM", "SIGHUP", "SIGINT", "SIGBREAK")):
            server.cleanup()
        sys.stdout = sys.__stdout__
    if isinstance(ended, _Signalled):
        return 128 + ended.signum
    return _EXIT_INTERRUPTED if ended is not None else _EXIT_OK


def main(argv: list | None = None) -> int:
    """Run the command line; return the exit code."""
    import signal
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):  # characters the encoding lacks (a cp1252 console's) are escaped
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    with _signals(_on_signal) as handled:
        console = _watch_console() if handled else None  # (None where signals cannot be handled)
        try:
            return _main(argv, out, err)
        except ConfigError as exc:
            err.write(f"jupyter_call: usage error: {exc}\n")
            return _EXIT_USAGE
        except ExecutionTimeout as exc:
            err.write(f"jupyter_call: timeout: {exc}; the kernel was interrupted\n")
            return _EXIT_TIMEOUT
        except KernelDied as exc:
            err.write(f"jupyter_call: {exc}\n")
            return _EXIT_DIED
        except _Signalled as exc:
            err.write(f"jupyter_call: ended by {signal.Signals(exc.signum).name}; the kernel was "
                      "interrupted\n")
            return 128 + exc.signum
        except KeyboardInterrupt:
            err.write("jupyter_call: interrupted\n")
            return _EXIT_INTERRUPTED
        except JupyterError as exc:
            err.write(f"jupyter_call: error: {error_text(exc)}\n")
            return _EXIT_SERVER
        except OSError as exc:
            # The reader went away (`| head`; Windows says EINVAL): stop quietly, as a process
            # killed by SIGPIPE.
            if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EINVAL:
                raise
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return _EXIT_BROKEN_PIPE
        finally:
            if console:
                console[0].set()  # the console handler may return: Windows ends the process


if __name__ == "__main__":
    status = main()
    # The collector's last pass over every object at exit costs a short call
    # ~7 ms; what is left goes with the process anyway.
    gc.freeze()
    raise SystemExit(status)
