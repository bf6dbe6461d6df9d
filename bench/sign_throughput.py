"""Signatures per second over HTTP per key store, next to raw in-process signing in the same run.

What is measured
----------------
1. **Baselines, in this process, one thread** (about 3 s each), over a 32-byte
   prehashed SHA-256 digest, ECDSA P-256 and RSA-3072 PKCS#1 v1.5:

   * ``cryptography`` signing (the builtin rows' baseline). A 2-thread RSA-3072
     rate (RSA signing releases the GIL) and the raw cost of sign + verify (the
     server verifies every signature before returning it) are printed as context.
   * **pkcs11**: the ``pkcs11`` key store's own ``sign()`` (session pool, ``C_Sign``,
     DER encoding: the code the server runs) on a SoftHSM2 token of its own, made
     in the run's temporary directory next to the server's token.
   * **aws-kms**: the ``aws-kms`` key store's own ``sign()``, i.e. one boto3 KMS
     ``Sign`` call per signature, against the same moto server the server uses.

   A key is generated in each store for the purpose, the first signature is
   verified, and the key is destroyed afterwards.
2. **Over HTTP**: a real ``signery serve --workers N`` (N = one per cpu by default,
   SQLite in a temporary data directory, access log off) with every available key
   store configured, one key per (store, algorithm) made through ``POST
   /api/v1/keys`` (``"storage"``, certified by the built-in CA), signs the same kind
   of digest through ``POST /api/v1/signing/keys/{key}/sign``, driven by ``wrk``
   (or, when wrk cannot be had, a small asyncio keep-alive client in this file).
   Every 200 answer means: token checked, account and key looked up in the
   database, digest signed by the key's store, signature verified, audit event and
   usage counters durably committed (group commit). After each measured run the
   key's ``successes`` counter from ``GET /api/v1/usage`` must have grown by at
   least the number of 200 answers the load generator saw; any failed request (in
   any run, warm-up and trials included) or a short counter fails the benchmark.
   These honesty checks apply to every (store, algorithm) pair.

Key stores
----------
``--stores builtin,pkcs11,aws-kms`` (default: all). ``pkcs11`` needs SoftHSM2
(``softhsm2-util``, ``libsofthsm2.so``) and python-pkcs11: the benchmark makes a
token in its temporary directory (``devtools.softhsm``) and starts the
server with ``SIGNERY_PKCS11__*``. ``aws-kms`` needs ``moto[server]`` and boto3: the
benchmark starts ``python -m devtools.moto_kms`` (moto corrected to sign
like KMS; ``--exit-with-parent``), gives the server ``SIGNERY_AWS_KMS__*`` and dummy
AWS credentials, and stops moto in the same ``finally`` as the server. A store
whose tools are missing or do not start is skipped, and the output says which and
why; that never fails the run. To keep ``make bench`` short, only builtin gets
trials over connection counts and placements; pkcs11 and aws-kms get a warm-up
and one shorter measured run at one connection count (``--store-connections``,
``--store-duration``; a comma list of connection counts gives them trials too).

moto is a functional stand-in for AWS KMS, not a performance one (its server does
~150-230 Sign/s here and boto3 costs ~2.4 ms of CPU per call): the aws-kms rows
measure Signery's overhead around a slow KMS double on the same 2 cores, never
AWS KMS's speed. SoftHSM2 is a software token whose crypto runs in the server's
own CPU. The output says both under the table. moto's CPU is metered on its own
("moto"), outside the server's CPU per signature and outside "other".

Why ratios against a same-run baseline
--------------------------------------
Absolute rates on a shared 2-core machine drift by +-20 % from one run to the
next (CPU frequency, neighbours, OpenSSL build). The raw rate measured minutes
earlier on the same machine absorbs most of that drift, so "HTTP rate / raw rate"
is the figure to compare across runs and machines; for pkcs11 and aws-kms the raw
rate is the store's own in-process rate, so the ratio shows what the HTTP stack,
database and audit cost around that store. The targets are judged on the builtin
rows only. The RSA-3072 target is such a ratio (>= 80 % of the raw 1-thread
rate: the HTTP stack, database and audit must cost little next to the private-key
operation); the EC P-256 target is absolute (>= 2,000 signatures/s: the raw
operation is so cheap that the server's own per-request cost is what is being
measured).

The load generator shares the 2 cores with the server. With one worker
(``--workers 1``), short trials before each builtin measured run compare pinning
(server on one core, load generator on the other, with ``taskset``) against no
pinning, for each connection count asked for; the best trial's setting is used
for the measured run, which is a fresh measurement, and the output says which
won.

Each run also reports where the CPU went (from /proc): the server process, the
load generator, moto (aws-kms), and every other process on the machine. A busy
neighbour shows up as "other" and makes a low rate recognisable as such; the
server's CPU time per signature is the figure least disturbed by neighbours.

Usage: ``make bench`` or ``.venv/bin/python bench/sign_throughput.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cryptography
import httpx
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from _common import (
    HOST,
    ROOT,
    BenchError,
    Server,
    clean_env,
    log,
    process_ticks,
    raw_rate,
)
from signery.client import AccountCredentials
from signery.crypto import Hashed, verify_signature
from signery.errors import SigneryError
from signery.keystores import (
    BACKENDS,
    AwsKmsSettings,
    Destroyable,
    KeyContext,
    KeyStore,
    health_of,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

if TYPE_CHECKING:
    from devtools.softhsm import SoftHsmToken

OUT_FILE = ROOT / "bench-out" / "sign_throughput.json"
API = "/api/v1"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

ALGORITHMS: dict[str, str] = {"EC_P256": "ecdsa", "RSA_3072": "rsa-pkcs1v15"}
KEY_NAMES: dict[str, str] = {"EC_P256": "p256", "RSA_3072": "rsa3072"}
RSA_TARGET_RATIO = 0.80
EC_TARGET_RATE = 2000.0
# The audit hash chain (issue 7) may cost at most this share of EC_P256 throughput;
# measured over alternating off/on rounds.
CHAIN_MAX_COST = 0.10
CHAIN_ROUNDS = 3

# Key stores a run can measure. builtin is always there; the others need their tools.
STORES: tuple[str, ...] = ("builtin", "pkcs11", "aws-kms")
BUILTIN = "builtin"
# What the "raw" figure of each store's rows is (one thread, in this process, same run).
RAW_SOURCES: dict[str, str] = {
    "builtin": "cryptography",
    "pkcs11": "store+SoftHSM2",
    "aws-kms": "store+boto3+moto",
}
RAW_SOURCE_NOTES: dict[str, str] = {
    "builtin": "cryptography's sign() on a key in memory",
    "pkcs11": "the pkcs11 key store's sign() on a SoftHSM2 token "
    "(session pool, C_Sign, DER encoding), the code the server runs",
    "aws-kms": "the aws-kms key store's sign(): one boto3 KMS Sign call to the same moto "
    "server per signature",
}
KMS_REGION = "us-east-1"
# Dummy credentials for the moto double. The AWS files point nowhere and instance
# metadata is off, so a developer's own AWS configuration is never read.
KMS_DUMMY_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": KMS_REGION,
    "AWS_CONFIG_FILE": "/nonexistent/signery-bench-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/signery-bench-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
MOTO_START_SECONDS = 60.0


# ---------------------------------------------------------------- CPU accounting

BUSY_WARNING = 0.25  # cores used by other processes that make a figure suspect


@dataclass
class CpuUse:
    """CPU used during a window, in cores (1.0 = one core busy for the whole window)."""

    server: float
    load: float
    other: float
    # The moto server standing in for AWS KMS (a child of this process, still running,
    # so neither "load" nor "server"); 0 when there is none.
    moto: float = 0.0


def _system_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (all but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _own_and_children_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """Who used the CPUs during a ``with`` block: the server, this process and its
    children (the load generator), and everything else on the machine.

    The machine may be shared: "other" shows how much of it was not ours, so a
    low figure caused by a neighbour is recognisable as such."""

    def __init__(self, server_pid: int | None = None, moto_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.moto_pid = moto_pid
        self.use: CpuUse | None = None
        self._tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ticks(pid: int | None) -> int:
        if pid is None:
            return 0
        try:
            return process_ticks(pid)
        except OSError:
            return 0

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._busy = _system_busy_ticks()
        self._server = self._ticks(self.server_pid)
        self._moto = self._ticks(self.moto_pid)
        self._ours = _own_and_children_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        busy = (_system_busy_ticks() - self._busy) / self._tick
        server = (self._ticks(self.server_pid) - self._server) / self._tick
        moto = (self._ticks(self.moto_pid) - self._moto) / self._tick
        load = _own_and_children_seconds() - self._ours
        if wall > 0:
            other = max(0.0, busy - server - load - moto)
            self.use = CpuUse(
                round(server / wall, 3),
                round(load / wall, 3),
                round(other / wall, 3),
                round(moto / wall, 3),
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


# ---------------------------------------------------------------- other key stores


class StoreUnavailable(Exception):
    """A key store's tools are missing or would not start: the store is skipped."""


def missing_tools(store: str) -> str | None:
    """Why ``store`` cannot be measured on this machine, or None when it can."""
    if store == "pkcs11":
        if importlib.util.find_spec("pkcs11") is None:
            return "python-pkcs11 is not installed (pip install 'signery[pkcs11]')"
        from devtools import softhsm

        if not softhsm.available():
            return (
                "SoftHSM2 is not installed (softhsm2-util, libsofthsm2.so: "
                "apt-get install softhsm2)"
            )
    elif store == "aws-kms":
        for module, package in (("boto3", "signery[aws]"), ("moto", "moto[server]")):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install '{package}')"
        if importlib.util.find_spec("moto.server") is None:
            return "moto's server is not installed (pip install 'moto[server]')"
    return None


class MotoKms:
    """The corrected moto server (``python -m devtools.moto_kms``), a child of
    this process standing in for AWS KMS. ``--exit-with-parent``: it goes away even
    if this benchmark is killed."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = MOTO_START_SECONDS) -> None:
        cmd = [
            sys.executable,
            "-m",
            "devtools.moto_kms",
            "--host",
            HOST,
            "--port",
            "0",
            "--exit-with-parent",
        ]
        with self.log_path.open("wb") as logfile:
            self.proc = subprocess.Popen(
                cmd,
                env={**clean_env(), **KMS_DUMMY_ENV},
                stdout=subprocess.PIPE,
                stderr=logfile,
                cwd=ROOT,  # `-m devtools.moto_kms`: the repository's devtools/
            )
        # It prints one JSON line, {"url": ...}, once it answers (port 0: no port race).
        stdout = self.proc.stdout
        assert stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        try:
            self.url = str(json.loads(lines[0])["url"])
        except (IndexError, ValueError, KeyError, TypeError):
            self.stop()
            raise StoreUnavailable(
                f"the moto server did not start within {timeout:g} s: {self.log_tail()}"
            ) from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no moto log)"
        return " | ".join(text.splitlines()[-lines:]) or "(moto log is empty)"


@dataclass
class StoreSetup:
    """The key stores of this run and what the server needs to have them."""

    active: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    server_env: dict[str, str] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)
    # A second SoftHSM2 token for the in-process baseline (the server has its own).
    raw_token: SoftHsmToken | None = None
    moto: MotoKms | None = None

    @property
    def moto_pid(self) -> int | None:
        return self.moto.pid if self.moto is not None else None

    def stop(self) -> None:
        if self.moto is not None:
            self.moto.stop()


def prepare_stores(requested: list[str], workdir: Path) -> StoreSetup:
    """Make what each requested store needs: a SoftHSM2 token in ``workdir`` (pkcs11),
    a moto server (aws-kms). A store whose tools are missing or do not start is
    skipped with the reason, never an error. The caller stops the setup (moto) in
    its ``finally``."""
    setup = StoreSetup()
    for store in requested:
        if store == BUILTIN:
            setup.active.append(store)
            setup.detail[store] = "the server's own store (keys wrapped by the master key)"
            continue
        why = missing_tools(store)
        if why is not None:
            setup.skipped[store] = why
            continue
        try:
            if store == "pkcs11":
                from devtools.softhsm import SoftHsm

                hsm = SoftHsm(workdir / "softhsm")
                # Both tokens exist before any process loads SoftHSM2 (it reads its
                # token directory once, when loaded).
                token = hsm.init_token("bench")
                setup.raw_token = hsm.init_token("bench-raw")
                setup.server_env.update(token.server_env())
                setup.detail[store] = f"SoftHSM2 token {token.label!r} in {hsm.directory}"
            else:
                setup.moto = MotoKms(workdir)
                setup.moto.start()
                setup.server_env.update(
                    {
                        "SIGNERY_AWS_KMS__REGION": KMS_REGION,
                        "SIGNERY_AWS_KMS__ENDPOINT_URL": setup.moto.url,
                        **KMS_DUMMY_ENV,
                    }
                )
                setup.detail[store] = (
                    f"moto server at {setup.moto.url} standing in for AWS KMS ({KMS_REGION})"
                )
        except subprocess.CalledProcessError as e:
            stderr = (e.stderr or b"").decode(errors="replace").strip()
            setup.skipped[store] = f"{' '.join(map(str, e.cmd[:2]))} failed: {stderr[:300]}"
            continue
        except StoreUnavailable as e:
            setup.skipped[store] = str(e)[:500]
            continue
        except (OSError, subprocess.SubprocessError) as e:
            setup.skipped[store] = f"{type(e).__name__}: {e}"[:500]
            continue
        setup.active.append(store)
    return setup


@dataclass
class StoreBaseline:
    """Signatures per second through a key store in this process, one thread."""

    store: str
    algorithm: str
    sign_per_s: float
    other_cpu: float = 0.0
    moto_cpu: float = 0.0


def _open_store_in_process(store: str, setup: StoreSetup) -> KeyStore:
    if store == "pkcs11":
        assert setup.raw_token is not None
        # SoftHSM2 reads SOFTHSM2_CONF when this process first loads it (just below).
        os.environ["SOFTHSM2_CONF"] = str(setup.raw_token.conf)
        return BACKENDS["pkcs11"].open_store(setup.raw_token.settings())
    assert setup.moto is not None
    from pydantic import SecretStr

    return BACKENDS["aws-kms"].open_store(
        AwsKmsSettings(
            region=KMS_REGION,
            endpoint_url=setup.moto.url,
            access_key_id=KMS_DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=SecretStr(KMS_DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]),
            alias_prefix="alias/signery-bench-raw",
        )
    )


def measure_store_baselines(
    setup: StoreSetup, algorithms: list[str], seconds: float
) -> dict[str, dict[str, StoreBaseline]]:
    """For each active store but builtin: a key per algorithm made in the store, then
    ``store.sign()`` of a SHA-256 digest in a loop, one thread, as ``raw_rate`` does
    for cryptography. The first signature is verified; the keys are destroyed after."""
    out: dict[str, dict[str, StoreBaseline]] = {}
    for store_name in setup.active:
        if store_name == BUILTIN:
            continue
        try:
            store = _open_store_in_process(store_name, setup)
        except SigneryError as e:
            raise BenchError(f"{store_name}: the key store does not open in-process: {e}") from e
        out[store_name] = {}
        try:
            health = health_of(store)
            if not health.ok:
                raise BenchError(f"{store_name}: the key store is not healthy: {health.detail}")
            for algorithm in algorithms:
                out[store_name][algorithm] = _store_baseline(
                    store, store_name, algorithm, seconds, setup.moto_pid
                )
        finally:
            store.close()
    return out


def _store_baseline(
    store: KeyStore, store_name: str, algorithm: str, seconds: float, moto_pid: int | None
) -> StoreBaseline:
    context = KeyContext(str(uuid.uuid4()), 1, "bench", label=f"bench-raw-{KEY_NAMES[algorithm]}")
    try:
        generated = store.generate(Algorithm(algorithm), context)
    except SigneryError as e:
        raise BenchError(f"{store_name} {algorithm}: generating a key failed: {e}") from e
    try:
        hashed = Hashed(DigestAlgorithm.SHA256, os.urandom(32))
        scheme = SignatureScheme(ALGORITHMS[algorithm])
        sign = functools.partial(store.sign, generated.handle, hashed, scheme)
        if not verify_signature(generated.public_key, hashed, scheme, sign()):
            raise BenchError(f"{store_name} {algorithm}: the store's signature does not verify")
        with CpuMeter(moto_pid=moto_pid) as meter:
            rate = raw_rate(sign, seconds)
    except SigneryError as e:
        raise BenchError(f"{store_name} {algorithm}: signing in-process failed: {e}") from e
    finally:
        if isinstance(store, Destroyable):
            with contextlib.suppress(SigneryError):
                store.destroy(generated.handle)
    use = meter.use
    moto = f"  (moto used {use.moto:.2f} cpu)" if use and store_name == "aws-kms" else ""
    log(
        f"  {algorithm:<9} {store_name:<7} 1 thread: {rate:>8,.0f} sign/s   "
        f"({RAW_SOURCES[store_name]}){moto}" + meter.note()
    )
    return StoreBaseline(
        store_name,
        algorithm,
        rate,
        other_cpu=use.other if use else 0.0,
        moto_cpu=use.moto if use else 0.0,
    )


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


@dataclass
class Fixture:
    """What the REST setup created: a TSG, an account and one key per (store, algorithm)."""

    tsg_id: str
    credentials: AccountCredentials
    key_ids: dict[tuple[str, str], str]


def key_name(store: str, algorithm: str) -> str:
    """The name of the key a (store, algorithm) pair signs with (builtin: p256, rsa3072)."""
    base = KEY_NAMES[algorithm]
    return base if store == BUILTIN else f"{store}-{base}"


def _expect(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if response.status_code != status:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def check_stores(admin: httpx.Client, stores: list[str]) -> dict[str, str]:
    """Every store of the run is configured on the server and healthy; returns each
    store's health detail."""
    response = admin.get(f"{API}/keystores")
    if response.status_code != 200:
        raise BenchError(f"list key stores: HTTP {response.status_code}: {response.text[:500]}")
    listed = {s["name"]: s for s in response.json()}
    for store in stores:
        if store not in listed:
            raise BenchError(
                f"the server has no {store!r} key store (it lists {sorted(listed)}); "
                "see the server log"
            )
        if not listed[store]["healthy"]:
            raise BenchError(f"the {store!r} key store is not healthy: {listed[store]['detail']}")
    return {store: str(listed[store]["detail"]) for store in stores}


BENCH_SUBJECT_FIELDS = ("common_name", "organization", "organizational_unit", "country", "email")


def set_up(admin: httpx.Client, pairs: list[tuple[str, str]]) -> Fixture:
    tsg = _expect(admin.post(f"{API}/tsgs", json={"name": "bench"}), 201, "create TSG")
    # Below the root TSG the built-in CA certifies only the subjects a subject
    # policy allows: the bench's keys may have any.
    _expect(
        admin.put(
            f"{API}/tsgs/{tsg['id']}/subject-policy",
            json={field: ["*"] for field in BENCH_SUBJECT_FIELDS},
        ),
        200,
        "set subject policy",
    )
    account = _expect(
        admin.post(f"{API}/accounts", json={"name": "bench", "tsg_id": tsg["id"]}),
        201,
        "create account",
    )
    key = serialization.load_pem_private_key(account["private_key_pem"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key_ids: dict[tuple[str, str], str] = {}
    for store, algorithm in pairs:
        created = _expect(
            admin.post(
                f"{API}/keys",
                json={
                    "name": key_name(store, algorithm),
                    "tsg_id": tsg["id"],
                    "algorithm": algorithm,
                    "certificate_authority": "builtin",
                    "storage": store,
                },
                timeout=120.0,
            ),
            201,
            f"create {algorithm} key in {store}",
        )
        if created.get("storage") != store:
            raise BenchError(
                f"{algorithm} key asked for in {store} was made in {created.get('storage')!r}"
            )
        key_ids[(store, algorithm)] = created["id"]
    return Fixture(tsg["id"], AccountCredentials(account["client_id"], key), key_ids)


def governed_policy(algorithm: str, limits: bool) -> dict[str, Any]:
    """A policy whose rules all let the bench's signings through: what a governed
    production key pays on each signing (usage limits are a conditional database
    write per signature)."""
    policy: dict[str, Any] = {
        "signers": ["bench"],
        "allowed_schemes": ["ecdsa" if algorithm.startswith("EC_") else "rsa-pkcs1v15"],
        "allowed_digests": ["sha256"],
        "client_ips": ["127.0.0.0/8", "::1/128"],
        "time_windows": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}],
        "timezone": "Europe/Berlin",
        "valid_from": "2000-01-01T00:00:00Z",
        "valid_until": "2999-01-01T00:00:00Z",
    }
    if limits:
        policy["max_signatures_total"] = 10**12
        policy["max_signatures_per_day"] = 10**12
    return policy


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
    store: str
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


def bench_pair(
    store: str,
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
    moto_pid: int | None = None,
) -> HttpResult:
    """Warm-up, trials over the connection counts and placements (when there are
    several), then a fresh measured run with the best; the honesty checks on each."""
    what_pair = f"{store} {algorithm}"
    key_id = fixture.key_ids[(store, algorithm)]
    token = access_token(server.url, fixture.credentials, issuer)
    body = json.dumps(
        {
            "digest": base64.b64encode(os.urandom(32)).decode("ascii"),
            "digest_algorithm": "sha256",
            "scheme": ALGORITHMS[algorithm],
        },
        separators=(",", ":"),
    ).encode("ascii")
    call = SignCall(f"{API}/signing/keys/{key_name(store, algorithm)}/sign", token, body)

    def run(connections: int, pinned: bool, seconds: int, what: str) -> LoadResult:
        cpus.place_server(server.pid, pinned)
        with CpuMeter(server.pid, moto_pid) as meter:
            result = load.run(call, connections, seconds, pinned)
        result.cpu = meter.use
        check_load(result, f"{what_pair} {what}")
        return result

    def line(label: str, r: LoadResult, extra: str = "") -> None:
        cpu = r.cpu
        moto = f" moto {cpu.moto:.2f}" if cpu and store == "aws-kms" else ""
        usage = (
            f"  cpu: server {cpu.server:.2f} load {cpu.load:.2f}{moto} other {cpu.other:.2f}"
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
    before, failures_before = key_counter(admin, key_id)
    result = run(connections, pinned, duration, "measured run")
    after, failures_after = key_counter(admin, key_id)
    line("MEASURED", result, f"  ({result.ok:,} in {result.seconds:.1f} s)")
    # Every 200 carried a signature whose audit event and counters were committed first.
    if after - before < result.ok:
        raise BenchError(
            f"{what_pair}: the key's successes counter grew by {after - before:,} but the "
            f"load generator received {result.ok:,} signatures: signatures left the server "
            "without a committed audit event"
        )
    if failures_after != failures_before:
        raise BenchError(
            f"{what_pair}: the key's failures counter grew by {failures_after - failures_before}"
        )
    log(
        f"  audit check  successes counter +{after - before:,} >= {result.ok:,} signatures "
        "received: OK"
    )
    return HttpResult(
        store, algorithm, result, trials, before, after, failures_after - failures_before
    )


# ---------------------------------------------------------------- report


def store_notes(setup: StoreSetup, baselines: dict[str, Baseline]) -> list[str]:
    """What to read the table with: what "raw" is per store, what the stand-ins are."""
    measured = setup.active
    notes: list[str] = []
    others = any(s != BUILTIN for s in measured)
    if measured:
        notes.append(
            "raw = the same signing operation in this process, one thread, this run: "
            + "; ".join(f"{s}: {RAW_SOURCE_NOTES[s]}" for s in measured)
            + "."
            + (
                " HTTP runs are concurrent and use every server worker, so HTTP/raw can "
                "exceed 100 % where the raw caller mostly waits (SoftHSM2 RSA, moto)."
                if others
                else ""
            )
        )
    if others:
        notes.append(
            "targets apply to the builtin rows only; raw cryptography for comparison: "
            + ", ".join(f"{a} {b.sign_per_s:,.0f}/s" for a, b in baselines.items())
            + "."
        )
    if "pkcs11" in measured:
        notes.append(
            "pkcs11 = SoftHSM2, a software token whose crypto runs inside the server "
            "process on the same 2 cores (measured by hand here: ~1,400-1,600 RSA-2048 or "
            "~14,000 P-256 signs/s via python-pkcs11). A real HSM has its own rate and "
            "usually a network round trip per signature."
        )
    if "aws-kms" in measured:
        notes.append(
            "aws-kms = the moto server standing in for AWS KMS. moto is a FUNCTIONAL "
            "stand-in, NOT a performance one: these rows are NOT AWS KMS's speed. moto's "
            "server does ~150-230 Sign/s on this machine and boto3 costs ~2.4 ms of CPU per "
            "call; moto shares the 2 cores with the server and the load generator (its CPU "
            "is shown as 'moto' and is not in the server's CPU per signature). Real KMS "
            "adds a network round trip per signature and is bounded by the account's KMS "
            "request quotas."
        )
    for store, why in setup.skipped.items():
        notes.append(f"skipped {store}: {why}")
    return notes


def report(
    baselines: dict[str, Baseline],
    store_baselines: dict[str, dict[str, StoreBaseline]],
    results: list[HttpResult],
    meta: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for http in results:
        algorithm, store = http.algorithm, http.store
        crypto = baselines[algorithm]
        builtin = store == BUILTIN
        raw = crypto.sign_per_s if builtin else store_baselines[store][algorithm].sign_per_s
        two = crypto.sign_per_s_2threads if builtin else None
        rows.append(
            {
                "store": store,
                "algorithm": algorithm,
                "raw_source": RAW_SOURCE_NOTES[store],
                "raw_sign_per_s_1thread": round(raw, 1),
                "raw_sign_verify_per_s_1thread": (
                    round(crypto.sign_verify_per_s, 1) if builtin else None
                ),
                "raw_sign_per_s_2threads": (
                    None if two is None else round(two, 1)  # measured for RSA_3072 only
                ),
                "cryptography_raw_sign_per_s_1thread": round(crypto.sign_per_s, 1),
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
                "baseline_other_cpu": round(
                    crypto.other_cpu if builtin else store_baselines[store][algorithm].other_cpu,
                    3,
                ),
                "load_generator": http.load.tool,
                "trials": [asdict(t) for t in http.trials],
            }
        )
    builtin_rows = {r["algorithm"]: r for r in rows if r["store"] == BUILTIN}
    targets: list[dict[str, Any]] = []
    if "RSA_3072" in builtin_rows:
        ratio = builtin_rows["RSA_3072"]["http_over_raw"]
        targets.append(
            {
                "target": f"RSA_3072 over HTTP >= {RSA_TARGET_RATIO:.0%} of raw rate",
                "value": f"{ratio:.1%}",
                "met": ratio >= RSA_TARGET_RATIO,
            }
        )
    if "EC_P256" in builtin_rows:
        rate = builtin_rows["EC_P256"]["http_sign_per_s"]
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
        f"{'store':<7}  {'algorithm':<9}  {'raw sign/s':>10}  {'raw measured as':<16}  "
        f"{'HTTP sign/s':>11}  {'HTTP/raw':>8}  {'p50 ms':>7}  {'p99 ms':>7}  "
        f"{'srv cpu ms/sig':>14}  {'conns':>5}  placement"
    )
    log("\n" + "=" * len(header))
    log(header)
    log("-" * len(header))
    for r in rows:
        log(
            f"{r['store']:<7}  {r['algorithm']:<9}  {r['raw_sign_per_s_1thread']:>10,.0f}  "
            f"{RAW_SOURCES[r['store']]:<16}  "
            f"{r['http_sign_per_s']:>11,.0f}  {r['http_over_raw']:>8.1%}  "
            f"{r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {cpu_ms(r):>14}  {r['connections']:>5}  "
            f"{'pinned' if r['pinned'] else 'unpinned'}"
        )
    if not rows:
        log("(no store was measured)")
    log("-" * len(header))
    if BUILTIN not in {r["store"] for r in rows}:
        log("targets: not judged (they apply to the builtin rows, which were not measured)")
    for t in targets:
        log(
            f"target (builtin): {t['target']:<42} {t['value']:>9}  "
            f"{'met' if t['met'] else 'NOT MET'}"
        )
    if notes:
        log("-" * len(header))
        for note in notes:
            log(textwrap.fill(f"note: {note}", len(header), subsequent_indent="      "))
    log("=" * len(header))
    return {"meta": meta, "results": rows, "targets": targets, "notes": notes}


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
        "stores_requested": args.stores,
        "store_duration_s": args.store_duration,
        "store_connections_tried": args.store_connections,
        "policy": args.policy,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Signing throughput over HTTP per key store, next to raw in-process "
        "signing (cryptography, and each store's own sign()) measured in the same run."
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
    ap.add_argument(
        "--stores",
        type=lambda s: [a.strip() for a in s.split(",") if a.strip()],
        default=list(STORES),
        help="comma list among builtin,pkcs11,aws-kms (default: all; a store whose tools "
        "are missing is skipped with the reason: pkcs11 needs SoftHSM2 and python-pkcs11, "
        "aws-kms needs moto[server] and boto3)",
    )
    ap.add_argument(
        "--store-duration",
        type=int,
        default=5,
        help="seconds of the measured run of each pkcs11 / aws-kms pair (default 5)",
    )
    ap.add_argument(
        "--store-connections",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[16],
        help="connection counts for the pkcs11 / aws-kms pairs; one value (default 16): "
        "no trials, a comma list: trials as for builtin",
    )
    ap.add_argument(
        "--policy",
        choices=("none", "rules", "limits"),
        default="none",
        help="give every key a signing policy whose rules all let the bench through: "
        "'rules' sets signer, scheme, digest, client range, time window and validity; "
        "'limits' adds total and per-day usage limits (a database reservation per "
        "signature). Measures what governance costs per signature (default none)",
    )
    ap.add_argument(
        "--audit-chain",
        choices=("on", "off", "both"),
        default="both",
        help="the audit hash chain (setting audit_hash_chain): on or off for the whole run, "
        "or both: after the main run (chain on), builtin EC_P256 is measured again with the "
        f"chain off and on, alternately ({CHAIN_ROUNDS} rounds, the server restarted each "
        # argparse %-formats help strings: a literal percent sign is written %%.
        f"time), and the cost is judged (target: at most {CHAIN_MAX_COST * 100:.0f}%%) "
        "(default both)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--strict", action="store_true", help="also exit with status 2 when a target is not met"
    )
    args = ap.parse_args(argv)
    for a in args.algorithms:
        if a not in ALGORITHMS:
            ap.error(f"unknown algorithm {a!r}")
    for st in args.stores:
        if st not in STORES:
            ap.error(f"unknown store {st!r} (known: {', '.join(STORES)})")
    args.stores = [st for st in STORES if st in args.stores]  # table order, no repeats
    if not args.stores:
        ap.error("--stores needs at least one store")
    if not args.algorithms:
        ap.error("--algorithms needs at least one algorithm")
    for name, counts in (
        ("connections", args.connections),
        ("store-connections", args.store_connections),
    ):
        if not counts or min(counts) < 1:
            ap.error(f"--{name} needs positive integers")
    if min(args.duration, args.warmup, args.trial_duration, args.store_duration) < 1:
        ap.error("durations are whole seconds >= 1 (wrk takes whole seconds)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cpus = Cpus.detect()
    workdir = Path(tempfile.mkdtemp(prefix="signery-bench-"))
    server = Server(workdir, args.workers)
    setup = StoreSetup()
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

        setup = prepare_stores(args.stores, workdir)
        for store in setup.active:
            log(f"store {store:<7}: {setup.detail[store]}")
        for store, why in setup.skipped.items():
            log(f"store {store:<7}: SKIPPED, {why}")
        meta["stores_measured"] = setup.active
        meta["stores_skipped"] = setup.skipped
        server.add_env(setup.server_env)
        server.add_env({"SIGNERY_AUDIT_HASH_CHAIN": str(args.audit_chain != "off").lower()})
        meta["audit_chain"] = args.audit_chain
        if not setup.active:
            log("nothing to measure over HTTP: every store asked for was skipped")

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

        log(f"\n[1/3] raw in-process signing, {args.baseline_duration:g} s each: cryptography")
        baselines = measure_baselines(args.baseline_duration)
        if any(store != BUILTIN for store in setup.active):
            log("  through the key stores themselves (a key made in each, then store.sign()):")
        store_baselines = measure_store_baselines(setup, args.algorithms, args.baseline_duration)

        results: list[HttpResult] = []
        chain: dict[str, Any] | None = None
        if setup.active:
            results, chain = bench_over_http(args, setup, server, workdir, load, cpus, pin_options)
        summary = report(baselines, store_baselines, results, meta, store_notes(setup, baselines))
        if chain is not None:
            summary["audit_chain"] = chain
            summary["targets"].append(chain["target"])
        log(
            "context: RSA_3072 raw with 2 threads "
            f"{baselines['RSA_3072'].sign_per_s_2threads or 0:,.0f}/s; every HTTP signature "
            "is also verified by the server (raw sign+verify: "
            + ", ".join(f"{a} {b.sign_verify_per_s:,.0f}/s" for a, b in baselines.items())
            + ")"
        )
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"the server exited during the run:\n{server.log_tail()}")
        elapsed = time.monotonic() - started
        summary["meta"]["elapsed_s"] = round(elapsed, 1)
        OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
        OUT_FILE.write_text(json.dumps(summary, indent=2) + "\n")
        log(f"wrote {OUT_FILE.relative_to(ROOT)} ({elapsed:.0f} s in all)")
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
        setup.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def bench_over_http(
    args: argparse.Namespace,
    setup: StoreSetup,
    server: Server,
    workdir: Path,
    load: WrkLoad | PythonLoad,
    cpus: Cpus,
    pin_options: list[bool],
) -> tuple[list[HttpResult], dict[str, Any] | None]:
    """Steps 2 and 3: the server with every active store, its keys, and each
    (store, algorithm) pair driven over HTTP; then the hash chain on/off (``both``)."""
    # pkcs11 / aws-kms: no placement trials (moto floats on both cores anyway).
    store_pin_options = pin_options if args.pin != "auto" else [False]
    log(f"\n[2/3] starting signery serve on {server.url} (data in {workdir})")
    info = server.init()
    install = Installation(info["admin_token"], info["issuer"], info["root_tsg_id"])
    server.start()
    results: list[HttpResult] = []
    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {install.admin_token}"},
        timeout=30.0,
    ) as admin:
        health = check_stores(admin, setup.active)
        for store in setup.active:
            log(f"  key store {store:<7} healthy: {health[store]}")
        pairs = [(st, a) for st in setup.active for a in args.algorithms]
        fixture = set_up(admin, pairs)
        if args.policy != "none":
            limits = args.policy == "limits"
            for (store, algorithm), key_id in fixture.key_ids.items():
                _expect(
                    admin.put(
                        f"{API}/keys/{key_id}/policy", json=governed_policy(algorithm, limits)
                    ),
                    200,
                    f"set the policy of {key_name(store, algorithm)}",
                )
            log(
                "  every key has a signing policy: signer, scheme, digest, client range, "
                "time window, validity" + (", total and per-day limits" if limits else "")
            )
        log(
            f"  TSG {fixture.tsg_id}, account {fixture.credentials.client_id}, "
            f"{len(pairs)} keys ready: " + ", ".join(key_name(st, a) for st, a in pairs)
        )
        log(
            f"\n[3/3] signing over HTTP: warm-up {args.warmup} s each;"
            f" builtin: trials {args.trial_duration} s over connections {args.connections}"
            f" x {['unpinned' if not p else 'pinned' for p in pin_options]}, "
            f"measured run {args.duration} s"
            + (
                f"; pkcs11/aws-kms: connections {args.store_connections}, measured run "
                f"{args.store_duration} s"
                if any(st != BUILTIN for st in setup.active)
                else ""
            )
        )
        for store, algorithm in pairs:
            builtin = store == BUILTIN
            log(f" {store} {algorithm}")
            results.append(
                bench_pair(
                    store,
                    algorithm,
                    server=server,
                    admin=admin,
                    fixture=fixture,
                    issuer=install.issuer,
                    load=load,
                    cpus=cpus,
                    connection_options=args.connections if builtin else args.store_connections,
                    pin_options=pin_options if builtin else store_pin_options,
                    duration=args.duration if builtin else args.store_duration,
                    warmup=args.warmup,
                    trial_seconds=args.trial_duration,
                    moto_pid=setup.moto_pid,
                )
            )
            if store == "aws-kms" and setup.moto is not None and not setup.moto.running:
                raise BenchError(f"the moto server exited: {setup.moto.log_tail()}")
        chain = None
        measured = next(
            (r for r in results if r.store == BUILTIN and r.algorithm == "EC_P256"), None
        )
        if args.audit_chain == "both" and measured is not None:
            chain = bench_chain_on_off(
                server, admin, fixture, install.issuer, load, cpus, measured, args
            )
    return results, chain


def bench_chain_on_off(
    server: Server,
    admin: httpx.Client,
    fixture: Fixture,
    issuer: str,
    load: WrkLoad | PythonLoad,
    cpus: Cpus,
    measured: HttpResult,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """builtin EC_P256 with the audit hash chain off and on, alternately (so that a
    drift of the machine's load hits both alike), each on a freshly started server
    with the connections and placement of the main run's best."""
    connections, pinned = measured.load.connections, measured.load.pinned
    log(
        f"\n[+] audit hash chain off/on: builtin EC_P256, {CHAIN_ROUNDS} rounds of "
        f"{args.duration} s each way, c={connections}"
    )
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(CHAIN_ROUNDS):
        for mode in ("off", "on"):
            server.stop()
            server.add_env({"SIGNERY_AUDIT_HASH_CHAIN": str(mode == "on").lower()})
            server.start()
            token = access_token(server.url, fixture.credentials, issuer)
            body = json.dumps(
                {
                    "digest": base64.b64encode(os.urandom(32)).decode("ascii"),
                    "digest_algorithm": "sha256",
                    "scheme": ALGORITHMS["EC_P256"],
                },
                separators=(",", ":"),
            ).encode("ascii")
            call = SignCall(f"{API}/signing/keys/{key_name(BUILTIN, 'EC_P256')}/sign", token, body)
            cpus.place_server(server.pid, pinned)
            load.run(call, connections, args.warmup, pinned)  # warm-up
            with CpuMeter(server.pid) as meter:
                result = load.run(call, connections, args.duration, pinned)
            check_load(result, f"chain {mode}")
            rates[mode].append(result.rate)
            # Server CPU time per signature: the figure a busy neighbour disturbs
            # least (a rate moves with the machine's load; the work per signature
            # does not).
            cpu_ms = (meter.use.server / result.rate * 1000) if meter.use and result.rate else 0.0
            cpu[mode].append(cpu_ms)
            log(
                f"  chain {mode:<3} {result.rate:>7,.0f} sign/s  p50 {result.p50_ms:6.2f} ms  "
                f"server cpu {cpu_ms:.3f} ms/sig" + meter.note()
            )
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    cpu_off, cpu_on = statistics.mean(cpu["off"]), statistics.mean(cpu["on"])
    cost = cpu_on / cpu_off - 1 if cpu_off else 0.0
    log(
        f"  chain on / off: throughput {on / off:.1%}, server CPU per signature "
        f"{cpu_on / cpu_off if cpu_off else 0:.1%} (cost {cost:.1%}, target <= "
        f"{CHAIN_MAX_COST:.0%})"
    )
    return {
        "rates_off": [round(r, 1) for r in rates["off"]],
        "rates_on": [round(r, 1) for r in rates["on"]],
        "cpu_ms_per_signature_off": [round(c, 4) for c in cpu["off"]],
        "cpu_ms_per_signature_on": [round(c, 4) for c in cpu["on"]],
        "on_over_off": round(on / off, 4),
        "target": {
            "target": f"audit hash chain costs <= {CHAIN_MAX_COST:.0%} more server CPU per "
            "EC_P256 signature",
            "value": f"{cost:.1%} (throughput {on / off:.1%} of chain off)",
            "met": cost <= CHAIN_MAX_COST,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
