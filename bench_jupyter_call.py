#!/usr/bin/env python3
"""Benchmarks and development checks for jupyter_call.

Standard library only at import time; run it from the checkout, next to
jupyter_call.py:

    python bench_jupyter_call.py                    # the same as: run
    python bench_jupyter_call.py run [--rounds N] [--latency-n 300] [--mb 50] [--only NAMES]
    python bench_jupyter_call.py cli-rss [--mb 500]
    python bench_jupyter_call.py mcp [--launches 20] [--calls 1000]
    python bench_jupyter_call.py autobahn URL AGENT

Subcommands:
  run       The benchmark: start a private jupyter_server (rate limits off), then
            measure import, attach, cold, latency and throughput for jupyter_call
            and its peers (jupyter_client over ZMQ with no server hop,
            websocket-client, websockets), interleaved round-robin over several
            rounds, and print one table per measurement with the targets.
            Peers that are not installed are skipped with a note:
            pip install websockets websocket-client requests
  sample    One in-process sample against a running server, printed as JSON;
            ``run`` starts one fresh process of it per sample. ``--profile``
            prints the cProfile top functions to stderr.
  cli-rss   Peak RSS of the jupyter_call command line while it prints a large
            output (default 500 MB, target: under 60 MB) to a pipe this script
            drains and counts, for each --protocol, next to the same command
            running ``pass``; on a private server with rate limits off.
  mcp       The --mcp server as a host drives it: launch to the tools/list answer
            (both eras, target: median under 100 ms), run_code of pass against
            Kernel.execute in the same run (target: p50 at most 1.5x), its RSS over
            1,000 calls (target: flat within 5 MB), and cleanup after stdin closes
            (target: process and started kernels gone within 3 s).
  autobahn  Autobahn|Testsuite echo client for jupyter_call.WebSocket. Run it
            through the kit: bash run.sh -- python bench_jupyter_call.py autobahn {url} {agent}
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from urllib.parse import quote

import jupyter_call  # the script's own directory is first on sys.path
from jupyter_call import WebSocket, WebSocketClosed, WebSocketError

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- autobahn: Autobahn|Testsuite echo client ----------------------------------------

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


# ---- run: a private Jupyter server ---------------------------------------------------

SERVER_START_TIMEOUT = 90.0  # s until GET /api/kernels answers
REST_TIMEOUT = 120.0         # s for one REST call of the harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A jupyter_server on a free 127.0.0.1 port with a random token and isolated Jupyter dirs.

    Rate limits are off, so throughput is not cut by the IOPub limits. ``stop``
    terminates it (then kills it) and removes its temporary folder.
    """

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="bench_jupyter_call-")
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runtime_dir = os.path.join(self.root, "runtime")
        self.env = dict(os.environ, HOME=os.path.join(self.root, "home"),
                        JUPYTER_CONFIG_DIR=os.path.join(self.root, "config"),
                        JUPYTER_DATA_DIR=os.path.join(self.root, "data"),
                        JUPYTER_RUNTIME_DIR=self.runtime_dir,
                        IPYTHONDIR=os.path.join(self.root, "ipython"), JUPYTER_PLATFORM_DIRS="1")
        for var in ("JUPYTER_URL", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE"):
            self.env.pop(var, None)
        # Measure what users get: bytecode cached after the first import. Without
        # this, jupyter_call.py (not in site-packages, so never precompiled) would
        # be compiled again in every measured process.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start the server and wait until its REST API answers; return the seconds it took."""
        work = os.path.join(self.root, "work")
        for folder in (self.env["HOME"], work):
            os.makedirs(folder)
        cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}",
               "--ZMQChannelsWebsocketConnection.limit_rate=False", f"--ServerApp.root_dir={work}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        t0 = time.perf_counter()
        with open(os.path.join(self.root, "server.log"), "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=work, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter_server exited at start:\n{self.log_tail()}")
            try:
                if isinstance(self.rest("GET", "api/kernels", timeout=5), list):
                    return time.perf_counter() - t0
            except OSError:
                pass
            if time.monotonic() > give_up:
                raise RuntimeError(f"jupyter_server did not answer within {SERVER_START_TIMEOUT:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.root, "server.log"), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rest(self, method: str, path: str, *, timeout: float = REST_TIMEOUT):
        import urllib.request
        req = urllib.request.Request(self.url + path, method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body.strip() else None

    def start_kernel(self) -> str:
        return self.rest("POST", "api/kernels")["id"]

    def connection_file(self, kernel_id: str, timeout: float = 30.0) -> str:
        """The kernel's connection file in the server's runtime dir (waits for it to appear)."""
        path = os.path.join(self.runtime_dir, f"kernel-{kernel_id}.json")
        give_up = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > give_up:
                raise RuntimeError(f"no connection file {os.path.basename(path)} in the runtime dir")
            time.sleep(0.05)
        return path

    def delete_all_kernels(self) -> None:
        try:
            for kernel in self.rest("GET", "api/kernels", timeout=10) or []:
                self.rest("DELETE", f"api/kernels/{kernel['id']}", timeout=30)
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.delete_all_kernels()
            jupyter_call._stop_server(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


# ---- run: the clients ----------------------------------------------------------------
#
# Every client has the same small interface: attach(kernel_id) (check the kernel
# over REST where the client has REST, then connect), connect(kernel_id),
# execute(code) -> (ok, stdout, text/plain result), close(), and cold() (start a
# kernel, run 1+1, delete the kernel). The peers are written plainly, the way
# their libraries are used in the wild, and are self-contained: the attach
# measurement runs their source in a fresh ``python -c`` process, with
# ATTACH_PRELUDE's imports, so no part of this module is imported there.

ATTACH_PRELUDE = "from __future__ import annotations\nimport json, os, struct, sys, time, uuid\n"


class JupyterCallClient:
    """jupyter_call's public API: Kernel(...).execute() and run_code()."""

    def __init__(self, url: str, token: str, protocol: str = "auto"):
        self.url, self.token, self.protocol = url, token, protocol
        self.kernel = None

    def attach(self, kernel_id: str) -> None:
        self.kernel = jupyter_call.Kernel(self.url, self.token, kernel_id=kernel_id,
                                          protocol=self.protocol)

    connect = attach

    def execute(self, code: str) -> tuple:
        result = self.kernel.execute(code)
        return result.ok, result.stdout, (result.data or {}).get("text/plain")

    def close(self) -> None:
        self.kernel.close()

    def cold(self) -> tuple:
        result = jupyter_call.run_code("1+1", self.url, self.token)
        return result.ok, (result.data or {}).get("text/plain")


class WebsocketPeer:
    """A kernel client on a third-party websocket library, written the way
    enterprise_gateway's client is: REST with requests (urllib without it, and
    always for ``websockets``), one websocket to /api/kernels/ID/channels, legacy
    JSON messages (or the v1 binary framing), read until both the execute_reply
    and the iopub idle status of our request are in.
    """

    def __init__(self, url: str, token: str, library: str = "websockets", protocol: str = "legacy"):
        self.url, self.token, self.library, self.protocol = url, token, library, protocol
        self.session = uuid.uuid4().hex
        self.ws = None

    # -- REST --

    def rest(self, method: str, path: str):
        headers = {"Authorization": f"token {self.token}"}
        if self.library == "websocket-client":
            try:
                import requests
            except ImportError:
                requests = None
            if requests is not None:
                resp = requests.request(method, self.url + path, headers=headers, timeout=120,
                                        json={} if method == "POST" else None)
                resp.raise_for_status()
                return resp.json() if resp.content else None
        import urllib.request
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=b"{}" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    # -- websocket --

    def attach(self, kernel_id: str) -> None:
        self.rest("GET", f"api/kernels/{kernel_id}")
        self.connect(kernel_id)

    def connect(self, kernel_id: str) -> None:
        ws_url = (f"ws{self.url[4:]}api/kernels/{kernel_id}/channels"
                  f"?session_id={self.session}")
        auth = f"token {self.token}"
        offered = ["v1.kernel.websocket.jupyter.org"] if self.protocol == "v1" else None
        if self.library == "websocket-client":
            import websocket
            self.ws = websocket.create_connection(ws_url, header=[f"Authorization: {auth}"],
                                                  subprotocols=offered)
            chosen = self.ws.getsubprotocol()
        else:
            from websockets.sync.client import connect
            self.ws = connect(ws_url, additional_headers={"Authorization": auth},
                              subprotocols=offered, max_size=None, compression=None)
            chosen = self.ws.subprotocol
        if offered and chosen not in offered:
            raise RuntimeError("the server does not speak the v1 kernel websocket protocol")

    def send(self, msg: dict) -> None:
        if self.protocol != "v1":
            self.ws.send(json.dumps(msg))
            return
        channel = msg["channel"].encode()
        parts = [json.dumps(msg[key]).encode()
                 for key in ("header", "parent_header", "metadata", "content")]
        offsets = [8 * (len(parts) + 3), 8 * (len(parts) + 3) + len(channel)]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        self.ws.send(struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets)
                     + channel + b"".join(parts))

    def recv(self) -> dict:
        raw = self.ws.recv()
        if self.protocol != "v1":
            return json.loads(raw)
        (count,) = struct.unpack_from("<Q", raw)
        offsets = struct.unpack_from(f"<{count}Q", raw, 8)
        parts = [raw[offsets[i]:offsets[i + 1]] for i in range(count - 1)]
        msg = {"channel": parts[0].decode(), "buffers": parts[5:]}
        for key, part in zip(("header", "parent_header", "metadata", "content"), parts[1:5]):
            msg[key] = json.loads(part) if part else {}
        return msg

    def execute(self, code: str) -> tuple:
        msg_id = uuid.uuid4().hex
        self.send({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                       "session": self.session, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "version": "5.3"},
            "parent_header": {}, "metadata": {},
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
            "channel": "shell", "buffers": [],
        })
        reply, idle, stdout, result = None, False, [], None
        while reply is None or not idle:
            msg = self.recv()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "execute_reply" and msg.get("channel") == "shell":
                reply = content
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "stream" and content.get("name") == "stdout":
                stdout.append(content["text"])
            elif kind == "execute_result":
                result = content["data"].get("text/plain")
        return reply.get("status") == "ok", "".join(stdout), result

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def cold(self) -> tuple:
        kernel_id = self.rest("POST", "api/kernels")["id"]
        try:
            self.connect(kernel_id)
            ok, _, result = self.execute("1+1")
            self.close()
        finally:
            self.rest("DELETE", f"api/kernels/{kernel_id}")
        return ok, result


class ZmqPeer:
    """jupyter_client talking ZMQ straight to the kernel (no server hop).

    attach loads the kernel's connection file from the server's runtime dir into
    a BlockingKernelClient; cold starts its own kernel with a KernelManager.
    """

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.client = None

    def attach(self, kernel_id: str) -> None:
        from jupyter_client import BlockingKernelClient
        client = BlockingKernelClient()
        client.load_connection_file(os.path.join(self.runtime_dir, f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        self.client = client

    connect = attach

    def execute(self, code: str) -> tuple:
        client = self.client
        msg_id = client.execute(code)
        idle, stdout, result = False, [], None
        while not idle:
            msg = client.iopub_channel.get_msg(timeout=600)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "stream" and content["name"] == "stdout":
                stdout.append(content["text"])
            elif kind == "execute_result":
                result = content["data"].get("text/plain")
        while True:
            reply = client.shell_channel.get_msg(timeout=600)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]["status"] == "ok", "".join(stdout), result

    def close(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None

    def cold(self) -> tuple:
        from jupyter_client import KernelManager
        manager = KernelManager()
        manager.start_kernel()
        try:
            self.client = manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=60)
            ok, _, result = self.execute("1+1")
            self.close()
        finally:
            manager.shutdown_kernel()
        return ok, result


class ClientSpec:
    """One benchmarked client: the measurements it takes part in and how to build it."""

    def __init__(self, name: str, kinds: tuple, *, requires: str = "", imports: str = "",
                 protocol: str = "legacy"):
        self.name, self.kinds, self.requires, self.protocol = name, kinds, requires, protocol
        self.imports = imports  # the modules its import measurement loads

    @property
    def library(self) -> str:
        """The websocket library of a WebsocketPeer: its name without the protocol suffix."""
        return self.name.split("-v1")[0]

    def make(self, url: str, token: str, runtime_dir: str):
        if self.name.startswith("jupyter_call"):
            protocol = self.name.rpartition("-")[2]
            return JupyterCallClient(url, token, protocol if protocol in ("v1", "legacy") else "auto")
        if self.name == "zmq-direct":
            return ZmqPeer(runtime_dir)
        return WebsocketPeer(url, token, self.library, self.protocol)

    def attach_argv(self, url: str, token: str, kernel_id: str, runtime_dir: str) -> list:
        """The command line of the attach measurement: a fresh process that runs 1+1."""
        py = sys.executable
        if self.name == "jupyter_call-cli":
            return [py, "jupyter_call.py", "--url", url, "--token", token, "--kernel-id", kernel_id, "1+1"]
        if self.name == "jupyter_call-api":
            return [py, "-c", "import sys, jupyter_call\n"
                    "r = jupyter_call.run_code('1+1', sys.argv[1], sys.argv[2], kernel_id=sys.argv[3])\n"
                    "print((r.data or {}).get('text/plain'))\nsys.exit(0 if r.ok else 1)\n",
                    url, token, kernel_id]
        if self.name == "zmq-direct":
            cls, args = ZmqPeer, "sys.argv[4]"
        else:
            cls, args = WebsocketPeer, f"sys.argv[1], sys.argv[2], {self.library!r}, {self.protocol!r}"
        script = (ATTACH_PRELUDE + textwrap.dedent(inspect.getsource(cls))
                  + f"\nclient = {cls.__name__}({args})\nclient.attach(sys.argv[3])\n"
                  "ok, _, result = client.execute('1+1')\nclient.close()\nprint(result)\n"
                  "sys.exit(0 if ok else 1)\n")
        return [py, "-c", script, url, token, kernel_id, runtime_dir]


MEASUREMENTS = ("import", "attach", "cold", "latency", "throughput")
QUICK = ("import", "attach", "cold")  # short and noisy: --repeat samples per round
REFERENCE = "zmq-direct"
CLIENTS = [
    ClientSpec("jupyter_call", ("import", "cold"), imports="jupyter_call"),
    ClientSpec("jupyter_call-cli", ("attach",)),
    ClientSpec("jupyter_call-api", ("attach",)),
    ClientSpec("jupyter_call-v1", ("latency", "throughput")),
    ClientSpec("jupyter_call-legacy", ("latency", "throughput")),
    ClientSpec("zmq-direct", MEASUREMENTS, requires="jupyter_client", imports="jupyter_client"),
    ClientSpec("websocket-client", MEASUREMENTS, requires="websocket", imports="websocket, requests"),
    ClientSpec("websockets", MEASUREMENTS, requires="websockets.sync.client",
               imports="websockets.sync.client, urllib.request"),
    ClientSpec("websockets-v1", ("attach", "cold", "latency", "throughput"),
               requires="websockets.sync.client", protocol="v1"),
]
SPECS = {spec.name: spec for spec in CLIENTS}


def _missing(module: str) -> str | None:
    """Why ``module`` cannot be used here, or None when it imports."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if module == "websocket" and not hasattr(mod, "create_connection"):
        return "the 'websocket' module found is not websocket-client"
    return None


# ---- run: one in-process sample (the sample subcommand) ------------------------------

LATENCY_WARMUP = 10   # untimed executes before the timed ones
LATENCY_BUDGET = 6.0  # s of timed executes per latency sample in run; keeps slow clients bounded


def _throughput_code(mb: int) -> str:
    return f"import sys\nfor i in range({mb}): sys.stdout.write('x'*(1<<20)); sys.stdout.flush()"


def _reset_peak_rss() -> float | None:
    """Current RSS in MB, after making it the process's peak again where that is possible.

    ru_maxrss does not work for this: a spawned process starts with its parent's
    peak (exec carries it over), so on Linux the peak is VmHWM of
    /proc/self/status, reset to the current RSS by writing 5 to clear_refs.
    Elsewhere it falls back to ru_maxrss, which hides growth below the old peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mb("VmRSS")
    except OSError:
        return _peak_rss_mb()


def _proc_status_mb(field: str, pid: object = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


def _peak_rss_mb() -> float | None:
    """Peak RSS in MB since the last _reset_peak_rss (see there)."""
    try:
        return _proc_status_mb("VmHWM")
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _percentile(values: list, q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def take_sample(kind: str, client, kernel_id: str | None, *, latency_n: int, mb: int,
                latency_budget: float = math.inf) -> dict:
    """Measure ``kind`` (cold, latency or throughput) once with ``client`` in this process.

    A latency sample stops early once its timed executes took ``latency_budget`` s.
    """
    if kind == "cold":
        t0 = time.perf_counter()
        ok, result = client.cold()
        return {"ms": (time.perf_counter() - t0) * 1000, "ok": bool(ok) and result == "2"}
    client.connect(kernel_id)
    try:
        if kind == "latency":
            for _ in range(LATENCY_WARMUP):
                client.execute("pass")
            times, ok, give_up = [], True, time.perf_counter() + latency_budget
            for _ in range(latency_n):
                t0 = time.perf_counter()
                ok = client.execute("pass")[0] and ok
                times.append((time.perf_counter() - t0) * 1000)
                if t0 > give_up:
                    break
            return {"p50_ms": statistics.median(times), "p99_ms": _percentile(times, 99),
                    "mean_ms": statistics.fmean(times), "n": len(times), "ok": ok}
        if kind == "throughput":
            client.execute("1+1")
            import gc
            gc.collect()
            rss0, cpu0, t0 = _reset_peak_rss(), time.process_time(), time.perf_counter()
            ok, stdout, _ = client.execute(_throughput_code(mb))
            wall, cpu, rss1 = time.perf_counter() - t0, time.process_time() - cpu0, _peak_rss_mb()
            received, stdout = len(stdout.encode("utf-8")), None
            return {"mb_s": mb / wall, "wall_s": wall, "cpu_s": cpu,
                    "rss_mb": None if rss0 is None or rss1 is None else rss1 - rss0,
                    "received": received, "expected": mb << 20,
                    "ok": bool(ok) and received == mb << 20}
        raise ValueError(f"unknown in-process measurement {kind!r}")
    finally:
        client.close()


def cmd_sample(args: argparse.Namespace) -> int:
    spec = SPECS[args.client]
    client = spec.make(args.url, args.token, args.runtime_dir)
    if args.kind != "cold" and not args.kernel_id:
        print("sample: --kernel-id is needed for latency and throughput", file=sys.stderr)
        return 2
    run = lambda: take_sample(args.kind, client, args.kernel_id,  # noqa: E731
                              latency_n=args.latency_n, mb=args.mb,
                              latency_budget=args.latency_budget)
    if not args.profile:
        result = run()
    else:
        import cProfile
        import pstats
        profile = cProfile.Profile()
        result = profile.runcall(run)
        stats = pstats.Stats(profile, stream=sys.stderr).strip_dirs()
        for order in ("cumulative", "tottime"):
            print(f"---- profile of {args.kind} {args.client}, by {order} ----", file=sys.stderr)
            stats.sort_stats(order).print_stats(args.profile)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- run: the round-robin driver -----------------------------------------------------

SAMPLE_TIMEOUT = 600.0  # s for one subprocess sample; past it the sample is a failure


def _timed_run(argv: list, env: dict, timeout: float = SAMPLE_TIMEOUT) -> tuple:
    """Run ``argv`` from the checkout; return (seconds, returncode, stdout, stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the sample and anything it started
        out, err = proc.communicate()
        err = err + f"\ntimed out after {timeout:g} s".encode()
    wall = time.perf_counter() - t0
    return wall, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class _Bench:
    """Collects samples: samples[measurement][client] -> list of dicts."""

    def __init__(self, server: _Server, args: argparse.Namespace, clients: list, kinds: list):
        self.server, self.args, self.clients, self.kinds = server, args, clients, kinds
        self.samples: dict = {kind: {} for kind in MEASUREMENTS}
        self.failures: list = []
        self.ws_kernel = self.zmq_kernel = ""

    def add(self, kind: str, name: str, sample: dict) -> None:
        self.samples[kind].setdefault(name, []).append(sample)

    def fail(self, kind: str, name: str, text: str) -> None:
        tail = " | ".join(line for line in text.strip().splitlines()[-3:] if line.strip())
        self.failures.append(f"{kind} {name}: {tail}")
        print(f"  ! {kind} {name} failed: {tail[:300]}", file=sys.stderr, flush=True)

    def kernel_for(self, name: str) -> str:
        # zmq-direct gets its own kernel: no websocket ever opens on it, so the
        # server never buffers its output for a closed websocket session.
        return self.zmq_kernel if name == REFERENCE else self.ws_kernel

    # -- whole-process measurements --

    def measure_import(self, names: list) -> None:
        for name in names:
            # each import paired with a `pass` taken just before it, so both see the same machine
            base, _, _, _ = _timed_run([sys.executable, "-c", "pass"], self.server.env)
            wall, rc, _, err = _timed_run([sys.executable, "-c", f"import {SPECS[name].imports}"],
                                          self.server.env)
            if rc != 0:
                self.fail("import", name, err)
                continue
            self.add("import", name, {"ms": wall * 1000, "pass_ms": base * 1000,
                                      "net_ms": (wall - base) * 1000})

    def measure_attach(self, names: list) -> None:
        srv = self.server
        for name in names:
            argv = SPECS[name].attach_argv(srv.url, srv.token, self.kernel_for(name), srv.runtime_dir)
            wall, rc, out, err = _timed_run(argv, srv.env)
            if rc != 0 or out.strip() != "2":
                self.fail("attach", name, err or f"printed {out.strip()!r}, not '2'")
                continue
            self.add("attach", name, {"ms": wall * 1000})

    # -- in-process measurements, each in a fresh process --

    def measure_in_process(self, kind: str, names: list) -> None:
        srv, args = self.server, self.args
        for name in names:
            argv = [sys.executable, os.path.basename(__file__), "sample", kind, name,
                    "--url", srv.url, "--token", srv.token, "--runtime-dir", srv.runtime_dir,
                    "--latency-n", str(args.latency_n), "--latency-budget", str(args.latency_budget),
                    "--mb", str(args.mb)]
            if kind != "cold":
                argv += ["--kernel-id", self.kernel_for(name)]
            _, rc, out, err = _timed_run(argv, srv.env)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if rc != 0 or not lines:
                self.fail(kind, name, err or out)
                continue
            sample = json.loads(lines[-1][len("RESULT "):])
            if not sample.get("ok"):
                self.fail(kind, name, f"wrong answer: {sample}")
            self.add(kind, name, sample)

    # -- driver --

    def names_for(self, kind: str, round_no: int) -> list:
        """The clients of ``kind``, rotated by round so none always goes first."""
        names = [spec.name for spec in self.clients if kind in spec.kinds]
        if not names:
            return names
        shift = round_no % len(names)
        return names[shift:] + names[:shift]

    def warm_up(self) -> None:
        """Compile bytecode, fill the page cache, and run each kernel's first cell."""
        if "import" in self.kinds:
            self.measure_import(self.names_for("import", 0))
        if "attach" in self.kinds:
            self.measure_attach(self.names_for("attach", 0))
        self.failures.clear()
        self.samples = {kind: {} for kind in MEASUREMENTS}

    def run(self) -> None:
        args = self.args
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for kind in self.kinds:
                if kind == "throughput" and r >= args.throughput_rounds:
                    continue
                repeat = args.repeat if kind in QUICK else 1
                for k in range(repeat):
                    names = self.names_for(kind, r * repeat + k)
                    if kind == "import":
                        self.measure_import(names)
                    elif kind == "attach":
                        self.measure_attach(names)
                    else:
                        self.measure_in_process(kind, names)
            print(f"round {r + 1}/{args.rounds} done in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)


# ---- run: report ---------------------------------------------------------------------

def _values(samples: list, key: str) -> list:
    return [s[key] for s in samples if s.get(key) is not None]


def _median(bench: _Bench, kind: str, name: str, key: str) -> float | None:
    values = _values(bench.samples[kind].get(name, []), key)
    return statistics.median(values) if values else None


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_table(bench: _Bench, kind: str, key: str, title: str, digits: int,
                 extra: dict | None = None, extra_title: str = "") -> None:
    rows = [(name, _values(samples, key)) for name, samples in bench.samples[kind].items()]
    rows = [(name, values) for name, values in rows if values]
    if not rows:
        return
    ref = _median(bench, kind, REFERENCE, key)
    print(f"\n{title}")
    print(f"  {'client':<20} {'median':>10} {'min-max':>19} {'vs ' + REFERENCE:>14}  {'n':>2}  {extra_title}")
    order = [spec.name for spec in CLIENTS]
    for name, values in sorted(rows, key=lambda row: order.index(row[0])):
        med = statistics.median(values)
        span = f"{_num(min(values), digits)}-{_num(max(values), digits)}"
        ratio = f"{med / ref:.2f}x" if ref else "-"
        print(f"  {name:<20} {_num(med, digits):>10} {span:>19} {ratio:>14}  {len(values):>2}  "
              f"{(extra or {}).get(name, '')}".rstrip())


def _targets(bench: _Bench, mb: int) -> list:
    """(passed or None, text) for each target of the spec that the samples allow to judge."""
    checks = []

    def med(kind, name, key):
        return _median(bench, kind, name, key)

    def judge(label, name, value, bound, unit, digits, want_low=True, bound_text=""):
        if value is None or bound is None:
            missing = "not measured" if value is None else f"no reference ({bound_text}) measured"
            checks.append((None, f"{label}: {name}: {missing}"))
            return
        ok = value <= bound if want_low else value >= bound
        relation = "<=" if want_low else ">="
        checks.append((ok, f"{label}: {name} {value:.{digits}f} {unit} {relation} "
                           f"{bound:.{digits}f} {unit} ({bound_text})"))

    ref_p50 = med("latency", REFERENCE, "p50_ms")
    for name in ("jupyter_call-v1", "jupyter_call-legacy"):
        judge("latency p50", name, med("latency", name, "p50_ms"),
              None if ref_p50 is None else 1.3 * ref_p50, "ms", 3, bound_text="1.3x zmq-direct")
    ref_mbs = med("throughput", REFERENCE, "mb_s")
    judge("throughput", "jupyter_call-v1", med("throughput", "jupyter_call-v1", "mb_s"),
          None if ref_mbs is None else 0.9 * ref_mbs, "MB/s", 0, want_low=False, bound_text="0.9x zmq-direct")
    judge("throughput", "jupyter_call-legacy", med("throughput", "jupyter_call-legacy", "mb_s"),
          med("throughput", "websockets", "mb_s"), "MB/s", 0, want_low=False,
          bound_text="websockets, legacy")
    for name, peer in (("jupyter_call-v1", "websockets-v1"), ("jupyter_call-legacy", "websockets")):
        judge(f"client CPU for {mb} MB", name, med("throughput", name, "cpu_s"),
              med("throughput", peer, "cpu_s"), "s", 3, bound_text=peer)
    ref_import = med("import", "websockets", "net_ms")
    judge("import net", "jupyter_call", med("import", "jupyter_call", "net_ms"),
          None if ref_import is None else 0.4 * ref_import, "ms", 1, bound_text="0.4x urllib.request + websockets")
    peers = [m for m in (med("attach", n, "ms") for n in
                         (REFERENCE, "websocket-client", "websockets", "websockets-v1")) if m]
    for name in ("jupyter_call-cli", "jupyter_call-api"):
        judge("attach", name, med("attach", name, "ms"), 0.6 * min(peers) if peers else None, "ms", 0,
              bound_text="0.6x the fastest peer")
    ws_cold = [m for m in (med("cold", n, "ms") for n in
                           ("websocket-client", "websockets", "websockets-v1")) if m]
    judge("cold", "jupyter_call", med("cold", "jupyter_call", "ms"), min(ws_cold) if ws_cold else None,
          "ms", 0, bound_text="the fastest websocket peer")
    for name in ("jupyter_call-v1", "jupyter_call-legacy"):
        judge("peak RSS growth", name, med("throughput", name, "rss_mb"), 1.3 * mb, "MB", 1,
              bound_text=f"1.3x the {mb} MB output")
    return checks


def report(bench: _Bench, args: argparse.Namespace) -> list:
    b = bench
    base = _values([s for v in b.samples["import"].values() for s in v], "pass_ms")
    if base:
        print(f"\n(python -c pass: median {statistics.median(base):.1f} ms)")
    _print_table(b, "import", "net_ms", "import: python -c 'import MODULES' minus python -c pass, "
                 "whole process (ms)", 1, {n: s.imports for n, s in SPECS.items()}, "modules")
    _print_table(b, "attach", "ms", "attach: fresh process attaches to a running kernel, runs 1+1, "
                 "exits (ms)", 0)
    _print_table(b, "cold", "ms", "cold: start a kernel, run 1+1, delete the kernel, "
                 "in-process (ms)", 0)
    executes = {name: f"{statistics.median(_values(samples, 'n')):.0f} executes"
                for name, samples in b.samples["latency"].items() if _values(samples, "n")}
    what = (f"{args.latency_n} x pass on one connection (at most {args.latency_budget:g} s "
            "per sample), in-process (ms)")
    _print_table(b, "latency", "p50_ms", f"latency p50: {what}", 3, executes, "per sample")
    _print_table(b, "latency", "p99_ms", f"latency p99: {what}", 3, executes, "per sample")
    _print_table(b, "throughput", "mb_s", f"throughput: a cell that writes {args.mb} MB to stdout "
                 "in 1 MB flushes (MB/s)", 0)
    _print_table(b, "throughput", "cpu_s", f"client CPU for {args.mb} MB (s)", 3)
    _print_table(b, "throughput", "rss_mb", f"peak RSS growth for {args.mb} MB, fresh process "
                 "per sample (MB)", 1)
    checks = _targets(bench, args.mb)
    print("\ntargets")
    for ok, text in checks:
        print(f"  [{'-' if ok is None else 'ok' if ok else 'MISS':>4}] {text}")
    if bench.failures:
        print(f"\n{len(bench.failures)} failed samples:")
        for text in bench.failures:
            print(f"  {text[:300]}")
    return checks


def _source_digest() -> str:
    """A short digest of jupyter_call.py, to tell which version a run measured."""
    import hashlib
    with open(os.path.join(HERE, "jupyter_call.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def _versions() -> str:
    from importlib import metadata
    found = []
    for dist in ("jupyter_server", "ipykernel", "jupyter_client", "pyzmq", "tornado",
                 "websockets", "websocket-client", "requests"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _select(only: str | None) -> tuple:
    """(client specs, measurements, error) chosen by --only."""
    if not only:
        return list(CLIENTS), list(MEASUREMENTS), None
    names = [n.strip() for n in only.split(",") if n.strip()]
    kinds = [n for n in names if n in MEASUREMENTS]
    wanted = [n for n in names if n not in MEASUREMENTS]
    clients = [spec for spec in CLIENTS
               if not wanted or any(spec.name == n or spec.name.startswith(n + "-") for n in wanted)]
    unknown = [n for n in wanted if not any(s.name == n or s.name.startswith(n + "-") for s in CLIENTS)]
    if unknown:
        return [], [], f"unknown name(s) in --only: {', '.join(unknown)}"
    return clients, kinds or list(MEASUREMENTS), None


def cmd_run(args: argparse.Namespace) -> int:
    clients, kinds, error = _select(args.only)
    if error:
        print(f"run: {error}; measurements: {', '.join(MEASUREMENTS)}; clients: "
              f"{', '.join(s.name for s in CLIENTS)}", file=sys.stderr)
        return 2
    if min(args.rounds, args.repeat, args.latency_n, args.mb) < 1 or args.latency_budget <= 0:
        print("run: --rounds, --repeat, --latency-n and --mb must be at least 1, --latency-budget above 0",
              file=sys.stderr)
        return 2
    args.throughput_rounds = min(args.throughput_rounds, args.rounds)
    if not _has_module("jupyter_server"):
        print("run: needs jupyter_server (pip install notebook)", file=sys.stderr)
        return 2
    usable = []
    for spec in clients:
        why = _missing(spec.requires) if spec.requires else None
        if why:
            print(f"note: skipping {spec.name}: {spec.requires} is not importable ({why}); "
                  f"pip install websockets websocket-client requests", flush=True)
        else:
            usable.append(spec)
    if "websocket-client" in (s.name for s in usable) and _missing("requests"):
        SPECS["websocket-client"].imports = "websocket, urllib.request"
        print("note: requests is not installed; websocket-client uses urllib for REST", flush=True)
    t_start, digest = time.perf_counter(), _source_digest()
    print(f"jupyter_call {jupyter_call.__version__} (jupyter_call.py sha256 {digest}) benchmark: {args.rounds} rounds "
          f"(throughput {args.throughput_rounds}; import, attach, cold {args.repeat} per round), "
          f"latency {args.latency_n} x pass, "
          f"throughput {args.mb} MB; python {sys.version.split()[0]} on {sys.platform}, "
          f"{os.cpu_count()} cores")
    print(f"with {_versions()}")
    _, _, out, _ = _timed_run([sys.executable, "-c", "import sys; print(len(sys.modules))"], os.environ)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set here; it is unset for the measured processes, "
              "so jupyter_call.py is compiled once, as for a user")
    print(f"python -c pass already has {out.strip()} modules loaded (site and .pth files); "
          f"load average at start {_num(load, 2)}")
    server = _Server()
    try:
        took = server.start()
        print(f"server: private jupyter_server on 127.0.0.1:{server.port} (started in {took:.1f} s); "
              "rate limits are off (--ZMQChannelsWebsocketConnection.limit_rate=False)", flush=True)
        bench = _Bench(server, args, usable, kinds)
        bench.ws_kernel = server.start_kernel()
        bench.zmq_kernel = server.start_kernel()
        server.connection_file(bench.zmq_kernel)
        bench.warm_up()
        bench.run()
    finally:
        server.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nserver stopped; total time {time.perf_counter() - t_start:.0f} s; "
          f"load average at end {_num(load, 2)}")
    if _source_digest() != digest:
        print(f"WARNING: jupyter_call.py changed during the run (now {_source_digest()}); "
              "the samples mix versions")
    checks = report(bench, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": {"rounds": args.rounds, "throughput_rounds": args.throughput_rounds,
                                  "repeat": args.repeat,
                                  "latency_n": args.latency_n, "latency_budget": args.latency_budget,
                                  "mb": args.mb,
                                  "jupyter_call_sha256": digest, "python": sys.version.split()[0], "platform": sys.platform,
                                  "cores": os.cpu_count(), "versions": _versions()},
                       "samples": bench.samples, "failures": bench.failures,
                       "targets": [{"ok": ok, "text": text} for ok, text in checks]}, f, indent=1)
        print(f"raw samples written to {args.json}")
    return 1 if bench.failures else 0


# ---- cli-rss: peak RSS of the command line printing a large output -------------------

CLI_RSS_LIMIT = 60.0  # MB: the goal for printing 500 MB through the command line

# Runs jupyter_call.py as ``python jupyter_call.py ARGS`` does (the script is
# compiled, never cached, as __main__), then writes VmHWM to the file named by
# its first argument, after main() returned and even when it raised. VmHWM
# belongs to the process's address space, which exec makes new, so it starts at
# zero here and needs no reset; ru_maxrss of a child would not do, as exec
# carries the parent's peak over into it.
CLI_WRAPPER = """\
import sys
peak_file = sys.argv.pop(1)
sys.argv = sys.argv[1:]
try:
    import runpy
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        peak = [line.split()[1] for line in f if line.startswith("VmHWM:")]
    with open(peak_file, "w") as f:
        f.write(peak[0] if peak else "")
"""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session and anything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _cli_run(server: _Server, protocol: str, code: str, mb: int) -> dict:
    """Run the CLI once in a fresh process with ``code``; drain and count its stdout."""
    fd, peak_file = tempfile.mkstemp(prefix="peak-", dir=server.root)
    os.close(fd)
    argv = [sys.executable, "-c", CLI_WRAPPER, peak_file, "jupyter_call.py", "--url", server.url,
            "--token", server.token, "--protocol", protocol, code]
    received = xs = 0
    t_first = t_last = None
    with tempfile.TemporaryFile(dir=server.root) as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=HERE, env=server.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        timer = threading.Timer(SAMPLE_TIMEOUT, _kill_group, (proc,))
        timer.start()
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                received += len(chunk)
                xs += chunk.count(b"x")
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
            proc.stdout.close()
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    with open(peak_file) as f:
        peak = f.read().strip()
    os.remove(peak_file)
    expected = mb << 20
    # The CLI ends the last line it printed, so a newline may follow the output.
    ok = rc == 0 and xs == expected and received - xs <= (1 if mb else 0)
    stream = t_last - t_first if mb and t_first is not None and t_last > t_first else None
    return {"protocol": protocol, "mb": mb, "received": received, "wall_s": wall,
            "mb_s": mb / stream if stream else None, "rss_mb": int(peak) / 1024 if peak else None,
            "rc": rc, "ok": ok, "stderr": stderr}


def _print_setup(what: str) -> None:
    """The first lines of a report: what ran, on which versions and machine."""
    print(f"jupyter_call {jupyter_call.__version__} (jupyter_call.py sha256 {_source_digest()}) "
          f"{what}; python {sys.version.split()[0]} on {sys.platform}, {os.cpu_count()} cores")
    print(f"with {_versions()}")


def cmd_cli_rss(args: argparse.Namespace) -> int:
    if args.mb < 1:
        print("cli-rss: --mb must be at least 1", file=sys.stderr)
        return 2
    if not os.path.exists("/proc/self/status"):
        print("cli-rss: needs /proc (Linux) to read a process's peak RSS (VmHWM)", file=sys.stderr)
        return 2
    if not _has_module("jupyter_server"):
        print("cli-rss: needs jupyter_server (pip install notebook)", file=sys.stderr)
        return 2
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or any(p not in ("auto", "v1", "legacy") for p in protocols):
        print("cli-rss: --protocols takes a comma-separated list of auto, v1, legacy", file=sys.stderr)
        return 2
    _print_setup(f"cli-rss: {args.mb} MB")
    rows = []
    server = _Server()
    try:
        took = server.start()
        print(f"server: private jupyter_server on 127.0.0.1:{server.port} (started in {took:.1f} s); "
              "rate limits are off (--ZMQChannelsWebsocketConnection.limit_rate=False)")
        print("each row: python jupyter_call.py --url URL --token T --protocol P CODE > pipe, "
              "a fresh process that starts and deletes its kernel")
        print(f"CODE: pass, or {_throughput_code(args.mb)!r}", flush=True)
        for protocol in protocols:
            for code, mb in (("pass", 0), (_throughput_code(args.mb), args.mb)):
                rows.append(_cli_run(server, protocol, code, mb))
    finally:
        server.stop()
    base = {r["protocol"]: r["rss_mb"] for r in rows if r["mb"] == 0}
    print(f"\ncli-rss: peak RSS (VmHWM) of the CLI process; MB/s from its first to its last "
          f"byte of output; target: under {args.limit:g} MB")
    print(f"  {'protocol':<9} {'output':>7} {'bytes received':>15} {'wall s':>7} {'MB/s':>6} "
          f"{'peak RSS MB':>12} {'vs pass':>8}  {'< ' + format(args.limit, 'g') + ' MB':>7}  all bytes")
    missed = 0
    for r in rows:
        rss, ref = r["rss_mb"], base.get(r["protocol"])
        under = rss is not None and rss < args.limit
        growth = f"+{rss - ref:.1f}" if r["mb"] and rss is not None and ref is not None else ""
        missed += not (under and r["ok"])
        print(f"  {r['protocol']:<9} {'pass' if not r['mb'] else str(r['mb']) + ' MB':>7} "
              f"{r['received']:>15} {r['wall_s']:>7.2f} {_num(r['mb_s'], 0):>6} "
              f"{_num(rss, 1):>12} {growth:>8}  {'ok' if under else 'MISS':>7}  "
              f"{'yes' if r['ok'] else 'NO'}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"\n{len(failed)} failed row{'s' if len(failed) > 1 else ''}:")
    for r in failed:
        tail = " | ".join(line for line in r["stderr"].strip().splitlines()[-3:] if line.strip())
        print(f"  {r['protocol']} {r['mb'] or 'pass'}{' MB' if r['mb'] else ''}: exit {r['rc']}, "
              f"{r['received']} bytes received, {r['mb'] << 20} expected (+ a final newline)"
              f"{'; stderr: ' + tail[:300] if tail else ''}")
    return 1 if missed else 0


# ---- notebook: a whole notebook, against jupyter execute ------------------------------

NOTEBOOK_TARGET = 0.5  # jupyter_call's wall time at most this share of jupyter execute's


def _bench_notebook(cells: int) -> dict:
    """A notebook of small cells: assignments, prints and values, as an analysis has them."""
    sources = [f"x{i} = {i}\nprint(x{i})" if i % 3 == 0 else f"x{i} = {i} * 2" if i % 3 == 1 else f"x{i - 1} + 1"
               for i in range(cells)]
    return {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
                       "outputs": [], "source": src} for i, src in enumerate(sources)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def cmd_notebook(args: argparse.Namespace) -> int:
    if not _has_module("jupyter_server") or not _has_module("nbclient"):
        print("notebook: needs jupyter_server and nbclient (pip install notebook)", file=sys.stderr)
        return 2
    _print_setup(f"notebook: {args.cells} cells, {args.rounds} rounds")
    server = _Server()
    walls: dict = {"jupyter_call": [], "jupyter execute": []}
    try:
        took = server.start()
        print(f"server: private jupyter_server on 127.0.0.1:{server.port} (started in {took:.1f} s)")
        work = os.path.join(server.root, "work")
        path = os.path.join(work, "bench.ipynb")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_bench_notebook(args.cells), f)
        here = os.path.dirname(os.path.abspath(__file__))
        commands = {
            "jupyter_call": [sys.executable, os.path.join(here, "jupyter_call.py"), "--url", server.url,
                             "-f", path, "--write", os.path.join(work, "out-jc.ipynb")],
            "jupyter execute": [shutil.which("jupyter-execute", path=os.path.dirname(sys.executable)) or "jupyter-execute",
                                path, "--output", "out-nbclient"],
        }
        env = dict(server.env, JUPYTER_TOKEN=server.token)
        for round_ in range(args.rounds):  # interleaved, so drifts of the machine hit both alike
            for name, cmd in commands.items():
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=work, stdin=subprocess.DEVNULL, capture_output=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(f"{name} failed (exit {proc.returncode}): {proc.stderr.decode()[-400:]}")
                    return 1
                walls[name].append(wall)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        server.stop()
    ours, theirs = (statistics.median(walls[name]) for name in ("jupyter_call", "jupyter execute"))
    print(f"\nnotebook: {args.cells} small cells, whole process, kernel start included (s)")
    for name, values in walls.items():
        print(f"  {name:<16} median {statistics.median(values):7.3f}   min-max "
              f"{min(values):.3f}-{max(values):.3f}   n {len(values)}")
    ratio = ours / theirs
    verdict = "ok" if ratio <= NOTEBOOK_TARGET else "MISS"
    print(f"  [{verdict:>4}] jupyter_call {ratio:.2f}x jupyter execute (target <= {NOTEBOOK_TARGET:g}x)")
    return 0 if verdict == "ok" else 1


# ---- mcp: the --mcp server as a host drives it -----------------------------------------

MCP_LAUNCH_TARGET_MS = 100.0  # launch to the tools/list answer, after the era's handshake
MCP_LATENCY_RATIO = 1.5       # run_code p50 at most this multiple of Kernel.execute's
MCP_RSS_GROWTH_MB = 5.0       # the server's RSS over the calls
MCP_CLEANUP_TARGET_S = 3.0    # stdin closed to process gone and its kernels deleted
_META = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                   "io.modelcontextprotocol/clientCapabilities": {}}}


class _McpHost:
    """One ``jupyter_call.py --mcp`` process, spoken to over its pipes."""

    def __init__(self, server: _Server, module: bool = False):
        # As a script the file is compiled at every launch (CPython caches the bytecode of
        # imported modules only); `python -m jupyter_call` with the folder on PYTHONPATH is not.
        launch = ["-m", "jupyter_call"] if module else [os.path.join(HERE, "jupyter_call.py")]
        self.proc = subprocess.Popen([sys.executable, *launch, "--mcp"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=dict(server.env, JUPYTER_URL=server.url, JUPYTER_TOKEN=server.token,
                                              PYTHONPATH=HERE))
        self.next_id = 0

    def ask(self, method: str, params: dict | None = None) -> dict:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the MCP server ended (exit {self.proc.wait()})")
            answer = json.loads(line)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def handshake(self) -> None:
        self.ask("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "bench", "version": "1"}})
        self.tell("notifications/initialized")

    def tell(self, method: str) -> None:
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> int:
        self.proc.stdin.close()
        code = self.proc.wait(30)
        self.proc.stdout.close()
        return code


def cmd_mcp(args: argparse.Namespace) -> int:
    if not _has_module("jupyter_server"):
        print("mcp: needs jupyter_server (pip install notebook)", file=sys.stderr)
        return 2
    _print_setup(f"mcp: {args.launches} launches per era, {args.calls} run_code calls")
    server = _Server()
    verdicts = []
    try:
        took = server.start()
        print(f"server: private jupyter_server on 127.0.0.1:{server.port} (started in {took:.1f} s)")
        # 1. Launch to tools/list: a process per sample, both eras, interleaved.
        launch: dict = {(era, form): [] for form in ("jupyter_call.py", "-m jupyter_call")
                        for era in ("handshake", "2026-07-28")}
        _McpHost(server, module=True).close()  # the first import writes the bytecode cache
        for _ in range(args.launches):
            for era, form in launch:
                t0 = time.perf_counter()
                host = _McpHost(server, module=form.startswith("-m"))
                if era == "handshake":
                    host.handshake()
                    host.ask("tools/list")
                else:  # as the official SDK does: server/discover, then tools/list
                    host.ask("server/discover", _META)
                    host.ask("tools/list", _META)
                launch[era, form].append((time.perf_counter() - t0) * 1000)
                host.close()
        print("\nlaunch to the tools/list answer, whole process (ms); python jupyter_call.py --mcp, and "
              "python -m jupyter_call --mcp with its folder on PYTHONPATH")
        for (era, form), values in launch.items():
            median = statistics.median(values)
            verdict = "ok" if median <= MCP_LAUNCH_TARGET_MS else "MISS"
            verdicts.append(verdict)
            print(f"  [{verdict:>4}] {form:<16} {era:<11} median {median:6.1f}   min-max "
                  f"{min(values):.1f}-{max(values):.1f}   n {len(values)}   (target <= {MCP_LAUNCH_TARGET_MS:g})")
        # 2. run_code of pass on a warm default kernel against Kernel.execute, interleaved in batches.
        host = _McpHost(server)
        host.handshake()
        call = {"name": "run_code", "arguments": {"code": "pass"}}
        host.ask("tools/call", call)  # starts the default kernel
        mcp_ms, api_ms, rss = [], [], []
        with jupyter_call.Kernel(server.url, server.token, timeout=60) as kernel:
            kernel.execute("pass")
            done = 0
            while done < args.calls:
                for _ in range(50):
                    t0 = time.perf_counter()
                    host.ask("tools/call", call)
                    mcp_ms.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    kernel.execute("pass")
                    api_ms.append((time.perf_counter() - t0) * 1000)
                done += 50
                rss.append((done, _proc_status_mb("VmRSS", host.proc.pid)))
        p50_mcp, p50_api = _percentile(mcp_ms, 50), _percentile(api_ms, 50)
        ratio = p50_mcp / p50_api
        verdict = "ok" if ratio <= MCP_LATENCY_RATIO else "MISS"
        verdicts.append(verdict)
        print(f"\nrun_code 'pass', request to response, warm default kernel (ms), {len(mcp_ms)} calls each")
        print(f"  run_code (MCP)     p50 {p50_mcp:6.2f}   p99 {_percentile(mcp_ms, 99):6.2f}")
        print(f"  Kernel.execute     p50 {p50_api:6.2f}   p99 {_percentile(api_ms, 99):6.2f}")
        print(f"  [{verdict:>4}] run_code p50 {ratio:.2f}x Kernel.execute (target <= {MCP_LATENCY_RATIO:g}x)")
        warm = next((mb for n, mb in rss if n >= min(100, args.calls)), rss[0][1])
        growth = rss[-1][1] - warm
        verdict = "ok" if growth <= MCP_RSS_GROWTH_MB else "MISS"
        verdicts.append(verdict)
        print("\nserver RSS (VmRSS, MB) after n calls: " + ", ".join(f"{n}: {mb:.1f}" for n, mb in rss[::4]))
        print(f"  [{verdict:>4}] growth after the first 100 calls {growth:+.1f} MB (target <= {MCP_RSS_GROWTH_MB:g})")
        before = _proc_status_mb("VmHWM", host.proc.pid)
        answer = host.ask("tools/call", {"name": "run_code", "arguments": {"code": _throughput_code(args.mb)}})
        shown = sum(len(block.get("text", "")) for block in answer["content"])
        peak = _proc_status_mb("VmHWM", host.proc.pid)
        print(f"\na {args.mb} MB output: {shown} characters in the result (the budget keeps head and tail); "
              f"server peak RSS {before:.1f} -> {peak:.1f} MB")
        # 3. Cleanup: stdin closed with three kernels started, one of them running a cell.
        for _ in range(2):
            host.ask("tools/call", {"name": "start_kernel", "arguments": {}})
        rest = jupyter_call.RestClient(server.url, server.token)
        mine = {k["id"] for k in rest.list_kernels(deadline=jupyter_call.Deadline(30))}  # the default kernel and the two started
        host.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {
            "name": "run_code", "arguments": {"code": "import time; time.sleep(60)"}}}).encode() + b"\n")
        host.proc.stdin.flush()
        time.sleep(0.5)  # the cell is running
        t0 = time.perf_counter()
        code = host.close()
        exited = time.perf_counter() - t0
        left = {k["id"] for k in rest.list_kernels(deadline=jupyter_call.Deadline(30))} & mine
        gone = time.perf_counter() - t0
        verdict = "ok" if code == 0 and not left and gone <= MCP_CLEANUP_TARGET_S else "MISS"
        verdicts.append(verdict)
        print(f"\ncleanup: stdin closed with {len(mine)} started kernels, one running a cell")
        print(f"  [{verdict:>4}] process gone after {exited:.2f} s (exit {code}), its kernels "
              f"{'deleted' if not left else f'{len(left)} LEFT'} by {gone:.2f} s (target <= {MCP_CLEANUP_TARGET_S:g})")
    finally:
        server.stop()
    return 0 if all(v == "ok" for v in verdicts) else 1


# ---- command line --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_jupyter_call.py",
        description="Benchmarks and development checks for jupyter_call. "
                    "Without a subcommand: run.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "run", help="the benchmark (default): jupyter_call against its peers on a private server",
        description="Start a private jupyter_server with rate limits off and measure import, "
                    "attach, cold, latency and throughput for jupyter_call and its peers, "
                    "interleaved round-robin over several rounds.")
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="rounds of every measurement (default %(default)s)")
    p.add_argument("--throughput-rounds", type=int, default=5, metavar="N",
                   help="rounds that include throughput, at most --rounds (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="samples per round of the short measurements (import, attach, cold), "
                        "which a busy machine disturbs most (default %(default)s)")
    p.add_argument("--latency-n", type=int, default=300, metavar="N",
                   help="timed executes of 'pass' per latency sample (default %(default)s)")
    p.add_argument("--latency-budget", type=float, default=LATENCY_BUDGET, metavar="S",
                   help="a latency sample stops after S s of timed executes, so a client that "
                        "is slow (e.g. stalled by delayed ACKs) takes fewer (default %(default)s)")
    p.add_argument("--mb", type=int, default=50, metavar="MB",
                   help="stdout written by the throughput cell (default %(default)s)")
    p.add_argument("--only", metavar="NAMES",
                   help="comma-separated measurements (" + ", ".join(MEASUREMENTS) + ") and/or "
                        "clients; a client name also selects its variants (jupyter_call: all of them)")
    p.add_argument("--json", metavar="FILE", help="write the raw samples and target checks to FILE")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser(
        "sample", help="one in-process sample against a running server, printed as JSON",
        description="Take one in-process sample (what run starts a fresh process for) against "
                    "a running server and print it as a JSON line prefixed RESULT.")
    p.add_argument("kind", choices=("cold", "latency", "throughput"))
    p.add_argument("client", choices=[spec.name for spec in CLIENTS
                                      if set(spec.kinds) & {"cold", "latency", "throughput"}])
    p.add_argument("--url", required=True, help="server base URL")
    p.add_argument("--token", required=True, help="server token")
    p.add_argument("--kernel-id", metavar="ID", help="running kernel (latency, throughput)")
    p.add_argument("--runtime-dir", metavar="DIR", default="",
                   help="the server's runtime dir, where zmq-direct finds connection files")
    p.add_argument("--latency-n", type=int, default=300, metavar="N")
    p.add_argument("--latency-budget", type=float, default=math.inf, metavar="S")
    p.add_argument("--mb", type=int, default=50, metavar="MB")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="run under cProfile; print the top N functions to stderr")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser(
        "cli-rss", help="peak RSS of the command line printing a large output",
        description="Start a private jupyter_server with rate limits off, run python "
                    "jupyter_call.py in a fresh process with a cell that writes MB megabytes to "
                    "stdout in 1 MB flushes, drain and count its output, and print its peak RSS "
                    "(VmHWM), next to the same command running 'pass', for each protocol.")
    p.add_argument("--mb", type=int, default=500, metavar="MB",
                   help="stdout written by the cell (default %(default)s)")
    p.add_argument("--limit", type=float, default=CLI_RSS_LIMIT, metavar="MB",
                   help="peak RSS the CLI must stay under (default %(default)g)")
    p.add_argument("--protocols", default="auto,legacy,v1", metavar="LIST",
                   help="values of --protocol to run, comma-separated (default %(default)s)")
    p.set_defaults(func=cmd_cli_rss)

    p = commands.add_parser(
        "notebook", help="a 200-cell notebook: jupyter_call against jupyter execute (nbclient)",
        description="Run one notebook of small cells with jupyter_call against a private server and "
                    "with jupyter execute (nbclient, a local kernel), whole process each, kernel "
                    "start included, interleaved over several rounds.")
    p.add_argument("--cells", type=int, default=200, metavar="N", help="code cells (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, metavar="N", help="runs of each (default %(default)s)")
    p.set_defaults(func=cmd_notebook)

    p = commands.add_parser(
        "mcp", help="the --mcp server: launch to tools/list, run_code latency, memory, cleanup",
        description="Drive jupyter_call.py --mcp as a host does, on a private server: launch to the "
                    "tools/list answer in both eras, run_code of pass against Kernel.execute in the same "
                    "run, the server's RSS over the calls, and cleanup after stdin closes.")
    p.add_argument("--launches", type=int, default=20, metavar="N", help="processes per era (default %(default)s)")
    p.add_argument("--calls", type=int, default=1000, metavar="N",
                   help="run_code calls, a multiple of 50 (default %(default)s)")
    p.add_argument("--mb", type=int, default=100, metavar="MB",
                   help="size of the large output whose peak RSS is shown (default %(default)s)")
    p.set_defaults(func=cmd_mcp)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # run is the default subcommand
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
