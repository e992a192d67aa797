"""Tests for jupyter_call, in the order of the module's layers.

1. Pure tests on byte, dict and file literals, no sockets: the frame codec, the
   message reader, Jupyter messages and output collection, discovery, the
   command-line parser, the module itself.
2. Loopback tests on 127.0.0.1 with threads, no Jupyter server: the websocket
   connection over a socketpair, a scripted websocket server, a fake Jupyter
   server and hostile peers.
3. Integration tests against a real jupyter_server started once per session
   on a free 127.0.0.1 port with a random token and isolated Jupyter dirs:
   the Python API, faults, every kind of server, the command line.

Run: python -m pytest -q test_jupyter_call.py
"""
from __future__ import annotations

import ast
import base64
import contextlib
import errno
import functools
import io
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

import jupyter_call as jc
from jupyter_call import (CloseCode, Frame, Opcode, Result, WebSocket, WebSocketClosed,
                          WebSocketError)

HERE = Path(__file__).resolve().parent
MODULE = HERE / "jupyter_call.py"


def parse_frame(data, **options):
    """``(frame, consumed)`` for the whole frame at the start of ``data``, else
    ``(None, needed)``: the module's header parser, then the payload."""
    head, needed = jc.parse_head(data, **options)
    if head is None or len(data) < needed:
        return None, needed
    return head.frame(data), needed

pytestmark = pytest.mark.timeout(180)

# JUPYTER_CALL_TIERS=1 runs the pure tier alone (seconds: for the edit-test loop), 2 adds the
# loopback tier; by default all three run. A test's tier is the number of the banner above it.
TIERS = int(os.environ.get("JUPYTER_CALL_TIERS", "3"))
_BANNERS = [(n, int(m.group(1)))
            for n, line in enumerate(Path(__file__).read_text("utf-8").splitlines(), 1)
            for m in [re.match(r"# ---- (\d)\. ", line)] if m]


@pytest.fixture(autouse=True)
def _only_the_tiers_asked_for(request):
    line = request.node.function.__code__.co_firstlineno
    tier = next((t for n, t in reversed(_BANNERS) if n < line), 1)
    if tier > TIERS:
        pytest.skip(f"tier {tier} (JUPYTER_CALL_TIERS={TIERS})")


# ---- Shared helpers: the command line as a user runs it (tiers 2 and 3) --------------

def _ctrl_c_heard():
    """(In a child: SIGINT as a terminal gives it, even where the tests run in the background of
    a shell, which starts them with SIGINT ignored, and Python then leaves it ignored.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, server=None, python=None, input=None, env=None, timeout=120):
    """Run the command line as a user would; returns the CompletedProcess."""
    full_env = dict(server.env if server else os.environ)
    full_env.update(env or {})
    cmd = [python or sys.executable, str(MODULE)]
    if server is not None:
        cmd += ["--url", server.url, "--token", server.token]
    return subprocess.run(cmd + list(args), input=input, env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(HERE))


# ---- 1. Pure: time budget and sockets (Windows slices, certificate messages) ---------------------

def test_windows_waits_come_in_slices_so_ctrl_c_is_seen(monkeypatch):
    class Socket:  # every wait runs out, as on a silent peer, until the ``answer``-th
        def __init__(self, answer):
            self.timeouts, self.answer = [], answer

        def settimeout(self, seconds):
            self.timeouts.append(seconds)

        def recv(self, size):
            if len(self.timeouts) < self.answer:
                raise socket.timeout("timed out")
            return b"late"

    monkeypatch.setattr(jc, "_WAIT_SLICE", 0.5)
    sock = Socket(answer=4)
    assert jc.recv_within(sock, 10, jc.Deadline(None)) == b"late" and sock.timeouts == [0.5] * 4
    # the last slice is what is left of the deadline, and it ends the wait
    sock = Socket(answer=10**6)
    with pytest.raises(socket.timeout):
        jc.recv_within(sock, 10, jc.Deadline(0.2))
    assert len(sock.timeouts) == 1 and 0 < sock.timeouts[0] <= 0.2
    monkeypatch.setattr(jc, "_WAIT_SLICE", None)  # elsewhere: one wait, as long as the deadline
    sock = Socket(answer=1)
    assert jc.recv_within(sock, 10, jc.Deadline(None)) == b"late" and sock.timeouts == [None]


def test_certificate_failures_say_what_failed(tmp_path, monkeypatch):
    class SSLCertVerificationError(OSError):  # what ssl raises, by the name the module asks for
        def __init__(self, code):
            super().__init__(1, "certificate verify failed")
            self.verify_code = code

    strict, unknown_issuer = SSLCertVerificationError(89), SSLCertVerificationError(20)
    assert jc._tls_fix(ConnectionRefusedError(), False) is None
    assert jc._tls_fix(strict, True) == "tls-strict" == jc._tls_fix(strict, False)
    assert jc._tls_fix(unknown_issuer, True) == "tls-context"  # the CA given is the wrong one
    assert jc._tls_fix(unknown_issuer, False, "linux") == "tls"
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))  # as a macOS python.org install
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))       # before its certificate step
    assert jc._tls_fix(unknown_issuer, False, "darwin") == "tls-store"
    assert jc._tls_fix(unknown_issuer, False, "win32") == "tls"  # Windows reads its own store
    for key in ("tls", "tls-context", "tls-store", "tls-strict"):
        assert key in jc.FIXES and key in jc._CLI_FIXES
    assert ("--cafile given" in jc._CLI_FIXES["tls-context"]
            and "Install Certificates" in jc._CLI_FIXES["tls-store"])


# ---- 1. Pure: the frame codec (RFC 6455 vectors) -------------------------------------

def test_accept_key_matches_rfc_section_1_3_example():
    assert jc.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_serialize_masks_hello_as_in_rfc_section_5_7():
    frame = Frame(Opcode.TEXT, b"Hello").serialize(mask_key=bytes([0x37, 0xFA, 0x21, 0x3D]))
    assert frame == bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])


def test_parse_reads_unmasked_hello_and_masked_hello():
    frame, used = parse_frame(b"\x81\x05Hello")
    assert (frame.opcode, frame.payload, frame.fin, used) == (Opcode.TEXT, b"Hello", True, 7)
    masked = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    frame, used = parse_frame(masked, masked=True)
    assert (frame.payload, used) == (b"Hello", 11)


def test_parse_reads_fragmented_hello_and_ping_from_rfc():
    first, n1 = parse_frame(b"\x01\x03Hel\x80\x02lo")
    second, n2 = parse_frame(b"\x01\x03Hel\x80\x02lo"[n1:])
    assert (first.fin, first.opcode, first.payload) == (False, Opcode.TEXT, b"Hel")
    assert (second.fin, second.opcode, second.payload) == (True, Opcode.CONT, b"lo")
    ping, _ = parse_frame(b"\x89\x05Hello")
    assert (ping.opcode, ping.payload) == (Opcode.PING, b"Hello")


@pytest.mark.parametrize("size, header", [
    (125, bytes([0x82, 125])),
    (126, bytes([0x82, 126, 0x00, 126])),
    (256, bytes([0x82, 0x7E, 0x01, 0x00])),
    (65535, bytes([0x82, 126, 0xFF, 0xFF])),
    (65536, bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00])),
])
def test_length_uses_7_16_or_64_bits(size, header):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = Frame(Opcode.BINARY, payload).serialize()
    assert wire[:len(header)] == header
    frame, used = parse_frame(wire)
    assert frame.payload == payload and used == len(wire)


def test_client_frames_roundtrip_through_a_masked_parse():
    wire = Frame(Opcode.BINARY, b"x" * 70000).serialize(mask_key=os.urandom(4))
    frame, _ = parse_frame(wire, masked=True)
    assert frame.payload == b"x" * 70000


def test_parse_asks_for_more_bytes_until_the_frame_is_whole():
    wire = Frame(Opcode.BINARY, b"a" * 300).serialize()
    assert parse_frame(wire[:1]) == (None, 2)
    assert parse_frame(wire[:3]) == (None, 4)
    assert parse_frame(wire[:100]) == (None, 304)


@pytest.mark.parametrize("wire, code, words", [
    (b"\xc1\x00", CloseCode.PROTOCOL_ERROR, "reserved bits"),
    (b"\x83\x00", CloseCode.PROTOCOL_ERROR, "reserved opcode"),
    (b"\x8b\x00", CloseCode.PROTOCOL_ERROR, "reserved opcode"),
    (b"\x09\x00", CloseCode.PROTOCOL_ERROR, "fragmented control"),
    (b"\x89\x7e\x00\x7e" + b"x" * 126, CloseCode.PROTOCOL_ERROR, "longer than 125"),
    (b"\x81\x80abcd", CloseCode.PROTOCOL_ERROR, "masked frame"),
    (b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00", CloseCode.PROTOCOL_ERROR, "top bit"),
])
def test_parse_rejects_protocol_violations_with_their_close_code(wire, code, words):
    with pytest.raises(WebSocketError) as info:
        parse_frame(wire)
    assert info.value.code == code and words in info.value.reason


def test_parse_rejects_frames_over_max_size_with_1009_before_reading_them():
    with pytest.raises(WebSocketError) as info:
        parse_frame(b"\x82\x7f" + (1 << 40).to_bytes(8, "big"), max_size=1024)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_mask_bytes_is_its_own_inverse_for_every_length():
    key = b"\x01\x02\x03\x04"
    for n in range(0, 9):
        data = bytes(range(n))
        assert jc._mask_bytes(jc._mask_bytes(data, key), key) == data
    assert jc._mask_bytes(b"\x00\x00\x00\x00\x00", key) == b"\x01\x02\x03\x04\x01"


def test_close_payload_and_parse_close():
    assert jc.close_payload(1000, "bye") == b"\x03\xe8bye"
    assert jc.parse_close(b"\x03\xe8bye") == (1000, "bye")
    assert jc.parse_close(b"") == (CloseCode.NO_STATUS, "")
    for bad in (b"\x03", b"\x03\xed", b"\x00\x00", b"\x13\x88"):  # 1-byte, 1005, 0, 5000
        with pytest.raises(WebSocketError) as info:
            jc.parse_close(bad)
        assert info.value.code == CloseCode.PROTOCOL_ERROR
    with pytest.raises(WebSocketError) as info:
        jc.parse_close(b"\x03\xe8\xff")
    assert info.value.code == CloseCode.INVALID_DATA


def test_frames_compare_by_value():
    assert Frame(Opcode.TEXT, b"hi") == Frame(Opcode.TEXT, b"hi", True, 0)
    assert Frame(Opcode.TEXT, b"hi") != Frame(Opcode.TEXT, b"hi", fin=False)
    assert "TEXT" in repr(Frame(Opcode.TEXT, b"hi"))


# ---- 1. Pure: the message reader (fragments, UTF-8, size limit) ---------------------

def _feed(reader, wire):
    """Every message that the frames in ``wire`` complete."""
    messages, buf = [], bytearray(wire)
    while buf:
        frame, used = parse_frame(buf)
        del buf[:used]
        message = reader.receive(frame)
        if message is not None:
            messages.append(message)
    return messages


def _fails_with(code, call, *args):
    with pytest.raises(WebSocketError) as info:
        call(*args)
    assert info.value.code == code
    return info.value


def test_reader_joins_fragments_into_one_message():
    reader = jc.MessageReader()
    assert _feed(reader, b"\x01\x03Hel" + b"\x00\x01l" + b"\x80\x01o") == ["Hello"]
    assert _feed(reader, b"\x02\x01\x00" + b"\x80\x01\x01" + b"\x82\x00") == [b"\x00\x01", b""]


def test_reader_validates_utf8_split_across_fragments():
    euro = "€".encode("utf-8")  # three bytes, split 1 + 2 across two fragments
    assert _feed(jc.MessageReader(), b"\x01\x01" + euro[:1] + b"\x80\x02" + euro[1:]) == ["€"]


def test_reader_fails_invalid_utf8_in_a_first_fragment_with_1007():
    # not final, but 0xC3 0x28 can never be UTF-8
    _fails_with(CloseCode.INVALID_DATA, _feed, jc.MessageReader(), b"\x01\x02\xc3\x28")


def test_reader_fails_invalid_utf8_before_the_rest_of_a_frame_arrives():
    reader = jc.MessageReader()
    partial = b"\x81\x0a" + b"ok" + b"\xf4\x90\x80\x80"  # 6 of 10 bytes; U+110000 is invalid
    head, needed = jc.parse_head(partial)
    assert needed == 12 and head.start == 2
    reader.check_partial(head, partial[:4])  # "ok" so far: fine
    _fails_with(CloseCode.INVALID_DATA, reader.check_partial, head, partial)


def test_reader_rejects_a_continuation_without_a_message_and_an_interleaved_message():
    error = _fails_with(CloseCode.PROTOCOL_ERROR, _feed, jc.MessageReader(), b"\x80\x01x")
    assert "no message to continue" in error.reason
    error = _fails_with(CloseCode.PROTOCOL_ERROR, _feed, jc.MessageReader(), b"\x01\x01a\x81\x01b")
    assert "inside a fragmented one" in error.reason


def test_reader_rejects_a_fragmented_message_over_max_size_with_1009():
    reader = jc.MessageReader(max_size=10)
    _fails_with(CloseCode.MESSAGE_TOO_BIG, _feed, reader, b"\x02\x06aaaaaa\x80\x06bbbbbb")


def test_many_tiny_fragments_cost_no_more_memory_than_the_message():
    import tracemalloc
    reader = jc.MessageReader(max_size=1 << 18)
    tracemalloc.start()
    try:
        assert reader.receive(Frame(Opcode.BINARY, b"", fin=False)) is None
        for _ in range(200_000):  # empty continuations cost nothing
            reader.receive(Frame(Opcode.CONT, b"", fin=False))
        with pytest.raises(WebSocketError) as info:
            for _ in range((1 << 18) + 1):  # one byte each, one past the limit
                reader.receive(Frame(Opcode.CONT, b"x", fin=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert peak < 4 * (1 << 18), peak  # was ~50 bytes a fragment: 13 MB here


# ---- 1. Pure: Jupyter messages and output collection ---------------------------------

def test_execute_request_has_every_key_the_server_needs():
    msg = jc.execute_request("1+1", session="s1")
    assert set(msg) == {"header", "parent_header", "metadata", "content", "channel", "buffers"}
    assert msg["channel"] == "shell" and msg["parent_header"] == {} and msg["metadata"] == {}
    header = msg["header"]
    assert header["msg_type"] == "execute_request" and header["session"] == "s1"
    assert header["version"] == "5.3" and re.match(r"\d{4}-\d\d-\d\dT", header["date"])
    assert msg["content"]["code"] == "1+1" and msg["content"]["allow_stdin"] is False


def test_legacy_encoding_is_one_json_object():
    msg = jc.execute_request("x", session="s")
    assert json.loads(jc.encode_message(msg)) == msg


def test_v1_encoding_matches_the_server_layout():
    msg = jc.new_message("kernel_info_request", {}, session="s")
    wire = jc.encode_message(msg, protocol="v1")
    count = struct.unpack_from("<Q", wire)[0]
    offsets = struct.unpack_from(f"<{count}Q", wire, 8)
    assert count == 6 and offsets[0] == 8 * 7 and offsets[-1] == len(wire)
    assert wire[offsets[0]:offsets[1]] == b"shell"
    assert json.loads(wire[offsets[1]:offsets[2]]) == msg["header"]
    back = jc.decode_message(wire, protocol="v1")
    assert back["header"] == msg["header"] and back["channel"] == "shell" and back["buffers"] == []


@pytest.mark.parametrize("wire", ["not json", "[1, 2]", '{"content": {}}', b"\x00\x00",
                                  '{"header": {"msg_type": "status"}} {}'])
def test_decode_rejects_malformed_messages(wire):
    with pytest.raises(ValueError):
        jc.decode_message(wire)


@pytest.mark.parametrize("content, ok", [(b'{"a": 1}', True), (b' {"a": 1}\r\n', True), (b"", True),
                                         (b'{"a": 1} {}', False), (b'{"a": 1', False),
                                         (b"\xff{}", False)])
def test_v1_parts_are_read_as_json_loads_reads_them(content, ok):
    header = json.dumps({"msg_type": "status", "msg_id": "m"}).encode()
    wire = jc._pack_v1("iopub", [header, b"{}", b"{}", content])
    if ok:
        assert jc.decode_message(wire, protocol="v1")["content"] == (json.loads(content)
                                                                     if content else {})
    else:
        with pytest.raises(ValueError):
            jc.decode_message(wire, protocol="v1")


def _msg(msg_type, content, parent="req", channel="iopub", msg_id=None):
    return {"header": {"msg_type": msg_type, "msg_id": msg_id or secrets.token_hex(8)},
            "parent_header": {"msg_id": parent} if parent else {},
            "content": content, "channel": channel}


def test_execution_is_done_only_after_reply_and_idle_in_either_order():
    for order in (("reply", "idle"), ("idle", "reply")):
        run = jc.Execution("req")
        for step in order:
            assert not run.done
            if step == "reply":
                run.feed(_msg("execute_reply", {"status": "ok", "execution_count": 3},
                              channel="shell"))
            else:
                run.feed(_msg("status", {"execution_state": "idle"}))
        assert run.done
        assert run.finish().status == "ok" and run.finish().execution_count == 3


def test_execution_ignores_foreign_parents_and_duplicate_ids():
    seen = []
    run = jc.Execution("req", on_output=seen.append)
    run.feed(_msg("stream", {"name": "stdout", "text": "other client\n"}, parent="other"))
    run.feed(_msg("status", {"execution_state": "idle"}, parent="kernel_info"))
    run.feed(_msg("stream", {"name": "stdout", "text": "a\n"}, msg_id="m1"))
    run.feed(_msg("stream", {"name": "stdout", "text": "a\n"}, msg_id="m1"))  # replayed
    assert not run.idle
    assert run.finish().stdout == "a\n" and len(seen) == 1


def test_execution_merges_streams_and_keeps_arrival_order():
    run = jc.Execution("req")
    for name, text in [("stdout", "a"), ("stdout", "b\n"), ("stderr", "e\n"), ("stdout", "c\n")]:
        run.feed(_msg("stream", {"name": name, "text": text}))
    run.feed(_msg("execute_result",
                  {"execution_count": 1, "data": {"text/plain": "2"}, "metadata": {}}))
    res = run.finish()
    assert [o["output_type"] for o in res.outputs] == ["stream", "stream", "stream",
                                                       "execute_result"]
    assert res.outputs[0] == {"output_type": "stream", "name": "stdout", "text": "ab\n"}
    assert res.stdout == "ab\nc\n" and res.stderr == "e\n" and res.data == {"text/plain": "2"}


def test_execution_takes_the_error_from_the_reply():
    run = jc.Execution("req")
    run.feed(_msg("error", {"ename": "ZeroDivisionError", "evalue": "division by zero",
                            "traceback": ["tb"]}))
    run.feed(_msg("execute_reply", {"status": "error", "ename": "ZeroDivisionError",
                                    "evalue": "division by zero", "traceback": ["tb"],
                                    "execution_count": 1}, channel="shell"))
    res = run.finish()
    assert res.status == "error" and not res.ok
    assert res.error == {"ename": "ZeroDivisionError", "evalue": "division by zero",
                         "traceback": ["tb"]}
    with pytest.raises(jc.ExecutionError, match="ZeroDivisionError: division by zero") as info:
        res.raise_for_error()
    assert info.value.result is res
    assert [o["output_type"] for o in res.outputs] == ["error"]  # (shown once)


def test_an_error_whose_output_never_came_is_shown_from_the_reply():
    """iopub drops what a kernel says while the server subscribes again after a restart."""
    shown = []
    run = jc.Execution("req", on_output=shown.append)
    run.feed(_msg("execute_reply", {"status": "error", "ename": "NameError",
                                    "evalue": "name 'gone' is not defined",
                                    "traceback": ["NameError: ..."], "execution_count": 2},
                  channel="shell"))
    run.feed(_msg("status", {"execution_state": "idle"}))
    res = run.finish()
    assert res.outputs == shown == [{"output_type": "error", "ename": "NameError", "evalue":
                                     "name 'gone' is not defined", "traceback": ["NameError: ..."]}]
    assert run.finish().outputs == shown  # (once)


def test_execution_surfaces_aborted():
    run = jc.Execution("req")
    run.feed(_msg("execute_reply", {"status": "aborted"}, channel="shell"))
    res = run.finish()
    assert res.status == "aborted" and not res.ok
    with pytest.raises(jc.ExecutionError, match="aborted"):
        res.raise_for_error()


def test_clear_output_and_update_display_data():
    run = jc.Execution("req")
    run.feed(_msg("stream", {"name": "stdout", "text": "old\n"}))
    run.feed(_msg("clear_output", {"wait": True}))
    assert run.result.outputs  # wait=True clears only when the next output comes
    run.feed(_msg("display_data", {"data": {"text/plain": "v1"}, "metadata": {},
                                   "transient": {"display_id": "d"}}))
    run.feed(_msg("update_display_data", {"data": {"text/plain": "v2"}, "metadata": {},
                                          "transient": {"display_id": "d"}}))
    res = run.finish()
    assert res.outputs == [{"output_type": "display_data", "data": {"text/plain": "v2"},
                            "metadata": {}}]
    run.feed(_msg("clear_output", {"wait": False}))
    assert run.finish().outputs == []


def test_execution_notes_rate_limit_and_kernel_death():
    run = jc.Execution("req")
    run.feed(_msg("stream", {"name": "stderr", "text": "IOPub data rate exceeded.\nThe server..."}))
    assert run.finish().truncated
    run.feed(_msg("status", {"execution_state": "restarting"}, parent=None))
    assert run.died


def test_result_to_dict_mirrors_every_field_and_property():
    res = Result(status="ok", execution_count=2,
                 outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"},
                          {"output_type": "execute_result", "execution_count": 2,
                           "data": {"text/plain": "3"}, "metadata": {}}])
    assert json.loads(json.dumps(res.to_dict())) == {
        "status": "ok", "ok": True, "execution_count": 2, "stdout": "1\n", "stderr": "",
        "data": {"text/plain": "3"}, "error": None, "truncated": False, "outputs": res.outputs}


def test_result_is_a_plain_class_that_compares_by_value():
    out = {"output_type": "stream", "name": "stdout", "text": "1\n"}
    res = Result(status="ok", execution_count=2, outputs=[out])
    assert res == Result("ok", 2, [dict(out)]) and res != Result("ok", 3, [out])
    assert (repr(Result()) == "Result(status='incomplete', execution_count=None, outputs=<0>, "
                              "error=None, truncated=False)")
    assert Result().outputs is not Result().outputs  # each its own list


def test_json_output_is_strict_even_for_infinities_from_the_server():
    res = Result("ok", 1, [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                             "data": {"application/json": {"big": float("inf"),
                                                           "nan": float("nan")}}}])
    out = io.StringIO()
    jc._print_json(out, [({}, res)], False, failed=False)
    strict = json.loads(out.getvalue(),
                        parse_constant=lambda name: pytest.fail(f"{name} in the output"))
    assert strict["data"]["application/json"] == {"big": "Infinity", "nan": "NaN"}


def _message(msg_type, content, *, parent="P", channel="iopub"):
    return {"header": {"msg_id": secrets.token_hex(4), "msg_type": msg_type},
            "parent_header": {"msg_id": parent},
            "metadata": {}, "content": content, "channel": channel}


@pytest.mark.parametrize("msg_type, content, words", [
    ("display_data", {"data": {"text/plain": [1, 2]}}, "list as text/plain"),
    ("execute_result", {"data": {"image/png": ["iVBO", None]}, "execution_count": 1},
     "list as image/png"),
    ("update_display_data", {"data": {"text/html": {"a": 1}}, "transient": {"display_id": "d"}},
     "dict as text/html"),
    ("display_data", {"data": {}, "metadata": 5}, "int as metadata"),
    ("display_data", {"data": {}, "transient": 1.5}, "float as transient"),
    ("error", {"ename": "E", "evalue": "", "traceback": True}, "bool as traceback"),
    ("execute_reply", {"status": "error", "traceback": 7}, "int as traceback"),
    ("execute_result", {"data": {}, "execution_count": True}, "bool as execution_count"),
    ("input_request", {"prompt": 5}, "int as prompt"),
    ("kernel_info_reply", {"language_info": "python"}, "str as language_info"),
    ("display_data", {"data": {"application/json": json.loads("[" * 300 + "]" * 300)}},
     "nested deeper than 200"),
])
def test_decode_refuses_values_of_the_wrong_type_where_they_enter(msg_type, content, words):
    with pytest.raises(ValueError, match=words):
        jc.decode_message(json.dumps(_message(msg_type, content)))


def test_decode_keeps_json_mimebundles_and_fields_it_does_not_read():
    data = {"application/json": [1, {"a": None}], "application/vnd.x+json": 5,
            "text/plain": ["a", "b"]}
    for msg_type, content in (("display_data", {"data": data}),
                              ("stream", {"name": "stdout", "text": "x",
                                          "traceback": 5, "transient": 5}),
                              ("comm_msg", {"data": {"x": [1]}, "traceback": {}})):
        assert jc.decode_message(json.dumps(_message(msg_type, content)))["content"] == content


def test_an_error_output_is_never_updated_by_a_display_id():
    run = jc.Execution("P", keep_outputs=True)
    for msg in (_message("display_data",
                         {"data": {"text/plain": "a"}, "transient": {"display_id": "d"}}),
                _message("error", {"ename": "E", "evalue": "v", "traceback": [],
                                   "transient": {"display_id": "d"}}),
                _message("update_display_data",
                         {"data": {"text/plain": "b"}, "transient": {"display_id": "d"}})):
        run.feed(jc.decode_message(json.dumps(msg)))
    assert [o.get("data") for o in run.result.outputs] == [{"text/plain": "b"}, None]


def _random_json(rng, depth=0):
    if depth > 3 or rng.random() < 0.45:
        return rng.choice([None, True, False, 0, -7, 2**70, 1.5, float("nan"), float("inf"), "",
                           "x", "stdout", "idle", "error", "ok", "\x1b[31mred\n", "iVBORw0KGgo=",
                           "d", "P", "\U0001f600", "\ud800"])
    if rng.random() < 0.55:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["text/plain", "image/png", "text/html", "application/json", "x+json", "display_id",
            "msg_id", "id", "name", "kernel", "path", "version", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


_OUTPUT_CONTENTS = {
    "stream": {"name": "stdout", "text": "hi\n"},
    "display_data": {"data": {"text/plain": "t", "image/png": "iVBORw0KGgo="},
                     "transient": {"display_id": "d"}},
    "execute_result": {"data": {"text/plain": "2", "text/html": ["<b>", "2</b>"]},
                       "execution_count": 1},
    "update_display_data": {"data": {"text/plain": "u"}, "transient": {"display_id": "d"}},
    "error": {"ename": "E", "evalue": "v", "traceback": ["l1", "l2"]},
    "execute_reply": {"status": "ok", "execution_count": 1},
    "status": {"execution_state": "idle"},
    "clear_output": {"wait": False},
}


def _random_message(rng):
    msg_type = rng.choice(list(_OUTPUT_CONTENTS))
    msg = _message(msg_type, json.loads(json.dumps(_OUTPUT_CONTENTS[msg_type])))
    for _ in range(rng.randrange(1, 4)):
        where, content = rng.random(), msg["content"]
        if not isinstance(content, dict) or not isinstance(msg["header"], dict):
            break
        if where < 0.5:
            content[rng.choice(list(content) + ["traceback", "data", "metadata",
                                                "transient"])] = _random_json(rng)
        elif where < 0.8 and isinstance(content.get("data"), dict):
            content["data"][rng.choice(["text/plain", "image/png", "text/html",
                                        "application/json"])] = \
                _random_json(rng)
        elif where < 0.9:
            msg[rng.choice(["header", "parent_header", "metadata", "content"])] = _random_json(rng)
        else:
            msg["header"][rng.choice(["msg_id", "msg_type"])] = _random_json(rng)
    return msg


def test_random_kernel_messages_end_as_outputs_or_as_malformed_never_as_a_crash(tmp_path):
    """Property: whatever a kernel sends, decode_message refuses it (ValueError) or every later
    stage (output collection, the printer, --json, --write) takes it."""
    import random
    rng = random.Random(20)
    for wire in ("legacy", "v1"):
        for _ in range(3000):
            run, shown = jc.Execution("P", keep_outputs=True), []
            run.on_output = shown.append
            for msg in (_random_message(rng) for _ in range(rng.randrange(1, 5))):
                try:
                    data = jc.encode_message(msg, protocol=wire)
                except (TypeError, ValueError):
                    continue  # (nothing a kernel could send)
                try:
                    run.feed(jc.decode_message(data, protocol=wire))
                except (ValueError, UnicodeDecodeError):
                    pass
            result = run.finish()
            printer = jc._Printer(io.StringIO(), io.StringIO(), color="never",
                                  output_dir=str(tmp_path))
            for out in shown:
                printer(out)
            printer.finish()
            jc._print_json(io.StringIO(), [({}, result)], False, failed=False)
            jc._notebook_text({"cells": [{"cell_type": "code", "metadata": {}, "source": "",
                                         "outputs": result.outputs,
                                          "execution_count": result.execution_count}],
                               "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


# ---- 1. Pure: notebooks (papermill's parameters, '# %' files) -------------------------

@pytest.mark.parametrize("value, expected", [  # papermill's own translator tests
    ("foo", '"foo"'), ('{"foo": "bar"}', '"{\\"foo\\": \\"bar\\"}"'),
    ({"foo": "bar"}, '{"foo": "bar"}'),
    ({"foo": '"bar"'}, '{"foo": "\\"bar\\""}'), ({"foo": ["bar"]}, '{"foo": ["bar"]}'),
    ({"foo": {"bar": "baz"}}, '{"foo": {"bar": "baz"}}'),
    (["foo", '"bar"'], '["foo", "\\"bar\\""]'), ([{"foo": '"bar"'}], '[{"foo": "\\"bar\\""}]'),
    (12345, "12345"), (-54321, "-54321"), (1.2345, "1.2345"),
    (-5432.1, "-5432.1"), (True, "True"), (False, "False"), (None, "None"),
    (float("nan"), "float('nan')"), (float("inf"), "float('inf')"),
    (float("-inf"), "float('-inf')"), ("é\n\\", '"\\xe9\\n\\\\"'),
])
def test_parameters_are_written_as_papermills_python_translator_writes_them(value, expected):
    assert jc._python_literal(value) == expected


def test_parameter_values_are_read_as_papermill_reads_them():
    assert [jc.parameter_value(v) for v in ("True", "False", "None", "12", "-1.5", "1e3",
                                            "x", "true")] == [
        True, False, None, 12, -1.5, 1000.0, "x", "true"]


def _cell(kind, source, tags=(), **fields):
    cell = {"cell_type": kind, "id": secrets.token_hex(4),
            "metadata": {"tags": list(tags)} if tags else {}, "source": source}
    if kind == "code":
        cell.update({"execution_count": None, "outputs": [], **fields})
    return cell


def test_parameters_go_after_the_parameters_cell_or_replace_an_injected_one_or_lead():
    notebook = {"cells": [_cell("markdown", "# t"), _cell("code", "a = 1", ["parameters"]),
                          _cell("code", "a")],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    jc._inject_parameters(notebook, {"foo": "bar", "baz": ["buz"]})
    injected = notebook["cells"][2]
    assert injected["source"] == '# Parameters\nfoo = "bar"\nbaz = ["buz"]\n'
    assert injected["metadata"]["tags"] == ["injected-parameters"]
    assert notebook["metadata"]["papermill"]["parameters"] == {"foo": "bar", "baz": ["buz"]}
    jc._inject_parameters(notebook, {"foo": 5})  # a second run replaces it where it stands
    assert (len(notebook["cells"]) == 4
            and notebook["cells"][2]["source"] == "# Parameters\nfoo = 5\n")
    plain = {"cells": [_cell("code", "x = 1")], "metadata": {}}
    jc._inject_parameters(plain, {"x": 2})
    assert [c["source"] for c in plain["cells"]] == ["# Parameters\nx = 2\n", "x = 1"]


def test_percent_files_become_notebooks_with_their_tags():
    text = ('import os\n# %% tags=["parameters"]\na = 1\n# %% [markdown]\n# Title\n#\n# text\n'
            '# %%\nprint(a)\n')
    notebook = jc.notebook_from(text, "Job.PY")
    assert [(c["cell_type"], c["source"], jc._cell_tags(c)) for c in notebook["cells"]] == [
        ("code", "import os\n", []), ("code", "a = 1\n", ["parameters"]),
        ("markdown", "Title\n\ntext", []), ("code", "print(a)\n", [])]
    jc._inject_parameters(notebook, {"a": 2})
    assert jc._cell_source(notebook["cells"][2]) == "# Parameters\na = 2\n"


def test_parameters_merge_as_papermill_merges_them(tmp_path):
    file = tmp_path / "params.json"
    file.write_text('{"a": 1, "b": 2, "c": [1]}')
    args = jc._parse_args(["--parameters-file", str(file), "-p", "b", "3", "-p", "d", "None",
                           "-r", "b", "4", "-r", "e", "1.5", "x"])
    assert jc._parameters(args) == {"a": 1, "b": "4", "c": [1], "d": None, "e": "1.5"}
    for bad, words in ((["-p", "not a name", "1"], "not a Python name"),
                       (["--parameters-file", str(tmp_path / "missing.json")],
                        "cannot read --parameters-file")):
        with pytest.raises(jc.ConfigError, match=words):
            jc._parameters(jc._parse_args(bad + ["x"]))


@pytest.mark.parametrize("minor", range(6))
@pytest.mark.parametrize("parameters", [None, {"x": 2}])
def test_every_notebook_written_validates_as_the_version_it_declares(minor, parameters):
    nbformat = pytest.importorskip("nbformat")
    old = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
               nbformat.v4.new_markdown_cell("text"), nbformat.v4.new_code_cell("x")])
    old.nbformat_minor = minor
    for cell in old.cells:
        if minor < 5:
            cell.pop("id", None)
    nbformat.validate(old)
    notebook = jc.notebook_from(json.dumps(old), "old.ipynb")
    jc.kernel_for(notebook, parameters)
    notebook["cells"][-1]["outputs"] = [{"output_type": "execute_result", "execution_count": 1,
                                         "metadata": {}, "data": {"text/plain": "2"}}]
    written = nbformat.reads(jc._notebook_text(notebook), as_version=nbformat.NO_CONVERT)
    nbformat.validate(written)
    assert (written.nbformat_minor == 5
            and len({cell.id for cell in written.cells}) == len(written.cells))


# ---- 1. Pure: discovery from runtime files and environment variables -----------------

def _runtime_file(folder, name, **info):
    path = folder / name
    path.write_text(json.dumps(info))
    return path


def test_list_servers_reads_runtime_files_newest_first_and_skips_dead_ones(tmp_path):
    old = _runtime_file(tmp_path, "nbserver-1.json", port=8001, hostname="0.0.0.0", base_url="/",
                        pid=os.getpid(), token="t1", notebook_dir="/nb")
    os.utime(old, (1, 1))
    _runtime_file(tmp_path, "jpserver-2.json", port=8002, hostname="localhost", base_url="/lab/",
                  pid=os.getpid(), token="t2", root_dir="/r", version="2.0")
    _runtime_file(tmp_path, "jpserver-3.json", port=8003, hostname="localhost", pid=2**22 + 12345)
    (tmp_path / "jpserver-4.json").write_text("{not json")
    (tmp_path / "kernel-5.json").write_text("{}")
    # the shape no server writes
    for odd in ({"base_url": 5}, {"sock": 7, "port": None}, {"hostname": 5}):
        _runtime_file(tmp_path, f"jpserver-{len(odd)}{id(odd)}.json",
                      **{"port": 9, "pid": os.getpid(), **odd})
    (tmp_path / "jpserver-6.json").write_text("[1, 2]")
    (tmp_path / "jpserver-7.json").write_text("[" * 100000 + "]" * 100000)
    servers = jc.list_servers(str(tmp_path))
    assert [s["url"] for s in servers] == ["http://localhost:8002/lab/", "http://127.0.0.1:8001/"]
    assert servers[1]["root_dir"] == "/nb" and servers[0]["token"] == "t2"


WRONG_VALUES = [None, True, 0, -1, 99999, 2**70, 1.5, "", "x", "[::1", [], ["h"], {}, {"a": 1}]


@pytest.mark.parametrize("field", ["url", "hostname", "ip", "port", "sock", "base_url", "secure",
                                   "token", "pid", "root_dir", "notebook_dir", "version"])
def test_a_runtime_file_with_an_odd_field_is_skipped_or_the_field_dropped(tmp_path, field):
    _runtime_file(tmp_path, "jpserver-1.json", port=8001, hostname="localhost", pid=os.getpid(),
                  token="t1")
    for n, value in enumerate(WRONG_VALUES):
        info = {"port": 8002, "hostname": "localhost", "base_url": "/b/", "pid": os.getpid(),
                "token": "t2", "secure": False, field: value}
        path = _runtime_file(tmp_path, f"jpserver-2{n}.json", **info)
        os.utime(path, (2**31, 2**31))  # newest: found first when it counts
        servers = jc.list_servers(str(tmp_path))
        assert servers[-1]["url"] == "http://localhost:8001/", (field, value)
        if len(servers) == 2:  # the field was ignored, or the value is a fine one
            assert servers[0]["url"].startswith(("http://", "https://",
                                                 "http+unix://")), (field, value)
            assert all(isinstance(servers[0].get(key), (str, type(None)))
                       for key in ("root_dir", "version", "token"))
        path.unlink()


def test_random_runtime_files_never_break_discovery(tmp_path, monkeypatch):
    """Property: random JSON in every field of runtime files; discovery finds the good server."""
    import random
    rng = random.Random(20)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    for var in ("JUPYTER_URL", "JUPYTERHUB_SERVICE_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE",
                "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    good = _runtime_file(tmp_path, "jpserver-1.json", port=8001, hostname="localhost",
                         pid=os.getpid(), token="t1")
    os.utime(good, (2**31, 2**31))
    for n in range(250):
        info = {"port": 8002, "hostname": "localhost", "pid": os.getpid(), "token": "t2"}
        for field in rng.sample(sorted(jc._RUNTIME_FIELDS) + ["url"], rng.randrange(1, 4)):
            info[field] = _random_json(rng)
        _runtime_file(tmp_path, f"jpserver-{n + 2}.json", **info)
        assert jc.resolve_server()[:2] == ("http://localhost:8001/", "t1")
        assert jc.resolve_server("http://localhost:8002/")[0] == "http://localhost:8002/"


@pytest.mark.parametrize("platform, env, where", [
    ("linux", {}, "~/.local/share/jupyter"),
    ("linux", {"JUPYTER_PLATFORM_DIRS": "1"}, "~/.local/share/jupyter"),
    ("linux", {"XDG_DATA_HOME": "/x"}, "/x/jupyter"), ("darwin", {}, "~/Library/Jupyter"),
    ("darwin", {"JUPYTER_PLATFORM_DIRS": "1"}, "~/Library/Application Support/jupyter"),
    ("darwin", {"JUPYTER_PLATFORM_DIRS": "off"}, "~/Library/Jupyter"),
    ("win32", {"APPDATA": "/r", "LOCALAPPDATA": "/l"}, "/r/jupyter"),
    ("win32", {"APPDATA": "/r", "LOCALAPPDATA": "/l", "JUPYTER_PLATFORM_DIRS": "true"},
     "/l/jupyter"),
    ("win32", {"JUPYTER_DATA_DIR": "/d", "JUPYTER_PLATFORM_DIRS": "1"}, "/d"),
])
def test_discovery_follows_jupyter_cores_directories_on_each_platform(platform, env, where):
    assert jc._data_dir(platform, env) == os.path.expanduser(where)


def test_windows_discovery_asks_whether_the_servers_process_still_runs():
    class Kernel32:  # the answers Windows gives for a running process and for one that exited
        def __init__(self, exit_code):
            self.exit_code, self.closed = exit_code, False

        def OpenProcess(self, access, inherit, pid):
            return 42 if pid == 7 else 0

        def GetExitCodeProcess(self, handle, code):
            code._obj.value = self.exit_code
            return 1

        def CloseHandle(self, handle):
            self.closed = True

    running, exited = Kernel32(259), Kernel32(0)
    assert jc._windows_process_alive(7, running) and running.closed
    assert not jc._windows_process_alive(7, exited) and not jc._windows_process_alive(8, running)
    assert not jc._pid_alive(True) and not jc._pid_alive("7", "win32")


def test_resolve_server_prefers_arguments_then_environment_then_discovery(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    assert jc.resolve_server()[:2] == ("http://localhost:8888/", "")  # "": no token to send
    _runtime_file(tmp_path, "jpserver-9.json", port=9999, hostname="127.0.0.1", pid=os.getpid(),
                  token="disc", root_dir="/srv/notebooks")
    assert jc.resolve_server()[:2] == ("http://127.0.0.1:9999/", "disc")
    assert jc.resolve_server("http://127.0.0.1:9999")[:2] == ("http://127.0.0.1:9999/", "disc")
    # the server's root folder comes from its runtime file, however URL and token were found
    assert jc.resolve_server("http://127.0.0.1:9999/", "given") == (
        "http://127.0.0.1:9999/", "given", "/srv/notebooks")
    token_file = tmp_path / "tok"
    monkeypatch.setenv("JUPYTER_TOKEN_FILE", str(token_file))
    with pytest.raises(jc.ConfigError, match="cannot read JUPYTER_TOKEN_FILE .*tok: No such file"):
        jc.resolve_server()
    token_file.write_bytes(b"\xff\xfe")
    with pytest.raises(jc.ConfigError, match="tok: it is not UTF-8 text"):
        jc.resolve_server()
    token_file.write_text("fromfile\n")
    assert jc.resolve_server()[1] == "fromfile"
    monkeypatch.setenv("JUPYTER_URL", "http://example.invalid:1/x")
    monkeypatch.setenv("JUPYTER_TOKEN", "envtok")
    assert jc.resolve_server()[:2] == ("http://example.invalid:1/x/", "envtok")
    assert jc.resolve_server("http://h:2/", "arg")[:2] == ("http://h:2/", "arg")
    # resolved: asks nothing more
    assert jc.resolve_server("http://h:2/", "")[:2] == ("http://h:2/", "")


def test_discovery_reads_unix_sockets_and_jupyterhub_variables(tmp_path, monkeypatch):
    _runtime_file(tmp_path, "jpserver-7.json", sock="/tmp/j s.sock", port=0, pid=os.getpid(),
                  token="u", base_url="/")
    assert ([s["url"] for s in jc.list_servers(str(tmp_path))]
            == ["http+unix://%2Ftmp%2Fj%20s.sock/"])
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "empty"))
    for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:8888/user/ann")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "hubtok")
    assert jc.resolve_server()[:2] == ("http://127.0.0.1:8888/user/ann/", "hubtok")


def test_a_hub_users_server_url_gives_the_hubs_api_beside_it():
    for url, hub, path in [
            ("https://hub.example.org/user/ann/", "https://hub.example.org/hub/",
             "api/users/ann/server"),
            ("http://h:8000/jupyter/user/ann/gpu/", "http://h:8000/jupyter/hub/",
             "api/users/ann/servers/gpu"),
            ("http://h/user/a%40b.org/", "http://h/hub/", "api/users/a%40b.org/server")]:
        rest, found = jc._hub_server(url, "t", None)
        assert (rest.url, found, rest.token) == (hub, path, "t")
    with pytest.raises(jc.ConfigError, match="not a JupyterHub user's server"):
        jc._hub_server("http://h:8888/lab/", "t", None)


# ---- 1. Pure: the command line (parser, help, Windows consoles) ----------------------------------

def test_command_line_forms():
    args = jc._parse_args(["--url=http://h:1/", "--tok", "T", "-fcode.py", "--env", "A=1",
                           "--env=B=2",
                           "--input", "-", "--input", "-3", "--timeout", "2.5", "--kernel-id", "K",
                           "--json", "--color", "never"])
    assert (args.url, args.token, args.file, args.kernel_id) == ("http://h:1/", "T", "code.py", "K")
    assert (args.env == [("A", "1"), ("B", "2")] and args.input == ["-", "-3"]
            and args.timeout == 2.5)
    assert (args.json is True and args.keep is False and args.color == "never"
            and args.protocol == "auto")
    assert args.code is None and args.kernel is None
    assert jc._parse_args(["-1"]).code == "-1"
    assert jc._parse_args(["--json", "--", "--not-an-option"]).code == "--not-an-option"
    assert jc._parse_args(["--kernel", "python3", "1"]).kernel == "python3"  # exact beats prefix


def test_help_lists_every_option():
    text = jc._help()
    for flags, *_ in jc._OPTIONS:
        assert all(flag in text for flag in flags)
    options = text.partition("exit codes:")[0]
    assert max(len(line) for line in options.splitlines()) <= 79


@pytest.mark.parametrize("url", ["file:///etc/", "ftp://127.0.0.1:1/", "javascript:alert(1)//x",
                                 "http://", "http:///x", "httpx://h/"])
def test_a_url_jupyter_call_does_not_speak_is_a_config_error(url, monkeypatch):
    with pytest.raises(jc.ConfigError, match="scheme|names no host|malformed"):
        jc.Kernel(url, "t")
    monkeypatch.setenv("JUPYTER_URL", url)
    with pytest.raises(jc.ConfigError, match="scheme|names no host|malformed"):
        jc.run_code("1", token="t")


def test_ws_urls_and_non_ascii_base_urls_are_spoken_to_over_http():
    assert (jc.resolve_server("ws://127.0.0.1:1/a b/ü/", "t")[:2]
            == ("http://127.0.0.1:1/a%20b/%C3%BC/", "t"))
    assert jc.resolve_server("WSS://h:1", "t")[0] == "https://h:1/"


def test_windows_console_closing_ends_the_run_as_ctrl_break_does():
    steps = []

    class Finished:  # what main() sets once the run has cleaned up
        def wait(self, seconds):
            steps.append(("held", seconds))
            return True

    handle = jc._console_handler(lambda: steps.append("raised"), Finished())
    # Ctrl-C, Ctrl-Break: Python's own
    assert handle(0) is False and handle(1) is False and not steps
    # CTRL_CLOSE_EVENT: the run is ended, the process held while it cleans up
    assert handle(2) is True
    assert steps == ["raised", ("held", jc._CONSOLE_CLOSE_GRACE)]


def test_windows_consoles_get_colour_only_where_they_speak_vt_already(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for var in ("NO_COLOR", "TERM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    for speaks, colour in ((lambda: True, True), (lambda: False, False), (None, False)):
        # (an "nt" without the check: Python before 3.13, which is given no colours)
        monkeypatch.setitem(sys.modules, "nt", types.SimpleNamespace(
            **({"_supports_virtual_terminal": speaks} if speaks else {})))
        assert jc._use_color(Terminal(), "auto") is colour
    assert jc._use_color(Terminal(), "always") and not jc._use_color(io.StringIO(), "auto")


# ---- 1. Pure: what the MCP server makes of outputs and arguments ----------------------

def test_mcp_content_keeps_order_and_strips_colours():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()
    outputs = [{"output_type": "stream", "name": "stdout", "text": "a\n"},
               {"output_type": "stream", "name": "stderr", "text": "warn\n"},
               {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"},
                "metadata": {}},
               {"output_type": "execute_result", "data": {"text/plain": "42"}, "metadata": {},
                "execution_count": 1},
               {"output_type": "display_data", "data": {"text/html": "<b>x</b>"}, "metadata": {}},
               {"output_type": "error", "ename": "E", "evalue": "v",
                "traceback": ["\x1b[0;31mE\x1b[0m: v"]}]
    content, missing = jc._tool_content(outputs)
    assert content == [{"type": "text", "text": "a\nwarn\n"},
                       {"type": "image", "data": png, "mimeType": "image/png"},
                       {"type": "text", "text": "42\n<b>x</b>\nE: v\n"}]
    assert missing is False


def test_mcp_content_budget_keeps_head_and_tail_and_says_where_the_rest_is(tmp_path):
    text = "".join(f"line {i}\n" for i in range(10_000))
    chunks = [{"output_type": "stream", "name": "stdout", "text": text[i:i + 777]}
              for i in range(0, len(text), 777)]
    content, missing = jc._tool_content(chunks, max_output=3000, output_dir=str(tmp_path))
    shown = content[0]["text"]
    assert (missing and shown.startswith("line 0\n") and shown.endswith("line 9999\n")
            and len(shown) < 3200)
    saved = next(tmp_path.glob("mcp-*.txt"))
    assert f"{len(text) - 3000:,} characters left out; the whole text is in {saved}" in shown
    assert saved.read_text() == text
    content, _ = jc._tool_content(chunks, max_output=3000)
    assert ("characters left out ...]" in content[0]["text"]
            and "whole text" not in content[0]["text"])
    small, missing = jc._tool_content(chunks[:2], max_output=3000,
                                      output_dir=str(tmp_path / "small"))
    assert (not missing and small[0]["text"] == text[:1554]
            and not list((tmp_path / "small").iterdir()))
    cleared = [*chunks, {"output_type": "clear_output", "wait": True},
               {"output_type": "stream", "text": "last\n"}]
    assert (jc._tool_content(cleared, max_output=3000)
            == ([{"type": "text", "text": "last\n"}], False))


def test_mcp_images_over_the_budget_are_saved_or_described(tmp_path):
    big = base64.b64encode(b"\xff\xd8" + b"\1" * 2_499_998).decode()
    outputs = [{"output_type": "display_data", "data": {"image/jpeg": big}, "metadata": {}}]
    content, missing = jc._tool_content(outputs)
    assert missing and content == [{"type": "text", "text": "[image/jpeg 2.4 MB omitted]\n"}]
    content, _ = jc._tool_content(outputs, output_dir=str(tmp_path))
    saved = next(tmp_path.glob("mcp-*.jpg"))
    assert content == [{"type": "text", "text": f"[image/jpeg 2.4 MB saved to {saved}]\n"}]
    assert saved.read_bytes() == base64.b64decode(big)
    small = {"output_type": "display_data",
             "data": {"image/png": base64.b64encode(b"png").decode()}, "metadata": {}}
    content, missing = jc._tool_content([small] * 12)
    # at most 10 inlined
    assert [b["type"] for b in content] == ["image"] * 10 + ["text"] and missing
    assert content[-1]["text"] == "[image/png 3 B omitted]\n[image/png 3 B omitted]\n"


def test_mcp_arguments_are_checked_against_the_input_schema():
    run_code = jc._MCP_TOOLS["run_code"][0]["inputSchema"]
    check = functools.partial(jc._check_arguments, run_code)
    assert (check({"code": "1"}) is None
            and check({"code": "1", "kernel": "k", "timeout": 2}) is None)
    assert check({}) == "argument 'code' is required"
    assert check({"code": 1}) == "argument 'code' must be string, not integer"
    assert check({"code": "1", "timeout": 0}) == "argument 'timeout' must be a positive number"
    assert check({"code": "1", "timeout": True}) == "argument 'timeout' must be number, not boolean"
    assert check({"code": "1", "cod": "x"}).startswith("unknown argument 'cod' (this tool takes: "
                                                       "code, kernel")
    assert check([]) == "the arguments must be an object"
    assert (check({"code": "1", "kernel": "../../api"})
            == "argument 'kernel' is not a kernel id: '../../api'")


class _App:
    """What the MCP transport hands on: tool calls, cancellations, log lines."""

    def __init__(self):
        self.calls, self.cancelled, self.logged = [], [], []

    def call_tool(self, request_id, params):
        self.calls.append((request_id, params))

    def cancel(self, request_id):
        self.cancelled.append(request_id)

    def log_line(self, text):
        self.logged.append(text)


def _rpc(*messages):
    """The MCP transport run over these messages as stdin lines; (app, the answers it wrote)."""
    app, out = _App(), io.BytesIO()
    lines = b"".join((m if isinstance(m, bytes) else json.dumps(m).encode()) + b"\n"
                     for m in messages)
    jc._JsonRpcStdio(app, out).serve(io.BytesIO(lines))
    return app, [json.loads(line) for line in out.getvalue().splitlines()]


def test_mcp_transport_keeps_the_handshake_eras_rules_on_byte_streams():
    app, answers = _rpc(
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-06-18"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "run_code"}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 4}},
        b"not json", b"[1, 2]", {"jsonrpc": "2.0", "id": 5, "method": "server/discover"},
        {"jsonrpc": "2.0", "id": True, "method": "ping"})
    assert (answers[0]["result"]["protocolVersion"] == "2025-06-18"
            and "resultType" not in answers[0]["result"])
    assert answers[1] == {"jsonrpc": "2.0", "id": 2, "result": {}}
    tools = answers[2]["result"]["tools"]
    assert ([t["name"] for t in tools] == list(jc._MCP_TOOLS)
            and "outputSchema" in tools[0])
    # (answered by the app)
    assert app.calls == [(4, {"name": "run_code"})] and app.cancelled == [4]
    assert [a["error"]["code"] for a in answers[3:]] == [-32700, -32600, -32601, -32600]


def test_mcp_transport_keeps_the_2026_eras_rules_on_byte_streams():
    key = "io.modelcontextprotocol/protocolVersion"
    meta = {"_meta": {key: "2026-07-28"}}
    app, answers = _rpc({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": meta},
                        {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
                        {"jsonrpc": "2.0", "id": 3, "method": "tools/list",
                         "params": {"_meta": {key: "2025-11-25"}}},
                        {"jsonrpc": "2.0", "id": 4, "method": "initialize",
                         "params": {**meta, "protocolVersion": "x"}},
                        {"jsonrpc": "2.0", "id": 5, "method": "ping", "params": meta},
                        {"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": meta})
    first = answers[0]["result"]
    assert ("2026-07-28" in first["supportedVersions"] and first["resultType"] == "complete"
            and first["ttlMs"] > 0)
    assert answers[1]["error"]["code"] == -32602 and key in answers[1]["error"]["message"]
    assert (answers[2]["error"]["code"] == -32022
            and answers[2]["error"]["data"]["requested"] == "2025-11-25")
    assert answers[3]["error"]["code"] == -32022 and answers[4]["error"]["code"] == -32601
    assert answers[5]["result"]["cacheScope"] == "public" and app.calls == []


# ---- 1. Pure: the module itself (standard library only, __all__) ---------------------

def test_module_imports_only_the_standard_library():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    names.discard("__future__")
    assert names and not names - set(sys.stdlib_module_names)


def test_all_lists_exactly_the_public_api():
    assert (set(jc.__all__)
            == {"run_code", "run_notebook", "read_notebook", "edit_notebook", "run_cells",
                "Kernel", "Result", "list_servers", "WebSocket",
                "JupyterError", "ServerError", "AuthError", "ConfigError", "ExecutionError",
                "KernelDied", "ExecutionTimeout", "WebSocketError", "WebSocketClosed"})
    assert issubclass(jc.ExecutionTimeout, TimeoutError) and issubclass(jc.ConfigError, ValueError)
    for name in jc.__all__:
        obj = getattr(jc, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, jc.JupyterError)


# ---- 2. Loopback: the websocket connection over a socketpair -------------------------

def _client_frames(sock, timeout=5.0):
    """Yield the frames a client sends to ``sock`` (masked, as RFC 6455 requires) until EOF or
    a pause."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while True:
            frame, used = parse_frame(buf, masked=True)
            if frame is None:
                break
            del buf[:used]
            yield frame


def _read_frames(sock, timeout=5.0):
    return list(_client_frames(sock, timeout))


def _pair(**kwargs):
    a, b = socket.socketpair()
    ws = WebSocket(a, **kwargs)
    ws.close_timeout = 0.05  # the raw peer never answers a close; do not wait for it
    return ws, b


def test_recv_joins_fragments_and_answers_interleaved_ping():
    ws, peer = _pair()
    peer.sendall(b"\x01\x03Hel" + b"\x89\x04ping" + b"\x80\x02lo")
    assert ws.recv(timeout=5) == "Hello"
    peer.sendall(b"\x88\x02\x03\xe8")
    with pytest.raises(WebSocketClosed):
        ws.recv(timeout=5)
    frames = _read_frames(peer)
    assert (frames[0].opcode, frames[0].payload) == (Opcode.PONG, b"ping")
    assert frames[1].opcode == Opcode.CLOSE and frames[1].payload == b"\x03\xe8"


def test_recv_fails_the_connection_with_the_code_of_the_error():
    ws, peer = _pair(max_size=10)
    peer.sendall(b"\x02\x06aaaaaa\x80\x06bbbbbb")
    _fails_with(CloseCode.MESSAGE_TOO_BIG, ws.recv)
    assert _read_frames(peer)[0].payload[:2] == (1009).to_bytes(2, "big")
    assert ws.close_code == CloseCode.MESSAGE_TOO_BIG


def test_recv_fails_invalid_utf8_before_the_rest_of_a_frame_arrives():
    ws, peer = _pair()
    # 6 of 10 bytes; U+110000 is invalid
    peer.sendall(b"\x81\x0a" + "ok".encode() + b"\xf4\x90\x80\x80")
    with pytest.raises(WebSocketError) as info:
        ws.recv(timeout=30)  # the rest never comes: only an early check can fail it
    assert info.value.code == CloseCode.INVALID_DATA
    assert _read_frames(peer)[0].payload[:2] == b"\x03\xef"


def test_recv_keeps_a_partial_frame_across_a_timeout():
    ws, peer = _pair()
    peer.sendall(b"\x82\x04ab")
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.05)
    peer.sendall(b"cd")
    assert ws.recv(timeout=5) == b"abcd"


def test_recv_raises_closed_1006_on_eof_in_the_middle_of_a_frame():
    ws, peer = _pair()
    peer.sendall(b"\x82\x7e\x01\x00abc")
    peer.close()
    with pytest.raises(WebSocketClosed) as info:
        ws.recv(timeout=5)
    assert info.value.code == CloseCode.ABNORMAL


def test_send_masks_text_and_binary_with_fresh_keys():
    ws, peer = _pair()
    ws.send("hé")
    ws.send(b"\x00\x01")
    peer.settimeout(5)
    wire = peer.recv(100)
    first, used = parse_frame(wire, masked=True)
    second, _ = parse_frame(wire[used:], masked=True)
    assert (first.opcode, first.payload) == (Opcode.TEXT, "hé".encode())
    assert (second.opcode, second.payload) == (Opcode.BINARY, b"\x00\x01")
    assert wire[0] == 0x81 and wire[1] & 0x80 and wire[2:6] != wire[used + 2:used + 6]


def test_abort_drops_the_connection_without_a_close_frame():
    ws, peer = _pair()
    ws.abort()
    assert ws.close_code == CloseCode.ABNORMAL
    peer.settimeout(5)
    assert peer.recv(10) == b""


# ---- 2. Loopback: a scripted websocket server ----------------------------------------

class ScriptedServer:
    """Accepts one websocket client and runs ``script(conn, request_head)`` in a thread."""

    def __init__(self, script, *, status=101, accept=None, protocol=None, extra=b""):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/path?q=1"
        self.script, self.status, self.accept, self.protocol, self.extra = (script, status, accept,
                                                                            protocol, extra)
        self.request = b""
        self.received: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            self.request = buf
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", buf).group(1).decode()
            if self.status != 101:
                body = b'{"message": "nope"}'
                conn.sendall(b"HTTP/1.1 %d Err\r\nContent-Length: %d\r\n\r\n%s" % (self.status,
                                                                                   len(body), body))
                return
            lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
                     "Connection: Upgrade",
                     f"Sec-WebSocket-Accept: {self.accept or jc.accept_key(key)}"]
            if self.protocol:
                lines.append(f"Sec-WebSocket-Protocol: {self.protocol}")
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + self.extra)
            self.script(conn, self)

    def read_frames(self, conn, count=None):
        """Read client frames until EOF (or ``count`` frames), answering a close."""
        for frame in _client_frames(conn, timeout=10):
            self.received.append(frame)
            if frame.opcode == Opcode.CLOSE:
                conn.sendall(Frame(Opcode.CLOSE, frame.payload).serialize())
                return
            if count is not None and len(self.received) >= count:
                return

    def join(self):
        self.thread.join(10)
        self.listener.close()


def test_connect_sends_a_correct_handshake_and_keeps_bytes_after_it():
    server = ScriptedServer(lambda conn, s: s.read_frames(conn), extra=b"\x81\x02hi")
    ws = WebSocket.connect(server.url, headers={"Authorization": "token abc"}, timeout=5)
    assert ws.recv(timeout=5) == "hi"
    ws.close()
    server.join()
    head = server.request.decode()
    assert head.startswith("GET /path?q=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    assert "Sec-WebSocket-Version: 13" in head and "Authorization: token abc" in head
    assert "Origin" not in head
    assert len(base64.b64decode(re.search(r"Sec-WebSocket-Key: (\S+)", head).group(1))) == 16
    assert server.received[-1].opcode == Opcode.CLOSE


def test_connect_rejects_a_wrong_accept_key():
    server = ScriptedServer(lambda conn, s: None, accept="d3Jvbmc=")
    with pytest.raises(WebSocketError, match="Sec-WebSocket-Accept"):
        WebSocket.connect(server.url, timeout=5)
    server.join()


def test_connect_rejects_a_subprotocol_that_was_not_offered():
    server = ScriptedServer(lambda conn, s: None, protocol="chat")
    with pytest.raises(WebSocketError, match="not offered"):
        WebSocket.connect(server.url, subprotocols=["v1.kernel.websocket.jupyter.org"], timeout=5)
    server.join()


def test_connect_reports_an_http_error_status_with_its_message():
    server = ScriptedServer(lambda conn, s: None, status=403)
    with pytest.raises(jc.AuthError) as info:
        WebSocket.connect(server.url, timeout=5)
    assert info.value.status == 403 and "nope" in str(info.value)
    server.join()


def test_connect_gives_up_on_a_silent_server_within_its_timeout():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(jc.ServerError,
                           match="did not complete the websocket handshake within 0.3 s"):
            WebSocket.connect(f"ws://127.0.0.1:{listener.getsockname()[1]}/", timeout=0.3)
    finally:
        listener.close()


def test_server_close_is_answered_and_reported():
    def script(conn, s):
        conn.sendall(Frame(Opcode.CLOSE, jc.close_payload(1001, "going")).serialize())
        s.read_frames(conn)
    server = ScriptedServer(script)
    ws = WebSocket.connect(server.url, timeout=5)
    with pytest.raises(WebSocketClosed) as info:
        ws.recv(timeout=5)
    assert (info.value.code, info.value.reason) == (1001, "going")
    server.join()
    assert server.received[-1].payload[:2] == (1001).to_bytes(2, "big")


def test_malformed_frame_fails_the_connection_with_1002():
    def script(conn, s):
        conn.sendall(b"\x85\x00")  # reserved opcode 5
        s.read_frames(conn)
    server = ScriptedServer(script)
    ws = WebSocket.connect(server.url, timeout=5)
    with pytest.raises(WebSocketError) as info:
        ws.recv(timeout=5)
    assert info.value.code == 1002
    server.join()
    assert server.received[-1].opcode == Opcode.CLOSE
    assert server.received[-1].payload[:2] == (1002).to_bytes(2, "big")


def test_oversized_message_fails_the_connection_with_1009():
    def script(conn, s):
        conn.sendall(Frame(Opcode.BINARY, b"x" * 2000).serialize())
        s.read_frames(conn)
    server = ScriptedServer(script)
    ws = WebSocket.connect(server.url, timeout=5, max_size=1000)
    with pytest.raises(WebSocketError) as info:
        ws.recv(timeout=5)
    assert info.value.code == 1009
    server.join()
    assert server.received[-1].payload[:2] == (1009).to_bytes(2, "big")


def test_ping_sends_a_ping_and_the_pong_is_consumed():
    def script(conn, s):
        s.read_frames(conn, count=1)
        conn.sendall(Frame(Opcode.PONG, s.received[0].payload).serialize() + b"\x81\x02ok")
        s.read_frames(conn)
    server = ScriptedServer(script)
    ws = WebSocket.connect(server.url, timeout=5)
    ws.ping(b"abc")
    assert ws.recv(timeout=5) == "ok"
    ws.close()
    server.join()
    assert (server.received[0].opcode, server.received[0].payload) == (Opcode.PING, b"abc")


# ---- 2. Loopback: a fake Jupyter server: retries, redirects, late output, hostile peers ----

def _http_response(status, body=b"", content_type="application/json"):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, content_type.encode(), len(body), body))


class LoopbackServer:
    """Listens on a free 127.0.0.1 port and serves each connection in a thread (``_serve``)."""

    def __init__(self):
        self.conns: list = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        raise NotImplementedError

    def close(self):
        self.listener.close()
        for conn in self.conns:
            conn.close()


class Paced:
    """A hostile server's answer: ``delay`` s of silence, then ``data`` in ``piece``-byte pieces,
    ``every`` s apart, then ``then`` sent ``times`` times (the server's pace; a client that
    leaves ends it)."""

    def __init__(self, data, *, delay=0.0, piece=None, every=0.0, then=b"", times=0):
        self.data, self.delay, self.piece, self.every = data, delay, piece or len(data), every
        self.then, self.times = then, times

    def send(self, conn):
        pause = threading.Event()
        pause.wait(self.delay)
        for start in range(0, len(self.data), self.piece):
            conn.sendall(self.data[start:start + self.piece])
            pause.wait(self.every)
        for _ in range(self.times):
            conn.sendall(self.then)


class FakeJupyter(LoopbackServer):
    """A hostile or broken stand-in for a Jupyter server.

    It answers the REST calls of one kernel ``fake`` (unless ``rest`` overrides a
    call with raw bytes, or None for silence) and runs ``ws(conn, key)`` on every
    channels websocket. It records the requests, so tests can see the DELETE.
    """

    def __init__(self, ws=None, rest=None):
        self.ws, self.rest = ws, rest or {}
        self.requests: list = []
        self.heads: list = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/"

    def _serve(self, conn):
        try:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode()
            method, path = line.split()[:2]
            self.requests.append(f"{method} {path.split('?')[0]}")
            self.heads.append(head.decode("latin-1"))
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", head)
            for (m, prefix), answer in self.rest.items():
                if m == method and path.startswith(prefix):
                    if callable(answer):
                        answer = answer()
                    if answer is None:  # silence: read (a request body too) until the client leaves
                        while conn.recv(65536):
                            pass
                        return
                    if isinstance(answer, Paced):
                        answer.send(conn)
                        return
                    conn.sendall(answer)
                    return
            if path.startswith("/api/kernels/fake/channels") and key:
                self.ws(conn, key.group(1).decode())
            elif method == "POST" and path == "/api/kernels":
                conn.sendall(_http_response(201, b'{"id": "fake", "name": "python3"}'))
            elif method == "GET" and path.startswith("/api/kernels/fake"):
                conn.sendall(_http_response(200, b'{"id": "fake", "execution_state": "busy"}'))
            else:
                conn.sendall(_http_response(204))
        except OSError:
            pass
        finally:
            conn.close()


DEEP = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested past any recursion limit


def _kernel_message(msg_type, content, *, msg_id="m1"):
    """A legacy websocket frame carrying one kernel message (parented to nothing)."""
    msg = {"header": {"msg_type": msg_type, "msg_id": msg_id}, "parent_header": {},
           "content": content}
    return Frame(Opcode.TEXT, json.dumps(msg).encode()).serialize()


def _upgrade(conn, key, accept=None, extra_headers=""):
    conn.sendall(
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Accept: {accept or jc.accept_key(key)}\r\n{extra_headers}\r\n").encode())


def _then(data, *, upgrade=True, accept=None, extra_headers="", hold=True):
    """A channels script: upgrade, send ``data``, then hold the connection until the client
    leaves."""
    def script(conn, key):
        if upgrade:
            _upgrade(conn, key, accept, extra_headers)
        conn.sendall(data)
        while hold and conn.recv(65536):
            pass
    return script


def test_delete_retries_the_500_of_a_restart_race_then_gives_up():
    answers = iter([_http_response(500, b'{"message": "restarting"}')] * 2 + [_http_response(204)])
    fake = FakeJupyter(rest={("DELETE", "/api/kernels/"): lambda: next(answers)})
    try:
        fake_rest = jc.RestClient(fake.url, "t")
        fake_rest.delete_kernel("k1", deadline=jc.Deadline(30))  # two 500s, then deleted: no error
        assert fake.requests.count("DELETE /api/kernels/k1") == 3
    finally:
        fake.close()
    fake = FakeJupyter(
        rest={("DELETE", "/api/kernels/"): _http_response(500, b'{"message": "stuck"}')})
    try:
        with pytest.raises(jc.ServerError, match="stuck"):
            jc.RestClient(fake.url, "t").delete_kernel("k2", deadline=jc.Deadline(30))
        assert fake.requests.count("DELETE /api/kernels/k2") == jc._DELETE_RETRIES
    finally:
        fake.close()


def test_redirect_to_another_origin_drops_the_token():
    other = FakeJupyter(rest={("GET", "/api/kernels"): _http_response(200, b"[]")})
    first = FakeJupyter(rest={("GET", "/api/kernels"): (
        b"HTTP/1.1 302 Found\r\nLocation: " + other.url.encode()
        + b"api/kernels\r\nContent-Length: 0\r\n\r\n")})
    try:
        rest = jc.RestClient(first.url, "secret-token")
        assert rest.list_kernels(deadline=jc.Deadline(10)) == []
    finally:
        first.close()
        other.close()
    assert other.requests == ["GET /api/kernels"]
    assert "authorization: token secret-token" in first.heads[0].lower()
    assert "authorization" not in other.heads[0].lower()


def _answering(send_answers, code="print(...)"):
    """run_code on a fake server whose channels script reads the request, then calls
    ``send_answers(conn, send)``; ``send(msg_type, content, channel)`` answers it."""
    def script(conn, key):
        _upgrade(conn, key)
        buf = bytearray()
        while (found := parse_frame(buf, masked=True))[0] is None:
            buf += conn.recv(65536)
        parent = json.loads(found[0].payload)["header"]

        def send(msg_type, content, channel="iopub"):
            msg = {"header": {"msg_id": secrets.token_hex(8), "msg_type": msg_type},
                   "parent_header": parent, "metadata": {}, "content": content, "channel": channel}
            conn.sendall(Frame(Opcode.TEXT, json.dumps(msg).encode()).serialize())
        send_answers(conn, send)
        while conn.recv(65536):
            pass
    fake = FakeJupyter(ws=script)
    try:
        return jc.run_code(code, fake.url, "t", timeout=30)
    finally:
        fake.close()


def test_output_that_lags_behind_the_reply_is_not_cut_off():
    """A server that falls behind sends the reply first and streams for longer than the grace."""
    def answers(conn, send):
        send("status", {"execution_state": "busy"})
        send("execute_reply", {"status": "ok", "execution_count": 1}, channel="shell")
        stop = time.monotonic() + jc._COMPLETION_GRACE + 1.5
        n = 0
        while time.monotonic() < stop:  # the lagging server: output keeps coming after the reply
            send("stream", {"name": "stdout", "text": f"{n}\n"})
            n += 1
            time.sleep(0.25)
        send("stream", {"name": "stdout", "text": "last\n"})
        send("status", {"execution_state": "idle"})
    res = _answering(answers)
    lines = res.stdout.splitlines()
    assert res.ok and lines[-1] == "last" and lines[:-1] == [str(i) for i in range(len(lines) - 1)]


def test_a_binary_frame_on_the_legacy_wire_is_skipped_and_nothing_is_lost():
    """There only comm (widget) messages with buffers come binary: skipped, never fatal."""
    def answers(conn, send):
        conn.sendall(Frame(Opcode.BINARY, struct.pack("!2I", 1, 8) + b"{not json").serialize())
        send("stream", {"name": "stdout", "text": "kept\n"})
        send("execute_reply", {"status": "ok", "execution_count": 1}, channel="shell")
        send("status", {"execution_state": "idle"})
    res = _answering(answers, "print('kept')")
    assert res.ok and res.stdout == "kept\n"


HOSTILE = {
    "handshake error status": (dict(ws=_then(_http_response(500, b'{"message": "boom"}'),
                                             upgrade=False)),
                               "refused the websocket handshake: boom (HTTP 500)"),
    "wrong accept key": (dict(ws=_then(b"", accept="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")),
                         "Sec-WebSocket-Accept"),
    "subprotocol not offered": (
        dict(ws=_then(b"", extra_headers="Sec-WebSocket-Protocol: chat\r\n")), "not offered"),
    "oversized frame": (dict(ws=_then(b"\x82\x7f" + (1 << 40).to_bytes(8, "big"))), "code 1009"),
    "invalid utf-8": (dict(ws=_then(b"\x81\x02\xc3\x28")), "code 1007"),
    "reserved opcode": (dict(ws=_then(b"\x83\x00")), "code 1002"),
    "reserved bits": (dict(ws=_then(b"\xf1\x00")), "code 1002"),
    "cut in the middle of a frame": (dict(ws=_then(b"\x81\x7e\x01\x00{", hold=False)), "code 1006"),
    "non-JSON message": (dict(ws=_then(b"\x81\x05hello")), "malformed kernel message"),
    "wrongly shaped message": (dict(ws=_then(b'\x81\x0f{"header": [1]}')),
                               "malformed kernel message"),
    "HTML error page": (dict(rest={("POST", "/api/kernels"): _http_response(
        502, b"<html>Bad Gateway</html>", "text/html")}),
                        "answered an error for POST api/kernels (HTTP 502)"),
    "HTML instead of JSON": (dict(rest={("POST", "/api/kernels"): _http_response(
        200, b"<html>login</html>", "text/html")}), "not JSON"),
    "silent after accepting": (dict(rest={("POST", "/api/kernels"): None}),
                               "did not start a kernel within 5 s"),
    # Odd but valid JSON, and answers that lie about their framing.
    "data not an object": (dict(ws=_then(_kernel_message("display_data", {"data": 5}))),
                           "int as data"),
    "traceback an int": (dict(ws=_then(_kernel_message("error", {"traceback": 5}))),
                         "int as traceback"),
    "a list as msg_id": (dict(ws=_then(_kernel_message("stream", {}, msg_id=[1]))),
                         "list as msg_id"),
    "transient a string": (dict(ws=_then(_kernel_message("display_data", {"transient": "x"}))),
                           "str as transient"),
    "a list as display_id": (dict(ws=_then(_kernel_message("display_data",
                                                           {"transient": {"display_id": [1]}}))),
                             "list as display_id"),
    "kernel message nested past the recursion limit": (
        dict(ws=_then(Frame(Opcode.TEXT, DEEP).serialize())), "malformed kernel message"),
    "REST answer nested past the recursion limit": (
        dict(rest={("POST", "/api/kernels"): _http_response(201, DEEP)}), "not JSON"),
    "refused handshake with a deeply nested body": (
        dict(ws=_then(_http_response(500, DEEP), upgrade=False)),
        "refused the websocket handshake (HTTP 500)"),
    "status in non-ASCII digits": (
        dict(ws=_then(b"HTTP/1.1 \xb9\xb2\xb3 Switching\r\n\r\n", upgrade=False)),
        "not an HTTP answer"),  # latin-1 superscripts
    "chunk size -1": (dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 201 Created\r\n"
                                 b"Transfer-Encoding: chunked\r\n"
                                 b"\r\n-1\r\n" + b"x" * 65536}), "bad chunk size"),
    "a chunk larger than any answer": (
        dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 201 Created\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n"
                   b"ffffffffffff\r\n" + b"x" * 65536}), "more than 16777216 bytes"),
    "a chunk size of 2**64-1": (
        dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 201 Created\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n"
                   b"ffffffffffffffff\r\n" + b"x" * 65536}), "more than 16777216 bytes"),
    "a header bomb": (dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 201 Created\r\n"
                                 + b"X-Bomb: y\r\n" * 1000}),
                      "got more than 100 headers"),
    "a header line without end": (
        dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 201 Created\r\nX: " + b"y" * 100_000}),
        "got more than 65536 bytes when reading header line"),
    "a redirect loop": (
        dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 307 Again\r\nLocation: /api/kernels\r\n"
                   b"Content-Length: 0\r\n\r\n"}), "more than 10 redirects"),
    "a redirect to a file": (
        dict(rest={("POST", "/api/kernels"): b"HTTP/1.1 307 Again\r\nLocation: file:///etc/passwd"
                   b"\r\nContent-Length: 0\r\n\r\n"}), "where it cannot be followed"),
    "a mimebundle of numbers": (dict(ws=_then(_kernel_message("display_data",
                                                              {"data": {"text/plain": [1, 2]}}))),
                                "list as text/plain"),
    "metadata a number": (dict(ws=_then(_kernel_message("execute_result",
                                                        {"data": {}, "metadata": 5}))),
                          "int as metadata"),
    "a traceback that is true": (dict(ws=_then(_kernel_message("error", {"traceback": True}))),
                                 "bool as traceback"),
    "a kernel id that is a path": (
        dict(rest={("POST", "/api/kernels"): _http_response(201, b'{"id": "../../api/x"}')}),
        "not a plain token"),
}


def test_hostile_peer_errors_are_jupyter_errors_in_the_api():
    def attempt(case):  # each case on a fake server of its own, so they run side by side
        kwargs, words = HOSTILE[case]
        fake = FakeJupyter(**kwargs)
        try:
            with pytest.raises(jc.JupyterError, match=re.escape(words.split(" (HTTP")[0])):
                jc.run_code("print(1)", fake.url, "t", timeout=5)
        finally:
            fake.close()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(attempt, HOSTILE))  # (re-raises the first failure)


def test_a_hubs_start_ends_in_its_message_or_within_the_budget(monkeypatch):
    server, progress = "/hub/api/users/ann/server", "/hub/api/users/ann/server/progress"
    stream = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    cases = [  # the POST's answer, the progress stream, what the caller sees
        (_http_response(500, b'{"message": "Internal Server Error"}'),
         stream + b'data: {"progress": 50, "message": "Spawning"}\n\n: keepalive\n\ndata: [1\n\n'
                  b'data: {"progress": 100, "failed": true, "message": "Spawn failed: quota"}\n\n',
         "could not be started by the hub: Spawn failed: quota"),
        (_http_response(202), stream + b'data: {"progress": 10}\n\n',
         "its progress stream ended early"),
        # a drip
        (_http_response(202), Paced(stream + b"\n\n" * 400, piece=2, every=0.05), "within 1 s")]
    for post, events, words in cases:
        fake = FakeJupyter(rest={("POST", server): post, ("GET", progress): events})
        try:
            with pytest.raises(jc.ServerError, match=re.escape(words)):
                jc._start_hub_server(fake.url + "user/ann/", "t", timeout=1)
        finally:
            fake.close()
    monkeypatch.setattr(jc, "_HUB_START_TIMEOUT", 1.0)  # a call with no time limit gets the hub's
    fake = FakeJupyter(rest={("POST", server): _http_response(202), ("GET", progress): cases[2][1]})
    try:
        with pytest.raises(jc.ServerError, match="within 1 s"):
            jc._start_hub_server(fake.url + "user/ann/", "t")
    finally:
        fake.close()
    fake = FakeJupyter(
        rest={("POST", server): _http_response(400, b'{"message": "ann is already running"}')})
    try:
        assert jc._start_hub_server(fake.url + "user/ann/", "t") is False
        assert fake.requests == [f"POST {server}"]  # nothing more asked of a running server
    finally:
        fake.close()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_peer_ends_in_one_line_and_exit_3(case):
    kwargs, words = HOSTILE[case]
    fake = FakeJupyter(**kwargs)
    try:
        start = time.monotonic()
        proc = cli("--url", fake.url, "--token", "t", "--timeout", "5", "print(1)", timeout=60)
        assert time.monotonic() - start < 40
    finally:
        fake.close()
    assert proc.returncode == jc._EXIT_SERVER, proc.stderr
    lines = proc.stderr.splitlines()
    assert (len(lines) == 1 and lines[0].startswith("jupyter_call: error: ")
            and words in lines[0]), lines
    if "POST /api/kernels" in fake.requests and kwargs.get("ws"):
        assert "DELETE /api/kernels/fake" in fake.requests  # the started kernel is not left behind
    assert all(r.startswith(("POST /api/kernels", "GET /api/kernels/fake",
                             "DELETE /api/kernels/fake", "GET /login"))
               for r in fake.requests), fake.requests  # no id from the server led anywhere else


def _timed_cli(fake, *args, timeout):
    """Run the CLI against ``fake`` with --timeout; return (process, wall seconds)."""
    start = time.monotonic()
    try:
        proc = cli("--url", fake.url, "--token", "t", "--timeout", str(timeout), *args, timeout=120)
    finally:
        fake.close()
    return proc, time.monotonic() - start


def test_a_slow_drip_of_rest_headers_or_body_cannot_outlast_the_timeout():
    head = b"HTTP/1.1 201 Created\r\nContent-Length: 40\r\n\r\n"
    for answer in (Paced(head, piece=1, every=0.5),
                   Paced(head + b'{"id": "fake"}' + b" " * 26, piece=1, every=0.2)):
        fake = FakeJupyter(rest={("POST", "/api/kernels"): answer})
        proc, took = _timed_cli(fake, "1", timeout=2)
        assert (proc.returncode == jc._EXIT_SERVER
                and "did not start a kernel within 2 s" in proc.stderr)
        assert took < 2 + 8, took  # the bound the README gives: --timeout plus the cleanup budget


def test_rest_bodies_are_bounded_whatever_their_framing_claims():
    """Measured in the child itself (VmHWM), as a user would see it with `time -v`."""
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    print([l for l in open('/proc/self/status') if "
            "l.startswith('VmHWM')][0].strip(), file=sys.stderr)\n")
    mb = b"x" * (1 << 20)
    bomb = b"X-Bomb: y\r\n" * (1 << 16)
    for head, then, words in ((b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", mb, "bad chunk size"),
                              (b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n", mb,
                               "more than 16777216"),
                              # no length: read to the end
                              (b"\r\n", mb, "more than 16777216 bytes"),
                              (b"", bomb, "got more than 100 headers")):
        fake = FakeJupyter(rest={("POST", "/api/kernels"): Paced(b"HTTP/1.1 201 Created\r\n" + head,
                                                                 then=then, times=200)})
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(MODULE), "--url", fake.url,
                                   "--token", "t", "1"],
                                  capture_output=True, text=True, timeout=60)
        finally:
            fake.close()
        error, peak = proc.stderr.splitlines()
        assert proc.returncode == jc._EXIT_SERVER and words in error
        assert int(peak.split()[1]) < 64 * 1024, peak  # kB: 200 MB were on offer


def test_rest_calls_go_through_urllib(server, no_leaks, monkeypatch):
    import urllib.request
    calls = []
    real_open = urllib.request.OpenerDirector.open

    def counting_open(self, request, *args, **kwargs):
        calls.append(f"{request.get_method()} {urlsplit(request.full_url).path}")
        return real_open(self, request, *args, **kwargs)

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", counting_open)
    assert jc.run_code("print(1)", server.url, server.token, timeout=60).stdout == "1\n"
    assert calls[0] == "POST /api/kernels" and calls[-1].startswith("DELETE /api/kernels/"), calls


def test_a_ping_flood_from_a_server_that_stops_reading_cannot_outlast_the_timeout():
    def flood(conn, key):
        _upgrade(conn, key)
        ping = Frame(Opcode.PING, b"p" * 125).serialize()
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(ping * 64)  # never reads, so the client's pongs back up

    proc, took = _timed_cli(FakeJupyter(ws=flood), "1", timeout=3)
    assert proc.returncode == jc._EXIT_TIMEOUT and len(proc.stderr.splitlines()) == 1
    assert took < 3 + 8, took


def test_cleanup_after_a_timeout_keeps_to_its_budget_when_the_server_stops_answering():
    fake = FakeJupyter(ws=_then(b""), rest={("POST", "/api/kernels/fake/interrupt"): None,
                                            ("DELETE", "/api/kernels/fake"): None})
    proc, took = _timed_cli(fake, "1", timeout=2)
    assert proc.returncode == jc._EXIT_TIMEOUT and len(proc.stderr.splitlines()) == 1
    assert "DELETE /api/kernels/fake" in fake.requests and took < 2 + 8, took


def test_a_kernel_start_answered_after_the_timeout_is_deleted():
    fake = FakeJupyter(rest={("POST", "/api/kernels"): Paced(_http_response(201, b'{"id": "late"}'),
                                                             delay=2.5)})
    proc, took = _timed_cli(fake, "1", timeout=1)
    assert proc.returncode == jc._EXIT_SERVER and "did not start a kernel within 1 s" in proc.stderr
    assert "DELETE /api/kernels/late" in fake.requests and took < 1 + 8, took


# ---- 3. Integration: a real Jupyter server; the Python API ---------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """A real server in a subprocess: jupyter_server (any options) or the kernel gateway."""

    def __init__(self, root: Path, extra_args=(), *, base_url="/", scheme="http", token=True,
                 sock=None, gateway=False, ssl_context=None, config=None):
        if TIERS < 3:
            pytest.skip(f"a real server is tier 3 (JUPYTER_CALL_TIERS={TIERS})")
        self.root = root
        self.token = secrets.token_hex(16) if token else None
        self.port = _free_port()
        host = f"127.0.0.1:{self.port}" if not sock else quote(str(sock), safe="")
        self.url = f"{'http+unix' if sock else scheme}://{host}{base_url}"
        self.ssl_context = ssl_context
        self.runtime_dir = root / "runtime"
        self.env = dict(
            os.environ, HOME=str(root / "home"), JUPYTER_CONFIG_DIR=str(root / "config"),
            JUPYTER_DATA_DIR=str(root / "data"), JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            IPYTHONDIR=str(root / "ipython"), JUPYTER_PLATFORM_DIRS="1")
        for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE", "JUPYTERHUB_API_TOKEN",
                    "JUPYTERHUB_SERVICE_URL"):
            self.env.pop(var, None)
        (root / "home").mkdir()
        if config:
            (root / "config").mkdir()
            (root / "config" / "jupyter_server_config.py").write_text(config + "\n")
        self.log: list = []
        if gateway:
            cmd = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
                   f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.port_retries=0",
                   f"--KernelGatewayApp.auth_token={self.token}",
                   "--JupyterWebsocketPersonality.list_kernels=True",
                   "--KernelGatewayApp.allow_root=True",
                   *(extra_args or ["--ZMQChannelsWebsocketConnection.limit_rate=False"])]
        else:
            where = [f"--ServerApp.sock={sock}"] if sock else [
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0"]
            cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", *where,
                   f"--IdentityProvider.token={self.token or ''}", f"--ServerApp.root_dir={root}",
                   f"--ServerApp.base_url={base_url}",
                   *(extra_args or ["--ZMQChannelsWebsocketConnection.limit_rate=False"])]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd.append("--allow-root")
        # (in its root: jupyter-collaboration keeps its document store in the working directory)
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, cwd=root,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._answers():
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))

    def _answers(self):
        """Poll (bounded) until the REST API answers: servers log their URL before they listen."""
        give_up = time.monotonic() + 90
        while self.proc.poll() is None and time.monotonic() < give_up:
            try:
                return self.kernels() is not None
            except jc.ServerError as exc:
                if exc.status is not None:
                    return False  # it answers, but not as it should: no use waiting
                time.sleep(0.05)
        return False

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def rest(self):
        return jc.RestClient(self.url, self.token, ssl_context=self.ssl_context)

    def kernels(self):
        return {k["id"]: k for k in self.rest().list_kernels(deadline=jc.Deadline(10))}

    def stop(self):
        if self.proc.poll() is None:
            jc._stop_server(self.proc)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    # (without jupyter-collaboration, which the live notebook tests start a server with)
    srv = JupyterServer(tmp_path_factory.mktemp("jupyter"), [
        "--ZMQChannelsWebsocketConnection.limit_rate=False",
        "--ServerApp.jpserver_extensions=jupyter_server_ydoc=False"])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def no_leaks(server):
    """Fails the test if it leaves a kernel behind that it started."""
    before = set(server.kernels())
    yield
    # A DELETE the server has taken is its to finish, however long the kernel takes to go: a
    # busy machine can outlast a client's cleanup budget. What is never deleted stays and fails.
    give_up = time.monotonic() + 15
    while (leaked := set(server.kernels()) - before) and time.monotonic() < give_up:
        time.sleep(0.1)
    assert not leaked, f"kernels left behind: {leaked}"


@pytest.fixture
def kernel(server):
    with jc.Kernel(server.url, server.token, timeout=60) as k:
        yield k


# -- the Python API

def test_run_code_returns_stdout_and_value(server, no_leaks):
    res = jc.run_code("print('hello')\n6 * 7", server.url, server.token, timeout=60)
    assert res.ok and res.status == "ok"
    assert res.stdout == "hello\n" and res.stderr == ""
    assert res.data["text/plain"] == "42" and res.execution_count == 1
    assert res.error is None


def test_run_code_error_is_a_result_and_raise_for_error_raises(server, no_leaks):
    res = jc.run_code("1/0", server.url, server.token, timeout=60)
    assert res.status == "error" and res.error["ename"] == "ZeroDivisionError"
    assert any("ZeroDivisionError" in line for line in res.error["traceback"])
    with pytest.raises(jc.ExecutionError) as info:
        res.raise_for_error()
    assert info.value.result is res


def test_run_code_streams_each_output_to_on_output_in_order(server, no_leaks):
    seen = []
    code = ("import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\n"
            "from IPython.display import display\ndisplay({'text/plain': 'shown'}, raw=True)\n3")
    res = jc.run_code(code, server.url, server.token, timeout=60, on_output=seen.append)
    kinds = [(o["output_type"], o.get("name") or o.get("data", {}).get("text/plain")) for o in seen]
    assert kinds == [("stream", "stdout"), ("stream", "stderr"), ("display_data", "shown"),
                     ("execute_result", "3")]
    assert res.outputs[2] == {"output_type": "display_data", "data": {"text/plain": "shown"},
                              "metadata": {}}


def test_unicode_round_trips(server, no_leaks):
    text = "héllo wörld ✓ 漢字 😀 \u0000 end"
    res = jc.run_code(f"print({text!r})\n{text!r}", server.url, server.token, timeout=60)
    assert res.stdout == text + "\n"
    assert res.data["text/plain"] == repr(text)


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
def test_twenty_megabytes_of_output_arrive_intact(server, no_leaks, protocol):
    code = ("import sys\nfor i in range(20):\n    sys.stdout.write(chr(97 + i) * (1 << 20))\n"
            "    sys.stdout.flush()")
    with jc.Kernel(server.url, server.token, timeout=120, protocol=protocol) as k:
        assert k._wire == protocol
        res = k.execute(code)
    expected = "".join(chr(97 + i) * (1 << 20) for i in range(20))
    assert res.ok and len(res.stdout) == len(expected) and res.stdout == expected


def test_one_twenty_megabyte_message_with_non_ascii_arrives_intact(server, no_leaks):
    res = jc.run_code("print('é✓' * 10_000_000)", server.url, server.token, timeout=120)
    assert res.stdout == "é✓" * 10_000_000 + "\n"


def test_kernel_keeps_state_and_is_deleted_on_close(server):
    before = set(server.kernels())
    with jc.Kernel(server.url, server.token, timeout=60) as k:
        assert k.id in server.kernels()
        k.execute("x = 41")
        assert k.execute("x + 1").data["text/plain"] == "42"
    assert set(server.kernels()) == before


def test_attach_by_kernel_id_shares_state_and_never_deletes(server, kernel, no_leaks):
    kernel.execute("shared = 'yes'")
    res = jc.run_code("shared", server.url, server.token, kernel_id=kernel.id, timeout=60)
    assert res.data["text/plain"] == "'yes'"
    with jc.Kernel(server.url, server.token, kernel_id=kernel.id) as other:
        assert other.execute("shared").ok
    assert kernel.id in server.kernels()


def test_attach_to_a_missing_kernel_says_so(server):
    with pytest.raises(jc.ServerError) as info:
        jc.Kernel(server.url, server.token, kernel_id="00000000-0000-0000-0000-000000000000")
    assert info.value.status == 404 and "has no kernel 00000000" in str(info.value)


def test_kernel_name_picks_the_spec(server, no_leaks):
    with jc.Kernel(server.url, server.token, name="python3", timeout=60) as k:
        assert k.name == "python3" and server.kernels()[k.id]["name"] == "python3"
    with pytest.raises(jc.ServerError) as info:
        jc.run_code("1", server.url, server.token, kernel_name="no-such-kernel", timeout=60)
    assert info.value.status in (404, 500)


def test_execute_silent_and_store_history(kernel):
    assert kernel.execute("1").execution_count == 1
    res = kernel.execute("print('quiet')\n5", silent=True)
    assert res.ok and res.data is None and res.stdout == "quiet\n"
    kernel.execute("2", store_history=False)
    assert kernel.execute("3").execution_count == 2


def test_messages_of_cells_sent_ahead_wait_for_their_turn_whoever_receives(kernel):
    deadline = jc.Deadline(60)
    first, second = (kernel._send_ahead(f"print({word!r})", deadline, allow_stdin=False)
                     for word in ("one", "two"))
    # queued behind both: their messages come first
    assert kernel.info()["language_info"]["name"] == "python"
    assert kernel._execute("", deadline, sent=first).stdout == "one\n"
    assert kernel._execute("", deadline, sent=second).stdout == "two\n"


def test_interrupt_and_restart(kernel):
    kernel.execute("y = 1")
    kernel.interrupt()  # nothing running: harmless
    assert kernel.execute("y").data["text/plain"] == "1"
    kernel.restart()
    res = kernel.execute("'y' in dir()")
    assert res.ok and res.data["text/plain"] == "False"


def test_timeout_interrupts_keeps_partial_output_and_the_kernel_usable(kernel):
    with pytest.raises(jc.ExecutionTimeout) as info:
        kernel.execute("print('before', flush=True)\nimport time\ntime.sleep(60)", timeout=2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.result.stdout == "before\n"
    assert info.value.result.error["ename"] == "KeyboardInterrupt"
    assert kernel.execute("'still alive'", timeout=30).data["text/plain"] == "'still alive'"


def test_run_code_timeout_deletes_the_kernel(server, no_leaks):
    with pytest.raises(jc.ExecutionTimeout):
        jc.run_code("import time; time.sleep(60)", server.url, server.token, timeout=3)


def test_on_output_exception_propagates_and_deletes_the_kernel(server, no_leaks):
    def boom(out):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        jc.run_code("print(1)", server.url, server.token, timeout=60, on_output=boom)


def test_stdin_answers_from_a_list_then_eof(kernel):
    res = kernel.execute("a = input('name? ')\nprint('hi', a)\ninput()", stdin=["bob"], timeout=60)
    assert "hi bob" in res.stdout
    assert res.error["ename"] == "EOFError"


def test_stdin_callable_gets_prompt_and_password_flag(kernel):
    calls = []

    def answer(prompt, password):
        calls.append((prompt, password))
        return "secret" if password else "user"
    res = kernel.execute("import getpass\nu = input('user: ')\np = getpass.getpass('pw: ')\n"
                         "print(u, p)", stdin=answer, timeout=60)
    assert res.stdout.strip().endswith("user secret")
    assert calls == [("user: ", False), ("pw: ", True)]


def test_without_stdin_input_fails_at_once(kernel):
    res = kernel.execute("input()", timeout=30)
    assert res.status == "error" and "StdinNotImplementedError" in res.error["ename"]


def test_kernel_death_raises_kernel_died_and_the_kernel_is_deleted(server, no_leaks):
    with jc.Kernel(server.url, server.token, timeout=60) as k:
        assert k.execute("print('alive')").ok
        with pytest.raises(jc.KernelDied) as info:
            k.execute("import os; os._exit(1)")
        assert info.value.kernel_id == k.id and not info.value.result.ok


def test_wrong_token_raises_auth_error(server):
    with pytest.raises(jc.AuthError) as info:
        jc.run_code("1", server.url, "wrong-token", timeout=30)
    assert info.value.status == 403 and "refused the token" in str(info.value)
    assert "wrong-token" not in str(info.value)


def test_library_errors_name_api_arguments_and_the_cli_its_flags(server):
    with pytest.raises(jc.AuthError) as info:
        jc.Kernel(server.url, "", timeout=30)
    assert (info.value.fix == "token"
            and str(info.value).endswith(": pass token= or set JUPYTER_TOKEN"))
    proc = cli("--url", server.url, "--token", "", "1", env=server.env)
    assert proc.returncode == 3 and proc.stderr.endswith(": set JUPYTER_TOKEN or pass --token\n")


def test_unreachable_server_raises_server_error():
    with pytest.raises(jc.ServerError) as info:
        jc.run_code("1", f"http://127.0.0.1:{_free_port()}/", "t", timeout=10)
    assert info.value.status is None and "connection refused" in str(info.value)


def test_list_servers_and_defaults_find_the_running_server(server, monkeypatch, no_leaks):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server.runtime_dir))
    for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    found = jc.list_servers()
    assert [(s["url"], s["token"], s["pid"]) for s in found] == [(server.url, server.token,
                                                                  server.proc.pid)]
    assert jc.run_code("1 + 2", timeout=60).data["text/plain"] == "3"


def test_environment_variables_choose_the_server(server, monkeypatch, tmp_path, no_leaks):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_URL", server.url)
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    assert jc.run_code("2 + 2", timeout=60).data["text/plain"] == "4"


def test_waits_in_windows_slices_change_nothing_a_caller_sees(server, no_leaks, monkeypatch):
    monkeypatch.setattr(jc, "_WAIT_SLICE", 0.05)  # as on Windows, only ten times finer
    code = ("import time; time.sleep(0.3)\n" + "x = '" + "y" * 2_000_000
            + "'\nprint(len(x), 'z' * 300_000)")
    # connect, handshake, REST: all in slices
    with jc.Kernel(server.url, server.token, timeout=120) as k:
        res = k.execute(code)  # two megabytes out in sends, a silent wait, then 300 kB in
        assert res.ok and res.stdout == "2000000 " + "z" * 300_000 + "\n"
        with pytest.raises(jc.ExecutionTimeout):
            k.execute("time.sleep(30)", timeout=0.5)
        assert k.execute("print('after')").stdout == "after\n"
    with pytest.raises(jc.ServerError, match="connection refused"):
        jc.run_code("1", url=f"http://127.0.0.1:{_free_port()}/", token="t", timeout=10)


def test_info_is_the_kernels_kernel_info_reply(server, no_leaks):
    with jc.Kernel(server.url, server.token, timeout=60) as k:
        info = k.info()
        assert info["language_info"]["name"] == "python" and info["status"] == "ok"


# ---- 3. Faults on a real server: cut connections, deleted kernels, rate limits, pings ----

def _shutdown(*socks):
    """Shut both directions of each socket, so the threads pumping them stop."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class CuttingRelay(LoopbackServer):
    """A TCP relay to the real server that cuts websocket connections at chosen points.

    ``cut_after[i]`` is how many server frames the i-th websocket connection
    forwards before the relay drops both sides, when nothing more from the server is
    waiting to be read (what the server believes sent, the relay has passed on).
    """

    def __init__(self, target_port, cut_after=()):
        self.target_port = target_port
        self.cut_after = list(cut_after)
        self.cuts = 0
        self.lock = threading.Lock()
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/"

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._down(upstream, client)

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _shutdown(src, dst)

    def _down(self, upstream, client):
        buf, limit, frames, upgraded = bytearray(), None, 0, False
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                buf += data
                if not upgraded:
                    if b"\r\n\r\n" not in buf:
                        continue
                    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                    client.sendall(head + b"\r\n\r\n")
                    buf = bytearray(rest)
                    upgraded = True
                    if head.startswith(b"HTTP/1.1 101"):
                        with self.lock:
                            limit = self.cut_after.pop(0) if self.cut_after else None
                    else:
                        client.sendall(bytes(buf))
                        self._pump(upstream, client)
                        return
                while True:
                    frame, used = parse_frame(buf, max_size=None)
                    if frame is None:
                        break
                    client.sendall(bytes(buf[:used]))
                    del buf[:used]
                    frames += 1
                if limit is not None and frames >= limit and not buf:
                    if select.select([upstream], [], [], 0)[0]:
                        continue  # bytes the server already sent: relay them, cut after
                    with self.lock:
                        self.cuts += 1
                    break
        except OSError:
            pass
        _shutdown(upstream, client)
        upstream.close()
        client.close()


NUMBERED_LINES = ("import time\nfor i in range(200):\n    print(f'line {i}', flush=True)\n"
                  "    time.sleep(0.02)")


def test_cli_finishes_a_cell_after_two_cuts_with_every_line_once_in_order(server, no_leaks):
    relay = CuttingRelay(server.port, cut_after=[60, 90])
    try:
        proc = cli("--url", relay.url, "--token", server.token, NUMBERED_LINES, env=server.env)
    finally:
        relay.close()
    assert relay.cuts == 2
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"line {i}" for i in range(200)]


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
def test_api_resumes_after_a_cut_with_the_same_session(server, no_leaks, protocol):
    relay = CuttingRelay(server.port, cut_after=[40])
    seen = []
    try:
        with jc.Kernel(relay.url, server.token, timeout=60, protocol=protocol) as k:
            session = k.session_id
            res = k.execute(NUMBERED_LINES, on_output=seen.append)
            assert k.session_id == session
    finally:
        relay.close()
    assert relay.cuts == 1
    assert res.ok and res.stdout.splitlines() == [f"line {i}" for i in range(200)]
    assert "".join(o["text"] for o in seen) == res.stdout


def test_a_request_sent_as_an_idle_connection_drops_is_delivered(server, no_leaks):
    relay = CuttingRelay(server.port, cut_after=[5])  # busy, input, result, idle, reply: then cut
    try:
        with jc.Kernel(relay.url, server.token, timeout=60) as k:
            assert k.execute("1").ok
            res = k.execute("print('again')")
    finally:
        relay.close()
    assert relay.cuts == 1 and res.ok and res.stdout == "again\n"


def test_kernel_deleted_by_someone_else_mid_cell_raises_kernel_died(server, no_leaks):
    with jc.Kernel(server.url, server.token, timeout=60) as k:
        def delete_when_running(out):
            jc.RestClient(server.url, server.token).delete_kernel(k.id, deadline=jc.Deadline(30))
        with pytest.raises(jc.KernelDied):
            k.execute("print('go', flush=True)\nimport time; time.sleep(50)",
                      on_output=delete_when_running)
            # (ipykernel 7 interrupts the cell it is told to stop for its shutdown, and may answer
            # it: then the next call finds the kernel gone)
            k.execute("1")


def test_failing_calls_of_every_kind_leave_no_kernel_behind(server, no_leaks):
    outcomes = []
    for i in range(8):
        kind = ("error", "timeout", "death", "cut")[i % 4]
        try:
            if kind == "error":
                outcomes.append(jc.run_code("1/0", server.url, server.token, timeout=30).status)
            elif kind == "timeout":
                jc.run_code("import time; time.sleep(30)", server.url, server.token, timeout=1)
            elif kind == "death":
                jc.run_code("import os; os._exit(1)", server.url, server.token, timeout=30)
            else:
                relay = CuttingRelay(server.port, cut_after=[3])
                try:
                    outcomes.append(jc.run_code("import time; time.sleep(0.5); print(1)", relay.url,
                                                server.token, timeout=30).status)
                finally:
                    relay.close()
        except jc.ExecutionTimeout:
            outcomes.append("timeout")
        except jc.KernelDied:
            outcomes.append("died")
    assert outcomes == ["error", "timeout", "died", "ok"] * 2


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    srv = JupyterServer(tmp_path_factory.mktemp("limited"), extra_args=(
        "--ZMQChannelsWebsocketConnection.limit_rate=True",
        "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=100000",
        "--ZMQChannelsWebsocketConnection.rate_limit_window=0.5"))
    try:
        yield srv
    finally:
        srv.stop()


def test_rate_limited_output_sets_truncated_and_the_cli_warns(limited_server):
    code = "for i in range(40):\n    print('x' * 50000, flush=True)\nprint('end')"
    res = jc.run_code(code, limited_server.url, limited_server.token, timeout=60)
    assert res.ok and res.truncated and "IOPub data rate exceeded" in res.stderr
    proc = cli(code, server=limited_server)
    assert proc.returncode == 0
    assert "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit" in proc.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory):
    srv = JupyterServer(tmp_path_factory.mktemp("remote"),
                        ["--ZMQChannelsWebsocketConnection.limit_rate=False",
                         "--ServerApp.allow_remote_access=True"],
                        # ping every 0.5 s; drop a client whose pong is 1.5 s late
                        config="c.ServerApp.tornado_settings = "
                               "{'ws_ping_interval': 500, 'ws_ping_timeout': 1500}")
    try:
        yield srv
    finally:
        srv.stop()


def test_server_pings_are_answered_during_a_long_silent_cell(remote_server):
    """The server pings every 0.5 s and drops a client whose pong is 1.5 s late."""
    with jc.Kernel(remote_server.url, remote_server.token, timeout=60) as k:
        connection = k._ws
        res = k.execute("import time; time.sleep(5); print('awake')")
        assert res.stdout == "awake\n"
        assert k._ws is connection  # never dropped, so never reconnected


# ---- 3. Every kind of server: base URLs, TLS, Unix sockets, no token, gateways, proxies ----

def _make_certificate(folder: Path) -> tuple:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class ServerKind:
    """How the battery reaches one kind of server: its URL, token and extra CLI flags."""

    def __init__(self, server, cli_flags=(), env=None, wrong_token=True, honours_env=False):
        self.server, self.cli_flags, self.extra_env = server, list(cli_flags), env or {}
        self.wrong_token, self.honours_env = wrong_token, honours_env

    def cli(self, *args, token=None, timeout=120):
        srv = self.server
        flags = ["--url", srv.url] + (["--token", token or srv.token]
                                      if (token or srv.token) else [])
        return cli(*flags, *self.cli_flags, *args, env={**srv.env, **self.extra_env},
                   timeout=timeout)


def _start_kind(kind, tmp_path_factory):
    root = tmp_path_factory.mktemp(kind)
    if kind == "base_url":  # (and a server that would compress: we never ask it to)
        return ServerKind(JupyterServer(root, base_url="/some/prefix/",
                                        config="c.ServerApp.websocket_compression_options = {}"))
    if kind == "https":
        cert, key = _make_certificate(root)
        import ssl
        context = ssl.create_default_context(cafile=str(cert))
        return ServerKind(JupyterServer(root, ["--ZMQChannelsWebsocketConnection.limit_rate=False",
                                               f"--ServerApp.certfile={cert}",
                                               f"--ServerApp.keyfile={key}"],
                                        scheme="https", ssl_context=context),
                          ["--cafile", str(cert)])
    if kind == "unix":
        sock = Path("/tmp") / f"jc-{secrets.token_hex(4)}.sock"  # socket paths must be short
        return ServerKind(JupyterServer(root, sock=sock))
    if kind == "no_token":
        return ServerKind(JupyterServer(root, ["--ZMQChannelsWebsocketConnection.limit_rate=False",
                                               "--ServerApp.password="], token=False),
                          wrong_token=False)
    if kind == "kernel_gateway":
        pytest.importorskip("kernel_gateway")
        return ServerKind(JupyterServer(root, gateway=True), honours_env=True)
    raise ValueError(kind)


SERVER_KINDS = ["base_url", "https", "unix", "no_token", "kernel_gateway"]


@pytest.fixture(scope="module", params=SERVER_KINDS)
def kind(request, tmp_path_factory):
    k = _start_kind(request.param, tmp_path_factory)
    try:
        yield k
    finally:
        k.server.stop()


BIG = ("import sys\nfor i in range(20):\n    sys.stdout.write(chr(97 + i) * (1 << 20))\n"
       "    sys.stdout.flush()")


def test_battery_runs_on_every_server_kind(kind):
    _battery(kind)


class ExternalServer:
    """A server a maintainer started (notebook 6, Enterprise Gateway, JupyterHub): see the
    README."""

    def __init__(self, url, token):
        self.url, self.token, self.ssl_context = url, token or None, None
        self.env = dict(os.environ)

    def kernels(self):
        try:
            return {k["id"]: k for k in
                    jc.RestClient(self.url, self.token).list_kernels(deadline=jc.Deadline(30))}
        except jc.ServerError:
            return None  # gateways may not list kernels: no leak check then

    def rest(self):
        return jc.RestClient(self.url, self.token)


def _external_servers():
    """JUPYTER_CALL_TEST_SERVERS='name=URL|TOKEN;...' names servers for the opt-in battery."""
    found = []
    for entry in filter(None, os.environ.get("JUPYTER_CALL_TEST_SERVERS", "").split(";")):
        name, _, rest = entry.partition("=")
        url, _, token = rest.partition("|")
        found.append(pytest.param(name.strip(), url.strip(), token.strip(), id=name.strip()))
    return found or [pytest.param(None, None, None, marks=pytest.mark.skip(
        reason="set JUPYTER_CALL_TEST_SERVERS to run the battery on servers you started"))]


@pytest.mark.parametrize("name, url, token", _external_servers())
def test_battery_runs_on_servers_a_maintainer_started(name, url, token):
    _battery(ServerKind(ExternalServer(url, token),
                        honours_env=name.startswith(("eg", "enterprise"))),
             kernel_timeout=300)


def _battery(kind, kernel_timeout=120):
    """print, value, error exit 1, 20 MB, timeout, attach with --kernel-id, wrong token exit 3."""
    srv = kind.server
    listed = srv.kernels() is not None
    before = set(srv.kernels() or ())
    proc = kind.cli("print('hi')\n6 * 7")
    assert (proc.returncode, proc.stdout) == (0, "hi\n42\n"), proc.stderr
    proc = kind.cli("1/0")
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
    with jc.Kernel(srv.url, srv.token, timeout=kernel_timeout, ssl_context=srv.ssl_context) as k:
        res = k.execute(BIG)
        assert len(res.stdout) == 20 << 20 and res.stdout[-1] == "t"
        with pytest.raises(jc.ExecutionTimeout):
            k.execute("import time; time.sleep(30)", timeout=1)
        k.execute("kept = 'here'")
        proc = kind.cli("--kernel-id", k.id, "print(kept)")
        assert (proc.returncode, proc.stdout) == (0, "here\n"), proc.stderr
        assert not listed or k.id in srv.kernels()
    proc = kind.cli("--timeout", "2", "import time; time.sleep(30)")
    assert proc.returncode == 124
    if kind.honours_env:  # gateways pass KERNEL_* variables of the start request to the kernel
        proc = kind.cli("--env", "KERNEL_GREETING=hola",
                        "import os; print(os.environ['KERNEL_GREETING'])")
        assert proc.stdout == "hola\n", proc.stderr
    if kind.wrong_token:
        proc = kind.cli("print(1)", token="wrong")
        assert (proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
                and "refused the token" in proc.stderr)
    # the MCP server: a call, the listing, cleanup
    host = McpProcess(srv, *kind.cli_flags, env=kind.extra_env)
    try:
        host.handshake()
        ran = host.call("run_code", code="print('mcp')\n6 * 7")
        assert _texts(ran) == "mcp\n42\n", b"".join(host.stderr)
        listing = host.call("list_kernels")["result"]
        assert (not listing.get("isError")
                and any(k["default"] for k in listing["structuredContent"]["kernels"]))
        assert host.close(timeout=60) == 0
    finally:
        host.stop()
    assert not listed or set(srv.kernels()) == before


@pytest.fixture(scope="module")
def https_kind(tmp_path_factory):
    k = _start_kind("https", tmp_path_factory)
    try:
        yield k
    finally:
        k.server.stop()


def test_https_is_verified_by_default_and_insecure_says_so(https_kind):
    srv = https_kind.server
    proc = cli("--url", srv.url, "--token", srv.token, "print(1)", env=srv.env)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "TLS certificate is not trusted" in proc.stderr and "--cafile" in proc.stderr
    proc = cli("--url", srv.url, "--token", srv.token, "--insecure", "print(1)", env=srv.env)
    assert proc.returncode == 0 and proc.stdout == "1\n"
    assert "--insecure" in proc.stderr and "not verified" in proc.stderr
    cert = srv.root / "cert.pem"
    proc = cli("--url", srv.url, "--token", srv.token, "print(2)",
               env={**srv.env, "SSL_CERT_FILE": str(cert)})
    assert proc.returncode == 0 and proc.stdout == "2\n"


def test_tls_handshake_in_windows_slices(https_kind, monkeypatch):
    monkeypatch.setattr(jc, "_WAIT_SLICE", 0.05)
    srv = https_kind.server
    with jc.Kernel(srv.url, srv.token, ssl_context=srv.ssl_context, timeout=60) as k:
        assert k.execute("print('over tls')").stdout == "over tls\n"


def test_certificate_messages_say_what_failed(https_kind, tmp_path):
    srv = https_kind.server
    # a CA, but not the one that signed the server's certificate
    other, _ = _make_certificate(tmp_path)
    proc = cli("--url", srv.url, "--token", srv.token, "--cafile", str(other), "1", env=srv.env)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "the --cafile given did not sign" in proc.stderr and "pass --cafile" not in proc.stderr
    no_store = {**srv.env, "SSL_CERT_FILE": str(tmp_path / "none.pem"),
                "SSL_CERT_DIR": str(tmp_path / "none")}
    # as macOS before its certificate step
    proc = cli("--url", srv.url, "--token", srv.token, "1", env=no_store)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "has no CA certificates" in proc.stderr and "Install Certificates.command" in proc.stderr


def _old_style_ca(folder: Path) -> tuple:
    """A private CA as many were made before Python 3.13: Basic Constraints not critical, no
    key usage; and a certificate for 127.0.0.1 that it signed. Returns (ca, cert, key)."""
    (folder / "ca.cnf").write_text("[req]\ndistinguished_name=dn\nx509_extensions=ca\nprompt=no\n"
                                   "[dn]\nCN=Old Private CA\n[ca]\nbasicConstraints=CA:TRUE\n")
    (folder / "leaf.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=60,
                            cwd=str(folder))
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
         "ca.pem", "-days", "2", "-config", "ca.cnf"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
         "leaf.csr", "-subj", "/CN=localhost"])
    run(["openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "leaf.ext"])
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


def test_python_313_strict_check_of_a_private_ca_is_named(tmp_path):
    python = _pyenv_python("3.13")
    ca, cert, key = _old_style_ca(tmp_path)
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():  # handshakes until closed; the client refuses the certificate
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                context.wrap_socket(conn, server_side=True).close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
        proc = cli("--url", url, "--token", "t", "--cafile", str(ca), "1", python=python,
                   timeout=60)
    finally:
        listener.close()
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "Basic Constraints of CA cert not marked critical" in proc.stderr
    assert ("Python 3.13+ checks certificates strictly" in proc.stderr
            and "pass --cafile" not in proc.stderr)


def test_no_token_server_without_xsrf_cookie_names_the_rule(tmp_path_factory):
    k = _start_kind("no_token", tmp_path_factory)
    try:
        rest = k.server.rest()
        rest._xsrf = ""  # as if the server had handed out no cookie
        with pytest.raises(jc.AuthError, match="_xsrf cookie check failed"):
            rest.start_kernel(None, deadline=jc.Deadline(30))
    finally:
        k.server.stop()


def test_token_required_jupyterhub_not_running_and_missing_kernel_lines(server, tmp_path):
    proc = cli("--url", server.url, "print(1)",
               env={**server.env, "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    assert proc.returncode == 3 and "requires a token" in proc.stderr
    # As JupyterHub answers for a stopped server: POSTs fail its xsrf check, GETs go to the
    # hub's 424.
    fake = FakeJupyter(rest={
        ("POST", "/user/ann/api/kernels"): _http_response(403, b"<html>'_xsrf' argument "
                                                               b"missing</html>", "text/html"),
        ("GET", "/user/ann/api/kernelspecs"): b"HTTP/1.1 302 Found\r\n"
                                              b"Location: /hub/user/ann/api/kernelspecs\r\n"
                                              b"Content-Length: 0\r\n\r\n",
        ("GET", "/hub/user/ann/"): _http_response(424, b'{"status": 424, "message": "ann is '
                                                       b'not running"}')})
    try:
        proc = cli("--url", fake.url + "user/ann/", "--token", "t", "print(1)", timeout=60)
    finally:
        fake.close()
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "JupyterHub server that is not running" in proc.stderr and "/hub/home" in proc.stderr
    # As Enterprise Gateway refuses a user: the token is fine, the reason is in the body.
    fake = FakeJupyter(rest={("POST", "/api/kernels"): _http_response(
        403, b'{"reason": "User \'root\' is not authorized to start kernel", "message": ""}')})
    try:
        proc = cli("--url", fake.url, "--token", "t", "print(1)", timeout=60)
    finally:
        fake.close()
    assert proc.returncode == 3
    assert ("refused POST api/kernels: User 'root' is not authorized to start kernel "
            "(HTTP 403)" in proc.stderr)
    proc = cli("--kernel-id", "nope", "print(1)", server=server)
    assert proc.returncode == 3 and "has no kernel nope" in proc.stderr


class ConnectProxy(LoopbackServer):
    """An HTTP proxy for the tests: CONNECT tunnels and absolute-form requests.

    Every host name resolves to 127.0.0.1, so a made-up name that is not
    loopback can stand for a remote server. It records what it was asked.
    """

    def __init__(self):
        self.requests: list = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, conn):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        first = head.split(b"\r\n", 1)[0].decode()
        self.requests.append(head.decode())
        method, target = first.split()[:2]
        if method == "CONNECT":
            port = int(target.rsplit(":", 1)[1])
            upstream = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            upstream.sendall(rest)
        else:  # absolute-form: http://host:port/path
            parts = urlsplit(target)
            upstream = socket.create_connection(("127.0.0.1", parts.port))
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            upstream.sendall(f"{method} {path} HTTP/1.1\r\n".encode() + head.split(b"\r\n", 1)[1]
                             + b"\r\n\r\n" + rest)
        threading.Thread(target=CuttingRelay._pump, args=(conn, upstream), daemon=True).start()
        CuttingRelay._pump(upstream, conn)


def test_proxy_carries_rest_and_websocket_with_credentials(remote_server):
    proxy = ConnectProxy()
    try:
        url = f"http://jupyter.test:{remote_server.port}/"
        env = {**remote_server.env,
               "HTTP_PROXY": proxy.url.replace("http://", "http://ann:s%40cret@"), "NO_PROXY": ""}
        proc = cli("--url", url, "--token", remote_server.token, "print('via proxy')", env=env)
    finally:
        proxy.close()
    assert (proc.returncode, proc.stdout) == (0, "via proxy\n"), proc.stderr
    connects = [r for r in proxy.requests if r.startswith("CONNECT jupyter.test:")]
    assert (connects and "Proxy-Authorization: Basic "
            + base64.b64encode(b"ann:s@cret").decode() in connects[0])
    assert any(r.startswith(f"POST http://jupyter.test:{remote_server.port}/api/kernels")
               for r in proxy.requests)


def test_no_proxy_and_loopback_bypass_the_proxy(server, remote_server, no_leaks):
    dead_proxy = f"http://127.0.0.1:{_free_port()}"
    proc = cli("print('direct')", server=server,
               env={"HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy})
    assert proc.stdout == "direct\n"
    proc = cli(
        "--url", f"http://jupyter.test:{remote_server.port}/", "--token", remote_server.token, "1",
        env={**remote_server.env, "HTTP_PROXY": dead_proxy, "NO_PROXY": "jupyter.test"}, timeout=60)
    assert proc.returncode == 3 and "unknown host" in proc.stderr  # went direct, as NO_PROXY says


def test_non_local_host_header_blocked_is_named(server):
    proxy = ConnectProxy()
    try:
        proc = cli("--url", f"http://jupyter.test:{server.port}/", "--token", server.token,
                   "print(1)", env={**server.env, "HTTP_PROXY": proxy.url, "NO_PROXY": ""},
                   timeout=60)
    finally:
        proxy.close()
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert "Host 'jupyter.test' is not a local name" in proc.stderr


# -- JupyterHub: a user's server started on demand (--start-server, --stop-server)

HUB_CONFIG = """
import asyncio, json, sys
c = get_config()
c.JupyterHub.ip, c.JupyterHub.port, c.JupyterHub.base_url = "127.0.0.1", {port}, "/jupyter/"
c.JupyterHub.hub_ip, c.JupyterHub.hub_port = "127.0.0.1", {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.authenticator_class, c.JupyterHub.spawner_class = "dummy", "simple"
c.Authenticator.allowed_users = {{"ann", "bob", "cal"}}
c.SimpleLocalProcessSpawner.home_dir_template = {home!r} + "/{{username}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root"] if {root_user} else []
c.JupyterHub.services = [{{"name": "maintainer", "api_token": {secret!r}}}]
c.JupyterHub.load_roles = [{{"name": "maintainer", "services": ["maintainer"],
                            "scopes": ["admin:users", "admin:servers", "tokens"]}}]

async def pre_spawn(spawner):  # ann starts; bob's server exits at once; cal's takes its time
    spawner.environment["JC_OPTIONS"] = json.dumps(spawner.user_options)
    if spawner.user.name == "bob":
        spawner.cmd, spawner.http_timeout = ["false"], 3
    if spawner.user.name == "cal":
        await asyncio.sleep(30)
c.Spawner.pre_spawn_hook = pre_spawn
"""


class JupyterHub:
    """A real JupyterHub behind the base URL /jupyter/: dummy authenticator, local processes,
    configurable-http-proxy; its users' servers start and stop as the tests ask."""

    def __init__(self, root: Path):
        if TIERS < 3:
            pytest.skip(f"a real hub is tier 3 (JUPYTER_CALL_TIERS={TIERS})")
        pytest.importorskip("jupyterhub", reason="needs jupyterhub (pip install jupyterhub)")
        if shutil.which("configurable-http-proxy") is None:
            pytest.skip("needs configurable-http-proxy on PATH (npm install -g "
                        "configurable-http-proxy)")
        self.port, self.secret = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/jupyter/"
        (root / "home").mkdir()
        (root / "jupyterhub_config.py").write_text(HUB_CONFIG.format(
            port=self.port, hub_port=_free_port(), proxy_api_port=_free_port(),
            home=str(root / "home"),
            root_user=hasattr(os, "geteuid") and os.geteuid() == 0, secret=self.secret))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY"))}
        self.env.update(HOME=str(root / "home"), JUPYTER_RUNTIME_DIR=str(root / "runtime"))
        self.log: list = []
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f",
                                      "jupyterhub_config.py"], cwd=root,
                                     env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        give_up = time.monotonic() + 120
        while self.proc.poll() is None and time.monotonic() < give_up:
            with contextlib.suppress(jc.ServerError):
                self.api("GET", "api/")
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the hub did not start:\n" + "".join(self.log[-30:]))

    def api(self, method, path, body=None):
        return jc.RestClient(self.url + "hub/", self.secret).request(method, path, body,
                                                                     deadline=jc.Deadline(60))

    def token(self, user, scopes=("inherit",)):
        return self.api("POST", f"api/users/{user}/tokens", {"scopes": list(scopes)})["token"]

    def server(self, user):
        """The state of the user's server: None (stopped), "ready", or what is pending."""
        found = self.api("GET", f"api/users/{user}")["servers"].get("")
        return None if found is None else "ready" if found["ready"] else found["pending"]

    def settle(self, user):
        """The user's server state once nothing is pending (bounded)."""
        give_up = time.monotonic() + 60
        while self.server(user) not in (None, "ready") and time.monotonic() < give_up:
            time.sleep(0.1)
        return self.server(user)

    def stop_server(self, user):
        jc.stop_hub_server(f"{self.url}user/{user}/", self.secret, timeout=60)
        assert self.settle(user) is None

    def stop(self):
        if self.proc.poll() is None:
            jc._stop_server(self.proc)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    srv = JupyterHub(tmp_path_factory.mktemp("hub"))
    try:
        yield srv
    finally:
        srv.stop()


def _hub_cli(hub, user, token, *args):
    return cli("--url", f"{hub.url}user/{user}/", "--token", token, *args, env=hub.env, timeout=120)


def test_hub_starts_a_stopped_server_and_stops_only_what_it_started(hub):
    token = hub.token("ann")
    stopped = _hub_cli(hub, "ann", token, "print(1)")
    assert stopped.returncode == 3 and "JupyterHub server that is not running" in stopped.stderr
    ran = _hub_cli(hub, "ann", token, "--start-server", "--profile", "gpu", "--user-options",
                   '{"image": "x"}', "import os; print(os.environ['JC_OPTIONS'])")
    assert (ran.returncode == 0
            and json.loads(ran.stdout) == {"image": "x", "profile": "gpu"}), ran.stderr
    # --start-server alone: it keeps running
    assert ran.stderr == "" and hub.server("ann") == "ready"
    again = _hub_cli(hub, "ann", token, "--start-server", "--stop-server", "print(2)")
    assert again.stdout == "2\n" and hub.server("ann") == "ready"  # running before: never stopped
    hub.stop_server("ann")
    shown = types.SimpleNamespace(url=f"{hub.url}user/ann/", token=token, env=hub.env)
    _, screen, code = _pty_run(shown, ["--start-server", "--stop-server", "print(3)"])
    assert code == 0 and b"Server ready at /jupyter/user/ann/" in screen and b"3\r\n" in screen
    assert hub.settle("ann") is None  # started by the call: stopped after it


def test_hub_refusals_and_failed_starts_are_one_line_exit_3(hub):
    failed = _hub_cli(hub, "bob", hub.token("bob"), "--start-server", "print(1)")
    assert failed.returncode == 3 and len(failed.stderr.splitlines()) == 1
    assert "could not be started by the hub: Spawn failed" in failed.stderr
    limited = _hub_cli(hub, "ann", hub.token("ann", ["access:servers!user=ann"]),
                       "--start-server", "print(1)")
    assert limited.returncode == 3 and len(limited.stderr.splitlines()) == 1
    assert ("lacks the scope servers!user=ann" in limited.stderr
            and f"{hub.url}hub/token" in limited.stderr)
    assert hub.server("ann") is None


def test_hub_ctrl_c_during_a_start_stops_what_was_started(hub):
    proc = subprocess.Popen([sys.executable, str(MODULE), "--url", f"{hub.url}user/cal/", "--token",
                             hub.token("cal"), "--start-server", "--stop-server", "print(1)"],
                            env=hub.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_heard)
    try:
        give_up = time.monotonic() + 60
        # its pre-spawn hook waits 30 s
        while hub.server("cal") != "spawn" and time.monotonic() < give_up:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        proc.communicate()
    assert hub.settle("cal") is None


def test_hub_python_api_and_mcp_start_a_stopped_server(hub):
    url, token = f"{hub.url}user/ann/", hub.token("ann")
    with contextlib.suppress(AssertionError):
        hub.stop_server("ann")
    result = jc.run_code("import os; print(os.environ['JC_OPTIONS'])", url, token,
                         start_server=True, user_options={"profile": "cpu"}, timeout=120)
    assert json.loads(result.stdout) == {"profile": "cpu"}
    with jc.Kernel(url, token, start_server=True, timeout=120) as kernel:
        assert kernel.started_server is False  # running already
    hub.stop_server("ann")
    host = McpProcess(types.SimpleNamespace(url=url, token=token, env=hub.env), "--start-server")
    try:
        host.handshake()
        answer = host.call("run_code", {"progressToken": "hub"}, code="print(6 * 7)")
        assert _texts(answer) == "42\n"
        with host.arrived:  # each step of the start, as the hub says it, at once
            steps = [m["params"]["message"] for m in host.messages
                     if m.get("method") == "notifications/progress"]
        assert any(": Server ready at " in step for step in steps), steps
        assert host.close() == 0
    finally:
        host.stop()
    assert hub.server("ann") == "ready"  # (the MCP server starts it; it never stops it)
    hub.stop_server("ann")


# ---- 3. The command line: exit codes, flags, discovery, usage errors, other Pythons ----

def test_cli_prints_output_and_exits_0(server, no_leaks):
    proc = cli("print(1)", server=server)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1\n", "")


def test_cli_prints_the_value_of_the_last_expression(server, no_leaks):
    proc = cli("x = 20\nx + 1", server=server)
    assert proc.returncode == 0 and proc.stdout == "21\n"


def test_cli_error_prints_traceback_on_stderr_and_exits_1(server, no_leaks):
    proc = cli("print('partial')\n1/0", server=server)
    assert proc.returncode == jc._EXIT_ERROR == 1
    assert proc.stdout == "partial\n"
    assert "ZeroDivisionError: division by zero" in proc.stderr
    assert "\x1b[" not in proc.stderr  # colours stripped when not a terminal


def test_cli_wrong_token_exits_3_with_one_line(server):
    proc = cli("--url", server.url, "--token", "nope", "print(1)", env=server.env)
    assert proc.returncode == jc._EXIT_SERVER == 3
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "refused the token" in lines[0] and server.url in lines[0]
    assert "nope" not in proc.stderr and proc.stdout == ""


def test_cli_unused_port_exits_3_quickly():
    url = f"http://127.0.0.1:{_free_port()}/"
    start = time.monotonic()
    proc = cli("--url", url, "--token", "t", "print(1)", timeout=30)
    assert proc.returncode == 3 and time.monotonic() - start < 30
    assert (proc.stderr.splitlines()
            == [f"jupyter_call: error: server at {url} is not reachable: connection refused"])


def test_cli_json_prints_the_result_object(server, no_leaks):
    proc = cli("--json", "print('a')\n1/0", server=server)
    assert proc.returncode == 1
    obj = json.loads(proc.stdout)
    assert obj["status"] == "error" and obj["error"]["ename"] == "ZeroDivisionError"
    assert obj["outputs"][0] == {"output_type": "stream", "name": "stdout", "text": "a\n"}
    assert (obj["ok"], obj["stdout"], obj["data"], obj["truncated"]) == (False, "a\n", None, False)
    assert set(obj) == {"status", "ok", "execution_count", "stdout", "stderr", "data", "error",
                        "outputs", "truncated"}


def test_cli_reads_code_from_a_file_and_from_stdin(server, tmp_path, no_leaks):
    script = tmp_path / "s.py"
    script.write_text("print('from file')\n", encoding="utf-8")
    assert cli("-f", str(script), server=server).stdout == "from file\n"
    assert cli("-f", "-", server=server, input="print('from stdin')\n").stdout == "from stdin\n"


def test_cli_kernel_id_attaches_and_keep_keeps(server):
    proc = cli("--keep", "z = 'kept'", server=server)
    assert proc.returncode == 0
    kernel_id = re.search(r"kernel (\S+) kept", proc.stderr).group(1)
    try:
        assert kernel_id in server.kernels()
        again = cli("--kernel-id", kernel_id, "print(z)", server=server)
        assert again.stdout == "kept\n" and kernel_id in server.kernels()
    finally:
        server.rest().delete_kernel(kernel_id, deadline=jc.Deadline(30))


def test_cli_kernel_chooses_the_spec(server, no_leaks):
    assert cli("--kernel", "python3", "print(2)", server=server).stdout == "2\n"
    proc = cli("--kernel", "nope", "print(2)", server=server)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1


def test_cli_timeout_exits_124_after_printing_what_arrived(server, no_leaks):
    proc = cli("--timeout", "3", "print('started', flush=True)\nimport time; time.sleep(60)",
               server=server)
    assert proc.returncode == jc._EXIT_TIMEOUT == 124
    assert proc.stdout == "started\n"
    assert "timeout" in proc.stderr and "interrupted" in proc.stderr


@pytest.mark.parametrize("signum, code, words", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "ended by SIGTERM"),
                                                 (signal.SIGHUP, 129, "ended by SIGHUP")])
def test_cli_ctrl_c_sigterm_and_sighup_interrupt_and_delete_the_kernel(server, no_leaks, signum,
                                                                       code, words):
    cmd = [sys.executable, str(MODULE), "--url", server.url,
           "print('running', flush=True)\nimport time; time.sleep(60)"]
    proc = subprocess.Popen(cmd, env={**server.env, "JUPYTER_TOKEN": server.token},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_heard)
    try:
        assert proc.stdout.readline() == "running\n"
        proc.send_signal(signum)
        assert proc.wait(60) == code
        assert words in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_output_a_windows_console_cannot_encode_is_escaped_not_lost(server, no_leaks):
    env = {"PYTHONIOENCODING": "cp1252"}  # what Python uses on Windows for a pipe or a file
    proc = subprocess.run([sys.executable, str(MODULE), "--url", server.url, "-f", "-"],
                          input="\ufeffprint('ok \u2713 \u00e9 \U0001f600')\n1/0".encode("utf-8"),
                          env={**server.env, "JUPYTER_TOKEN": server.token, **env},
                          capture_output=True, timeout=120)
    assert (proc.returncode == 1
            and proc.stdout.decode("cp1252") == "ok \\u2713 \u00e9 \\U0001f600\n")
    assert b"ZeroDivisionError" in proc.stderr


def test_files_with_a_bom_and_upper_case_suffixes_run(server, tmp_path, no_leaks):
    script, notebook = tmp_path / "Script.PY", tmp_path / "NB.IPYNB"
    script.write_bytes("\ufeffprint('py')\n".encode("utf-8"))
    notebook.write_bytes(
        ("\ufeff" + json.dumps(_notebook(("code", "print('nb')")))).encode("utf-8"))
    assert cli("-f", str(script), server=server).stdout == "py\n"
    proc = cli("-f", str(notebook), "--json", server=server)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cells"][0]["stdout"] == "nb\n"


def test_no_unix_sockets_on_the_platform_is_one_line_and_exit_3():
    code = ("import socket, runpy, sys\ndel socket.AF_UNIX\nsys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(MODULE), "--url",
                           "http+unix://%2Ftmp%2Fno.sock/",
                           "--token", "t", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stderr.splitlines() == [
        "jupyter_call: error: server at http+unix://%2Ftmp%2Fno.sock/ is not reachable: "
        "Unix sockets are not available on this platform"]


def test_a_reader_that_goes_away_with_einval_is_a_broken_pipe(server, monkeypatch, no_leaks):
    class Gone(io.StringIO):  # a Windows pipe whose reader quit
        def write(self, text):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert (jc.main(["--url", server.url, "--token", server.token, "print(1)"])
            == jc._EXIT_BROKEN_PIPE)


def test_cli_stops_quietly_when_the_reader_goes_away(server, no_leaks):
    cmd = [sys.executable, str(MODULE), "--url", server.url, "--token", server.token,
           "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.001)"]
    proc = subprocess.Popen(cmd, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"0\n"
        proc.stdout.close()  # as `| head -1` does
        assert proc.wait(60) == jc._EXIT_BROKEN_PIPE == 141
        assert b'jupyter_call.py", line' not in proc.stderr.read()  # no Python traceback of ours
    finally:
        proc.kill()
        proc.wait()


def test_cli_kernel_death_exits_4(server, no_leaks):
    proc = cli("import os; os._exit(1)", server=server)
    assert proc.returncode == jc._EXIT_DIED == 4 and "died" in proc.stderr


def test_cli_stdin_answers_from_input_flags(server, no_leaks):
    proc = cli("--input", "ann", "print('hi', input('name? '))", server=server)
    assert proc.returncode == 0 and "hi ann" in proc.stdout


def test_cli_list_shows_servers_and_kernels(server, kernel):
    proc = cli("--list", env=server.env)
    assert proc.returncode == 0
    assert server.url in proc.stdout and kernel.id in proc.stdout
    rows = json.loads(cli("--list", "--json", env=server.env).stdout)
    assert rows[0]["url"] == server.url and kernel.id in [k["id"] for k in rows[0]["kernels"]]


def test_token_whitespace_is_dropped_and_control_characters_are_refused_unseen(server, no_leaks):
    proc = cli("--url", server.url, "print(1)",
               env={**server.env, "JUPYTER_TOKEN": f" {server.token}\n"})
    assert (proc.returncode, proc.stdout) == (0, "1\n")
    proc = cli("--url", server.url, "print(1)",
               env={**server.env, "JUPYTER_TOKEN": "secret\r\nX-Evil: 1"})
    assert (proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
            and "secret" not in proc.stderr)
    proc = cli("--url", server.url, "print(1)", env={**server.env, "JUPYTER_TOKEN": "secret\u20ac"})
    assert (proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
            and "beyond Latin-1" in proc.stderr)
    with pytest.raises(ValueError) as info:  # a ConfigError, raised before anything is sent
        jc.Kernel(server.url, "a\x00b", timeout=30)
    assert isinstance(info.value, jc.ConfigError) and "a\x00b" not in str(info.value)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with pytest.raises(jc.ConfigError):
            WebSocket.connect(f"ws://127.0.0.1:{listener.getsockname()[1]}/",
                              headers={"X": "a\r\nb"}, timeout=10)
        conn, _ = listener.accept()
        conn.settimeout(10)
        assert conn.recv(100) == b""  # the handshake never left
        conn.close()


def test_cli_list_survives_kernels_with_null_fields():
    rows = [{"id": "k1", "name": None, "execution_state": None, "last_activity": None}]
    fake = FakeJupyter(
        rest={("GET", "/api/kernels"): _http_response(200, json.dumps(rows).encode()),
              ("GET", "/api"): _http_response(200, b'{"version": "2.0"}')})
    try:
        proc = cli("--list", "--url", fake.url, "--token", "t", timeout=30)
    finally:
        fake.close()
    assert proc.returncode == 0 and "k1  ?" in proc.stdout


def test_cli_list_skips_kernel_entries_that_are_not_objects():
    rows = [{"id": "k1", "name": ["py"], "execution_state": 5}, 5, "x", None, {"id": 7},
            {"name": "no id"}]
    fake = FakeJupyter(
        rest={("GET", "/api/kernels"): _http_response(200, json.dumps(rows).encode()),
              ("GET", "/api"): _http_response(200, b'{"version": ["2.0"]}')})
    try:
        proc = cli("--list", "--url", fake.url, "--token", "t", timeout=30)
        as_json = cli("--list", "--json", "--url", fake.url, "--token", "t", timeout=30)
    finally:
        fake.close()
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (proc.stdout.splitlines()[1:] == ["  k1  ?            ?        ?"]
            and "version ?" in proc.stdout)
    assert [k["id"] for k in json.loads(as_json.stdout)[0]["kernels"]] == ["k1"]


def test_random_rest_answers_end_in_a_server_error_never_a_crash():
    """Property: random JSON for every REST answer the module reads (kernel model, kernel list,
    sessions, contents model, /api) through the REST calls and --list."""
    import random
    rng = random.Random(20)
    answers: dict = {}
    routes = [("GET", "/api/kernels/k1"), ("GET", "/api/kernels"), ("GET", "/api/sessions"),
              ("POST", "/api/sessions"), ("POST", "/api/kernels"),
              ("GET", "/api/contents/a.ipynb"), ("GET", "/api")]  # (by prefix, in order)
    fake = FakeJupyter(rest={
        key: functools.partial(lambda key: _http_response(200, json.dumps(answers[key]).encode()),
                               key) for key in routes})
    rest = jc.RestClient(fake.url, "t")
    calls = [lambda: rest.list_kernels(deadline=jc.Deadline(5)),
             lambda: rest.list_sessions(deadline=jc.Deadline(5)),
             lambda: rest.find_session("a.ipynb", deadline=jc.Deadline(5)),
             lambda: rest.create_session("a.ipynb", None, deadline=jc.Deadline(5)),
             lambda: rest.start_kernel(None, deadline=jc.Deadline(5)),
             lambda: rest.get_kernel("k1", deadline=jc.Deadline(5)),
             lambda: jc.load_notebook("server:a.ipynb", rest, jc.Deadline(5)),
             lambda: jc._list(jc._parse_args(["--url", fake.url, "--token", "t", "--list"]),
                              io.StringIO()),
             lambda: jc._list(jc._parse_args(["--url", fake.url, "--token", "t",
                                              "--list", "--json"]), io.StringIO())]
    shapes = {("GET", "/api/kernels"): lambda: [{"id": "k1", "name": "python3"}, _random_json(rng)],
              ("GET", "/api/sessions"): lambda: [{"path": "a.ipynb", "kernel": _random_json(rng),
                                                  "notebook": _random_json(rng)},
                                                 _random_json(rng)],
              ("POST", "/api/sessions"): lambda: {"kernel": _random_json(rng)},
              ("POST", "/api/kernels"): lambda: {"id": "k1", "name": _random_json(rng)},
              ("GET", "/api/kernels/k1"): lambda: {"id": _random_json(rng),
                                                   "name": _random_json(rng)},
              ("GET", "/api/contents/a.ipynb"): lambda: {"type": "notebook",
                                                         "content": _random_json(rng)},
              ("GET", "/api"): lambda: {"version": _random_json(rng)}}
    try:
        for _ in range(150):
            for key, shape in shapes.items():
                answers[key] = shape() if rng.random() < 0.8 else _random_json(rng)
            for call in calls:
                try:
                    call()
                except jc.JupyterError:
                    pass
    finally:
        fake.close()


def test_cli_discovers_the_server_without_url_or_token(server, no_leaks):
    proc = cli("print('found')", env=server.env)
    assert proc.returncode == 0 and proc.stdout == "found\n"


def test_the_command_line_resolves_the_server_once(server, tmp_path, monkeypatch, no_leaks):
    for name, value in server.env.items():
        if name.startswith("JUPYTER"):
            monkeypatch.setenv(name, value)
    scans, resolves = [], []
    monkeypatch.setattr(jc, "list_servers", functools.partial(
        lambda real, *a: scans.append(1) or real(*a), jc.list_servers))
    monkeypatch.setattr(jc, "resolve_server", functools.partial(
        lambda real, *a: resolves.append(a) or real(*a), jc.resolve_server))
    script = tmp_path / "two.py"
    script.write_text("# %%\nx = 1\n# %%\nprint(x + 1)\n")
    out = io.StringIO()
    assert jc._main(["-f", str(script), "--color", "never"], out, io.StringIO()) == 0
    assert out.getvalue().splitlines() == ["-- cell 1/2 --", "-- cell 2/2 --", "2"]
    # the CLI's, then Kernel's on its answer
    assert len(resolves) == 2 and resolves[1][1] is not None, resolves
    assert len(scans) == 2, scans  # resolving, and the notebook's folder under the server's root


def test_a_url_copied_from_jupyters_log_works_and_its_token_is_never_shown(server, no_leaks):
    assert jc.resolve_server("http://h:1/lab?token=abc")[:2] == ("http://h:1/", "abc")
    assert (jc.resolve_server("http://h:1/base/tree?token=a%2Fb", "given")[:2]
            == ("http://h:1/base/", "given"))
    proc = cli("--url", f"{server.url}lab?token={server.token}", "print('from log url')",
               env=server.env)
    assert (proc.returncode, proc.stdout) == (0, "from log url\n"), proc.stderr
    proc = cli("--url", f"{server.url}lab?token=secret-in-url", "print(1)", env=server.env)
    assert (proc.returncode == 3 and "refused the token" in proc.stderr
            and "secret-in-url" not in proc.stderr)


def test_no_server_found_suggests_how_to_get_one(tmp_path):
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTERHUB_SERVICE_URL"):
        env.pop(var, None)
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", 8888))
            pytest.skip("something listens on port 8888")
        except OSError:
            pass
    proc = cli("print(1)", env=env, timeout=60)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1
    assert ("no Jupyter server found" in proc.stderr and "--spawn" in proc.stderr
            and "--url" in proc.stderr)


def test_cli_spawn_runs_on_a_private_server(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), HOME=str(tmp_path))
    proc = cli("--spawn", "import os\nprint('spawned', os.getcwd())", env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("spawned ")


@pytest.mark.parametrize("args, words", [
    ([], "no code given"),
    (["-f", "/no/such/file.py"], "cannot read /no/such/file.py"),
    (["--timeout", "0", "1"], "--timeout"),
    (["--no-such-flag", "1"], "unknown option --no-such-flag"),
    (["--k", "1"], "--k is ambiguous"),
    (["--protocol", "v2", "1"], "--protocol must be one of auto, v1, legacy"),
    (["--timeout", "soon", "1"], "--timeout must be a positive number"),
    (["--url"], "--url needs a value"),
    (["--json=yes", "1"], "--json takes no value"),
    (["print(1)", "print(2)"], "unexpected argument 'print(2)'"),
    (["-f", "x.py", "1"], "as an argument, with -f or as --cells, not two"),
    (["--cells", "a"], "--cells goes with --notebook"),
    (["--timeout", "nan", "1"], "--timeout"),
    (["--keep", "--spawn", "1"], "--keep cannot keep"),
    (["--session", "a", "--kernel-id", "b", "1"], "choose one of"),
    (["--url", "http://[::1", "1"], "the server URL is malformed"),
    (["--url", "http://127.0.0.1:99999/", "1"], "the server URL is malformed"),
    (["--url", "file:///etc/", "1"], "scheme 'file' is not one of http, https, ws, wss, http+unix"),
    (["--url", "http:///x", "--list"], "the server URL names no host"),
    (["--url", "http://127.0.0.1:9/", "--token", "a\r\nX-Evil: 1", "1"],
     "the token holds a control character"),
    (["--mcp", "print(1)"], "--mcp takes no code"),
    (["--mcp", "--max-output", "lots"], "--max-output must be a positive whole number"),
    (["--mcp", "--wait", "-1"], "--wait must be a number of seconds, 0 or more"),
    (["--mcp", "--wait", "soon"], "--wait must be a number of seconds, 0 or more"),
    (["--mcp", "--json"], "--json cannot be used with --mcp"),
    (["--profile", "gpu", "1"], "--profile goes with --start-server"),
    (["--wait", "5", "1"], "--wait goes with --mcp"),
    (["--start-server", "--user-options", "[1]", "1"], "--user-options must be a JSON object"),
    (["--mcp", "--start-server", "--stop-server"], "--stop-server cannot be used with --mcp"),
    (["--mcp", "--spawn"], "--spawn cannot be used with --mcp"),
    (["--mcp", "--log", "README.md"], "--log README.md exists and is not a notebook"),
])
def test_cli_usage_errors_exit_2_with_one_line(args, words):
    proc = cli(*args, timeout=30)
    assert proc.returncode == jc._EXIT_USAGE == 2
    assert len(proc.stderr.splitlines()) == 1 and words in proc.stderr


def test_env_pairs_must_be_key_equals_value():
    proc = cli("--env", "novalue", "1", timeout=30)
    assert proc.returncode == 2 and "--env must be KEY=VALUE, not 'novalue'" in proc.stderr


def test_cli_version_and_help():
    proc = cli("--version", timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == f"jupyter_call {jc.__version__}"
    proc = cli("--help", timeout=30)
    assert proc.returncode == 0
    for words in ("--spawn", "--kernel-id", "--timeout", "exit codes", "124", "130"):
        assert words in proc.stdout


def _pyenv_python(version):
    found = shutil.which(f"python{version}")
    if found:
        try:
            subprocess.run([found, "-c", "pass"], check=True, capture_output=True, timeout=30)
            return found
        except (subprocess.SubprocessError, OSError):
            pass
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob(f"{version}.*/bin/python{version}"), reverse=True):
        return str(candidate)
    pytest.skip(f"python{version} is not installed")


def test_the_public_api_hints_resolve_on_python_3_10():
    """(On 3.9 the module runs, but "X | None" hints cannot be evaluated there.)"""
    check = ("import typing, jupyter_call as jc\n"
             "for name in jc.__all__:\n"
             "    obj = getattr(jc, name)\n"
             "    for f in ([obj, *vars(obj).values()] if isinstance(obj, type) else [obj]):\n"
             "        f = getattr(f, '__func__', f)\n"
             "        if callable(f) and getattr(f, '__annotations__', None):\n"
             "            typing.get_type_hints(f)\n"
             "print(typing.get_type_hints(jc.Kernel.execute)['stdin'])\n")
    proc = subprocess.run([_pyenv_python("3.10"), "-c", check], capture_output=True, text=True,
                          timeout=60, cwd=str(HERE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("typing.Union[collections.abc.Iterable[str], "
                                   "collections.abc.Callable[[str, bool], str], NoneType]")


def test_the_handshake_digest_has_a_fallback_for_pythons_without_sha1_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "_sha1", None)  # a private module a future Python may drop
    assert jc.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_cli_runs_under_oldest_and_newest_python(server, version, no_leaks):
    python = _pyenv_python(version)
    proc = cli("print('é', 1 + 1)", server=server, python=python)
    assert (proc.returncode, proc.stdout) == (0, "é 2\n"), proc.stderr
    assert cli("1/0", server=server, python=python).returncode == 1


# ---- 3. The command line people meet: rich outputs, colour, terminals, sessions, notebooks ----

def _tiny_png() -> bytes:
    import zlib

    def chunk(kind, data):
        body = kind + data
        return (struct.pack(">I", len(data)) + body
                + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF))
    # two rows of one red-ish and one green-ish pixel (gray+alpha)
    raw = b"\x00\xff\x00\x00\x00\x00\xff\x00"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 4, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_cli_saves_rich_outputs_byte_for_byte_or_says_what_was_not_shown(server, tmp_path,
                                                                         no_leaks):
    png = _tiny_png()
    code = ("from IPython.display import display\n"
            f"display({{'image/png': {base64.b64encode(png).decode()!r}, 'text/plain': "
            f"'<image>'}}, raw=True)\n"
            "display({'text/html': '<b>bold</b>'}, raw=True)\n"
            "display({'application/json': {'a': [1, 2]}}, raw=True)")
    proc = cli(code, server=server)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "<image>", f"[image/png {len(png)} B: use --output-dir to save]",
        "[text/html 11 B: use --output-dir to save]",
        "{", '  "a": [', "    1,", "    2", "  ]", "}"]
    proc = cli("--output-dir", str(tmp_path / "out"), code, server=server)
    assert proc.returncode == 0
    assert (tmp_path / "out" / "out-1.png").read_bytes() == png
    assert (tmp_path / "out" / "out-2.html").read_bytes() == b"<b>bold</b>"
    assert f"[image/png {len(png)} B saved to {tmp_path / 'out' / 'out-1.png'}]" in proc.stdout


def test_unwritable_output_dir_is_a_usage_error_and_the_kernel_is_deleted(server, tmp_path,
                                                                          no_leaks):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = (f"from IPython.display import display\n"
            f"display({{'image/png': {base64.b64encode(_tiny_png()).decode()!r}}}, raw=True)")
    proc = cli("--output-dir", str(blocker / "sub"), code, server=server)
    assert (proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
            and "cannot write" in proc.stderr)


def test_cli_color_flag_keeps_or_strips_ansi(server, no_leaks):
    always = cli("--color", "always", "1/0", server=server)
    never = cli("--color", "never", "1/0", server=server)
    assert "\x1b[" in always.stderr and "ZeroDivisionError" in always.stderr
    assert "\x1b[" not in never.stderr and "ZeroDivisionError" in never.stderr
    # raw in --json
    assert cli("--json", "--color", "always", "1/0", server=server).stdout.count("\\u001b[") > 0


def _screen(data: bytes) -> list:
    """What a terminal shows for ``data``: handles \\r, \\n and erase-line; drops other escapes."""
    lines, col = [""], 0
    text = data.decode("utf-8", "replace")
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":
            match = re.match(r"\x1b\[[0-9;?]*([@-~])", text[i:])
            if match and match.group(0) == "\x1b[2K":
                lines[-1] = ""
            i += len(match.group(0)) if match else 1
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1]
            lines[-1] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return lines


def _pty_run(server, args, *, until=None, env=None):
    """Run the CLI on a pseudo-terminal; return (raw bytes before ``until``, all raw bytes,
    exit code)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update({**server.env, **(env or {})})
        os.execv(sys.executable, [sys.executable, str(MODULE), "--url", server.url, "--token",
                                  server.token, *args])
    data, before = b"", None
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if until is not None and before is None and until in data:
                before = data
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return before, data, os.waitstatus_to_exitcode(status)


def test_cli_prompts_on_a_terminal_and_hides_passwords(server, no_leaks):
    import pty
    code = ("import getpass\nname = input('name? ')\npw = getpass.getpass('pw? ')\n"
            "print('got', name, len(pw))")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with a terminal on stdin, stdout and stderr
        os.environ.clear()
        os.environ.update(server.env)
        os.execv(sys.executable, [sys.executable, str(MODULE), "--url", server.url, "--token",
                                  server.token, code])
    screen = b""

    def read_until(words):
        nonlocal screen
        while words not in screen:
            chunk = os.read(fd, 1024)
            if not chunk:
                raise AssertionError(f"CLI ended before {words!r}: {screen!r}")
            screen += chunk
    try:
        read_until(b"name? ")
        os.write(fd, b"ada\n")
        read_until(b"pw? ")
        os.write(fd, b"hunter2\n")
        read_until(b"got ada 7")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert screen.count(b"hunter2") == 0  # the password was not echoed


def test_terminal_shows_a_transient_status_line_while_a_cell_is_silent(server, no_leaks):
    before, data, code = _pty_run(server, ["print('start', flush=True)\n"
                                           "import time; time.sleep(4)\nprint('end')"],
                                  until=b"Ctrl-C to interrupt]")
    assert code == 0 and before is not None
    assert re.fullmatch(r"\[running \d+s \| kernel busy \| Ctrl-C to interrupt\]",
                        _screen(before)[-1])
    final = [line for line in _screen(data) if line]
    assert final == ["start", "end"]


@pytest.mark.parametrize("args, env", [(["--color", "never"], {}), ([], {"NO_COLOR": "1"}),
                                       ([], {"TERM": "dumb"})])
def test_no_status_line_on_a_terminal_that_wants_no_escapes(server, no_leaks, args, env):
    _, data, code = _pty_run(server, [*args, "import time; time.sleep(3); print('end')"], env=env)
    assert code == 0 and b"\x1b" not in data and b"running" not in data and data.strip() == b"end"


def test_terminal_says_which_cell_of_a_notebook_runs(server, tmp_path, no_leaks):
    path = tmp_path / "two.py"
    path.write_text("# %%\nx = 1\n# %%\nprint(x)\n")
    _, data, code = _pty_run(server, ["-f", str(path)])
    assert code == 0 and b"[cell 1/2]" in data and b"[cell 2/2]" in data
    assert cli("-f", str(path), server=server).stderr == ""  # never in pipes


def test_no_status_line_in_pipes(server, no_leaks):
    proc = cli("import time; time.sleep(3); print('quiet')", server=server)
    assert proc.stdout == "quiet\n" and "running" not in proc.stderr


def test_terminal_progress_bars_update_in_place_and_keep_colours(server, no_leaks):
    code = ("import sys\nfor p in (10, 50, 100):\n"
            "    sys.stderr.write(f'\\rprogress {p}%'); sys.stderr.flush()\n"
            "sys.stderr.write('\\n'); sys.stderr.flush()\nprint('\\x1b[31mred\\x1b[0m')")
    _, data, code_ = _pty_run(server, [code])
    assert code_ == 0
    assert [line for line in _screen(data) if line] == ["progress 100%", "red"]
    assert b"\x1b[31mred" in data  # a terminal keeps colours
    _, data, _ = _pty_run(server, [code], env={"NO_COLOR": "1"})
    assert b"\x1b[31m" not in data and b"red" in data


def test_session_keeps_a_named_kernel_between_cli_runs(server):
    rest = server.rest()
    try:
        assert cli("--session", "work", "x = 1", server=server).returncode == 0
        proc = cli("--session", "work", "print(x)", server=server)
        assert (proc.returncode, proc.stdout) == (0, "1\n")
        sessions = [s for s in rest.request("GET", "api/sessions", deadline=jc.Deadline(30))
                    if s["path"] == "work"]
        assert len(sessions) == 1 and sessions[0]["kernel"]["id"] in server.kernels()
        with jc.Kernel(server.url, server.token, session="work", timeout=60) as k:
            assert k.execute("x + 1").data["text/plain"] == "2"
        assert sessions[0]["kernel"]["id"] in server.kernels()  # sessions outlive the call
    finally:
        for s in rest.request("GET", "api/sessions", deadline=jc.Deadline(30)):
            rest.request("DELETE", f"api/sessions/{s['id']}", deadline=jc.Deadline(30))


def test_notebook_flag_runs_in_the_kernel_of_an_open_notebook(server):
    rest = server.rest()
    opened = rest.request("POST", "api/sessions", {"path": "analysis.ipynb", "type": "notebook",
                                                   "name": "analysis.ipynb",
                                                   "kernel": {"name": "python3"}},
                          deadline=jc.Deadline(30))
    try:
        assert cli("--notebook", "analysis.ipynb", "shared = 41", server=server).returncode == 0
        with jc.Kernel(server.url, server.token, notebook="./analysis.ipynb", timeout=60) as k:
            assert k.id == opened["kernel"]["id"]
            assert k.execute("shared + 1").data["text/plain"] == "42"
        proc = cli("--notebook", "missing.ipynb", "1", server=server)
        assert proc.returncode == 3 and "has no open notebook missing.ipynb" in proc.stderr
    finally:
        rest.request("DELETE", f"api/sessions/{opened['id']}", deadline=jc.Deadline(30))


def _notebook(*cells):
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3"}},
            "cells": [{"cell_type": kind, "id": f"c{i}", "metadata": {}, "source": source,
                       **({"outputs": [], "execution_count": None} if kind == "code" else {})}
                      for i, (kind, source) in enumerate(cells)]}


def test_whole_notebook_stops_at_the_first_error_and_writes_the_results(server, tmp_path, no_leaks):
    path = tmp_path / "three.ipynb"
    path.write_text(json.dumps(_notebook(("code", ["x = 2\n", "print(x)"]), ("markdown", "# title"),
                                         ("code", "1/0"), ("code", "print('after')"))))
    out = tmp_path / "out.ipynb"
    proc = cli("-f", str(path), "--write", str(out), server=server)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["-- cell 1/3 --", "2", "-- cell 2/3 --"]
    assert "ZeroDivisionError" in proc.stderr and "after" not in proc.stdout
    written = json.loads(out.read_text())
    code = [c for c in written["cells"] if c["cell_type"] == "code"]
    assert code[0]["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "2\n"}]
    assert code[0]["execution_count"] == 1
    assert code[1]["outputs"][0]["output_type"] == "error" and code[1]["execution_count"] == 2
    assert code[2]["outputs"] == [] and code[2]["execution_count"] is None
    assert written["cells"][1] == {"cell_type": "markdown", "id": "c1", "metadata": {},
                                   "source": "# title"}
    assert written["nbformat"] == 4 and written["metadata"]["kernelspec"]["name"] == "python3"


def test_whole_notebook_keep_going_runs_every_cell(server, tmp_path, no_leaks):
    path = tmp_path / "three.ipynb"
    path.write_text(json.dumps(_notebook(("code", "1/0"), ("raw", "skip me"),
                                         ("code", "print('b')"), ("code", "print('c')"))))
    proc = cli("-f", str(path), "--keep-going", server=server)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["-- cell 1/3 --", "-- cell 2/3 --", "b",
                                        "-- cell 3/3 --", "c"]
    obj = json.loads(cli("-f", str(path), "--keep-going", "--json", server=server).stdout)
    assert obj["status"] == "error" and [c["status"] for c in obj["cells"]] == ["error", "ok", "ok"]
    assert obj["ok"] is False and obj["cells"][2]["stdout"] == "c\n"


def test_percent_cells_in_a_py_file_run_one_by_one(server, tmp_path, no_leaks):
    path = tmp_path / "cells.py"
    path.write_text("# %%\na = 1\n# %% [markdown]\n# not code\n# %%\nprint(a + 1)\n")
    out = tmp_path / "cells.ipynb"
    proc = cli("-f", str(path), "--write", str(out), server=server)
    assert (proc.returncode, proc.stdout) == (0, "-- cell 1/2 --\n-- cell 2/2 --\n2\n")
    written = json.loads(out.read_text())
    assert [(c["cell_type"], c["source"]) for c in written["cells"]] == [
        ("code", "a = 1\n"), ("markdown", "not code"), ("code", "print(a + 1)\n")]
    assert written["cells"][2]["outputs"][0]["text"] == "2\n"


def test_input_answers_carry_over_from_cell_to_cell(server, tmp_path, no_leaks):
    path = tmp_path / "ask.py"
    path.write_text("# %%\nprint(input())\n# %%\nprint(input())\n")
    proc = cli("-f", str(path), "--input", "first", "--input", "second", server=server)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["-- cell 1/2 --", "first", "-- cell 2/2 --", "second"]


NBCLIENT_CASES = [  # nbclient's semantics, cell by cell
    _cell("code", "x = 1"),
    _cell("code", "   \n"),                                     # empty: not run
    _cell("code", "print('stored')", ["skip-execution"],         # not run; its stored outputs stay
          outputs=[{"output_type": "stream", "name": "stdout", "text": "old\n"}],
          execution_count=7),
    _cell("code", "raise ValueError('allowed')", ["raises-exception"]),  # may fail; the run goes on
    _cell("code", "h = display('a', display_id='d')\nprint(x)"),
    _cell("markdown", "text"),
    # updates the output of an earlier cell
    _cell("code", "h.update('b')"),
    # so does a new display with that id
    _cell("code", "_ = display('c', display_id='d')"),
    _cell("code", "x + 1"),
]


def _comparable(notebook):
    """Outputs and counts of every code cell, with stream chunks joined (their split is timing)."""
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        outputs, streams = [], {}
        for out in cell["outputs"]:
            if out["output_type"] == "stream":
                streams[out["name"]] = streams.get(out["name"], "") + out["text"]
            else:
                out = dict(out)
                if out["output_type"] == "error":
                    out["traceback"] = len(out["traceback"]) > 0  # colours and paths vary
                outputs.append(out)
        cells.append((cell["execution_count"], sorted(streams.items()), outputs))
    return cells


def test_a_notebook_runs_as_nbclient_runs_it(server, tmp_path, no_leaks):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = {"cells": NBCLIENT_CASES,
                "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                            "display_name": "Python 3"}},
                "nbformat": 4, "nbformat_minor": 5}
    path, out = tmp_path / "semantics.ipynb", tmp_path / "out.ipynb"
    path.write_text(json.dumps(notebook))
    proc = cli("-f", str(path), "--write", str(out), server=server)
    assert proc.returncode == 0, proc.stderr  # the only error is in a cell that may raise
    ours = json.loads(out.read_text())
    nbformat.validate(nbformat.reads(out.read_text(), as_version=4))
    theirs = nbformat.reads(json.dumps(notebook), as_version=4)
    nbclient.NotebookClient(theirs, kernel_name="python3", timeout=60).execute()
    assert _comparable(ours) == _comparable(theirs)
    code = [c for c in ours["cells"] if c["cell_type"] == "code"]
    assert code[1]["execution_count"] is None and code[2]["execution_count"] == 7
    assert ([o["data"]["text/plain"] for c in code for o in c["outputs"] if o.get("data")]
            == ["'c'", "'c'", "2"])
    assert ours["metadata"]["language_info"]["name"] == "python"


def test_papermill_parameters_reach_the_notebook_and_its_metadata(server, tmp_path, no_leaks):
    notebook = {"cells": [_cell("code", "a = 1\nb = 'x'", ["parameters"]),
                          _cell("code", "print(a, repr(b), c)")],
                "metadata": {"kernelspec": {"name": "python3", "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    path, params, out = tmp_path / "p.ipynb", tmp_path / "params.json", tmp_path / "out.ipynb"
    path.write_text(json.dumps(notebook))
    params.write_text('{"a": 2, "c": {"k": [1, 2.5]}}')
    proc = cli("-f", str(path), "--parameters-file", str(params), "-p", "a", "5", "-r", "b", "7",
               "--write", str(out), server=server)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "5 '7' {'k': [1, 2.5]}"
    written = json.loads(out.read_text())
    assert written["cells"][1]["source"] == '# Parameters\na = 5\nc = {"k": [1, 2.5]}\nb = "7"\n'
    assert written["cells"][1]["metadata"]["tags"] == ["injected-parameters"]
    assert (written["metadata"]["papermill"]["parameters"]
            == {"a": 5, "c": {"k": [1, 2.5]}, "b": "7"})
    # replaces the injected cell
    proc = cli("-f", str(out), "-p", "a", "6", "-r", "c", "z", "--json", server=server)
    assert json.loads(proc.stdout)["cells"][-1]["stdout"] == "6 'x' z\n"


def test_a_cell_over_its_time_limit_is_an_error_and_the_run_goes_on_with_keep_going(
        server, tmp_path, no_leaks):
    path, out = tmp_path / "slow.ipynb", tmp_path / "out.ipynb"
    path.write_text(json.dumps(_notebook(("code", "import time; time.sleep(60)"),
                                         ("code", "print('next')"))))
    proc = cli("-f", str(path), "--cell-timeout", "2", "--keep-going", "--write", str(out),
               server=server)
    assert proc.returncode == 1 and proc.stdout.splitlines()[-1] == "next"
    first = json.loads(out.read_text())["cells"][0]
    assert first["outputs"][-1]["output_type"] == "error"
    assert first["outputs"][-1]["ename"] in ("KeyboardInterrupt", "CellTimeoutError")


def test_the_kernel_starts_in_the_notebooks_directory_on_the_server(server, no_leaks):
    folder = server.root / "reports"
    folder.mkdir(exist_ok=True)
    (folder / "data.txt").write_text("beside the notebook")
    (folder / "read.ipynb").write_text(
        json.dumps(_notebook(("code", "print(open('data.txt').read())"))))
    proc = cli("-f", str(folder / "read.ipynb"), "--url", server.url,
               env={**server.env, "JUPYTER_TOKEN": server.token})
    assert ((proc.returncode, proc.stdout.splitlines()[-1])
            == (0, "beside the notebook")), proc.stderr


def test_notebooks_on_the_server_run_there_and_are_saved_there(server, no_leaks):
    rest = server.rest()
    rest.request("PUT", "api/contents/daily", {"type": "directory"}, deadline=jc.Deadline(30))
    rest.request("PUT", "api/contents/daily/in.txt",
                 {"type": "file", "format": "text", "content": "42"}, deadline=jc.Deadline(30))
    rest.request("PUT", "api/contents/daily/job.ipynb",
                 {"type": "notebook", "format": "json",
                  "content": _notebook(("code", "print(open('in.txt').read())"))},
                 deadline=jc.Deadline(30))
    proc = cli("-f", "server:daily/job.ipynb", "--write", "server:daily/job-out.ipynb",
               server=server)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "42", proc.stderr
    saved = rest.request("GET", "api/contents/daily/job-out.ipynb?content=1",
                         deadline=jc.Deadline(30))["content"]
    assert saved["cells"][0]["outputs"][0]["text"] == "42\n"
    proc = cli("-f", "server:daily/missing.ipynb", server=server)
    assert proc.returncode == 3 and proc.stderr.splitlines() == [
        f"jupyter_call: error: server at {server.url} has no file daily/missing.ipynb (HTTP 404)"]


def test_run_notebook_returns_the_executed_notebook_or_raises_with_it(server, tmp_path, no_leaks):
    notebook = _notebook(("code", "n = 1"), ("code", "print(n + p)"))
    notebook["cells"][0]["metadata"]["tags"] = ["parameters"]
    done = jc.run_notebook(notebook, server.url, server.token, parameters={"p": 41}, timeout=60)
    assert (done["cells"][2]["outputs"][0]["text"] == "42\n"
            and notebook["cells"][1]["outputs"] == [])
    with pytest.raises(jc.ExecutionError) as info:
        jc.run_notebook(_notebook(("code", "1/0"), ("code", "print('never')")), server.url,
                        server.token, timeout=60)
    assert info.value.result.error["ename"] == "ZeroDivisionError"
    assert info.value.notebook["cells"][1]["outputs"] == []


def test_not_a_notebook_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.ipynb"
    for text in ("{}", '{"cells": [{"cell_type": "code", "source": [1], "metadata": []}], '
                       '"metadata": []}'):
        bad.write_text(text)
        proc = cli("-f", str(bad), "-p", "a", "1", timeout=30)
        assert (proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
                and "is not a Jupyter notebook" in proc.stderr)


def test_notebooks_and_parameters_of_the_wrong_shape_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.ipynb"
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 600 + "]" * 600 + "}")
    good = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    for metadata in ({"kernelspec": True}, {"papermill": "x"}, {"language_info": 5},
                     {"kernelspec": {"name": 3}}):
        bad.write_text(json.dumps({**good, "metadata": metadata}))
        proc = cli("-f", str(bad), "-p", "a", "1", timeout=30)
        assert (proc.returncode == 2
                and "is not a Jupyter notebook" in proc.stderr), (metadata, proc.stderr)
        with pytest.raises(jc.ConfigError, match="not the shape of a notebook"):
            jc.run_notebook({**good, "metadata": metadata})
    bad.write_text(json.dumps(good))
    proc = cli("-f", str(bad), "--parameters-file", str(deep), timeout=30)
    assert (proc.returncode == 2
            and "parameters nest deeper than 200 levels" in proc.stderr), proc.stderr
    bad.write_bytes(b"\xff\xfe{")
    proc = cli("--mcp", "--log", str(bad), timeout=30)
    assert proc.returncode == 2 and "it is not UTF-8 text" in proc.stderr, proc.stderr


def test_a_lone_surrogate_is_written_escaped_not_lost():
    text = jc._notebook_text({"cells": [{"cell_type": "markdown", "source": "half \ud83d",
                                        "metadata": {}}]})
    assert json.loads(text.encode("utf-8"))["cells"][0]["source"] == "half \ud83d"


# ---- 3. The MCP server (--mcp) against the real server --------------------------------

class McpProcess:
    """``jupyter_call.py --mcp`` in a subprocess, spoken to over its pipes as a host does."""

    def __init__(self, server, *args, url=True, env=None, module=False, cwd=HERE,
                 python=sys.executable):
        flags = ((["--url", server.url] + (["--token", server.token] if server.token else []))
                 if url else [])
        # as the README's host configurations
        launch = ["-m", "jupyter_call"] if module else [str(MODULE)]
        self.proc = subprocess.Popen(
            [python, "-W", "error", *launch, "--mcp", *flags, *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**server.env, **(env or {})},
            cwd=str(cwd))
        self.lines, self.messages, self.stderr = [], [], []
        self.arrived = threading.Condition()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.arrived:
                self.lines.append(line)
                with contextlib.suppress(ValueError):
                    self.messages.append(json.loads(line))
                self.arrived.notify_all()
        with self.arrived:
            self.lines.append(None)  # EOF
            self.arrived.notify_all()

    def send(self, message):
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def start(self, method, params=None):
        """Send a request; return its id."""
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                   **({"params": params} if params else {})})
        return self.next_id

    def wait(self, test, timeout=120):
        """The first message for which ``test`` is true (bounded wait)."""
        with self.arrived:
            found = self.arrived.wait_for(lambda: next((m for m in self.messages if test(m)), None)
                                          or None in self.lines, timeout)
            match = next((m for m in self.messages if test(m)), None)
        assert match is not None, ("no such message; stderr: "
                                   f"{b''.join(self.stderr).decode()[-2000:]}"
                                   if found else "timed out waiting for the MCP server")
        return match

    def answer(self, request_id, timeout=120):
        return self.wait(lambda m: m.get("id") == request_id and "method" not in m, timeout)

    def request(self, method, params=None, timeout=120):
        return self.answer(self.start(method, params), timeout)

    def call(self, tool, meta=None, **arguments):
        return self.request("tools/call", {"name": tool, "arguments": arguments,
                                           **({"_meta": meta} if meta else {})})

    def handshake(self, version="2025-11-25"):
        answer = self.request("initialize", {"protocolVersion": version, "capabilities": {},
                                             "clientInfo": {"name": "test", "version": "1"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer["result"]

    def close(self, timeout=30):
        """Close stdin as a host does; return the exit code."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        return self.proc.wait(timeout)

    def check_stdout(self):
        """Every line on stdout is one JSON-RPC message."""
        for line in self.lines:
            if line is not None:
                msg = json.loads(line)
                assert msg["jsonrpc"] == "2.0" and ("method" in msg or "id" in msg), line

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


@pytest.fixture
def mcp(server, no_leaks):
    started = []

    def start(*args, **options):
        process = McpProcess(server, *args, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
        process.stop()


def _texts(answer):
    return "".join(block["text"] for block in answer["result"]["content"]
                   if block["type"] == "text")


def test_mcp_handshake_era_serves_tools_whose_schemas_are_valid(mcp):
    jsonschema = pytest.importorskip("jsonschema")
    host = mcp()
    result = host.handshake("2025-06-18")
    assert (result["protocolVersion"] == "2025-06-18"
            and result["capabilities"] == {"tools": {"listChanged": False}})
    assert result["serverInfo"]["name"] == "jupyter_call" and result["instructions"]
    assert host.handshake("1999-01-01")["protocolVersion"] == "2025-11-25"  # unknown: the latest
    tools = {t["name"]: t for t in host.request("tools/list")["result"]["tools"]}
    assert set(tools) == {"run_code", "get_execution", "list_kernels", "start_kernel",
                          "interrupt_kernel", "restart_kernel", "shutdown_kernel", "run_notebook",
                          "read_notebook", "edit_notebook", "run_cells"}

    def types(schema):  # every "type" in a schema, at any depth
        if isinstance(schema, dict):
            yield from ([schema["type"]] if "type" in schema else [])
            for value in schema.values():
                yield from types(value)
        elif isinstance(schema, list):
            for value in schema:
                yield from types(value)
    # portable: one type per schema (nullable fields as anyOf), as one-type dialects need
    assert all(isinstance(kind, str) for kind in types(list(tools.values())))
    for tool in tools.values():
        jsonschema.Draft202012Validator.check_schema(tool["inputSchema"])
        assert tool["inputSchema"]["type"] == "object" and len(tool["description"]) > 80
        if "outputSchema" in tool:
            jsonschema.Draft202012Validator.check_schema(tool["outputSchema"])
    assert (tools["list_kernels"]["annotations"]["readOnlyHint"]
            and tools["get_execution"]["annotations"]["readOnlyHint"])
    assert (tools["shutdown_kernel"]["annotations"]["destructiveHint"]
            and not tools["run_code"]["annotations"]["destructiveHint"])
    assert host.request("ping")["result"] == {}
    assert host.request("resources/list")["error"]["code"] == -32601
    assert host.call("no_such_tool")["error"]["code"] == -32602
    host.send(b"this is not json\n")
    assert host.wait(lambda m: m.get("id") is None and "error" in m)["error"]["code"] == -32700
    wrong = host.call("run_code", code=5)
    assert (wrong["result"]["isError"]
            and _texts(wrong) == "run_code: argument 'code' must be string, not integer")
    assert host.request("ping")["result"] == {}  # still serving
    assert host.close() == 0
    host.check_stdout()


def test_mcp_run_code_outputs_state_errors_images_and_budget(mcp, server):
    jsonschema = pytest.importorskip("jsonschema")
    host = mcp("--max-output", "5000")
    host.handshake()
    schema = next(t for t in host.request("tools/list")["result"]["tools"]
                  if t["name"] == "run_code")["outputSchema"]
    first = host.call("run_code", code="x = 41\nprint('hello')\nx + 1")
    assert _texts(first) == "hello\n42\n" and first["result"]["isError"] is False
    structured = first["result"]["structuredContent"]
    jsonschema.validate(structured, schema)
    assert (structured["status"] == "ok" and structured["truncated"] is False
            and structured["kernel"] in server.kernels())
    # the default kernel keeps its state
    assert _texts(host.call("run_code", code="print(x * 2)")) == "82\n"
    failed = host.call("run_code", code="1 / 0")
    assert (failed["result"]["isError"]
            and failed["result"]["structuredContent"]["status"] == "error")
    assert "ZeroDivisionError" in _texts(failed) and "\x1b" not in _texts(failed)
    png = _tiny_png()
    shown = host.call("run_code", code=f"from IPython.display import display\n"
                                       f"display({{'image/png': "
                                       f"{base64.b64encode(png).decode()!r}, "
                                       f"'text/plain': '<image>'}}, raw=True)")
    images = [b for b in shown["result"]["content"] if b["type"] == "image"]
    assert (len(images) == 1 and images[0]["mimeType"] == "image/png"
            and base64.b64decode(images[0]["data"]) == png)
    big = host.call("run_code", code="for i in range(20000): print('row', i)")
    assert big["result"]["structuredContent"]["truncated"] is True
    text = _texts(big)
    assert (text.startswith("row 0\n") and text.endswith("row 19999\n")
            and "characters left out" in text)
    assert len(text) < 5200
    jsonschema.validate(big["result"]["structuredContent"], schema)
    assert host.close() == 0
    host.check_stdout()


def _meta(version="2026-07-28", **more):
    return {"_meta": {"io.modelcontextprotocol/protocolVersion": version,
                      "io.modelcontextprotocol/clientCapabilities": {}, **more}}


def test_mcp_2026_era_discovers_without_a_handshake(mcp):
    host = mcp()
    found = host.request("server/discover", _meta())["result"]
    assert (found["supportedVersions"][0] == "2026-07-28"
            and "2025-11-25" in found["supportedVersions"])
    assert found["capabilities"]["tools"] == {"listChanged": False} and found["instructions"]
    assert ((found["resultType"], found["cacheScope"]) == ("complete", "public")
            and found["ttlMs"] > 0)
    assert found["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "jupyter_call"
    listed = host.request("tools/list", _meta())["result"]
    assert (len(listed["tools"]) == 11 and listed["resultType"] == "complete" and "ttlMs" in listed
            and "cacheScope" in listed)
    ran = host.request("tools/call",
                       {"name": "run_code", "arguments": {"code": "6 * 7"}, **_meta()})["result"]
    assert ran["content"] == [{"type": "text", "text": "42\n"}] and ran["resultType"] == "complete"
    assert ran["structuredContent"]["status"] == "ok"
    unsupported = host.request("tools/list", _meta("2030-01-01"))["error"]
    assert (unsupported["code"] == -32022
            and unsupported["data"] == {"supported": ["2026-07-28"], "requested": "2030-01-01"})
    assert host.request("tools/list")["error"]["code"] == -32602  # no version in _meta
    assert host.request("ping", _meta())["error"]["code"] == -32601  # gone in this revision
    assert host.request("initialize", {"protocolVersion": "2025-11-25",
                                       "capabilities": {}})["error"]["code"] == -32022
    assert host.close() == 0
    host.check_stdout()


def test_mcp_long_calls_report_progress_and_do_not_block_others(mcp):
    host = mcp()
    host.handshake()
    other = host.call("start_kernel")["result"]["structuredContent"]["kernel"]
    long = host.start("tools/call", {"name": "run_code",
                                     "arguments": {"code": "import time\nprint('started')\n"
                                                           "time.sleep(6)\nprint('woke')"},
                                     "_meta": {"progressToken": "p1"}})
    first = host.wait(lambda m: m.get("method") == "notifications/progress")
    assert host.request("ping")["result"] == {}  # answered while the cell runs
    elsewhere = host.call("run_code", code="print('meanwhile')", kernel=other)
    assert _texts(elsewhere) == "meanwhile\n"
    done = host.answer(long)
    assert _texts(done) == "started\nwoke\n"
    with host.arrived:
        order = [m.get("id") or m.get("method") for m in host.messages]
        progress = [m["params"] for m in host.messages
                    if m.get("method") == "notifications/progress"]
    # the other kernel answered before the long cell ended
    assert order.index(host.next_id) < order.index(long)
    assert len(progress) >= 2 and all(p["progressToken"] == "p1" for p in progress)
    # strictly increasing
    assert [p["progress"] for p in progress] == sorted({p["progress"] for p in progress})
    assert first["params"]["message"].endswith(": started")
    assert order.index("notifications/progress") < order.index(long)
    assert (host.call("shutdown_kernel", kernel=other)["result"]["content"][0]["text"]
            == f"kernel {other} shut down")
    assert host.close() == 0


def test_mcp_cancellation_interrupts_the_kernel_and_sends_nothing_more(mcp):
    host = mcp()
    host.handshake()
    host.call("run_code", code="state = 'kept'")
    sleeping = host.start("tools/call", {"name": "run_code",
                                         "arguments": {"code": "import time; time.sleep(600)"},
                                         "_meta": {"progressToken": 7}})
    host.wait(lambda m: m.get("method") == "notifications/progress")  # it runs
    host.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
               "params": {"requestId": sleeping}})
    # queued behind the cancelled cell: runs once it stopped
    after = host.call("run_code", code="print(state)")
    assert _texts(after) == "kept\n"
    with host.arrived:
        since = len(host.messages)
    # A call longer than the progress interval: the cancelled one, were it still reported, shows.
    host.call("run_code", code=f"import time; time.sleep({jc._MCP_PROGRESS_EVERY + 0.5})",
              meta={"progressToken": 8})
    with host.arrived:
        assert not any(m.get("id") == sleeping for m in host.messages)
        late = [m["params"]["progressToken"] for m in host.messages[since:]
                if m.get("method") == "notifications/progress"]
    assert 8 in late and 7 not in late, late
    assert host.close() == 0


def test_mcp_kernels_tools_and_cleanup_when_stdin_closes(mcp, server):
    person = jc.Kernel(server.url, server.token, timeout=60)  # a kernel someone else started
    try:
        host = mcp("--kernel-id", person.id)
        host.handshake()
        assert (_texts(host.call("run_code", code="shared = 1; print('in the person kernel')"))
                == "in the person kernel\n")
        # the agent and the person share its state
        assert person.execute("print(shared)").stdout == "1\n"
        started = host.call("start_kernel")["result"]["structuredContent"]
        assert started["name"] == "python3"
        listed = host.call("list_kernels")["result"]["structuredContent"]
        mine = {k["id"]: k for k in listed["kernels"]}
        assert mine[started["kernel"]]["started"] and not mine[started["kernel"]]["default"]
        assert mine[person.id]["default"] and not mine[person.id]["started"]
        refused = host.call("shutdown_kernel", kernel=person.id)
        assert refused["result"]["isError"] and "not started by this MCP server" in _texts(refused)
        host.call("run_code", code="gone = 1", kernel=started["kernel"])
        assert "restarted" in _texts(host.call("restart_kernel", kernel=started["kernel"]))
        lost = host.call("run_code", code="gone", kernel=started["kernel"])
        assert "NameError" in _texts(lost)
        assert "interrupted" in _texts(host.call("interrupt_kernel", kernel=person.id))
        assert host.close() == 0
        kernels = server.kernels()
        assert started["kernel"] not in kernels and person.id in kernels  # attached: left alone
        everything = b"".join(line for line in host.lines if line) + b"".join(host.stderr)
        assert server.token.encode() not in everything and server.url.encode() not in everything
        assert b"default kernel" in everything  # (the log said something, without them)
    finally:
        person.close()


def test_mcp_sigterm_deletes_the_kernels_it_started(mcp, server):
    host = mcp()
    host.handshake()
    kernel = host.call("run_code", code="1")["result"]["structuredContent"]["kernel"]
    assert kernel in server.kernels()
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(30) == 143
    assert kernel not in server.kernels()


def test_mcp_run_notebook_and_log(mcp, server, tmp_path):
    notebook = _notebook(("code", "n = 1"), ("markdown", "text"),
                         ("code", "import time; time.sleep(2.5)\nprint(n + p)"), ("code", "1/0"))
    notebook["cells"][0]["metadata"]["tags"] = ["parameters"]
    path = tmp_path / "job.ipynb"
    path.write_text(json.dumps(notebook))
    log = tmp_path / "agent.ipynb"
    host = mcp("--log", str(log))
    host.handshake()
    ran = host.call("run_notebook", path=str(path), parameters={"p": 41},
                    write=str(tmp_path / "out.ipynb"), meta={"progressToken": "nb"})
    summary = ran["result"]["structuredContent"]
    assert ran["result"]["isError"] and summary["status"] == "error"
    assert [(c["cell"], c["status"]) for c in summary["cells"]] == [(1, "ok"), (2, "ok"), (3, "ok"),
                                                                    (4, "error")]
    assert (summary["cells"][2]["output"] == "42\n"
            and summary["cells"][3]["error"] == "ZeroDivisionError: division by zero")
    progress = host.wait(lambda m: m.get("method") == "notifications/progress"
                         and m["params"]["message"].endswith(": cell 3 of 4"))["params"]
    assert progress["progressToken"] == "nb"
    written = json.loads((tmp_path / "out.ipynb").read_text())
    assert written["cells"][3]["outputs"][0]["text"] == "42\n"
    host.call("run_code", code="print('logged')")
    host.call("run_code", code="1 / 0")
    nbformat = pytest.importorskip("nbformat")
    kept = nbformat.read(str(log), as_version=4)
    nbformat.validate(kept)
    assert [c.source for c in kept.cells] == ["print('logged')", "1 / 0"]
    assert (kept.cells[0].outputs[0].text == "logged\n"
            and kept.cells[1].outputs[0].ename == "ZeroDivisionError")
    assert host.close() == 0


def test_a_notebook_runs_the_same_through_the_api_the_command_line_and_mcp(mcp, server, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    notebook = _notebook(("code", "x = 1"), ("markdown", "text"), ("code", "print(x * 2)\nx"),
                         ("code", "import sys"))
    notebook["nbformat_minor"] = 4  # as papermill's own test notebooks
    notebook["metadata"]["kernelspec"] = {"name": "python3", "language": "python",
                                          "display_name": "Python 3"}
    for cell in notebook["cells"]:
        del cell["id"]
    notebook["cells"][0]["metadata"]["tags"] = ["parameters"]
    path = tmp_path / "same.ipynb"
    path.write_text(json.dumps(notebook))
    ran = {"api": jc.run_notebook(str(path), server.url, server.token, parameters={"x": 21},
                                  timeout=60)}
    proc = cli("-f", str(path), "-p", "x", "21", "--write", str(tmp_path / "cli.ipynb"),
               server=server)
    assert proc.returncode == 0, proc.stderr
    ran["cli"] = json.loads((tmp_path / "cli.ipynb").read_text())
    host = mcp()
    host.handshake()
    assert not host.call("run_notebook", path=str(path), parameters={"x": 21},
                         write=str(tmp_path / "mcp.ipynb"))["result"]["isError"]
    ran["mcp"] = json.loads((tmp_path / "mcp.ipynb").read_text())
    for name, executed in ran.items():
        nbformat.validate(nbformat.from_dict(executed))
        for cell in executed["cells"]:
            del cell["id"]  # (new cells get random ones)
    assert ran["api"] == ran["cli"] == ran["mcp"]
    assert ran["api"]["cells"][3]["outputs"][0]["text"] == "42\n"
    assert ran["api"]["metadata"]["language_info"]["name"] == "python"
    assert host.close() == 0


def test_non_python_notebooks_take_no_parameters_and_keep_their_kernel_in_every_front_end(
        mcp, server, tmp_path):
    notebook = _notebook(("code", "1"))
    notebook["metadata"]["kernelspec"] = {"name": "ir", "language": "R"}
    path = tmp_path / "r.ipynb"
    path.write_text(json.dumps(notebook))
    with pytest.raises(jc.ConfigError, match="this notebook's language is R"):
        jc.run_notebook(str(path), server.url, server.token, parameters={"x": 1})
    proc = cli("-f", str(path), "-p", "x", "1", server=server)
    assert proc.returncode == 2 and "this notebook's language is R" in proc.stderr
    host = mcp()
    host.handshake()
    answer = host.call("run_notebook", path=str(path), parameters={"x": 1})
    assert answer["result"]["isError"] and "this notebook's language is R" in _texts(answer)
    proc = cli("-f", str(path), server=server)  # the notebook's kernel, which this server lacks
    assert proc.returncode == 3 and "ir" in proc.stderr, proc.stderr
    assert host.close() == 0


def test_run_notebook_reads_notebooks_on_the_server(server, no_leaks):
    name = f"api-{secrets.token_hex(3)}.ipynb"
    jc.RestClient(server.url, server.token).save_notebook(
        name, _notebook(("code", "print('there')")), deadline=jc.Deadline(10))
    executed = jc.run_notebook(f"server:{name}", server.url, server.token, timeout=60)
    assert executed["cells"][0]["outputs"][0]["text"] == "there\n"


def test_the_official_mcp_sdk_speaks_to_it_in_both_eras(server, no_leaks):
    pytest.importorskip("mcp")
    import asyncio
    from mcp import Client, StdioServerParameters
    params = StdioServerParameters(command=sys.executable, args=[str(MODULE), "--mcp"],
                                   env={**server.env, "JUPYTER_URL": server.url,
                                        "JUPYTER_TOKEN": server.token})

    async def session(mode):
        async with Client(params, mode=mode) as client:  # validates each result against its schema
            names = {tool.name for tool in (await client.list_tools()).tools}
            first = await client.call_tool("run_code", {"code": "x = 6 * 7\nprint(x)"})
            second = await client.call_tool("run_code", {"code": "x"})
            kernels = await client.call_tool("list_kernels", {})
            slow = await client.call_tool("run_code",
                                          {"code": "import time; time.sleep(1.5); x", "wait": 0.2})
            later = await client.call_tool("get_execution",
                                           {"execution": slow.structured_content["execution"]})
            assert ((slow.structured_content["status"], later.structured_content["status"])
                    == ("running", "ok"))
            assert (later.content[0].text == "42\n"
                    and later.structured_content["kernel"] == slow.structured_content["kernel"])
            book = _server_notebook(server, f"sdk-{mode}.ipynb", "6 * 7")
            read = await client.call_tool("read_notebook", {"path": book})
            await client.call_tool("edit_notebook", {
                "path": book, "revision": read.structured_content["revision"],
                "edits": [{"op": "replace", "id": "a", "source": "6 * 7 + 1"}]})
            ran = await client.call_tool("run_cells", {"path": book, "cells": "all"})
            _close_sessions(server, book)
            assert not read.structured_content["live"] and ran.content[0].text == "[cell a]\n43\n"
            return client.protocol_version, names, first, second, kernels

    for mode, era in (("auto", "2026-07-28"), ("legacy", "2025-11-25")):
        version, names, first, second, kernels = asyncio.run(session(mode))
        assert version == era and "run_code" in names
        assert first.content[0].text == "42\n" and not first.is_error
        assert first.structured_content["status"] == "ok" and second.content[0].text == "42\n"
        assert any(k["default"] for k in kernels.structured_content["kernels"])


def test_mcp_malformed_messages_get_one_error_each_and_the_server_goes_on(mcp):
    host = mcp()
    host.handshake()
    for raw, code in (
            (b"[1, 2]\n", -32600),
            (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}\n', -32600),
            (b'{"jsonrpc": "2.0", "id": 90}\n', -32600), (b"\xff\xfe not utf-8\n", -32700),
            (b'{"jsonrpc": "2.0", "id": 91, "method": "tools/list", "params": [1]}\n', -32602)):
        before = len(host.messages)
        host.send(raw)
        host.wait(lambda m, n=before: len(host.messages) > n and m is host.messages[n])
        assert host.messages[before]["error"]["code"] == code, raw
    host.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
               "params": {"requestId": {"x": []}}})
    # notifications are never answered
    host.send({"jsonrpc": "2.0", "method": "notifications/unknown"})
    nothing = host.request("tools/call", {"name": "run_code", "arguments": None})
    assert nothing["result"]["isError"] and "'code' is required" in _texts(nothing)
    bare = host.request("tools/call", {"name": "interrupt_kernel"})  # no arguments at all
    assert bare["result"]["isError"] and "'kernel' is required" in _texts(bare)
    assert host.request("ping")["result"] == {}
    assert host.close() == 0
    host.check_stdout()
    assert not any("internal error" in line.decode() for line in host.stderr)


def test_mcp_timeout_interrupts_and_returns_what_arrived(mcp):
    host = mcp("--timeout", "60")
    host.handshake()
    slow = host.call("run_code", code="import time\nprint('before', flush=True)\ntime.sleep(30)",
                     timeout=1.5)
    assert slow["result"]["isError"] and slow["result"]["structuredContent"]["status"] == "timeout"
    assert _texts(slow).startswith("before\n") and "timed out after 1.5 s" in _texts(slow)
    assert _texts(host.call("run_code", code="print('still here')")) == "still here\n"
    assert host.close() == 0


def test_mcp_shares_the_kernel_of_an_open_notebook(mcp, server):
    rest = server.rest()
    # as JupyterLab does when a person opens it
    kernel_id = rest.create_session("shared.ipynb", None, deadline=jc.Deadline(30))
    try:
        host = mcp("--notebook", "shared.ipynb")
        host.handshake()
        ran = host.call("run_code", code="from_agent = 'hello'")
        assert ran["result"]["structuredContent"]["kernel"] == kernel_id
        with jc.Kernel(server.url, server.token, kernel_id=kernel_id, timeout=60) as person:
            assert person.execute("print(from_agent)").stdout == "hello\n"
        assert host.close() == 0
        assert kernel_id in server.kernels()  # a person's kernel is left running
    finally:
        for session in rest.request("GET", "api/sessions", deadline=jc.Deadline(30)):
            if session["kernel"]["id"] == kernel_id:
                # deletes its kernel too
                rest.request("DELETE", f"api/sessions/{session['id']}", deadline=jc.Deadline(30))


def test_mcp_unreachable_server_is_a_tool_error_that_names_no_url(mcp):
    port = _free_port()  # given by the environment, as the README's host configurations do
    host = mcp(url=False,
               env={"JUPYTER_URL": f"http://127.0.0.1:{port}/", "JUPYTER_TOKEN": "secret-token-1"})
    host.handshake()
    failed = host.call("run_code", code="1")
    text = _texts(failed)
    assert (failed["result"]["isError"]
            and text == "the Jupyter server is not reachable: connection refused")
    listed = host.call("list_kernels")
    assert listed["result"]["isError"] and str(port) not in _texts(listed)
    assert host.close() == 0
    assert (b"secret-token-1" not in b"".join(host.stderr)
            + b"".join(line for line in host.lines if line))


def test_mcp_as_the_host_configurations_launch_it(mcp, server, tmp_path):
    host = mcp(url=False, module=True, cwd=tmp_path,
               env={"PYTHONPATH": str(HERE), "JUPYTER_URL": server.url,
                    "JUPYTER_TOKEN": server.token})
    host.handshake()
    assert _texts(host.call("run_code", code="import sys; print(sys.version_info[0])")) == "3\n"
    assert host.close() == 0


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_mcp_on_the_oldest_and_newest_python(mcp, version):
    host = mcp(python=_pyenv_python(version))
    assert host.handshake("2024-11-05")["protocolVersion"] == "2024-11-05"
    tools = host.request("tools/list")["result"]["tools"]
    # (2025-06-18 brought them)
    assert len(tools) == 11 and not any("outputSchema" in t for t in tools)
    assert _texts(host.call("run_code", code="print('on', 40 + 2)")) == "on 42\n"
    assert host.close() == 0


def _running(host, **arguments):
    """A run_code call expected to leave its cell running: its result."""
    result = host.call("run_code", **arguments)["result"]
    assert result["structuredContent"]["status"] == "running" and not result["isError"], result
    return result


def _collect(host, execution, wait=5):
    """get_execution until a final status: the stream text and the last result."""
    texts = []
    while True:
        result = host.call("get_execution", execution=execution, wait=wait)["result"]
        texts += [b["text"] for b in result["content"] if b["type"] == "text"
                  and not b["text"].startswith("[")]
        if result["structuredContent"]["status"] != "running":
            return "".join(texts), result


def test_mcp_a_cell_that_outlasts_its_wait_runs_on_and_is_collected(mcp, server, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    host = mcp("--log", str(tmp_path / "log.ipynb"))
    host.handshake()
    schema = next(t for t in host.request("tools/list")["result"]["tools"]
                  if t["name"] == "get_execution")
    slow = _running(host, code="import time\nfor i in range(8):\n    print(i, flush=True)\n"
                               "    time.sleep(1)", wait=2)
    jsonschema.validate(slow["structuredContent"], schema["outputSchema"])
    execution, kernel = slow["structuredContent"]["execution"], slow["structuredContent"]["kernel"]
    first = [b["text"] for b in slow["content"]]
    assert first[0].startswith("0\n") and "8" not in first[0]  # what it printed so far
    assert f'call get_execution with execution "{execution}"' in first[-1] and len(execution) == 32
    queued = _running(host, code="print('second')", wait=0)  # waits its turn, as the kernel would
    listed = host.call("list_kernels")["result"]["structuredContent"]["kernels"]
    ids = next(k["executions"] for k in listed if k["id"] == kernel)
    assert set(ids) == {execution, queued["structuredContent"]["execution"]}
    rest, last = _collect(host, execution)
    assert first[0] + rest == "".join(f"{i}\n" for i in range(8))  # nothing lost, nothing twice
    assert (last["structuredContent"]["status"] == "ok"
            and isinstance(last["structuredContent"]["execution_count"], int))
    jsonschema.validate(last["structuredContent"], schema["outputSchema"])
    assert _collect(host, queued["structuredContent"]["execution"])[0] == "second\n"
    for unknown in (execution, "0" * 32):  # collected, and never known
        gone = host.call("get_execution", execution=unknown)["result"]
        assert gone["isError"] and "unknown, or collected already" in _texts({"result": gone})
    assert (host.call("run_code", code="print('at once')")["result"]["structuredContent"]["status"]
            == "ok")
    assert host.close() == 0
    # the background cells with all they printed
    logged = json.loads((tmp_path / "log.ipynb").read_text())["cells"]
    assert [jc._cell_source(c) for c in logged][-2:] == ["print('second')", "print('at once')"]
    assert ("".join(out["text"] for out in logged[0]["outputs"])
            == "".join(f"{i}\n" for i in range(8)))


def test_mcp_background_cells_are_interrupted_bounded_and_cleaned_up(mcp, server):
    host = mcp("--wait", "0.5")
    host.handshake()
    # started
    assert host.call("run_code", code="1", wait=60)["result"]["structuredContent"]["status"] == "ok"
    sleeping = _running(host, code="import time; time.sleep(600)")["structuredContent"]
    waiting = host.start("tools/call",
                         {"name": "get_execution", "arguments": {"execution": sleeping["execution"],
                                                                 "wait": 300}})
    host.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
               "params": {"requestId": waiting}})
    # the wait ended; the cell ran on
    still = host.call("get_execution", execution=sleeping["execution"], wait=0)["result"]
    assert still["structuredContent"]["status"] == "running"
    with host.arrived:
        assert not any(m.get("id") == waiting for m in host.messages)
    queued = _running(host, code="print('never')")["structuredContent"]  # behind the sleeping cell
    host.call("interrupt_kernel", kernel=sleeping["kernel"])
    text, ended = _collect(host, sleeping["execution"], wait=60)
    assert ended["structuredContent"]["status"] == "error" and ended["isError"]
    assert "KeyboardInterrupt" in _texts({"result": ended})
    # as Jupyter aborts what waited behind an error
    text, aborted = _collect(host, queued["execution"], wait=60)
    assert (aborted["structuredContent"]["status"] == "aborted" and text == ""
            and "aborted" in _texts({"result": aborted}))
    with open(f"/proc/{host.proc.pid}/status") as f:
        before = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
    loud = _running(host, code="for _ in range(100):\n"
                               "    print('x' * 10**6, flush=True)", wait=0)["structuredContent"]
    text, done = _collect(host, loud["execution"], wait=120)
    assert done["structuredContent"]["status"] == "ok" and done["structuredContent"]["truncated"]
    assert "characters left out" in _texts({"result": done}) or "characters left out" in text
    with open(f"/proc/{host.proc.pid}/status") as f:
        peak = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    assert peak - before < 30_000, (before, peak)  # kB: 100 MB printed, a few MB held
    left = _running(host, code="import time; time.sleep(600)")["structuredContent"]
    assert left["kernel"] in server.kernels()
    assert host.close() == 0  # the host leaves with the cell running
    assert left["kernel"] not in server.kernels()


def test_mcp_kernel_registry_deletes_only_what_it_started(server, no_leaks):
    said = []
    registry = jc._KernelRegistry(server.url, server.token, log=said.append)
    with jc.Kernel(server.url, server.token) as other:  # someone else's kernel
        attached = registry.get(other.id)
        default = registry.get(None)
        assert registry.table() == ({default.id}, default.id)
        assert other.id not in registry.table()[0]
        registry.drop(default.id)  # the connection goes; the kernel stays, and stays ours
        assert registry.get(None).id == default.id and default.id in registry.table()[0]
        # (the host's budget is not the point here)
        started, threads = registry.close(jc.Deadline(30))
        for thread in threads:
            thread.join(30)
        assert started == [default.id] and default.id not in server.kernels()
        assert other.id in server.kernels() and not attached.owned
        attached.close()
        with pytest.raises(jc.JupyterError, match="stopping"):  # a start after close: deleted
            registry.get(None)
    assert said == [f"default kernel {default.id} started"]


def test_mcp_cleanup_waits_for_a_kernel_still_starting(server, no_leaks, monkeypatch):
    starting, started = threading.Event(), []

    class Kernel(jc.Kernel):
        def __init__(self, *args, **options):
            starting.set()  # the first run_code has begun to start the default kernel...
            super().__init__(*args, **options)
            started.append(self.id)

    monkeypatch.setattr(jc, "Kernel", Kernel)
    before = set(server.kernels())
    mcp_server = jc.McpServer(server.url, server.token, out=io.BytesIO(), err=io.StringIO())

    def first_call():
        # "the MCP server is stopping", if its start outlasted cleanup
        with contextlib.suppress(jc.JupyterError):
            mcp_server.kernels.get(None)

    first = threading.Thread(target=first_call)
    first.start()
    assert starting.wait(30)
    mcp_server.cleanup()  # ...when the host closed stdin
    first.join(60)
    assert not first.is_alive()
    assert started and set(server.kernels()) == before  # deleted, however long its start took


# ---- 3. One live notebook: an agent and a person (jupyter-collaboration) ---------------------

@pytest.fixture(scope="module")
def collab(tmp_path_factory):
    """A server with jupyter-collaboration, polling and saving files faster than by default."""
    pytest.importorskip("jupyter_server_ydoc", reason="needs jupyter-collaboration")
    srv = JupyterServer(tmp_path_factory.mktemp("collab"), [
        "--ZMQChannelsWebsocketConnection.limit_rate=False",
        "--YDocExtension.file_poll_interval=0.5", "--YDocExtension.document_save_delay=0.5"])
    try:
        yield srv
    finally:
        srv.stop()


class Person:
    """A person's JupyterLab on a notebook of ``server``: it joins the notebook's collaboration
    room as the browser does (pycrdt, jupyter_ydoc), shows the document and types into it. It
    takes in what comes only when told (``pump``, ``wait``): one thread."""

    def __init__(self, server, path):
        from jupyter_ydoc import YNotebook
        from pycrdt import Doc, create_sync_message
        rest = server.rest()
        room = rest.request("PUT", f"api/collaboration/session/{quote(path, safe='')}",
                            {"format": "json", "type": "notebook"}, deadline=jc.Deadline(30))
        self.ws = rest.websocket(f"api/collaboration/room/json:notebook:{room['fileId']}"
                                 f"?sessionId={room['sessionId']}", jc.Deadline(30))
        self.doc, self.synced, self.replaced = Doc(), False, 0
        self.notebook = YNotebook(self.doc)
        self.ws.send(create_sync_message(self.doc))
        self.wait(lambda: self.synced)
        # a cell leaves the document only when it is deleted or replaced
        self.notebook.ycells.observe_deep(self._replaced)

    def _replaced(self, events):
        self.replaced += sum(d.get("delete", 0) for e in events if not e.path for d in e.delta)

    def pump(self, seconds=0.0):
        from pycrdt import handle_sync_message
        end = time.monotonic() + seconds
        while True:
            try:
                message = self.ws.recv(timeout=max(0.001, end - time.monotonic()))
            except TimeoutError:
                return
            if isinstance(message, bytes) and message[:1] == b"\x00":
                reply = handle_sync_message(message[1:], self.doc)
                if reply is not None:
                    self.ws.send(reply)
                self.synced = self.synced or message[1:2] == b"\x01"

    def wait(self, test, timeout=30):
        give_up = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < give_up, self.cells()
            self.pump(0.05)

    def cells(self):
        return [self.notebook.get_cell(i) for i in range(self.notebook.cell_number)]

    def type(self, index, text):
        """A keystroke: ``text`` at the end of cell ``index``."""
        from pycrdt import create_update_message
        before, source = self.doc.get_state(), self.notebook.ycells[index]["source"]
        source.insert(len(source), text)
        self.ws.send(create_update_message(self.doc.get_update(before)))

    def close(self):
        self.ws.close()


def _server_notebook(server, name, *sources, minor=5):
    """A notebook of code cells with ids "a", "b", ... on the server; its name."""
    cells = [{"cell_type": "code", "id": chr(97 + i), "metadata": {}, "source": source,
              "outputs": [], "execution_count": None} for i, source in enumerate(sources)]
    for cell in cells if minor < 5 else ():
        del cell["id"]
    (server.root / name).write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": minor,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}}}))
    return name


def _close_sessions(server, path):
    """Delete the sessions (and so the kernels) of notebook ``path``, as closing it in JupyterLab
    would."""
    rest = server.rest()
    for session in rest.request("GET", "api/sessions", deadline=jc.Deadline(30)):
        if session["path"] == path:
            rest.request("DELETE", f"api/sessions/{session['id']}", deadline=jc.Deadline(30))


def _on_disk(server, name):
    """The notebook in the file, its multiline strings joined (as nbformat reads it)."""
    return pytest.importorskip("nbformat").reads((server.root / name).read_text(), as_version=4)


def _shown(cell):
    return "".join(str(out.get("text", "")) for out in cell["outputs"])


def test_edits_appear_where_the_person_sees_the_notebook_and_others_keep_their_identity(collab):
    path = _server_notebook(collab, "edits.ipynb", "1", "2", "3", "4")
    person = Person(collab, path)
    try:
        read = jc.read_notebook(path, collab.url, collab.token)
        assert read["live"] and [c["id"] for c in read["cells"]] == ["a", "b", "c", "d"]
        done = jc.edit_notebook(path, [{"op": "insert", "source": "new = 5", "after": "a"},
                                       {"op": "replace", "id": "b", "source": "changed = 2"},
                                       {"op": "delete", "id": "c"},
                                       {"op": "move", "id": "d", "before": "a"}],
                                collab.url, collab.token, revision=read["revision"])
        new = done["ids"][0]
        person.wait(lambda: [c["id"] for c in person.cells()] == ["d", "a", new, "b"])
        assert [c["source"] for c in person.cells()] == ["4", "1", "new = 5", "changed = 2"]
        assert person.replaced == 2  # c deleted and d moved; a and b are the cells they were
        assert done["revision"] == jc.read_notebook(path, collab.url, collab.token)["revision"]
        with pytest.raises(jc.JupyterError, match="changed since you read it: read it again"):
            jc.edit_notebook(path, [{"op": "delete", "id": "a"}], collab.url, collab.token,
                             revision=read["revision"])
        with pytest.raises(jc.ConfigError, match="edit 2: the notebook has no cell 'zz'"):
            jc.edit_notebook(path, [{"op": "delete", "id": "a"}, {"op": "move", "id": "zz"}],
                             collab.url, collab.token)
        person.pump(1.5)
        assert [c["id"] for c in person.cells()] == ["d", "a", new, "b"]  # nothing written
        assert [c["id"] for c in _on_disk(collab, path)["cells"]] == ["d", "a", new, "b"]
    finally:
        person.close()


def test_outputs_appear_as_a_cell_runs_in_the_notebooks_own_kernel(collab):
    path = _server_notebook(collab, "run.ipynb", "print(shared)",
                            "import time\nfor i in range(6):\n    print(i, flush=True)\n"
                            "    time.sleep(1)\n'done'")
    session = collab.rest().request("POST", "api/sessions", {
        "path": path, "type": "notebook", "kernel": {"name": "python3"}}, deadline=jc.Deadline(60))
    with jc.Kernel(collab.url, collab.token, kernel_id=session["kernel"]["id"]) as theirs:
        theirs.execute("shared = 'set by the person'")  # (as their JupyterLab would)
    person = Person(collab, path)
    try:
        results = []
        runner = threading.Thread(target=lambda: results.extend(jc.run_cells(
            path, "all", collab.url, collab.token, timeout=60)))
        runner.start()
        person.wait(lambda: "1\n" in _shown(person.cells()[1]))  # while it runs
        assert runner.is_alive()
        runner.join(60)
        person.wait(lambda: person.cells()[1]["execution_count"] == 3)  # (their cell was 1)
        assert [r.stdout for r in results] == ["set by the person\n", "0\n1\n2\n3\n4\n5\n"]
        ran = person.cells()
        assert ran[0]["outputs"][0]["text"] == "set by the person\n"
        assert ran[1]["outputs"][-1]["data"]["text/plain"] == "'done'"
        assert [c["execution_count"] for c in _on_disk(collab, path)["cells"]] == [2, 3]
    finally:
        person.close()
    assert session["kernel"]["id"] in collab.kernels()  # the notebook's kernel, left running


def test_a_person_typing_meanwhile_loses_nothing_and_outputs_land_at_the_pause(collab):
    path = _server_notebook(collab, "typing.ipynb", "notes = 1",
                            "import time\nfor i in range(3):\n    print(i, flush=True)\n"
                            "    time.sleep(1)")
    person = Person(collab, path)
    try:
        results = []
        runner = threading.Thread(target=lambda: results.extend(jc.run_cells(
            path, ["b"], collab.url, collab.token, timeout=60)))
        runner.start()
        typed = ""
        for i in range(17):  # a keystroke every 0.3 s for 5 s, in another cell
            person.type(0, str(i % 10))
            typed += str(i % 10)
            person.pump(0.3)
            assert _shown(person.cells()[1]) == ""  # nothing lands while they type
        person.wait(lambda: person.cells()[1]["execution_count"] is not None)
        runner.join(60)
        assert person.cells()[0]["source"] == "notes = 1" + typed
        assert results[0].stdout == "0\n1\n2\n" and _shown(person.cells()[1]) == "0\n1\n2\n"
        # (the person's own save)
        person.wait(lambda: _on_disk(collab, path)["cells"][0]["source"] == "notes = 1" + typed)
    finally:
        person.close()


def test_a_notebook_without_ids_gets_them_on_its_first_edit_and_validates(collab):
    nbformat = pytest.importorskip("nbformat")
    path = _server_notebook(collab, "old.ipynb", "x = 1", "y = 2", minor=4)
    read = jc.read_notebook(path, collab.url, collab.token, outputs="none")
    assert [c["id"] for c in read["cells"]] == ["cell-0", "cell-1"]
    jc.edit_notebook(path, [{"op": "insert", "source": "# notes", "cell_type": "markdown",
                             "before": "cell-1"}], collab.url, collab.token,
                     revision=read["revision"])
    written = _on_disk(collab, path)
    nbformat.validate(written)
    assert written["nbformat_minor"] == 5 and [c["source"] for c in written["cells"]] == [
        "x = 1", "# notes", "y = 2"] and written["cells"][2]["id"] == "cell-1"


def test_the_mcp_tools_read_edit_and_run_a_live_notebook(collab, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    path = _server_notebook(collab, "agent.ipynb", "import time; time.sleep(2); print('slow')",
                            "1 + 1")
    notebook = _on_disk(collab, path)
    notebook["cells"][1]["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
        "image/png": base64.b64encode(_tiny_png()).decode(), "text/plain": "<image>"}}]
    (collab.root / path).write_text(json.dumps(notebook))
    host = McpProcess(collab)
    try:
        host.handshake()
        tools = {t["name"]: t for t in host.request("tools/list")["result"]["tools"]}
        read = host.call("read_notebook", path=path, outputs="full")["result"]
        jsonschema.validate(read["structuredContent"], tools["read_notebook"]["outputSchema"])
        assert read["structuredContent"]["live"] and [b["type"] for b in read["content"]] == [
            "text", "image"] and read["structuredContent"]["cells"][1]["outputs"] == "<image>\n"
        revision = read["structuredContent"]["revision"]
        bad = host.call("edit_notebook", path=path, edits=[{"op": "replace", "id": "zz"}])
        assert bad["result"]["isError"] and "edit 1: the notebook has no cell 'zz'" in _texts(bad)
        done = host.call("edit_notebook", path=path, revision=revision,
                         edits=[{"op": "insert", "source": "print('added')", "after": "a"}])
        added = done["result"]["structuredContent"]["ids"][0]
        stale = host.call("edit_notebook", path=path, revision=revision,
                          edits=[{"op": "delete", "id": "a"}])
        assert stale["result"]["isError"] and "changed since you read it" in _texts(stale)
        running = host.call("run_cells", path=path, cells=["a", added], wait=0.5)["result"]
        assert running["structuredContent"]["status"] == "running"
        done = host.call("get_execution", execution=running["structuredContent"]["execution"],
                         wait=30)["result"]
        jsonschema.validate(done["structuredContent"], tools["run_cells"]["outputSchema"])
        assert done["structuredContent"]["status"] == "ok"
        shown = "".join(block["text"] for result in (running, done)
                        for block in result["content"] if not block["text"].startswith("[still"))
        assert shown == f"[cell a]\nslow\n[cell {added}]\nadded\n"
        assert [c.get("outputs") for c in _on_disk(collab, path)["cells"]][:2] == [
            [{"output_type": "stream", "name": "stdout", "text": "slow\n"}],
            [{"output_type": "stream", "name": "stdout", "text": "added\n"}]]
        assert host.close() == 0
    finally:
        host.stop()


def test_without_collaboration_the_notebook_changes_on_disk_and_the_cli_runs_its_cells(server):
    path = _server_notebook(server, "plain.ipynb", "print('from the cli')", "'second'")
    assert not jc.read_notebook(path, server.url, server.token)["live"]
    jc.edit_notebook(path, [{"op": "replace", "id": "b", "source": "'changed'"}], server.url,
                     server.token)
    kernels = server.kernels()
    with pytest.raises(jc.ConfigError, match="the notebook has no cell 'zz'"):
        jc.run_cells(path, ["a", "zz"], server.url, server.token)
    assert server.kernels().keys() == kernels.keys()  # (none started for it)
    proc = cli("--notebook", path, "--cells", "a,b", server=server)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [
        "-- cell 1/2 --", "from the cli", "-- cell 2/2 --", "'changed'"], proc.stderr
    cells = _on_disk(server, path)["cells"]
    assert [c["execution_count"] for c in cells] == [1, 2] and cells[1]["source"] == "'changed'"
    proc = cli("--notebook", path, "--cells", "zz", server=server)
    assert (proc.returncode, proc.stderr.strip()) == (
        2, "jupyter_call: usage error: the notebook has no cell 'zz'")
    proc = cli("--notebook", path, "--cells", "a", "-p", "x", "1", server=server)
    assert (proc.returncode, proc.stderr.strip()) == (
        2, "jupyter_call: usage error: --parameters cannot be used with --cells")
    _close_sessions(server, path)
