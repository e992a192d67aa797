#!/usr/bin/env python3
"""Benchmarks and development checks for jupyter_call.

Standard library only; run it from the checkout, next to jupyter_call.py:

    python bench_jupyter_call.py autobahn URL AGENT

Subcommands:
  autobahn  Autobahn|Testsuite echo client for jupyter_call.WebSocket. Run it
            through the kit: bash run.sh -- python bench_jupyter_call.py autobahn {url} {agent}
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from urllib.parse import quote

import jupyter_call  # the script's own directory is first on sys.path
from jupyter_call import WebSocket, WebSocketClosed, WebSocketError

# ---- autobahn: Autobahn|Testsuite echo client -----------------------------------

MAX_SIZE = 64 * 2**20  # 9.x sends messages of up to 16 MiB
ABORT_GRACE = 10.0     # a case still running this long after its watchdog fired ends the process


def _short(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Watchdog:
    """Shut the case's socket down after ``timeout`` s; exit if the case still runs later."""

    def __init__(self, timeout: float, label: str):
        self.sock: socket.socket | None = None
        self.fired = False
        self._timeout, self._label = timeout, label
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        if self._done.wait(self._timeout):
            return
        self.fired = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # a blocked recv()/sendall() returns at once
            except OSError:
                pass
        if not self._done.wait(ABORT_GRACE):
            print(f"autobahn: FATAL: {self._label} still running {ABORT_GRACE:g} s after "
                  f"its {self._timeout:g} s limit; exiting", flush=True)
            os._exit(3)

    def stop(self) -> None:
        self._done.set()


def _run_case(url: str, label: str, args: argparse.Namespace) -> tuple[str, str]:
    """Echo every message until the connection closes; return (status, text)."""
    dog = _Watchdog(args.case_timeout, label)
    ws, echoed = None, 0
    try:
        ws = WebSocket.connect(url, timeout=args.io_timeout, max_size=MAX_SIZE)
        dog.sock = ws.sock
        while True:
            ws.send(ws.recv(timeout=args.io_timeout))  # pings and the close reply are handled inside
            echoed += 1
    except WebSocketClosed as exc:  # before WebSocketError: it is a subclass
        how = f"closed {exc.code} ({exc.reason})"
    except WebSocketError as exc:
        how = f"client failed the connection with {exc.code} ({exc.reason})"
    except Exception as exc:
        how = f"{type(exc).__name__}: {exc}"
    finally:
        dog.stop()
        if ws is not None:
            ws.close()  # a no-op when the connection already ended
    if dog.fired:
        return "timeout", _short(f"no end after {args.case_timeout:g} s, socket shut down "
                                 f"({how} after {echoed} echoed)")
    return "ok", _short(f"{how} after {echoed} echoed")


def _control(url: str, timeout: float) -> list:
    """Connect to a control URL and collect its messages until the server closes."""
    ws = WebSocket.connect(url, timeout=timeout)
    messages = []
    try:
        while True:
            messages.append(ws.recv(timeout=timeout))
    except WebSocketClosed:
        return messages
    finally:
        ws.close()


def cmd_autobahn(args: argparse.Namespace) -> int:
    base, agent = args.url.rstrip("/"), quote(args.agent, safe="")
    try:
        count = int(_control(f"{base}/getCaseCount", args.control_timeout)[0])
    except Exception as exc:
        print(f"autobahn: FATAL: getCaseCount failed: {type(exc).__name__}: {exc}", flush=True)
        return 3
    print(f"autobahn: jupyter_call {jupyter_call.__version__}; {count} cases; agent {args.agent}",
          flush=True)
    t_start, tally = time.monotonic(), {}
    for i in range(1, count + 1):
        label, t0 = f"case {i}/{count}", time.monotonic()
        status, text = _run_case(f"{base}/runCase?case={i}&agent={agent}", label, args)
        print(f"{label} {time.monotonic() - t0:.3f}s {status}: {text}", flush=True)
        tally[status] = tally.get(status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(tally.items()))
    print(f"autobahn: ran {count} cases in {time.monotonic() - t_start:.1f}s ({summary})", flush=True)
    try:
        _control(f"{base}/updateReports?agent={agent}", args.control_timeout)
    except Exception as exc:
        print(f"autobahn: updateReports failed: {type(exc).__name__}: {exc}", flush=True)
        return 4
    print("autobahn: updateReports done", flush=True)
    return 0


# ---- command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_jupyter_call.py",
        description="Benchmarks and development checks for jupyter_call.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "autobahn", help="Autobahn|Testsuite echo client for jupyter_call.WebSocket",
        description="Run every case of an Autobahn|Testsuite fuzzingserver, echoing each "
                    "message back, then ask the server to write its report.")
    p.add_argument("url", help="fuzzingserver URL, e.g. ws://127.0.0.1:9001")
    p.add_argument("agent", help="agent name the report is filed under")
    p.add_argument("--io-timeout", type=float, default=10.0, metavar="S",
                   help="limit for the handshake and for each message (default %(default)s)")
    p.add_argument("--case-timeout", type=float, default=60.0, metavar="S",
                   help="wall-clock limit per case (default %(default)s)")
    p.add_argument("--control-timeout", type=float, default=120.0, metavar="S",
                   help="limit for getCaseCount and updateReports (default %(default)s)")
    p.set_defaults(func=cmd_autobahn)

    # More subcommands (benchmarks) go here: add_parser(...), then set_defaults(func=...).
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
