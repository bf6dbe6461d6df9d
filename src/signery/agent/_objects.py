"""The token's objects: what a PKCS#11 tool finds for each key the account may use.

Per key, three objects share one ``CKA_ID`` (the key id's 16 bytes) and
``CKA_LABEL`` (the key name): the private key (sign only, sensitive, never
extractable: it holds no key material, only the name the server knows it by),
its public key, and its leaf certificate when it has one (SunPKCS11 ignores a
private key without a certificate of the same id). The certificates of the
chain above the leaf follow as authority certificates, once each however many
keys they certify.

Handles are numbers the agent hands out once and never reuses: a key that is
rotated gets new objects (its public key changed), and a tool holding the old
handle is told the object is gone, never signed for with a key it did not read.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from asn1crypto import core  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signery import protocol as p
from signery.agent._pkcs11 import (
    CK_CERTIFICATE_CATEGORY_AUTHORITY,
    CK_CERTIFICATE_CATEGORY_TOKEN_USER,
    CKA,
    CKC_X_509,
    CKK,
    CKO,
)

AttributeValue = bool | int | bytes | tuple[int, ...]
"""A CK_BBOOL, a CK_ULONG, a byte array, or a mechanism list (as a tool may send
CKA_ALLOWED_MECHANISMS in a template; the token's objects carry none)."""

# What no tool may read from a private key object: refused with
# CKR_ATTRIBUTE_SENSITIVE (the agent has none of it anyway).
SENSITIVE: Final = frozenset({0x123, 0x124, 0x125, 0x126, 0x127, 0x128, CKA.VALUE})

_SHA256: Final = hashes.SHA256()
_CURVES: Final = {
    p.Algorithm.EC_P256: "1.2.840.10045.3.1.7",
    p.Algorithm.EC_P384: "1.3.132.0.34",
    p.Algorithm.EC_P521: "1.3.132.0.35",
}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A key as the token signs with it: the version whose public key and
    certificate the tool read."""

    id: str
    name: str
    version: int
    algorithm: p.Algorithm


@dataclass(frozen=True, slots=True)
class TokenObject:
    handle: int
    attributes: Mapping[int, AttributeValue]
    key: KeyEntry | None = None  # set on private keys: what signs

    @property
    def object_class(self) -> int:
        value = self.attributes[CKA.CLASS]
        assert isinstance(value, int)
        return value

    def matches(self, template: Mapping[int, AttributeValue | None]) -> bool:
        """Every template attribute has this value here; one sent without a
        value (validity 0) matches no object."""
        return all(
            value is not None and self.attributes.get(kind) == value
            for kind, value in template.items()
        )


class HandleBook:
    """Object handles, handed out once per distinct object and never reused."""

    def __init__(self) -> None:
        self._handles: dict[tuple[str, ...], int] = {}

    def handle(self, *identity: str) -> int:
        found = self._handles.get(identity)
        if found is None:
            found = self._handles[identity] = len(self._handles) + 1
        return found


def token_objects(keys: Iterable[p.SigningKeySummary], book: HandleBook) -> list[TokenObject]:
    """The objects of the usable ``keys``, in a stable order: each key's private
    key, public key and leaf, then the authority certificates."""
    objects: list[TokenObject] = []
    authorities: dict[bytes, x509.Certificate] = {}
    for summary in keys:
        if not summary.usable:
            continue
        public = serialization.load_pem_public_key(summary.public_key_pem.encode())
        chain = [x509.load_pem_x509_certificate(c.encode()) for c in summary.certificate_chain]
        leaf = chain[0] if chain and chain[0].public_key() == public else None
        objects.extend(_key_objects(summary, public, leaf, book))
        for ca in chain[1:] if leaf is not None else []:
            authorities.setdefault(ca.fingerprint(_SHA256), ca)
    for fingerprint, ca in authorities.items():
        objects.append(
            TokenObject(
                book.handle("ca", fingerprint.hex()),
                _certificate_attributes(
                    ca,
                    label=_common_name(ca) or "CA",
                    object_id=hashlib.sha1(_spki(ca.public_key())).digest(),  # noqa: S324 (an id)
                    category=CK_CERTIFICATE_CATEGORY_AUTHORITY,
                ),
            )
        )
    return objects


def _key_objects(
    summary: p.SigningKeySummary,
    public: object,
    leaf: x509.Certificate | None,
    book: HandleBook,
) -> list[TokenObject]:
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return []  # not a key type the token knows; the server makes none
    spki = _spki(public)
    version = hashlib.sha256(spki).hexdigest()
    entry = KeyEntry(summary.id, summary.name, summary.current_version, summary.algorithm)
    object_id = uuid.UUID(summary.id).bytes
    label = summary.name.encode()
    subject = leaf.subject.public_bytes() if leaf is not None else b""
    common: dict[int, AttributeValue] = {
        CKA.TOKEN: True,
        CKA.PRIVATE: False,
        CKA.LABEL: label,
        CKA.ID: object_id,
        CKA.MODIFIABLE: False,
        CKA.COPYABLE: False,
        CKA.DESTROYABLE: False,
        CKA.KEY_TYPE: CKK.RSA if isinstance(public, rsa.RSAPublicKey) else CKK.EC,
        CKA.SUBJECT: subject,
        CKA.LOCAL: False,
        CKA.START_DATE: b"",
        CKA.END_DATE: b"",
        CKA.DERIVE: False,
        CKA.PUBLIC_KEY_INFO: spki,
        **_public_numbers(public, summary.algorithm),
    }
    private: dict[int, AttributeValue] = {
        **common,
        CKA.CLASS: CKO.PRIVATE_KEY,
        CKA.SENSITIVE: True,
        CKA.ALWAYS_SENSITIVE: True,
        CKA.EXTRACTABLE: False,
        CKA.NEVER_EXTRACTABLE: True,
        CKA.SIGN: True,
        CKA.SIGN_RECOVER: False,
        CKA.DECRYPT: False,
        CKA.UNWRAP: False,
        CKA.ALWAYS_AUTHENTICATE: False,
    }
    public_attributes: dict[int, AttributeValue] = {
        **common,
        CKA.CLASS: CKO.PUBLIC_KEY,
        CKA.VERIFY: True,
        CKA.VERIFY_RECOVER: False,
        CKA.ENCRYPT: False,
        CKA.WRAP: False,
    }
    found = [
        TokenObject(book.handle("private", summary.id, version), private, entry),
        TokenObject(book.handle("public", summary.id, version), public_attributes),
    ]
    if leaf is not None:
        found.append(
            TokenObject(
                book.handle("leaf", summary.id, leaf.fingerprint(_SHA256).hex()),
                _certificate_attributes(
                    leaf,
                    label=summary.name,
                    object_id=object_id,
                    category=CK_CERTIFICATE_CATEGORY_TOKEN_USER,
                ),
            )
        )
    return found


def _public_numbers(
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, algorithm: p.Algorithm
) -> dict[int, AttributeValue]:
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {
            CKA.MODULUS: _unsigned(numbers.n),
            CKA.MODULUS_BITS: public.key_size,
            CKA.PUBLIC_EXPONENT: _unsigned(numbers.e),
        }
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {
        CKA.EC_PARAMS: core.ObjectIdentifier(_CURVES[algorithm]).dump(),
        # PKCS#11 v2.40 §2.3.3: DER-encoding of the ANSI X9.62 ECPoint (an OCTET STRING).
        CKA.EC_POINT: core.OctetString(point).dump(),
    }


def _certificate_attributes(
    certificate: x509.Certificate, *, label: str, object_id: bytes, category: int
) -> dict[int, AttributeValue]:
    return {
        CKA.CLASS: CKO.CERTIFICATE,
        CKA.TOKEN: True,
        CKA.PRIVATE: False,
        CKA.MODIFIABLE: False,
        CKA.COPYABLE: False,
        CKA.DESTROYABLE: False,
        CKA.LABEL: label.encode(),
        CKA.ID: object_id,
        CKA.CERTIFICATE_TYPE: CKC_X_509,
        CKA.CERTIFICATE_CATEGORY: category,
        CKA.TRUSTED: False,
        CKA.SUBJECT: certificate.subject.public_bytes(),
        CKA.ISSUER: certificate.issuer.public_bytes(),
        CKA.SERIAL_NUMBER: core.Integer(certificate.serial_number).dump(),
        CKA.VALUE: certificate.public_bytes(serialization.Encoding.DER),
        CKA.START_DATE: b"",
        CKA.END_DATE: b"",
    }


def _spki(public: object) -> bytes:
    assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _unsigned(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None
