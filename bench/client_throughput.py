"""The client side of signing: hashing speed, memory, Authenticode, many files.

What is measured (each against a baseline measured in the same run)
--------------------------------------------------------------------
1. **Hashing**: SHA-256 of a 1 GiB file by ``signery.crypto.hash_file`` (what
   every format uses) next to ``sha256sum`` on the same file, best of 3 each, the
   file in the page cache (read once before). Target: 90 % of sha256sum or more.
   ``signery sign --digest-only`` (the whole CLI: start-up, hashing, output) is
   shown beside it.
2. **Memory**: peak RSS (``ru_maxrss`` of the child, from ``wait4``) of ``signery
   sign --format raw`` on a 10 MiB and on a 1 GiB file, through a real server.
   Target: the same within 20 MiB (hashing streams; nothing grows with the file).
3. **Authenticode**: the time to sign a 100 MiB PE32+ through the service
   (``signery sign --format authenticode``, RSA-3072 key in the built-in store)
   next to ``osslsigncode sign`` with a local RSA-3072 key file on the same file.
   Target: within 1.5x. Both outputs are checked with ``osslsigncode verify``.
4. **Many files**: files/s for ``signery sign`` of 1,000 small files in one
   command (one access token, bounded concurrency), with the key's usage counter
   checked to have grown by exactly 1,000.

Usage: ``.venv/bin/python bench/client_throughput.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from _common import ROOT, BenchError, Server, log
from signery.crypto import hash_file
from signery.protocol import DigestAlgorithm

OUT_FILE = ROOT / "bench-out" / "client_throughput.json"
MIB = 1024 * 1024
HASH_TARGET = 0.90
RSS_TARGET_MIB = 20.0
AUTHENTICODE_TARGET = 1.5


def best_of(runs: int, op: Callable[[], object]) -> float:
    """The fastest of ``runs`` wall-clock timings of ``op`` (seconds)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        op()
        times.append(time.perf_counter() - started)
    return min(times)


def write_file(path: Path, size: int) -> Path:
    """``size`` bytes of incompressible data (a random MiB repeated)."""
    block = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
        f.write(block[: size % MIB])
    return path


def run(args: list[str], env: dict[str, str], *, check: bool = True) -> tuple[float, int, str]:
    """Run a command: (wall seconds, peak RSS in KiB of the child, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(args[:4])}... exited {proc.returncode}:\n{err.decode()}")
    return seconds, usage.ru_maxrss, out.decode()


class Client:
    """A build machine: a profile logged in as a built-in account."""

    def __init__(self, server: Server, admin_token: str, workdir: Path) -> None:
        self.server = server
        self.signery = server.signery
        self.env = {**server.env, "SIGNERY_HOME": str(workdir / "home"), "NO_COLOR": "1"}
        self.admin = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60
        )
        tsgs = self.admin.get("/api/v1/tsgs").json()
        root = next(t for t in (tsgs.get("tsgs", tsgs) if isinstance(tsgs, dict) else tsgs))
        self.tsg = root["id"]
        account = self._post("/api/v1/accounts", {"tsg_id": self.tsg, "name": "bench-client"})
        key_file = workdir / "account.pem"
        key_file.write_text(account["private_key_pem"])
        key_file.chmod(0o600)
        self.keys: dict[str, str] = {}
        run(
            [self.signery, "login", "--server", server.url, "--client-id", account["client_id"],
             "--key-file", str(key_file), "--json"],
            self.env,
        )  # fmt: skip

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.admin.post(path, json=body)
        if response.status_code != 201:
            raise BenchError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()  # type: ignore[no-any-return]

    def key(self, algorithm: str) -> str:
        """A key of ``algorithm`` with a built-in CA certificate; its name."""
        if algorithm not in self.keys:
            name = f"bench-{algorithm.lower().replace('_', '-')}"
            created = self._post(
                "/api/v1/keys",
                {"name": name, "tsg_id": self.tsg, "algorithm": algorithm,
                 "certificate_authority": "builtin"},
            )  # fmt: skip
            self.keys[algorithm] = created["id"]
        return f"bench-{algorithm.lower().replace('_', '-')}"

    def successes(self, algorithm: str) -> int:
        report = self.admin.get("/api/v1/usage", params={"scope": "key"}).json()
        key_id = self.keys[algorithm]
        return sum(c["successes"] for c in report["counters"] if c["subject_id"] == key_id)

    def sign(self, *args: str) -> tuple[float, int, str]:
        return run([self.signery, "sign", *args], self.env)


# ---------------------------------------------------------------- the measurements


def bench_hashing(workdir: Path, client: Client, size: int) -> dict[str, Any]:
    big = write_file(workdir / "big.bin", size)
    hash_file(big, DigestAlgorithm.SHA256)  # into the page cache
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        raise BenchError("sha256sum is not installed")
    baseline = best_of(3, lambda: subprocess.run([sha256sum, str(big)], check=True,
                                                 capture_output=True))  # fmt: skip
    ours = best_of(3, lambda: hash_file(big, DigestAlgorithm.SHA256))
    cli = min(client.sign("--key", "x", "--digest-only", str(big))[0] for _ in range(3))
    return {
        "file_bytes": size,
        "sha256sum_mib_s": size / MIB / baseline,
        "hash_file_mib_s": size / MIB / ours,
        "ratio": baseline / ours,
        "cli_digest_only_mib_s": size / MIB / cli,
        "cli_ratio": baseline / cli,
    }


def bench_memory(workdir: Path, client: Client, big_size: int) -> dict[str, Any]:
    key = client.key("EC_P256")
    small = write_file(workdir / "small.bin", 10 * MIB)
    big = workdir / "big.bin"
    if not big.exists() or big.stat().st_size != big_size:
        write_file(big, big_size)
    rss = {}
    for name, path in (("10 MiB", small), (f"{big_size // MIB} MiB", big)):
        peaks = [
            client.sign("--key", key, "--format", "raw", "-o", str(workdir / "out.sig"),
                        str(path))[1]
            for _ in range(2)
        ]  # fmt: skip
        rss[name] = max(peaks) / 1024  # KiB -> MiB
    values = list(rss.values())
    return {"peak_rss_mib": rss, "difference_mib": values[1] - values[0]}


def bench_many_files(workdir: Path, client: Client, count: int) -> dict[str, Any]:
    key = client.key("EC_P256")
    folder = workdir / "many"
    folder.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"f{i:05d}.txt"
        path.write_bytes(f"artifact {i}\n".encode() * 64)
        files.append(str(path))
    before = client.successes("EC_P256")
    seconds, _, out = client.sign("--key", key, "--format", "raw", "--json", *files)
    results = json.loads(out)
    signed = sum(1 for r in results if r.get("ok", True) and Path(r["file"] + ".sig").exists())
    grown = client.successes("EC_P256") - before
    if signed != count or grown != count:
        raise BenchError(f"{signed} signatures written and {grown} counted for {count} files")
    return {"files": count, "seconds": seconds, "files_per_s": count / seconds}


def bench_authenticode(workdir: Path, client: Client, size: int) -> dict[str, Any]:
    from signery.formats import FORMATS

    if "authenticode" not in FORMATS:
        return {"skipped": "the authenticode format is not available"}
    osslsigncode = shutil.which("osslsigncode")
    openssl = shutil.which("openssl")
    if osslsigncode is None or openssl is None:
        return {"skipped": "osslsigncode or openssl is not installed"}
    from devtools.pe import build_pe

    key = client.key("RSA_3072")
    pe = workdir / "big.exe"
    # A PE32+ whose .text section is ``size`` bytes of incompressible data.
    pe.write_bytes(build_pe(pe32_plus=True, text=b"\xc3" + os.urandom(size - 1)))
    local_key, local_cert = workdir / "local.key", workdir / "local.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", str(local_key),
         "-out", str(local_cert), "-subj", "/CN=bench", "-days", "2",
         "-addext", "extendedKeyUsage=codeSigning"],
        check=True, capture_output=True,
    )  # fmt: skip
    ours_out, theirs_out = workdir / "ours.exe", workdir / "theirs.exe"

    def osslsigncode_sign() -> None:
        theirs_out.unlink(missing_ok=True)
        subprocess.run(
            [osslsigncode, "sign", "-certs", str(local_cert), "-key", str(local_key),
             "-h", "sha256", "-in", str(pe), "-out", str(theirs_out)],
            check=True, capture_output=True,
        )  # fmt: skip

    theirs = statistics.median(best_of(1, osslsigncode_sign) for _ in range(3))
    ours = statistics.median(
        client.sign("--key", key, "--format", "authenticode", "-o", str(ours_out), str(pe))[0]
        for _ in range(3)
    )
    chain = workdir / "chain.pem"
    chain.write_text(
        "".join(client.admin.get(f"/api/v1/keys/{client.keys['RSA_3072']}").json()[
            "certificate_chain"])
    )  # fmt: skip
    for signed, ca in ((ours_out, chain), (theirs_out, local_cert)):
        done = subprocess.run(
            [osslsigncode, "verify", "-CAfile", str(ca), "-in", str(signed)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"osslsigncode verify {signed.name} failed:\n{done.stdout}")
    return {
        "file_bytes": pe.stat().st_size,
        "signery_s": ours,
        "osslsigncode_s": theirs,
        "ratio": ours / theirs,
    }


# ---------------------------------------------------------------- report


def report(results: dict[str, Any]) -> None:
    log("")
    h = results["hashing"]
    met = "met" if h["ratio"] >= HASH_TARGET else "NOT MET"
    log(f"hashing {h['file_bytes'] // MIB} MiB (SHA-256, page cache):")
    log(f"  sha256sum          {h['sha256sum_mib_s']:8,.0f} MiB/s")
    log(f"  signery hash_file  {h['hash_file_mib_s']:8,.0f} MiB/s  = {h['ratio']:.0%} "
        f"of sha256sum (target >= {HASH_TARGET:.0%}: {met})")  # fmt: skip
    log(f"  signery sign --digest-only (whole CLI) {h['cli_digest_only_mib_s']:,.0f} MiB/s "
        f"= {h['cli_ratio']:.0%}")  # fmt: skip
    m = results["memory"]
    met = "met" if abs(m["difference_mib"]) <= RSS_TARGET_MIB else "NOT MET"
    log("peak RSS of `signery sign --format raw`:")
    for name, mib in m["peak_rss_mib"].items():
        log(f"  {name:>10}  {mib:7.1f} MiB")
    log(f"  difference  {m['difference_mib']:7.1f} MiB (target <= {RSS_TARGET_MIB:.0f}: {met})")
    a = results["authenticode"]
    if "skipped" in a:
        log(f"authenticode: skipped ({a['skipped']})")
    else:
        met = "met" if a["ratio"] <= AUTHENTICODE_TARGET else "NOT MET"
        log(f"authenticode, {a['file_bytes'] // MIB} MiB PE32+, RSA-3072, median of 3:")
        log(f"  osslsigncode sign (local key)      {a['osslsigncode_s']:6.2f} s")
        log(f"  signery sign (through the service) {a['signery_s']:6.2f} s = {a['ratio']:.2f}x "
            f"(target <= {AUTHENTICODE_TARGET}x: {met})")  # fmt: skip
    f = results["many_files"]
    log(f"{f['files']:,} small files in one `signery sign`: {f['seconds']:.1f} s = "
        f"{f['files_per_s']:,.0f} files/s (usage counter +{f['files']:,})")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the large file")
    ap.add_argument("--pe-mib", type=int, default=100, help="size of the PE to sign")
    ap.add_argument("--files", type=int, default=1000, help="number of small files")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="signery-client-bench-"))
    server = Server(tmp, args.workers)
    try:
        admin_token = str(server.init()["admin_token"])
        server.start()
        client = Client(server, admin_token, tmp)
        results: dict[str, Any] = {}
        log(f"hashing a {args.big_mib} MiB file ...")
        results["hashing"] = bench_hashing(tmp, client, args.big_mib * MIB)
        log("peak RSS of signery sign on 10 MiB and the large file ...")
        results["memory"] = bench_memory(tmp, client, args.big_mib * MIB)
        (tmp / "big.bin").unlink(missing_ok=True)
        log(f"authenticode on a {args.pe_mib} MiB PE ...")
        results["authenticode"] = bench_authenticode(tmp, client, args.pe_mib * MIB)
        log(f"signing {args.files} small files in one command ...")
        results["many_files"] = bench_many_files(tmp, client, args.files)
    except BenchError as e:
        log(f"BENCHMARK FAILED: {e}")
        return 1
    finally:
        server.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    OUT_FILE.parent.mkdir(exist_ok=True)
    OUT_FILE.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {OUT_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
