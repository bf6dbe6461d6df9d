"""Signatures per second over HTTP, next to raw ``cryptography`` signing in the same run.

What is measured
----------------
1. **Baseline**: in-process ``cryptography`` signing of a 32-byte prehashed SHA-256
   digest, one thread, about 3 s per algorithm: ECDSA P-256 and RSA-3072 PKCS#1 v1.5.
   A 2-thread RSA-3072 rate (RSA signing releases the GIL) and the raw cost of
   sign + verify (the server verifies every signature before returning it) are
   printed as context.
2. **Over HTTP**: a real ``signery serve --workers N`` (N = one per cpu by default,
   SQLite in a temporary data directory, access log off) signs the same kind of digest with a
   built-in key through ``POST /api/v1/signing/keys/{key}/sign``, driven by ``wrk``
   (or, when wrk cannot be had, a small asyncio keep-alive client in this file).
   Every 200 answer means: token checked, account and key looked up in the
   database, digest signed, signature verified, audit event and usage counters
   durably committed (group commit). After each run the key's ``successes``
   counter from ``GET /api/v1/usage`` must have grown by at least the number of
   200 answers the load generator saw; any failed request or a short counter
   fails the benchmark.

Why ratios against a same-run baseline
--------------------------------------
Absolute rates on a shared 2-core machine drift by +-20 % from one run to the
next (CPU frequency, neighbours, OpenSSL build). The raw rate measured minutes
earlier on the same machine absorbs most of that drift, so "HTTP rate / raw rate"
is the figure to compare across runs and machines. The RSA-3072 target is such a
ratio (>= 80 % of the raw 1-thread rate: the HTTP stack, database and audit must
cost little next to the private-key operation); the EC P-256 target is absolute
(>= 2,000 signatures/s: the raw operation is so cheap that the server's own
per-request cost is what is being measured).

The load generator shares the 2 cores with the server. With one worker
(``--workers 1``), short trials before each measured run compare pinning (server
on one core, load generator on the other, with ``taskset``) against no pinning,
for each connection count asked for; the best trial's setting is used for the
measured run, which is a fresh measurement, and the output says which won.

Each run also reports where the CPU went (from /proc): the server process, the
load generator, and every other process on the machine. A busy neighbour shows
up as "other" and makes a low rate recognisable as such; the server's CPU time
per signature is the figure least disturbed by neighbours.

Usage: ``make bench`` or ``.venv/bin/python bench/sign_throughput.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import cryptography
import httpx
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signery.client import AccountCredentials

ROOT = Path(__file__).resolve().parent.parent
OUT_FILE = ROOT / "bench-out" / "sign_throughput.json"
API = "/api/v1"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
HOST = "127.0.0.1"

ALGORITHMS: dict[str, str] = {"EC_P256": "ecdsa", "RSA_3072": "rsa-pkcs1v15"}
KEY_NAMES: dict[str, str] = {"EC_P256": "p256", "RSA_3072": "rsa3072"}
RSA_TARGET_RATIO = 0.80
EC_TARGET_RATE = 2000.0


class BenchError(Exception):
    """A failure that invalidates the benchmark (printed loudly, exit status 1)."""


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- CPU accounting

BUSY_WARNING = 0.25  # cores used by other processes that make a figure suspect


@dataclass
class CpuUse:
    """CPU used during a window, in cores (1.0 = one core busy for the whole window)."""

    server: float
    load: float
    other: float


def _system_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (all but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _process_ticks(pid: int) -> int:
    """user + system clock ticks of a process (all its threads) and of its live
    descendants (the worker processes of ``signery serve --workers N``)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    ticks = int(after_name[11]) + int(after_name[12])  # utime, stime (fields 14, 15)
    for child in _children(pid):
        with contextlib.suppress(OSError):
            ticks += _process_ticks(child)
    return ticks


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def _own_and_children_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """Who used the CPUs during a ``with`` block: the server, this process and its
    children (the load generator), and everything else on the machine.

    The machine may be shared: "other" shows how much of it was not ours, so a
    low figure caused by a neighbour is recognisable as such."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.use: CpuUse | None = None
        self._tick = os.sysconf("SC_CLK_TCK")

    def _server_ticks(self) -> int:
        if self.server_pid is None:
            return 0
        try:
            return _process_ticks(self.server_pid)
        except OSError:
            return 0

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._busy = _system_busy_ticks()
        self._server = self._server_ticks()
        self._ours = _own_and_children_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        busy = (_system_busy_ticks() - self._busy) / self._tick
        server = (self._server_ticks() - self._server) / self._tick
        load = _own_and_children_seconds() - self._ours
        if wall > 0:
            other = max(0.0, busy - server - load)
            self.use = CpuUse(
                round(server / wall, 3), round(load / wall, 3), round(other / wall, 3)
            )

    def note(self) -> str:
        if self.use is None or self.use.other < BUSY_WARNING:
            return ""
        return f"  WARNING: other processes used {self.use.other:.2f} cpu meanwhile"


def other_cpu_now(seconds: float = 1.0) -> float:
    """Cores used by other processes over the next ``seconds``."""
    with CpuMeter() as meter:
        time.sleep(seconds)
    return meter.use.other if meter.use else 0.0


def wait_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for other processes to leave the CPUs alone;
    returns what they use at the end."""
    busy = other_cpu_now()
    deadline = time.monotonic() + limit
    if busy >= BUSY_WARNING and limit > 0:
        log(f"waiting up to {limit:g} s for other processes to go quiet ({busy:.2f} cpu busy)")
    while busy >= BUSY_WARNING and time.monotonic() < deadline:
        busy = other_cpu_now(2.0)
    return busy


# ---------------------------------------------------------------- raw baseline


def _raw_signer(algorithm: str, *, verify: bool = False) -> Callable[[], object]:
    digest = os.urandom(32)
    prehashed = utils.Prehashed(hashes.SHA256())
    if algorithm == "EC_P256":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        ec_pub = ec_key.public_key()

        def sign_ec() -> object:
            sig = ec_key.sign(digest, ec.ECDSA(prehashed))
            if verify:
                ec_pub.verify(sig, digest, ec.ECDSA(prehashed))
            return sig

        return sign_ec
    rsa_key = rsa.generate_private_key(65537, 3072)
    rsa_pub = rsa_key.public_key()
    pkcs1 = padding.PKCS1v15()

    def sign_rsa() -> object:
        sig = rsa_key.sign(digest, pkcs1, prehashed)
        if verify:
            rsa_pub.verify(sig, digest, pkcs1, prehashed)
        return sig

    return sign_rsa


def raw_rate(sign: Callable[[], object], seconds: float, threads: int = 1) -> float:
    """Operations per second of ``sign`` run in ``threads`` threads for ``seconds``."""
    for _ in range(5):  # warm up (first calls load and set up the key in OpenSSL)
        sign()
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        n = 0
        end = deadline[0]
        while time.perf_counter() < end:
            sign()
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    barrier.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


@dataclass
class Baseline:
    algorithm: str
    sign_per_s: float
    sign_verify_per_s: float
    sign_per_s_2threads: float | None = None
    other_cpu: float = 0.0


def measure_baselines(seconds: float) -> dict[str, Baseline]:
    out: dict[str, Baseline] = {}
    for algorithm in ALGORITHMS:
        with CpuMeter() as meter:
            rate = raw_rate(_raw_signer(algorithm), seconds)
        both = raw_rate(_raw_signer(algorithm, verify=True), seconds / 2)
        out[algorithm] = Baseline(
            algorithm, rate, both, other_cpu=meter.use.other if meter.use else 0.0
        )
        log(
            f"  {algorithm:<9} 1 thread : {rate:>9,.0f} sign/s   (sign+verify {both:,.0f}/s)"
            + meter.note()
        )
    with CpuMeter() as meter:
        rsa2 = raw_rate(_raw_signer("RSA_3072"), seconds, threads=2)
    out["RSA_3072"].sign_per_s_2threads = rsa2
    log(
        f"  RSA_3072  2 threads: {rsa2:>9,.0f} sign/s   "
        f"({rsa2 / out['RSA_3072'].sign_per_s:.2f}x one thread; context only)" + meter.note()
    )
    return out


# ---------------------------------------------------------------- CPU placement


@dataclass(frozen=True)
class Cpus:
    """Which cores the server and the load generator get when pinned."""

    available: bool
    server: int = 0
    load: int = 1
    all: tuple[int, ...] = ()

    @classmethod
    def detect(cls) -> Cpus:
        allowed = tuple(sorted(os.sched_getaffinity(0)))
        ok = shutil.which("taskset") is not None and len(allowed) >= 2
        return cls(ok, allowed[0], allowed[-1], allowed) if ok else cls(False, all=allowed)

    def place_server(self, pid: int, pinned: bool) -> None:
        """Move every thread of the running server (``taskset -a``)."""
        if not self.available:
            return
        cpus = str(self.server) if pinned else ",".join(map(str, self.all))
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def load_prefix(self, pinned: bool) -> list[str]:
        return ["taskset", "-c", str(self.load)] if pinned and self.available else []

    @contextlib.contextmanager
    def this_process_on_load_core(self, pinned: bool) -> Iterator[None]:
        """For the in-process load generator: run this process on the load core."""
        if not (pinned and self.available):
            yield
            return
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.load})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)


# ---------------------------------------------------------------- the server


@dataclass
class Installation:
    admin_token: str
    issuer: str
    root_tsg_id: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """``signery init`` + ``signery serve`` on a temporary data directory."""

    def __init__(self, workdir: Path, workers: int = 1) -> None:
        self.workers = workers
        bindir = Path(sys.executable).parent
        exe = bindir / "signery"
        self.signery = str(exe if exe.exists() else ROOT / ".venv" / "bin" / "signery")
        self.data_dir = workdir / "data"
        self.log_path = workdir / "serve.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        # Only what this benchmark sets: no inherited SIGNERY_* setting changes the run.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNERY_")}
        self.env["SIGNERY_ACCESS_LOG"] = "false"

    def init(self) -> Installation:
        done = subprocess.run(
            [self.signery, "init", "--data-dir", str(self.data_dir), "--json"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"signery init failed:\n{done.stderr.decode(errors='replace')}")
        info = json.loads(done.stdout)
        return Installation(info["admin_token"], info["issuer"], info["root_tsg_id"])

    def start(self, timeout: float = 60.0) -> None:
        cmd = [
            self.signery,
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--workers",
            str(self.workers),
        ]
        with self.log_path.open("wb") as logfile:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=logfile, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"signery serve exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        raise BenchError(f"signery serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


@dataclass
class Fixture:
    """What the REST setup created: a TSG, an account and one key per algorithm."""

    tsg_id: str
    credentials: AccountCredentials
    key_ids: dict[str, str]


def _expect(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if response.status_code != status:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def set_up(admin: httpx.Client) -> Fixture:
    tsg = _expect(admin.post(f"{API}/tsgs", json={"name": "bench"}), 201, "create TSG")
    account = _expect(
        admin.post(f"{API}/accounts", json={"name": "bench", "tsg_id": tsg["id"]}),
        201,
        "create account",
    )
    key = serialization.load_pem_private_key(account["private_key_pem"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key_ids: dict[str, str] = {}
    for algorithm in ALGORITHMS:
        created = _expect(
            admin.post(
                f"{API}/keys",
                json={
                    "name": KEY_NAMES[algorithm],
                    "tsg_id": tsg["id"],
                    "algorithm": algorithm,
                    "certificate_authority": "builtin",
                },
                timeout=120.0,
            ),
            201,
            f"create {algorithm} key",
        )
        key_ids[algorithm] = created["id"]
    return Fixture(tsg["id"], AccountCredentials(account["client_id"], key), key_ids)


def access_token(server_url: str, credentials: AccountCredentials, issuer: str) -> str:
    """An account access token (RFC 7523 JWT-bearer grant; no other credential sent)."""
    response = httpx.post(
        f"{server_url}{API}/oauth/token",
        data={"grant_type": JWT_BEARER_GRANT, "assertion": credentials.assertion(issuer)},
        timeout=30.0,
    )
    token: str = _expect(response, 200, "access token")["access_token"]
    return token


def key_counter(admin: httpx.Client, key_id: str) -> tuple[int, int]:
    """(successes, failures) of a key's usage counter (0, 0 before its first use)."""
    report = _expect(admin.get(f"{API}/usage", params={"scope": "key"}), 200, "usage")
    for c in report["counters"]:
        if c["subject_id"] == key_id:
            return int(c["successes"]), int(c["failures"])
    return 0, 0


# ---------------------------------------------------------------- load generation


@dataclass(frozen=True)
class SignCall:
    """One pre-built sign request, replayed by the load generator."""

    path: str
    token: str
    body: bytes

    def http_request(self, host: str) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"Authorization: Bearer {self.token}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "\r\n"
        )
        return head.encode("ascii") + self.body


@dataclass
class LoadResult:
    tool: str
    connections: int
    pinned: bool
    seconds: float
    ok: int
    non_ok: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    first_error: str | None = None
    cpu: CpuUse | None = None

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> int:
        return self.non_ok + self.socket_errors


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = [==[Bearer {token}]==]

local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non200 = 0
  first_bad = ""
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.gsub(string.sub(body or "", 1, 300), "[\\r\\n]", " ")
    end
  end
end

function done(summary, latency, requests)
  local bad, first = 0, ""
  for _, t in ipairs(threads) do
    bad = bad + t:get("non200")
    if first == "" then first = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {{\\"responses\\": %d, \\"duration_us\\": %d, \\"non200\\": %d, "
      .. "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d, "
      .. "\\"status\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d}}\\n",
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50.0), latency:percentile(99.0)))
  if first ~= "" then io.write("BENCH_BAD " .. first .. "\\n") end
end
"""


class WrkLoad:
    name = "wrk"

    def __init__(self, wrk: str, url: str, workdir: Path, cpus: Cpus) -> None:
        self.wrk = wrk
        self.url = url
        self.workdir = workdir
        self.cpus = cpus

    def run(self, call: SignCall, connections: int, seconds: int, pinned: bool) -> LoadResult:
        script = self.workdir / "sign.lua"
        script.write_text(WRK_SCRIPT.format(body=call.body.decode("ascii"), token=call.token))
        cmd = [
            *self.cpus.load_prefix(pinned),
            self.wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            self.url + call.path,
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        match = re.search(r"^BENCH_JSON (\{.*\})$", done.stdout, re.MULTILINE)
        if done.returncode != 0 or match is None:
            raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        r = json.loads(match.group(1))
        bad = re.search(r"^BENCH_BAD (.*)$", done.stdout, re.MULTILINE)
        socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
        # wrk counts only status > 399 itself; the response() hook counts every non-200.
        non_ok = max(r["non200"], r["status"])
        return LoadResult(
            tool=self.name,
            connections=connections,
            pinned=pinned,
            seconds=r["duration_us"] / 1e6,
            ok=r["responses"] - non_ok,
            non_ok=non_ok,
            socket_errors=socket_errors,
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            first_error=bad.group(1) if bad else None,
        )


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


@dataclass
class _Tally:
    ok: int = 0
    non_ok: int = 0
    socket_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None


class _KeepAlive(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as its answer is in.

    Parses only the status line and Content-Length (the server never uses chunked
    encoding for these answers)."""

    def __init__(self, request: bytes, tally: _Tally, deadline: float) -> None:
        self.request = request
        self.tally = tally
        self.deadline = deadline
        self.buf = bytearray()
        self.body_start = -1
        self.end = -1
        self.status = 0
        self.sent_at = 0.0
        self.finished = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.end < 0:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = bytes(self.buf[:head_end])
                m = _CONTENT_LENGTH.search(head)
                try:
                    self.status = int(head[9:12])
                except ValueError:
                    self.status = 0
                if m is None:
                    self._abort(f"unparsable answer: {head[:200]!r}")
                    return
                self.body_start = head_end + 4
                self.end = self.body_start + int(m.group(1))
            if len(self.buf) < self.end:
                return
            now = time.perf_counter()
            self.tally.latencies.append(now - self.sent_at)
            if self.status == 200:
                self.tally.ok += 1
            else:
                self.tally.non_ok += 1
                if self.tally.first_error is None:
                    body = bytes(self.buf[self.body_start : self.end][:300])
                    self.tally.first_error = f"{self.status} {body.decode(errors='replace')}"
            del self.buf[: self.end]
            self.end = -1
            if now >= self.deadline:
                self.finished = True
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def _abort(self, why: str) -> None:
        self.tally.socket_errors += 1
        self.tally.first_error = self.tally.first_error or why
        self.finished = True
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.tally.socket_errors += 1
            self.tally.first_error = self.tally.first_error or f"connection lost: {exc!r}"
        if not self.closed.done():
            self.closed.set_result(None)


class PythonLoad:
    """Fallback load generator: asyncio (uvloop when installed), raw keep-alive sockets."""

    name = "python-asyncio"

    def __init__(self, cpus: Cpus) -> None:
        self.cpus = cpus
        self.host, self.port = HOST, 0

    def target(self, url: str) -> PythonLoad:
        self.port = int(url.rsplit(":", 1)[1])
        return self

    async def _run(self, request: bytes, connections: int, seconds: int) -> tuple[_Tally, float]:
        loop = asyncio.get_running_loop()
        tally = _Tally()
        started = time.perf_counter()
        deadline = started + seconds
        conns: list[_KeepAlive] = []
        factory = functools.partial(_KeepAlive, request, tally, deadline)
        for _ in range(connections):
            _, proto = await loop.create_connection(factory, self.host, self.port)
            conns.append(proto)
        try:
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), seconds + 60)
        except TimeoutError:
            raise BenchError("the load generator's connections did not finish") from None
        return tally, time.perf_counter() - started

    def run(self, call: SignCall, connections: int, seconds: int, pinned: bool) -> LoadResult:
        request = call.http_request(f"{self.host}:{self.port}")
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
        with (
            self.cpus.this_process_on_load_core(pinned),
            asyncio.Runner(loop_factory=factory) as runner,
        ):
            tally, elapsed = runner.run(self._run(request, connections, seconds))
        lat = sorted(tally.latencies) or [0.0]
        return LoadResult(
            tool=self.name,
            connections=connections,
            pinned=pinned,
            seconds=elapsed,
            ok=tally.ok,
            non_ok=tally.non_ok,
            socket_errors=tally.socket_errors,
            p50_ms=lat[len(lat) // 2] * 1000,
            p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            first_error=tally.first_error,
        )


def find_wrk(allow_install: bool) -> str | None:
    wrk = shutil.which("wrk")
    if wrk or not allow_install:
        return wrk
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    log("wrk not found: trying `apt-get install -y wrk` ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-qq", "wrk"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "wrk"],
    ):
        try:
            subprocess.run(
                cmd,
                check=False,
                timeout=300,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if shutil.which("wrk"):
            return shutil.which("wrk")
    return None


# ---------------------------------------------------------------- one algorithm


@dataclass
class Trial:
    connections: int
    pinned: bool
    rate: float
    p50_ms: float
    p99_ms: float
    cpu: CpuUse | None = None


@dataclass
class HttpResult:
    algorithm: str
    load: LoadResult
    trials: list[Trial]
    counter_before: int
    counter_after: int
    failures_delta: int


def check_load(result: LoadResult, what: str) -> None:
    if result.failed:
        raise BenchError(
            f"{what}: {result.non_ok} non-200 answers and {result.socket_errors} socket errors "
            f"out of {result.ok + result.failed} requests; first: {result.first_error}"
        )
    if result.ok == 0:
        raise BenchError(f"{what}: no request succeeded")


def bench_algorithm(
    algorithm: str,
    *,
    server: Server,
    admin: httpx.Client,
    fixture: Fixture,
    issuer: str,
    load: WrkLoad | PythonLoad,
    cpus: Cpus,
    connection_options: list[int],
    pin_options: list[bool],
    duration: int,
    warmup: int,
    trial_seconds: int,
) -> HttpResult:
    token = access_token(server.url, fixture.credentials, issuer)
    body = json.dumps(
        {
            "digest": base64.b64encode(os.urandom(32)).decode("ascii"),
            "digest_algorithm": "sha256",
            "scheme": ALGORITHMS[algorithm],
        },
        separators=(",", ":"),
    ).encode("ascii")
    call = SignCall(f"{API}/signing/keys/{KEY_NAMES[algorithm]}/sign", token, body)

    def run(connections: int, pinned: bool, seconds: int, what: str) -> LoadResult:
        cpus.place_server(server.pid, pinned)
        with CpuMeter(server.pid) as meter:
            result = load.run(call, connections, seconds, pinned)
        result.cpu = meter.use
        check_load(result, f"{algorithm} {what}")
        return result

    def line(label: str, r: LoadResult, extra: str = "") -> None:
        cpu = r.cpu
        usage = (
            f"  cpu: server {cpu.server:.2f} load {cpu.load:.2f} other {cpu.other:.2f}"
            if cpu
            else ""
        )
        warn = (
            f"  WARNING: other processes used {cpu.other:.2f} cpu"
            if cpu and cpu.other >= BUSY_WARNING
            else ""
        )
        log(
            f"  {label:<9} c={r.connections:<3} {'pinned  ' if r.pinned else 'unpinned'}"
            f" {r.rate:>7,.0f} sign/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
            f"{usage}{extra}{warn}"
        )

    line("warm-up", run(connection_options[0], pin_options[0], warmup, "warm-up"))
    trials: list[Trial] = []
    combos = [(c, p) for p in pin_options for c in connection_options]
    best = combos[0]
    if len(combos) > 1:
        best_rate = -1.0
        for connections, pinned in combos:
            r = run(connections, pinned, trial_seconds, "trial")
            trials.append(Trial(connections, pinned, round(r.rate, 1), r.p50_ms, r.p99_ms, r.cpu))
            line("trial", r)
            if r.rate > best_rate:
                best, best_rate = (connections, pinned), r.rate
    connections, pinned = best
    before, failures_before = key_counter(admin, fixture.key_ids[algorithm])
    result = run(connections, pinned, duration, "measured run")
    after, failures_after = key_counter(admin, fixture.key_ids[algorithm])
    line("MEASURED", result, f"  ({result.ok:,} in {result.seconds:.1f} s)")
    # Every 200 carried a signature whose audit event and counters were committed first.
    if after - before < result.ok:
        raise BenchError(
            f"{algorithm}: the key's successes counter grew by {after - before:,} but the "
            f"load generator received {result.ok:,} signatures: signatures left the server "
            "without a committed audit event"
        )
    if failures_after != failures_before:
        raise BenchError(
            f"{algorithm}: the key's failures counter grew by {failures_after - failures_before}"
        )
    log(
        f"  audit check  successes counter +{after - before:,} >= {result.ok:,} signatures "
        "received: OK"
    )
    return HttpResult(algorithm, result, trials, before, after, failures_after - failures_before)


# ---------------------------------------------------------------- report


def report(
    baselines: dict[str, Baseline], results: dict[str, HttpResult], meta: dict[str, Any]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for algorithm, http in results.items():
        raw = baselines[algorithm].sign_per_s
        two = baselines[algorithm].sign_per_s_2threads
        rows.append(
            {
                "algorithm": algorithm,
                "raw_sign_per_s_1thread": round(raw, 1),
                "raw_sign_verify_per_s_1thread": round(baselines[algorithm].sign_verify_per_s, 1),
                "raw_sign_per_s_2threads": (
                    None if two is None else round(two, 1)  # measured for RSA_3072 only
                ),
                "http_sign_per_s": round(http.load.rate, 1),
                "http_over_raw": round(http.load.rate / raw, 4),
                "server_cpu_ms_per_signature": (
                    round(http.load.cpu.server / http.load.rate * 1000, 3)
                    if http.load.cpu and http.load.rate
                    else None
                ),
                "p50_ms": round(http.load.p50_ms, 3),
                "p99_ms": round(http.load.p99_ms, 3),
                "connections": http.load.connections,
                "pinned": http.load.pinned,
                "signatures": http.load.ok,
                "seconds": round(http.load.seconds, 3),
                "usage_counter_delta": http.counter_after - http.counter_before,
                "cpu_cores": asdict(http.load.cpu) if http.load.cpu else None,
                "baseline_other_cpu": round(baselines[algorithm].other_cpu, 3),
                "load_generator": http.load.tool,
                "trials": [asdict(t) for t in http.trials],
            }
        )
    targets: list[dict[str, Any]] = []
    if "RSA_3072" in results:
        ratio = next(r["http_over_raw"] for r in rows if r["algorithm"] == "RSA_3072")
        targets.append(
            {
                "target": f"RSA_3072 over HTTP >= {RSA_TARGET_RATIO:.0%} of raw rate",
                "value": f"{ratio:.1%}",
                "met": ratio >= RSA_TARGET_RATIO,
            }
        )
    if "EC_P256" in results:
        rate = results["EC_P256"].load.rate
        targets.append(
            {
                "target": f"EC_P256 >= {EC_TARGET_RATE:,.0f} signatures/s",
                "value": f"{rate:,.0f}/s",
                "met": rate >= EC_TARGET_RATE,
            }
        )

    def cpu_ms(r: dict[str, Any]) -> str:
        v = r["server_cpu_ms_per_signature"]
        return "-" if v is None else f"{v:.3f}"

    header = (
        f"{'algorithm':<9}  {'raw sign/s':>10}  {'HTTP sign/s':>11}  {'HTTP/raw':>8}  "
        f"{'p50 ms':>7}  {'p99 ms':>7}  {'srv cpu ms/sig':>14}  {'conns':>5}  placement"
    )
    log("\n" + "=" * len(header))
    log(header)
    log("-" * len(header))
    for r in rows:
        log(
            f"{r['algorithm']:<9}  {r['raw_sign_per_s_1thread']:>10,.0f}  "
            f"{r['http_sign_per_s']:>11,.0f}  {r['http_over_raw']:>8.1%}  "
            f"{r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {cpu_ms(r):>14}  {r['connections']:>5}  "
            f"{'pinned' if r['pinned'] else 'unpinned'}"
        )
    log("-" * len(header))
    for t in targets:
        log(f"target: {t['target']:<42} {t['value']:>9}  {'met' if t['met'] else 'NOT MET'}")
    log("=" * len(header))
    return {"meta": meta, "results": rows, "targets": targets}


def environment(load_tool: str, cpus: Cpus, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "cpus": len(cpus.all),
        "machine": platform.machine(),
        "load_generator": load_tool,
        "pinning": f"server on cpu {cpus.server}, load on cpu {cpus.load}"
        if cpus.available
        else "unavailable (no taskset or fewer than 2 cpus)",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "trial_s": args.trial_duration,
        "connections_tried": args.connections,
        "pin_mode": args.pin,
        "server_workers": args.workers,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Signing throughput over HTTP next to raw cryptography signing."
    )
    ap.add_argument(
        "--duration", type=int, default=10, help="seconds of each measured run (default 10)"
    )
    ap.add_argument(
        "--connections",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[16, 32, 64],
        help="concurrent keep-alive connections; a comma list is tried (short trials) and "
        "the best used for the measured run (default 16,32,64)",
    )
    ap.add_argument(
        "--pin",
        choices=("auto", "yes", "no"),
        default="auto",
        help="pin the server and the load generator to separate cores: auto tries both "
        "(default), yes/no forces one",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="server worker processes (signery serve --workers); default: one per cpu "
        "(with 1, the server can be pinned to one core and the load generator to another)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds (default 2)")
    ap.add_argument(
        "--trial-duration", type=int, default=3, help="seconds of each trial (default 3)"
    )
    ap.add_argument(
        "--baseline-duration",
        type=float,
        default=3.0,
        help="seconds of each raw cryptography measurement (default 3)",
    )
    ap.add_argument(
        "--algorithms",
        type=lambda s: [a.strip() for a in s.split(",") if a.strip()],
        default=list(ALGORITHMS),
        help="comma list among EC_P256,RSA_3072 (default both)",
    )
    ap.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk, installed with apt-get when missing and running as root, "
        "else the built-in asyncio client",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine, wait up to this long for other processes to go quiet "
        "before measuring (default 0: do not wait)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--strict", action="store_true", help="also exit with status 2 when a target is not met"
    )
    args = ap.parse_args(argv)
    for a in args.algorithms:
        if a not in ALGORITHMS:
            ap.error(f"unknown algorithm {a!r}")
    if not args.connections or min(args.connections) < 1:
        ap.error("--connections needs positive integers")
    if min(args.duration, args.warmup, args.trial_duration) < 1:
        ap.error("durations are whole seconds >= 1 (wrk takes whole seconds)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = Cpus.detect()
    workdir = Path(tempfile.mkdtemp(prefix="signery-bench-"))
    server = Server(workdir, args.workers)
    try:
        wrk = find_wrk(allow_install=args.loadgen == "auto") if args.loadgen != "python" else None
        if args.loadgen == "wrk" and wrk is None:
            raise BenchError("--loadgen wrk: wrk is not installed")
        load: WrkLoad | PythonLoad = (
            WrkLoad(wrk, server.url, workdir, cpus) if wrk else PythonLoad(cpus).target(server.url)
        )
        if args.workers > 1:
            # Several server processes share the cores with the load generator.
            pin_options = [False]
        elif args.pin == "auto":
            pin_options = [False, True] if cpus.available else [False]
        else:
            pin_options = [args.pin == "yes" and cpus.available]
        meta = environment(load.name, cpus, args)
        log(
            f"Signery signing benchmark: Python {meta['python']}, cryptography "
            f"{meta['cryptography']} ({meta['openssl']}), {meta['cpus']} cpus"
        )
        log(
            f"server: signery serve --workers {args.workers}; load generator: {load.name}; "
            f"pinning: {meta['pinning'] if args.workers == 1 else 'off (several workers)'}"
            f"; --pin {args.pin}"
        )

        busy = wait_quiet(args.wait_quiet)
        meta["other_cpu_before_start"] = round(busy, 3)
        log(
            f"machine check: other processes use {busy:.2f} of {len(cpus.all)} cpus"
            + (
                "  WARNING: the machine is busy; absolute rates will be low and noisy "
                "(the HTTP/raw ratios and server CPU per signature hold up better)"
                if busy >= BUSY_WARNING
                else ""
            )
        )

        log(f"\n[1/3] raw cryptography signing, {args.baseline_duration:g} s each")
        baselines = measure_baselines(args.baseline_duration)

        log(f"\n[2/3] starting signery serve on {server.url} (data in {workdir})")
        install = server.init()
        server.start()
        results: dict[str, HttpResult] = {}
        with httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {install.admin_token}"},
            timeout=30.0,
        ) as admin:
            fixture = set_up(admin)
            log(f"  TSG {fixture.tsg_id}, account {fixture.credentials.client_id}, keys ready")
            log(
                f"\n[3/3] signing over HTTP: warm-up {args.warmup} s, trials {args.trial_duration}"
                f" s over connections {args.connections} x "
                f"{['unpinned' if not p else 'pinned' for p in pin_options]}, "
                f"measured run {args.duration} s"
            )
            for algorithm in args.algorithms:
                log(f" {algorithm}")
                results[algorithm] = bench_algorithm(
                    algorithm,
                    server=server,
                    admin=admin,
                    fixture=fixture,
                    issuer=install.issuer,
                    load=load,
                    cpus=cpus,
                    connection_options=args.connections,
                    pin_options=pin_options,
                    duration=args.duration,
                    warmup=args.warmup,
                    trial_seconds=args.trial_duration,
                )
        summary = report(baselines, results, meta)
        log(
            "context: RSA_3072 raw with 2 threads "
            f"{baselines['RSA_3072'].sign_per_s_2threads or 0:,.0f}/s; every HTTP signature "
            "is also verified by the server (raw sign+verify: "
            + ", ".join(f"{a} {b.sign_verify_per_s:,.0f}/s" for a, b in baselines.items())
            + ")"
        )
        OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
        OUT_FILE.write_text(json.dumps(summary, indent=2) + "\n")
        log(f"wrote {OUT_FILE.relative_to(ROOT)}")
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"the server exited during the run:\n{server.log_tail()}")
        if args.strict and not all(t["met"] for t in summary["targets"]):
            return 2
        return 0
    except BenchError as e:
        print(f"\nERROR: {e}", file=sys.stderr, flush=True)
        if server.proc is not None:
            print(f"--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
