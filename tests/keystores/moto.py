"""A corrected moto KMS server for the tests (devtools.moto_kms).

One server process per test session, started on first use on a free loopback
port it picks itself (``--port 0``; the URL is read from its announcement, so no
port race), and stopped when the session ends. ``--exit-with-parent`` stops it
even if the test run is killed. Without moto, tests.support.missing() skips (or
fails in CI).

Clients here use dummy credentials given explicitly; the server processes of the
end-to-end tests get them from the environment (AWS_TEST_ENV), the standard chain.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signery.keystores import BACKENDS, KeyStore
from tests.support import missing

REPOSITORY = Path(__file__).resolve().parents[2]

REGION = "us-east-1"
DUMMY_ACCESS_KEY_ID = "AKIDSIGNERYTESTING"
DUMMY_SECRET = "signery-test-secret-never-in-messages"
# For processes that find credentials through the standard AWS chain. The files
# point nowhere and instance metadata is off, so a developer's own AWS
# configuration is never read.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/signery-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/signery-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
START_TIMEOUT = 60.0


@dataclass
class MotoKms:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> Any:
        """A boto3 KMS client on this server, for reading back what a store did."""
        import boto3

        return boto3.client(
            "kms",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=DUMMY_ACCESS_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.log.parent, ignore_errors=True)


def moto_available() -> bool:
    return (
        importlib.util.find_spec("moto") is not None
        and importlib.util.find_spec("moto.server") is not None
        and importlib.util.find_spec("boto3") is not None
    )


def _start() -> MotoKms:
    if not moto_available():
        missing("moto server")
    log = Path(tempfile.mkdtemp(prefix="signery-moto-")) / "moto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtools.moto_kms",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--exit-with-parent",
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env={**_base_env(), **AWS_TEST_ENV},
            cwd=REPOSITORY,  # `-m devtools.moto_kms`: the repository's devtools/
        )
    assert process.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(START_TIMEOUT)
    if not lines or not lines[0]:
        process.kill()
        process.wait(5)
        raise RuntimeError(f"moto did not start:\n{log.read_text(errors='replace')[-3000:]}")
    server = MotoKms(str(json.loads(lines[0])["url"]), process, log)
    _wait_until_it_answers(server)
    return server


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIGNERY_"))}


def _wait_until_it_answers(server: MotoKms) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + START_TIMEOUT
    kms = server.client()
    while True:
        try:
            kms.list_keys(Limit=1)
            return
        except (BotoCoreError, ClientError):
            if server.process.poll() is not None or time.monotonic() > deadline:
                tail = server.log.read_text(errors="replace")[-3000:]
                server.stop()
                raise RuntimeError(f"moto does not answer:\n{tail}") from None
            time.sleep(0.1)


_shared: MotoKms | None = None
_shared_lock = threading.Lock()


def moto_kms() -> MotoKms:
    """The session's server: started on first use, stopped when the session ends."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.process.poll() is not None:
            _shared = _start()
            atexit.register(_shared.stop)
        return _shared


def kms_settings(url: str, **overrides: Any) -> Any:
    """AwsKmsSettings for a store on ``url`` with the dummy credentials."""
    from signery.keystores import AwsKmsSettings

    values: dict[str, Any] = {
        "region": REGION,
        "endpoint_url": url,
        "access_key_id": DUMMY_ACCESS_KEY_ID,
        "secret_access_key": DUMMY_SECRET,
        "alias_prefix": "alias/signery-test",
    }
    values.update(overrides)
    return AwsKmsSettings(**values)


@contextlib.contextmanager
def aws_kms_store(tmp: Path) -> Iterator[KeyStore]:
    """The conformance factory: an aws-kms store on the session's moto server."""
    server = moto_kms()
    store = BACKENDS["aws-kms"].open_store(kms_settings(server.url))
    try:
        yield store
    finally:
        store.close()
