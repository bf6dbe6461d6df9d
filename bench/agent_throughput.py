"""What the PKCS#11 agent adds to a signature.

What is measured (both in this run, against the same server and key)
-----------------------------------------------------------------------
1. **Baseline**: ``signery.client.Client.sign`` in this process, one digest at a
   time (one access token, keep-alive HTTP): signatures/s, p50 and p99 latency.
   It sends the same client info the agent sends for its caller (machine, tool
   and the process: executable, SHA-256, command line), so that both make the
   same signing with the same audit event and only the way there differs.
2. **Through the agent**: a python-pkcs11 loop over Debian's stock
   ``p11-kit-client.so`` in this process (C_SignInit + C_Sign per signature, the
   way a tool signs), talking to ``signery agent`` running as its own process on
   a private socket: signatures/s, p50, p99.

Target: the agent adds less than 20 % to the p50 latency of a signature. The
CPU per signature of the client (this process, in the baseline) and of the
agent process (its HTTP client included) are printed beside them: the agent's
own p11-kit work is a few tens of microseconds; what it adds beyond that is the
three round trips p11-kit's client makes per signature (C_SignInit, C_Sign
asking the length, C_Sign), between processes that share the machine's cores. Each
pair of runs alternates (baseline, agent, baseline, agent...) so that a change
of machine load hits both. The key's usage counter must grow by exactly the
number of signatures made (every signature audited).

Usage: ``.venv/bin/python bench/agent_throughput.py --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from _common import ROOT, BenchError, Server, log, process_ticks
from signery import protocol as p
from signery.agent import P11_KIT_CLIENT
from signery.client import AccountCredentials, Client
from signery.crypto import Hashed

OUT_FILE = ROOT / "bench-out" / "agent_throughput.json"
TARGET_OVERHEAD = 0.20
TICKS = os.sysconf("SC_CLK_TCK")
ALGORITHMS = {"EC_P256": p.SignatureScheme.ECDSA, "RSA_3072": p.SignatureScheme.RSA_PKCS1V15}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(sign: Callable[[], object], count: int) -> dict[str, float]:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        sign()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    return {
        "rate": count / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


class World:
    """An account and one key per algorithm on a fresh server."""

    def __init__(self, server: Server, admin_token: str, workdir: Path) -> None:
        self.admin = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60
        )
        tsgs = self.admin.get("/api/v1/tsgs").json()
        root = next(t for t in (tsgs.get("tsgs", tsgs) if isinstance(tsgs, dict) else tsgs))
        account = self._post("/api/v1/accounts", {"tsg_id": root["id"], "name": "bench-agent"})
        self.key_file = workdir / "account.pem"
        self.key_file.write_text(account["private_key_pem"])
        self.key_file.chmod(0o600)
        self.client_id = str(account["client_id"])
        self.keys = {
            algorithm: self._post(
                "/api/v1/keys",
                {
                    "name": f"bench-{algorithm.lower()}",
                    "tsg_id": root["id"],
                    "algorithm": algorithm,
                    "certificate_authority": "builtin",
                },
            )
            for algorithm in ALGORITHMS
        }

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.admin.post(path, json=body)
        if response.status_code != 201:
            raise BenchError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()  # type: ignore[no-any-return]

    def successes(self, key_id: str) -> int:
        report = self.admin.get("/api/v1/usage", params={"scope": "key"}).json()
        return sum(c["successes"] for c in report["counters"] if c["subject_id"] == key_id)


def start_agent(
    server: Server, world: World, workdir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    directory = workdir / "agent"
    directory.mkdir(mode=0o700)
    socket_path = directory / "agent.sock"
    env = {
        **server.env,
        "SIGNERY_HOME": str(workdir / "home"),
        "SIGNERY_SERVER": server.url,
        "SIGNERY_CLIENT_ID": world.client_id,
        "SIGNERY_KEY_FILE": str(world.key_file),
    }
    proc = subprocess.Popen(
        [server.signery, "agent", "--socket", str(socket_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "agent.log").open("wb"),
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"signery agent did not start:\n{(workdir / 'agent.log').read_text()}")
        time.sleep(0.05)
    return proc, socket_path


def this_process() -> p.ClientInfo:
    """The client info the agent would send for this process."""
    executable = os.readlink("/proc/self/exe")
    with open(executable, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    command = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return p.ClientInfo(
        machine=socket.gethostname(),
        tool=f"{Path(executable).name} via signery-agent",
        process=p.ClientProcess(
            pid=os.getpid(),
            executable=executable,
            executable_sha256=sha256,
            command_line=command[:1024],
            user=os.environ.get("USER", "root"),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="signatures per run (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    try:
        import pkcs11  # python-pkcs11 (signery[pkcs11])
    except ImportError:
        log("python-pkcs11 is not installed: pip install 'signery[pkcs11]'")
        return 1
    if not P11_KIT_CLIENT.exists():
        log(f"{P11_KIT_CLIENT} is missing: apt-get install p11-kit-modules")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="signery-agent-bench-"))
    server = Server(tmp, workers=1)
    agent: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {}
    try:
        admin_token = str(server.init()["admin_token"])
        server.start()
        world = World(server, admin_token, tmp)
        agent, socket_path = start_agent(server, world, tmp)
        os.environ["P11_KIT_SERVER_ADDRESS"] = f"unix:path={socket_path}"
        library = pkcs11.lib(str(P11_KIT_CLIENT))
        token = library.get_token(token_label="Signery")
        credentials = AccountCredentials.from_key_file(world.client_id, world.key_file)
        with Client(server.url, credentials=credentials) as client, token.open() as session:
            for algorithm, scheme in ALGORITHMS.items():
                key = world.keys[algorithm]
                private = session.get_key(
                    object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=key["name"]
                )
                mechanism = (
                    pkcs11.Mechanism.ECDSA if scheme is p.SignatureScheme.ECDSA
                    else pkcs11.Mechanism.SHA256_RSA_PKCS
                )  # fmt: skip
                digest = hashlib.sha256(b"bench").digest()
                # ECDSA takes the digest; SHA256_RSA_PKCS the data (hashed by the agent).
                data = digest if scheme is p.SignatureScheme.ECDSA else b"bench"
                hashed = Hashed(p.DigestAlgorithm.SHA256, digest)
                info = this_process()
                before = world.successes(key["id"])
                made = 0
                runs: dict[str, list[dict[str, float]]] = {"client": [], "agent": []}
                for _ in range(args.rounds):
                    own_cpu = time.process_time()  # this process only, not the server
                    runs["client"].append(
                        timed(
                            lambda k=key, s=scheme, h=hashed, i=info: client.sign(
                                k["id"], h, s, client_info=i
                            ),
                            args.count,
                        )
                    )
                    runs["client"][-1]["client_cpu_ms"] = (
                        (time.process_time() - own_cpu) * 1000 / args.count
                    )
                    agent_ticks = process_ticks(agent.pid)
                    runs["agent"].append(
                        timed(
                            lambda pk=private, m=mechanism, d=data: pk.sign(d, mechanism=m),
                            args.count,
                        )
                    )
                    runs["agent"][-1]["agent_cpu_ms"] = (
                        (process_ticks(agent.pid) - agent_ticks) / TICKS * 1000 / args.count
                    )
                    made += 2 * args.count
                after = world.successes(key["id"])
                if after - before != made:
                    raise BenchError(
                        f"{algorithm}: the usage counter grew by {after - before}, not {made}"
                    )
                results[algorithm] = {
                    side: {
                        name: statistics.median(r[name] for r in rs)
                        for name in (
                            "rate",
                            "p50_ms",
                            "p99_ms",
                            "mean_ms",
                            "client_cpu_ms",
                            "agent_cpu_ms",
                        )
                        if name in rs[0]
                    }
                    for side, rs in runs.items()
                }
                results[algorithm]["counter_check"] = f"+{after - before} == {made} signatures"
    except BenchError as e:
        log(f"BENCHMARK FAILED: {e}")
        return 1
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(20)
        server.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    OUT_FILE.parent.mkdir(exist_ok=True)
    OUT_FILE.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict[str, Any]) -> None:
    log("")
    log("algorithm  path                         sign/s   p50 ms   p99 ms   p50 overhead")
    for algorithm, r in results.items():
        base, agent = r["client"], r["agent"]
        overhead = agent["p50_ms"] / base["p50_ms"] - 1
        log(f"{algorithm:<10} signery.client.Client.sign  {base['rate']:7.0f}  "
            f"{base['p50_ms']:7.2f}  {base['p99_ms']:7.2f}            "
            f"(client cpu {base['client_cpu_ms']:.2f} ms/sig)")  # fmt: skip
        log(f"{'':<10} python-pkcs11 -> agent      {agent['rate']:7.0f}  "
            f"{agent['p50_ms']:7.2f}  {agent['p99_ms']:7.2f}   {overhead:+.1%}  "
            f"(agent cpu {agent['agent_cpu_ms']:.2f} ms/sig)")  # fmt: skip
        verdict = "met" if overhead < TARGET_OVERHEAD else "NOT met"
        log(f"{'':<10} target: agent adds < {TARGET_OVERHEAD:.0%} to p50: {verdict}; "
            f"usage counter {r['counter_check']}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
