"""PKCS#11 signing mechanisms, turned into what Signery signs: a digest and a scheme.

A tool hands the token either a digest it made (``CKM_RSA_PKCS`` with a
DigestInfo, ``CKM_RSA_PKCS_PSS``, ``CKM_ECDSA``) or the data itself
(``CKM_SHA256_RSA_PKCS``...), which the agent hashes here, on the build
machine: only the digest is sent. Whatever the tool sends is
checked before anything leaves: a DigestInfo naming another algorithm, a digest
of a length no SHA-2 has, PSS parameters the server would not honour. Each
refusal is a :class:`Pkcs11Error` with the return value the spec prescribes
and a line for the agent's log.

Offered are only the mechanisms p11-kit 0.24's client forwards: it refuses
every mechanism outside its list in the tool's own process (``CKM_ECDSA_SHA256``
and the hash-and-sign PSS mechanisms among them), so an EC key signs with
``CKM_ECDSA`` over a digest the tool made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signery import protocol as p
from signery.agent._pkcs11 import CKG, CKM, CKR, Pkcs11Error
from signery.crypto import Hashed

# RFC 8017 §9.2, note 1: the DER DigestInfo prefixes of the SHA-2 digests, and
# the same with the parameters absent instead of NULL (RFC 5754 §2 allows both).
_DIGEST_INFO: Final[Mapping[bytes, p.DigestAlgorithm]] = {
    bytes.fromhex("3031300d060960864801650304020105000420"): p.DigestAlgorithm.SHA256,
    bytes.fromhex("3041300d060960864801650304020205000430"): p.DigestAlgorithm.SHA384,
    bytes.fromhex("3051300d060960864801650304020305000440"): p.DigestAlgorithm.SHA512,
    bytes.fromhex("302f300b0609608648016503040201" + "0420"): p.DigestAlgorithm.SHA256,
    bytes.fromhex("303f300b0609608648016503040202" + "0430"): p.DigestAlgorithm.SHA384,
    bytes.fromhex("304f300b0609608648016503040203" + "0440"): p.DigestAlgorithm.SHA512,
}
_BY_LENGTH: Final = {d.size: d for d in p.DigestAlgorithm}
_HASH_MECHANISM: Final = {
    CKM.SHA256: p.DigestAlgorithm.SHA256,
    CKM.SHA384: p.DigestAlgorithm.SHA384,
    CKM.SHA512: p.DigestAlgorithm.SHA512,
}
_MGF: Final = {
    CKG.MGF1_SHA256: p.DigestAlgorithm.SHA256,
    CKG.MGF1_SHA384: p.DigestAlgorithm.SHA384,
    CKG.MGF1_SHA512: p.DigestAlgorithm.SHA512,
}
# Hash-and-sign mechanisms: the hash the agent computes.
_HASH_AND_SIGN: Final = {
    CKM.SHA256_RSA_PKCS: p.DigestAlgorithm.SHA256,
    CKM.SHA384_RSA_PKCS: p.DigestAlgorithm.SHA384,
    CKM.SHA512_RSA_PKCS: p.DigestAlgorithm.SHA512,
}
RSA_MECHANISMS: Final = (
    CKM.RSA_PKCS,
    CKM.RSA_PKCS_PSS,
    CKM.SHA256_RSA_PKCS,
    CKM.SHA384_RSA_PKCS,
    CKM.SHA512_RSA_PKCS,
)
EC_MECHANISMS: Final = (CKM.ECDSA,)
# Single-part mechanisms take a digest or a DigestInfo: a few dozen bytes. More
# than this through C_SignUpdate is a tool's mistake, refused before it grows.
RAW_INPUT_MAX: Final = 1024


@dataclass(frozen=True, slots=True)
class PssParams:
    """CK_RSA_PKCS_PSS_PARAMS as the tool sent them."""

    hash_alg: int
    mgf: int
    salt_length: int


def mechanisms_for(algorithm: p.Algorithm) -> tuple[CKM, ...]:
    return RSA_MECHANISMS if algorithm.is_rsa else EC_MECHANISMS


def signature_length(algorithm: p.Algorithm) -> int:
    """The length of the signature the token returns: the modulus for RSA, r‖s
    for ECDSA (PKCS#11 §2.3.1: each half as long as the curve order)."""
    return {
        p.Algorithm.RSA_2048: 256,
        p.Algorithm.RSA_3072: 384,
        p.Algorithm.RSA_4096: 512,
        p.Algorithm.EC_P256: 64,
        p.Algorithm.EC_P384: 96,
        p.Algorithm.EC_P521: 132,
    }[algorithm]


def key_bits(algorithm: p.Algorithm) -> int:
    return {
        p.Algorithm.RSA_2048: 2048,
        p.Algorithm.RSA_3072: 3072,
        p.Algorithm.RSA_4096: 4096,
        p.Algorithm.EC_P256: 256,
        p.Algorithm.EC_P384: 384,
        p.Algorithm.EC_P521: 521,
    }[algorithm]


@dataclass
class SignOperation:
    """One C_SignInit .. C_Sign/C_SignFinal: what the tool streams in, and what
    it becomes. ``hasher`` is set for the hash-and-sign mechanisms."""

    mechanism: CKM
    algorithm: p.Algorithm
    pss: PssParams | None = None
    hasher: hashlib._Hash | None = None
    buffered: bytearray = field(default_factory=bytearray)

    def update(self, data: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
            return
        if len(self.buffered) + len(data) > RAW_INPUT_MAX:
            raise Pkcs11Error(
                CKR.DATA_LEN_RANGE,
                f"{self.mechanism.name} takes a digest, not {len(self.buffered) + len(data)} bytes",
            )
        self.buffered += data

    def request(self) -> tuple[Hashed, p.SignatureScheme]:
        """The digest and scheme to send to the server, checked."""
        if self.hasher is not None:
            algorithm = _HASH_AND_SIGN[self.mechanism]
            return Hashed(algorithm, self.hasher.digest()), p.SignatureScheme.RSA_PKCS1V15
        data = bytes(self.buffered)
        if self.mechanism is CKM.RSA_PKCS:
            return _from_digest_info(data), p.SignatureScheme.RSA_PKCS1V15
        if self.mechanism is CKM.RSA_PKCS_PSS:
            assert self.pss is not None  # checked by start()
            wanted = _HASH_MECHANISM[CKM(self.pss.hash_alg)]
            if len(data) != wanted.size:
                raise Pkcs11Error(
                    CKR.DATA_LEN_RANGE,
                    f"CKM_RSA_PKCS_PSS with {wanted.value} takes a {wanted.size}-byte digest, "
                    f"not {len(data)} bytes",
                )
            return Hashed(wanted, data), p.SignatureScheme.RSA_PSS
        # CKM_ECDSA: the digest alone; its length says which SHA-2 made it.
        by_length = _BY_LENGTH.get(len(data))
        if by_length is None:
            raise Pkcs11Error(
                CKR.DATA_LEN_RANGE,
                f"CKM_ECDSA takes a SHA-256, SHA-384 or SHA-512 digest (32, 48 or 64 bytes), "
                f"not {len(data)} bytes",
            )
        return Hashed(by_length, data), p.SignatureScheme.ECDSA

    def result(self, signature: bytes) -> bytes:
        """The server's signature as PKCS#11 returns it: RSA as is, ECDSA from DER
        to the fixed-length r‖s."""
        if self.algorithm.is_rsa:
            return signature
        r, s = decode_dss_signature(signature)
        half = signature_length(self.algorithm) // 2
        return r.to_bytes(half, "big") + s.to_bytes(half, "big")


def start(mechanism: int, algorithm: p.Algorithm, pss: PssParams | None) -> SignOperation:
    """C_SignInit: the mechanism must fit the key, and PSS parameters must be the
    ones Signery signs with (MGF1 with the same hash, salt as long as the hash)."""
    try:
        known = CKM(mechanism)
    except ValueError:
        raise Pkcs11Error(
            CKR.MECHANISM_INVALID, f"mechanism 0x{mechanism:x} is not offered"
        ) from None
    if known not in mechanisms_for(algorithm):
        raise Pkcs11Error(
            CKR.KEY_TYPE_INCONSISTENT
            if known in RSA_MECHANISMS + EC_MECHANISMS
            else CKR.MECHANISM_INVALID,
            f"{known.name} does not sign with a {algorithm.value} key",
        )
    if known is CKM.RSA_PKCS_PSS:
        _check_pss(pss)
    hasher = hashlib.new(_HASH_AND_SIGN[known].value) if known in _HASH_AND_SIGN else None
    return SignOperation(known, algorithm, pss=pss, hasher=hasher)


def _check_pss(pss: PssParams | None) -> None:
    if pss is None:
        raise Pkcs11Error(CKR.MECHANISM_PARAM_INVALID, "CKM_RSA_PKCS_PSS needs its parameters")
    try:
        digest = _HASH_MECHANISM[CKM(pss.hash_alg)]
        mgf = _MGF[CKG(pss.mgf)]
    except (ValueError, KeyError):
        raise Pkcs11Error(
            CKR.MECHANISM_PARAM_INVALID,
            f"PSS with hash 0x{pss.hash_alg:x} and MGF 0x{pss.mgf:x}: only SHA-256/384/512 "
            "with MGF1 of the same hash are signed",
        ) from None
    if mgf is not digest or pss.salt_length != digest.size:
        raise Pkcs11Error(
            CKR.MECHANISM_PARAM_INVALID,
            f"PSS with {digest.value} signs with MGF1-{digest.value} and a {digest.size}-byte "
            f"salt; asked for MGF1-{mgf.value} and {pss.salt_length} bytes",
        )


def _from_digest_info(data: bytes) -> Hashed:
    for prefix, algorithm in _DIGEST_INFO.items():
        if data.startswith(prefix) and len(data) == len(prefix) + algorithm.size:
            return Hashed(algorithm, data[len(prefix) :])
    raise Pkcs11Error(
        CKR.DATA_INVALID,
        "CKM_RSA_PKCS takes a DER DigestInfo of SHA-256, SHA-384 or SHA-512; "
        f"got {len(data)} bytes starting {data[:19].hex()}",
    )
