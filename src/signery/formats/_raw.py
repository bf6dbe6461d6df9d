"""``raw``: the bare signature bytes of the file's digest (``FILE.sig``).

RSA signatures are the RFC 8017 signature octets; ECDSA signatures are DER
(``Ecdsa-Sig-Value``, RFC 3279 §2.2.3), the form ``openssl dgst -verify`` reads.
"""

from __future__ import annotations

from pathlib import Path

from signery.crypto import (
    Hashed,
    PublicKey,
    algorithm_of_public_key,
    default_digest,
    default_scheme,
    hash_file,
    verify_signature,
)
from signery.errors import ClientError
from signery.formats._base import Signer, SignOptions, SignResult, VerifyResult, write_atomically
from signery.protocol import DigestAlgorithm

MAX_SIGNATURE_BYTES = 1024  # RSA-4096 = 512 bytes, P-521 DER <= 139 bytes


class RawFormat:
    name = "raw"

    def default_output(self, file: Path, options: SignOptions) -> Path:
        return file.with_name(file.name + ".sig")

    def sign(self, signer: Signer, file: Path, output: Path, options: SignOptions) -> SignResult:
        digest_algorithm = options.digest_algorithm or signer.default_digest
        scheme = options.scheme or signer.default_scheme
        hashed = hash_file(file, digest_algorithm, options.on_chunk)
        options.check_interrupted()
        response = signer.sign_detailed(hashed, scheme)
        write_atomically(output, response.signature, before_commit=options.check_interrupted)
        return SignResult(
            file=file,
            output=output,
            digest_algorithm=digest_algorithm,
            digest=hashed.hex,
            key_name=signer.key_name,
            key_version=response.key_version,
            scheme=scheme,
        )

    def verify(
        self, file: Path, signature: Path, public_keys: list[PublicKey], options: SignOptions
    ) -> VerifyResult:
        try:
            sig = signature.read_bytes()
        except OSError as e:
            raise ClientError(f"cannot read signature {signature}: {e.strerror}") from None
        if not sig or len(sig) > MAX_SIGNATURE_BYTES:
            return VerifyResult(file, signature, False, "not a raw signature (empty or too long)")
        digests: dict[DigestAlgorithm, Hashed] = {}
        for index, key in enumerate(public_keys):
            algorithm = algorithm_of_public_key(key)
            digest_algorithm = options.digest_algorithm or default_digest(algorithm)
            scheme = options.scheme or default_scheme(algorithm)
            if digest_algorithm not in digests:
                digests[digest_algorithm] = hash_file(file, digest_algorithm, options.on_chunk)
            hashed = digests[digest_algorithm]
            if verify_signature(key, hashed, scheme, sig):
                return VerifyResult(
                    file,
                    signature,
                    True,
                    f"valid ({scheme.value}, {digest_algorithm.value}, key #{index + 1})",
                )
        return VerifyResult(file, signature, False, "signature does not verify with the key")
