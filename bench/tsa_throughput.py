"""RFC 3161 timestamps per second over HTTP, next to raw in-process signing in the same run.

What is measured
----------------
1. **Raw baseline, in this process, one thread** (about 3 s): ``cryptography``
   signing a 32-byte prehashed digest with a key of the TSA's algorithm (ECDSA
   P-256 by default, PKCS#1 v1.5 for RSA), the private-key operation every
   timestamp contains, and the same with a verification (the TSA verifies each
   token's signature before it answers).
2. **Over HTTP**: ``signery init`` + ``signery serve --workers N`` (one worker per
   cpu by default) on a temporary data directory (SQLite, access log off, the
   TSA's per-client rate limit raised out of the way), then ``POST /api/v1/tsa``
   with one DER TimeStampReq (SHA-256 imprint, nonce, certReq) driven by ``wrk``
   (or, without wrk, a small asyncio keep-alive client). A 200 answer means:
   query parsed and validated, TSTInfo and signed attributes built, signed
   through the key store, signature verified, ``tsa.timestamp.issued`` audit event
   and usage count durably committed (group commit), TimeStampResp returned.
3. **Honesty checks**: one reply is verified with ``openssl ts -verify`` against
   the chain from ``GET /api/v1/tsa/certificate`` (when openssl is installed);
   every answer of the measured run must be 200 and a granted TimeStampResp
   (wrk: status only); the TSA's ``successes`` usage counter must have grown by at
   least the number of 200 answers (every token has its committed audit event).

The figure to compare across runs is the ratio HTTP rate / raw rate and the
server CPU per timestamp: absolute rates on the shared 2-core machine drift by
+-20 % from one run to the next, and the load generator shares the cores.

Usage: ``.venv/bin/python bench/tsa_throughput.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from asn1crypto import tsp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from _common import ROOT, BenchError, Server, log, process_ticks, raw_rate
from signery.rfc3161 import TimeStampResp

OUT_FILE = ROOT / "bench-out" / "tsa_throughput.json"
TSA_PATH = "/api/v1/tsa"
QUERY_MEDIA_TYPE = "application/timestamp-query"
# The TSA limits each client address; the benchmark is one client, so the limit is
# raised out of the way (the setting's maximum).
RATE_LIMIT_OFF = "1000000"
TARGET_RATE = 300.0  # "several hundred timestamps per second" on this 2-core machine
ALGORITHMS = ("EC_P256", "EC_P384", "RSA_2048", "RSA_3072")


# ---------------------------------------------------------------- raw baseline


def raw_signer(algorithm: str, *, verify: bool) -> Callable[[], object]:
    """One private-key operation of the TSA's kind, on a key in memory."""
    digest_size, hash_algorithm = (
        (48, hashes.SHA384()) if algorithm == "EC_P384" else (32, hashes.SHA256())
    )
    digest = os.urandom(digest_size)
    prehashed = utils.Prehashed(hash_algorithm)
    if algorithm.startswith("EC_"):
        curve = ec.SECP384R1() if algorithm == "EC_P384" else ec.SECP256R1()
        ec_key = ec.generate_private_key(curve)
        ec_pub = ec_key.public_key()

        def sign_ec() -> object:
            sig = ec_key.sign(digest, ec.ECDSA(prehashed))
            if verify:
                ec_pub.verify(sig, digest, ec.ECDSA(prehashed))
            return sig

        return sign_ec
    rsa_key = rsa.generate_private_key(65537, int(algorithm.split("_")[1]))
    rsa_pub = rsa_key.public_key()
    pkcs1 = padding.PKCS1v15()

    def sign_rsa() -> object:
        sig = rsa_key.sign(digest, pkcs1, prehashed)
        if verify:
            rsa_pub.verify(sig, digest, pkcs1, prehashed)
        return sig

    return sign_rsa


def server_cpu_seconds(pid: int) -> float:
    return process_ticks(pid) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the server


# ---------------------------------------------------------------- queries and checks


def make_query(data: bytes) -> bytes:
    """A DER TimeStampReq: SHA-256 imprint of ``data``, a 64-bit nonce, certReq."""
    return bytes(
        tsp.TimeStampReq(
            {
                "version": "v1",
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": hashlib.sha256(data).digest(),
                },
                "nonce": secrets.randbits(63),
                "cert_req": True,
            }
        ).dump()
    )


def granted(reply: bytes) -> bool:
    try:
        status = TimeStampResp.load(reply)["status"]["status"].native
    except (ValueError, TypeError, KeyError):
        return False
    return bool(status == "granted")


def openssl_verify(http: httpx.Client, query: bytes, reply: bytes, workdir: Path) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        return "skipped (openssl not installed)"
    chain = http.get("/api/v1/tsa/certificate")
    if chain.status_code != 200:
        raise BenchError(f"GET /api/v1/tsa/certificate: {chain.status_code} {chain.text[:200]}")
    pems = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", chain.content, re.S
    )
    (workdir / "cas.pem").write_bytes(b"".join(pems[1:]))  # issuing CA + root
    (workdir / "q.tsq").write_bytes(query)
    (workdir / "r.tsr").write_bytes(reply)
    done = subprocess.run(
        [
            openssl,
            "ts",
            "-verify",
            "-in",
            str(workdir / "r.tsr"),
            "-queryfile",
            str(workdir / "q.tsq"),
            "-CAfile",
            str(workdir / "cas.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if "Verification: OK" not in done.stdout:
        raise BenchError(f"openssl ts -verify refused a reply:\n{done.stdout}{done.stderr}")
    return "Verification: OK"


def tsa_successes(http: httpx.Client, admin_token: str) -> int:
    response = http.get(
        "/api/v1/usage",
        params={"scope": "tsa"},
        headers={"Authorization": f"Bearer {admin_token}"},
    )
    if response.status_code != 200:
        raise BenchError(f"GET /api/v1/usage: {response.status_code} {response.text[:300]}")
    return sum(int(c["successes"]) for c in response.json()["counters"])


# ---------------------------------------------------------------- load generators


@dataclass
class LoadResult:
    tool: str
    connections: int
    seconds: float
    ok: int
    failed: int
    p50_ms: float
    p99_ms: float
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


WRK_SCRIPT = """\
wrk.method = "POST"
local f = assert(io.open([==[{query}]==], "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/timestamp-query"

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
    if first_bad == "" then first_bad = tostring(status) end
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
      .. "\\"socket\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d}}\\n",
    summary.requests, summary.duration, bad, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
  if first ~= "" then io.write("BENCH_BAD " .. first .. "\\n") end
end
"""


def wrk_load(
    wrk: str, url: str, query_file: Path, workdir: Path, connections: int, seconds: int
) -> LoadResult:
    script = workdir / "tsa.lua"
    script.write_text(WRK_SCRIPT.format(query=str(query_file)))
    done = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url + TSA_PATH,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    match = re.search(r"^BENCH_JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(match.group(1))
    bad = re.search(r"^BENCH_BAD (.*)$", done.stdout, re.MULTILINE)
    failed = r["non200"] + r["socket"]
    return LoadResult(
        tool="wrk",
        connections=connections,
        seconds=r["duration_us"] / 1e6,
        ok=r["responses"] - r["non200"],
        failed=failed,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        first_error=bad.group(1) if bad else None,
    )


def python_load(url: str, query: bytes, connections: int, seconds: int) -> LoadResult:
    """A keep-alive client per connection (httpx), checking every reply is granted."""
    latencies: list[float] = []
    tally = {"ok": 0, "failed": 0}
    first_error: list[str] = []

    async def worker(client: httpx.AsyncClient, end: float) -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    TSA_PATH, content=query, headers={"Content-Type": QUERY_MEDIA_TYPE}
                )
            except httpx.HTTPError as e:
                tally["failed"] += 1
                first_error.append(type(e).__name__)
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 200 and granted(r.content):
                tally["ok"] += 1
            else:
                tally["failed"] += 1
                first_error.append(str(r.status_code))

    async def run() -> float:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
            started = time.perf_counter()
            end = started + seconds
            await asyncio.gather(*(worker(client, end) for _ in range(connections)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return LoadResult(
        tool="python",
        connections=connections,
        seconds=elapsed,
        ok=tally["ok"],
        failed=tally["failed"],
        p50_ms=pct(0.50) if latencies else 0.0,
        p99_ms=pct(0.99) if latencies else 0.0,
        first_error=first_error[0] if first_error else None,
    )


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="RFC 3161 timestamps/s over HTTP vs raw signing in the same run"
    )
    ap.add_argument("--algorithm", choices=ALGORITHMS, default="EC_P256", help="TSA key")
    ap.add_argument("--duration", type=int, default=10, help="seconds of the measured run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--strict", action="store_true", help="exit 2 when the target is not met")
    return ap.parse_args(argv)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="signery-tsa-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk") if args.loadgen in ("auto", "wrk") else None
    if args.loadgen == "wrk" and wrk is None:
        raise BenchError("--loadgen wrk: wrk is not installed (apt-get install wrk)")

    log(f"raw baseline: cryptography {args.algorithm} signing, one thread, 3 s each ...")
    raw = raw_rate(raw_signer(args.algorithm, verify=False), 3.0)
    raw_verify = raw_rate(raw_signer(args.algorithm, verify=True), 3.0)

    with workdir(args.keep) as tmp:
        server = Server(
            tmp,
            args.workers,
            {
                "SIGNERY_TSA_ALGORITHM": args.algorithm,
                "SIGNERY_TSA_RATE_LIMIT_PER_MINUTE": RATE_LIMIT_OFF,
            },
        )
        admin_token = str(server.init()["admin_token"])
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                query = make_query(b"signery tsa benchmark\n")
                first = http.post(
                    TSA_PATH, content=query, headers={"Content-Type": QUERY_MEDIA_TYPE}
                )
                if first.status_code != 200 or not granted(first.content):
                    raise BenchError(
                        f"first timestamp: {first.status_code} {first.content[:200]!r}"
                    )
                verified = openssl_verify(http, query, first.content, tmp)
                log(f"first reply: openssl ts -verify: {verified}")
                query_file = tmp / "bench.tsq"
                query_file.write_bytes(query)
                # Warm-up (and the lazily made pieces of every worker).
                if wrk:
                    wrk_load(wrk, server.url, query_file, tmp, args.connections, 2)
                else:
                    python_load(server.url, query, args.connections, 2)
                before_count = tsa_successes(http, admin_token)
                cpu_before = server_cpu_seconds(server.pid)
                log(f"measured run: {args.duration} s, {args.connections} connections ...")
                if wrk:
                    result = wrk_load(
                        wrk, server.url, query_file, tmp, args.connections, args.duration
                    )
                else:
                    result = python_load(server.url, query, args.connections, args.duration)
                cpu = server_cpu_seconds(server.pid) - cpu_before
                after_count = tsa_successes(http, admin_token)
        finally:
            server.stop()

    if result.failed:
        raise BenchError(
            f"{result.failed} failed requests in the measured run (first: {result.first_error})"
        )
    counted = after_count - before_count
    if counted < result.ok:
        raise BenchError(f"usage counter grew by {counted}, but {result.ok} tokens were received")
    met = result.rate >= TARGET_RATE
    summary: dict[str, Any] = {
        "algorithm": args.algorithm,
        "workers": args.workers,
        "raw_sign_per_s": round(raw, 1),
        "raw_sign_verify_per_s": round(raw_verify, 1),
        "http": asdict(result),
        "http_timestamps_per_s": round(result.rate, 1),
        "http_over_raw": round(result.rate / raw, 4),
        "server_cpu_ms_per_timestamp": round(1000 * cpu / max(result.ok, 1), 3),
        "usage_counter_delta": counted,
        "first_reply_openssl": verified,
        "target_per_s": TARGET_RATE,
        "target_met": met,
    }
    log("")
    log(
        f"{'TSA key':<10} {'raw sign/s':>11} {'raw s+v/s':>10} {'HTTP ts/s':>10} "
        f"{'HTTP/raw':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/ts':>10} {'conns':>6} tool"
    )
    log(
        f"{args.algorithm:<10} {raw:>11,.0f} {raw_verify:>10,.0f} {result.rate:>10,.0f} "
        f"{result.rate / raw:>8.1%} {result.p50_ms:>7.1f} {result.p99_ms:>7.1f} "
        f"{summary['server_cpu_ms_per_timestamp']:>10.3f} {result.connections:>6} {result.tool}"
    )
    log(
        f"workers: {args.workers}; usage counter +{counted} for {result.ok} tokens; "
        f"target >= {TARGET_RATE:.0f} timestamps/s: {'met' if met else 'NOT MET'}"
    )
    OUT_FILE.parent.mkdir(exist_ok=True)
    OUT_FILE.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {OUT_FILE.relative_to(ROOT)}")
    return 2 if args.strict and not met else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"BENCHMARK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
