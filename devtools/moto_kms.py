"""moto's server with its AWS KMS signing corrected to behave like real AWS KMS.

Run it as ``python -m devtools.moto_kms --host 127.0.0.1 --port 0``: it
prints one JSON line, ``{"url": "http://127.0.0.1:PORT"}``, once it answers, and
serves until SIGTERM or SIGINT. The test suite, the demo and the benchmark use it
as the AWS KMS endpoint of the ``aws-kms`` key store (``endpoint_url``).

Why a wrapper: moto 5.2.5 signs differently from AWS KMS, and its own ``Verify``
agrees with its own wrong signatures, so a test that only asks moto passes while
every external verifier rejects the signature (ECOSYSTEM-FACTS.md, "AWS KMS and
moto"; open upstream PR getmoto/moto#10202). Before the server starts, this module
patches moto's KMS classes in this process only; nothing of moto is copied.
Corrected, each as the AWS KMS API reference describes it (``Sign``, ``Verify``):

(a) ``MessageType=DIGEST``: the message is an already computed digest and is
    signed (and verified) as such, with cryptography's ``Prehashed``. moto 5.2.5
    ignores ``MessageType`` and hashes the digest a second time.
(b) With ``MessageType=DIGEST`` a message whose length is not the digest size of
    the signing algorithm's hash is refused with ``ValidationException``, as KMS
    does; moto signs whatever it gets. ``MessageType`` other than RAW or DIGEST is
    refused too.
(c) RSASSA-PSS uses a salt as long as the digest, like KMS (RFC 8017 §9.1: the
    usual choice; what verifiers assume); moto uses the maximum salt length.
(d) ECC_NIST_P384 signs only with ECDSA_SHA_384 and ECC_NIST_P521 only with
    ECDSA_SHA_512. moto 5.2.5 already enforces this (``Key.signing_algorithms``);
    the patched signing keeps moto's check and the tests pin it.
(e) ``Sign``, ``Verify``, ``GetPublicKey``, ``Encrypt`` and ``Decrypt`` (the
    latter two wrap Signery's master key) on a key that is not enabled are
    refused as KMS refuses them (developer guide, "Key states of AWS KMS keys"):
    ``DisabledException`` for a disabled key, ``KMSInvalidStateException`` for a
    key pending deletion. moto 5.2.5 signs with disabled and doomed keys alike,
    which would hide exactly the refusals a key store must translate.

Left as moto does it, on purpose: ``GetPublicKey`` without ``KeySpec`` (only the
older ``CustomerMasterKeySpec``), which the key store must handle anyway, and
RAW messages (hashed, then signed), which Signery never sends.

This is a test double, not a KMS: keys live in memory, unencrypted, and anyone
who reaches the port can use them. It listens on loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

if TYPE_CHECKING:
    from moto.kms.models import Key
    from moto.kms.responses import KmsResponse
    from moto.kms.utils import ECDSAPrivateKey, RSAPrivateKey
    from moto.server import ThreadedMotoServer

__all__ = ["MotoKmsServer", "MotoNotInstalled", "apply_kms_corrections", "main", "start_server"]

MOTO_INSTALL_HINT = "moto is not installed: pip install 'moto[server]>=5' (or 'signery[dev]')"
MESSAGE_TYPES = ("RAW", "DIGEST")
# How often --exit-with-parent looks whether the process that started us is gone.
PARENT_POLL_SECONDS = 1.0

log = logging.getLogger("devtools.moto_kms")

# The MessageType of the request being served. moto's KmsResponse reads it but
# never hands it to the backend; the patched key classes read it from here.
# Each request runs in its own thread of the threaded server, so one request's
# value never leaks into another's.
_MESSAGE_TYPE: ContextVar[str] = ContextVar("signery_moto_kms_message_type", default="RAW")

# The hash inside each KMS signing algorithm (AWS KMS API reference, Sign:
# SigningAlgorithm). SM2DSA is not offered: Signery does not use it.
_HASH_OF_ALGORITHM: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "RSASSA_PSS_SHA_256": hashes.SHA256,
    "RSASSA_PSS_SHA_384": hashes.SHA384,
    "RSASSA_PSS_SHA_512": hashes.SHA512,
    "RSASSA_PKCS1_V1_5_SHA_256": hashes.SHA256,
    "RSASSA_PKCS1_V1_5_SHA_384": hashes.SHA384,
    "RSASSA_PKCS1_V1_5_SHA_512": hashes.SHA512,
    "ECDSA_SHA_256": hashes.SHA256,
    "ECDSA_SHA_384": hashes.SHA384,
    "ECDSA_SHA_512": hashes.SHA512,
}

_Handler = TypeVar("_Handler", bound=Callable[..., str])
_applied = False
_apply_lock = threading.Lock()


class MotoNotInstalled(RuntimeError):
    """moto (with its server extra) is needed for this development tool."""


def apply_kms_corrections() -> None:
    """Patch moto's KMS classes in this process (idempotent). See the module docstring.

    Only call this in a process that exists to run the test double: it changes
    moto for everything else in the process too.
    """
    global _applied
    with _apply_lock:
        if _applied:
            return
        try:
            from moto.core.exceptions import JsonRESTError
            from moto.kms import responses as kms_responses
            from moto.kms import utils as kms_utils
            from moto.kms.exceptions import ValidationException
        except ImportError as e:
            raise MotoNotInstalled(MOTO_INSTALL_HINT) from e

        def hash_of(signing_algorithm: str) -> hashes.HashAlgorithm:
            factory = _HASH_OF_ALGORITHM.get(signing_algorithm)
            if factory is None:
                raise ValidationException(
                    f"1 validation error detected: Value '{signing_algorithm[:64]}' at "
                    "'SigningAlgorithm' failed to satisfy constraint: Member must satisfy "
                    f"enum value set: {sorted(_HASH_OF_ALGORITHM)}"
                )
            return factory()

        def prepared(
            message: bytes, signing_algorithm: str
        ) -> tuple[hashes.HashAlgorithm, hashes.HashAlgorithm | utils.Prehashed]:
            """The hash of the algorithm, and what cryptography signs the message with."""
            algorithm = hash_of(signing_algorithm)
            if _MESSAGE_TYPE.get() != "DIGEST":
                return algorithm, algorithm
            # (b) AWS KMS API reference, Sign: "When the value of MessageType is
            # DIGEST, the length of the Message value must match the length of
            # hashed messages for the specified signing algorithm."
            if len(message) != algorithm.digest_size:
                raise ValidationException(
                    f"Digest is invalid length for algorithm {signing_algorithm}: "
                    f"expected {algorithm.digest_size} bytes, got {len(message)}."
                )
            # (a) the digest is signed as it is, not hashed again.
            return algorithm, utils.Prehashed(algorithm)

        def rsa_pad(
            signing_algorithm: str, algorithm: hashes.HashAlgorithm
        ) -> padding.AsymmetricPadding:
            if signing_algorithm.startswith("RSASSA_PSS_"):
                # (c) KMS RSASSA_PSS_*: MGF1 with the same hash, salt length = digest length.
                return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            return padding.PKCS1v15()

        def rsa_sign(self: RSAPrivateKey, message: bytes, signing_algorithm: str) -> bytes:
            kms_utils.validate_signing_algorithm(
                signing_algorithm, kms_utils.SigningAlgorithm.rsa_signing_algorithms()
            )
            algorithm, hash_arg = prepared(message, signing_algorithm)
            return self.private_key.sign(message, rsa_pad(signing_algorithm, algorithm), hash_arg)

        def rsa_verify(
            self: RSAPrivateKey, message: bytes, signature: bytes, signing_algorithm: str
        ) -> bool:
            kms_utils.validate_signing_algorithm(
                signing_algorithm, kms_utils.SigningAlgorithm.rsa_signing_algorithms()
            )
            algorithm, hash_arg = prepared(message, signing_algorithm)
            try:
                self.private_key.public_key().verify(
                    signature, message, rsa_pad(signing_algorithm, algorithm), hash_arg
                )
            except InvalidSignature:
                return False
            return True

        def ecdsa_sign(self: ECDSAPrivateKey, message: bytes, signing_algorithm: str) -> bytes:
            # (d) moto's own curve/hash pairing check, kept as it is.
            kms_utils.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
            _, hash_arg = prepared(message, signing_algorithm)
            return self.private_key.sign(message, ec.ECDSA(hash_arg))

        def ecdsa_verify(
            self: ECDSAPrivateKey, message: bytes, signature: bytes, signing_algorithm: str
        ) -> bool:
            kms_utils.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
            _, hash_arg = prepared(message, signing_algorithm)
            try:
                self.private_key.public_key().verify(signature, message, ec.ECDSA(hash_arg))
            except InvalidSignature:
                return False
            return True

        def require_enabled(key: Key) -> None:
            # (e) Key states of AWS KMS keys: Sign, Verify and GetPublicKey fail on a
            # disabled key (DisabledException) and on a key pending deletion
            # (KMSInvalidStateException). Messages as KMS words them.
            if key.key_state == "Disabled":
                raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
            if key.key_state != "Enabled":
                raise JsonRESTError(
                    "KMSInvalidStateException",
                    f"{key.arn} is pending deletion."
                    if key.key_state == "PendingDeletion"
                    else f"{key.arn} is {key.key_state}.",
                )

        def enabled_key_only(handler: _Handler, *, reads_message_type: bool) -> _Handler:
            @functools.wraps(handler)
            def checked(self: KmsResponse) -> str:
                key_id = self._get_param("KeyId")
                if key_id is not None:  # Decrypt may leave KeyId out
                    self._validate_key_id(key_id)  # moto's NotFoundException, unchanged
                    require_enabled(self.kms_backend.describe_key(key_id))
                if not reads_message_type:
                    return handler(self)
                message_type = self._get_param("MessageType") or "RAW"
                if message_type not in MESSAGE_TYPES:
                    raise ValidationException(
                        f"1 validation error detected: Value '{str(message_type)[:32]}' at "
                        "'MessageType' failed to satisfy constraint: Member must satisfy "
                        f"enum value set: {list(MESSAGE_TYPES)}"
                    )
                token = _MESSAGE_TYPE.set(message_type)
                try:
                    return handler(self)
                finally:
                    _MESSAGE_TYPE.reset(token)

            return cast(_Handler, checked)

        response = kms_responses.KmsResponse
        response.sign = enabled_key_only(response.sign, reads_message_type=True)  # type: ignore[method-assign]
        response.verify = enabled_key_only(response.verify, reads_message_type=True)  # type: ignore[method-assign]
        response.get_public_key = enabled_key_only(  # type: ignore[method-assign]
            response.get_public_key, reads_message_type=False
        )
        response.encrypt = enabled_key_only(response.encrypt, reads_message_type=False)  # type: ignore[method-assign]
        response.decrypt = enabled_key_only(response.decrypt, reads_message_type=False)  # type: ignore[method-assign]
        kms_utils.RSAPrivateKey.sign = rsa_sign  # type: ignore[method-assign]
        kms_utils.RSAPrivateKey.verify = rsa_verify  # type: ignore[method-assign]
        kms_utils.ECDSAPrivateKey.sign = ecdsa_sign  # type: ignore[method-assign]
        kms_utils.ECDSAPrivateKey.verify = ecdsa_verify  # type: ignore[method-assign]
        _applied = True


@dataclass
class MotoKmsServer:
    """A corrected moto server running in a thread of this process."""

    url: str
    _server: ThreadedMotoServer

    def stop(self) -> None:
        self._server.stop()


def start_server(host: str = "127.0.0.1", port: int = 0) -> MotoKmsServer:
    """Apply the corrections and start moto's threaded server; port 0 picks a free port."""
    apply_kms_corrections()
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise MotoNotInstalled(MOTO_INSTALL_HINT) from e
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return MotoKmsServer(f"http://{shown}:{bound_port}", server)


def _watch_parent(stop: threading.Event) -> None:
    """Stop when the process that started us is gone (no orphan after a killed test run)."""
    parent = os.getppid()
    while not stop.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:
            stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.moto_kms",
        description="moto's server with AWS KMS signing corrected (test double; see the "
        "module documentation).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one exits",
    )
    args = parser.parse_args(argv)
    # werkzeug logs each request at INFO; quiet unless asked (the bench drives it hard).
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        server = start_server(args.host, args.port)
    except MotoNotInstalled as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(stop,), daemon=True).start()
    # One line on stdout once the server answers: callers read the URL from it
    # (with --port 0 there is no port race).
    print(json.dumps({"url": server.url}), flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
