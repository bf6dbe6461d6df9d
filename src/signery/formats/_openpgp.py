"""``openpgp``: detached OpenPGP v4 signatures (RFC 4880) made with a remote key,
and the key's OpenPGP public key (``signery key export --openpgp``).

The packets are built here with ``struct``: the OpenPGP libraries for Python sign
only with local private keys (PGPy cannot use an external signer), and the few
packets a detached signature and a transferable public key need are small and
fully specified. What the service signs is exactly the OpenPGP hash (RFC 4880
§5.2.4): the file (or the key and User ID), then the signature's hashed part, then
the v4 trailer. RSA keys sign it with PKCS#1 v1.5 and the hash's DigestInfo (RFC
4880 §5.2.2, the service's ``rsa-pkcs1v15`` scheme); ECDSA keys (RFC 6637) return
a DER ``Ecdsa-Sig-Value`` that becomes the two MPIs r and s.

An OpenPGP v4 fingerprint is SHA-1 over the public-key packet, which holds the
key's creation time (RFC 4880 §12.2): Signery uses the time the server stored for
the key's current version, cut to whole seconds, so every export and every
signature names the same fingerprint for one key version.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from signery.crypto import (
    HASH_CHUNK,
    Hashed,
    PublicKey,
    algorithm_of_public_key,
    default_digest,
    verify_signature,
)
from signery.errors import ClientError, UnsupportedAlgorithm
from signery.formats._base import Signer, SignOptions, SignResult, VerifyResult, write_atomically
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

if TYPE_CHECKING:
    from hashlib import _Hash

# RFC 4880 §4.3: packet tags.
TAG_SIGNATURE = 2
TAG_PUBLIC_KEY = 6
TAG_USER_ID = 13

# RFC 4880 §5.2.1: signature types.
SIG_BINARY_DOCUMENT = 0x00
SIG_POSITIVE_CERTIFICATION = 0x13

# RFC 4880 §9.1 and RFC 6637 §5: public-key algorithms.
PK_RSA = 1
PK_ECDSA = 19

# RFC 4880 §9.4: hash algorithms.
HASH_IDS: dict[DigestAlgorithm, int] = {
    DigestAlgorithm.SHA256: 8,
    DigestAlgorithm.SHA384: 9,
    DigestAlgorithm.SHA512: 10,
}
_HASH_BY_ID = {v: k for k, v in HASH_IDS.items()}

# RFC 4880 §5.2.3.1 (and RFC 4880bis §5.2.3.28 for the issuer fingerprint).
SUB_CREATION_TIME = 2
SUB_ISSUER = 16
SUB_PREFERRED_HASH = 21
SUB_KEY_FLAGS = 27
SUB_ISSUER_FINGERPRINT = 33
_KNOWN_SUBPACKETS = {
    SUB_CREATION_TIME,
    SUB_ISSUER,
    SUB_PREFERRED_HASH,
    SUB_KEY_FLAGS,
    SUB_ISSUER_FINGERPRINT,
}
# RFC 4880 §5.2.3.21: the primary key certifies (its own User ID) and signs.
KEY_FLAGS_CERTIFY_SIGN = 0x01 | 0x02

# RFC 6637 §11: the curve OIDs, as the DER contents without tag and length.
CURVE_OIDS: dict[Algorithm, bytes] = {
    Algorithm.EC_P256: bytes.fromhex("2a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    Algorithm.EC_P384: bytes.fromhex("2b81040022"),  # 1.3.132.0.34
    Algorithm.EC_P521: bytes.fromhex("2b81040023"),  # 1.3.132.0.35
}

# RFC 4880 §6.1: CRC-24 of the armored data.
CRC24_INIT = 0xB704CE
CRC24_POLY = 0x1864CFB
ARMOR_LINE = 64  # RFC 4880 §6.3: at most 76 characters; GnuPG writes 64.

MAX_SIGNATURE_FILE = 64 * 1024  # an RSA-4096 signature packet is ~560 bytes
MAX_USER_ID_BYTES = 1024


class OpenPgpTimestampUnsupported(ClientError):
    code = "openpgp_timestamp_unsupported"
    title = "OpenPGP signatures cannot carry an RFC 3161 timestamp"


class OpenPgpKeyUnsupported(ClientError):
    code = "openpgp_key_unsupported"
    title = "This key, scheme or digest cannot make an OpenPGP signature"


class OpenPgpKeyTimeUnknown(ClientError):
    code = "openpgp_key_time_unknown"
    title = "The server does not say when the key version was made"


class OpenPgpKeyChanged(ClientError):
    # The OpenPGP twin of _signeddata.KeyChangedWhileSigning: here the key is
    # named by its fingerprint (public key + version time), not a certificate.
    code = "openpgp_key_changed"
    title = "The key changed while signing; sign again"


class OpenPgpMalformed(ClientError):
    code = "openpgp_malformed"
    title = "Not a well-formed OpenPGP signature"


class OpenPgpInvalidUserId(ClientError):
    code = "openpgp_invalid_user_id"
    title = "Invalid OpenPGP User ID"


# ------------------------------------------------------------------ encoding


def _mpi(value: int) -> bytes:
    """RFC 4880 §3.2: bit count (2 octets), then the big-endian magnitude."""
    bits = value.bit_length()
    return struct.pack(">H", bits) + value.to_bytes((bits + 7) // 8, "big")


def _length(n: int) -> bytes:
    """RFC 4880 §4.2.2 (new-format packets) and §5.2.3.1 (subpackets)."""
    if n < 192:
        return bytes([n])
    if n < 8384:
        n -= 192
        return bytes([(n >> 8) + 192, n & 0xFF])
    return b"\xff" + struct.pack(">I", n)


def _packet(tag: int, body: bytes) -> bytes:
    """A new-format packet (RFC 4880 §4.2: bit 7 and bit 6 set, then the tag)."""
    return bytes([0xC0 | tag]) + _length(len(body)) + body


def _subpacket(kind: int, data: bytes) -> bytes:
    return _length(len(data) + 1) + bytes([kind]) + data


def crc24(data: bytes) -> int:
    """The CRC-24 of RFC 4880 §6.1."""
    crc = CRC24_INIT
    for octet in data:
        crc ^= octet << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= CRC24_POLY
    return crc & 0xFFFFFF


def armor(kind: str, data: bytes) -> str:
    """ASCII armor (RFC 4880 §6.2): header line, blank line, base64, CRC-24, tail."""
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + ARMOR_LINE] for i in range(0, len(body), ARMOR_LINE)]
    checksum = base64.b64encode(crc24(data).to_bytes(3, "big")).decode("ascii")
    return "\n".join(
        [f"-----BEGIN PGP {kind}-----", "", *lines, f"={checksum}", f"-----END PGP {kind}-----", ""]
    )


def dearmor(text: bytes, kind: str) -> bytes:
    """The data inside ASCII armor of ``kind``, its CRC-24 checked when present
    (RFC 4880 §6.2; RFC 9580 §6.1 makes the checksum optional)."""
    try:
        lines = [line.rstrip() for line in text.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise OpenPgpMalformed("the armored signature is not ASCII text") from None
    begin, end = f"-----BEGIN PGP {kind}-----", f"-----END PGP {kind}-----"
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != begin:
        raise OpenPgpMalformed(f"the armor does not start with {begin}")
    if lines[-1] != end or lines.count(end) != 1:
        raise OpenPgpMalformed(f"the armor does not end with {end}")
    inner = lines[1:-1]
    # Armor headers ("Key: value") run until the first blank line (§6.2).
    try:
        blank = inner.index("")
    except ValueError:
        raise OpenPgpMalformed("the armor has no blank line after its headers") from None
    if any(": " not in header for header in inner[:blank]):
        raise OpenPgpMalformed("the armor has a malformed header line")
    body = inner[blank + 1 :]
    checksum: bytes | None = None
    if body and body[-1].startswith("="):
        try:
            checksum = base64.b64decode(body.pop()[1:], validate=True)
        except binascii.Error:
            raise OpenPgpMalformed("the armor checksum is not base64") from None
        if len(checksum) != 3:
            raise OpenPgpMalformed("the armor checksum is not 3 octets")
    try:
        data = base64.b64decode("".join(body), validate=True)
    except binascii.Error:
        raise OpenPgpMalformed("the armored data is not valid base64") from None
    if checksum is not None and crc24(data) != int.from_bytes(checksum, "big"):
        raise OpenPgpMalformed("the armor checksum (CRC-24) does not match: the data is damaged")
    return data


# ------------------------------------------------------------------ keys


def _created_seconds(moment: datetime) -> int:
    """A key or signature time as the 4-octet count of seconds (RFC 4880 §3.5)."""
    if moment.tzinfo is None:  # the wire and the database carry UTC
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())  # whole seconds: truncated, never rounded up


@dataclass(frozen=True, slots=True)
class OpenPgpKey:
    """A signing key as an OpenPGP v4 public key: the public-key packet body
    (RFC 4880 §5.5.2), from which the fingerprint and key id follow."""

    algorithm: Algorithm
    created: int
    """Creation time, seconds since the epoch: part of the fingerprint."""
    body: bytes

    @classmethod
    def from_public_key(cls, public_key: PublicKey, created: datetime) -> OpenPgpKey:
        algorithm = algorithm_of_public_key(public_key)
        seconds = _created_seconds(created)
        head = struct.pack(">BI", 4, seconds)
        if isinstance(public_key, rsa.RSAPublicKey):
            numbers = public_key.public_numbers()
            material = bytes([PK_RSA]) + _mpi(numbers.n) + _mpi(numbers.e)
        else:
            # RFC 6637 §9: curve OID (length-prefixed), then the point as an MPI
            # in SEC1 uncompressed form (0x04 || x || y).
            oid = CURVE_OIDS[algorithm]
            point = public_key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            material = bytes([PK_ECDSA, len(oid)]) + oid + _mpi(int.from_bytes(point, "big"))
        return cls(algorithm, seconds, head + material)

    @classmethod
    def for_signer(cls, signer: Signer) -> OpenPgpKey:
        """The OpenPGP key of a remote key's listed version."""
        if signer.key_created_at is None:
            raise OpenPgpKeyTimeUnknown(
                f"the server does not say when key {signer.key_name!r} was made; the "
                "OpenPGP fingerprint depends on it (upgrade the server)"
            )
        return cls.from_public_key(signer.public_key, signer.key_created_at)

    @property
    def pk_algorithm(self) -> int:
        return self.body[5]

    @property
    def fingerprint_bytes(self) -> bytes:
        # RFC 4880 §12.2: SHA-1 over 0x99, the 2-octet length and the packet body.
        return hashlib.sha1(  # noqa: S324 - the v4 fingerprint is SHA-1 by definition
            b"\x99" + struct.pack(">H", len(self.body)) + self.body
        ).digest()

    @property
    def fingerprint(self) -> str:
        """40 upper-case hex digits, as ``gpg --with-colons`` prints it."""
        return self.fingerprint_bytes.hex().upper()

    @property
    def key_id(self) -> str:
        """The low 64 bits of the fingerprint (RFC 4880 §12.2), upper-case hex."""
        return self.fingerprint_bytes[-8:].hex().upper()

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)

    def hash_prefix(self) -> bytes:
        """What a key signature hashes for the key (RFC 4880 §5.2.4)."""
        return b"\x99" + struct.pack(">H", len(self.body)) + self.body


@dataclass(frozen=True, slots=True)
class OpenPgpPublicKey:
    """A transferable public key (RFC 4880 §11.1): public-key packet, User ID
    packet and the positive-certification self-signature made through the service."""

    key: OpenPgpKey
    user_id: str
    packets: bytes
    key_version: int

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def armored(self) -> str:
        return armor("PUBLIC KEY BLOCK", self.packets)


# ------------------------------------------------------------------ signing


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything decided before a digest is sent: refusals happen here."""

    key: OpenPgpKey
    digest_algorithm: DigestAlgorithm
    scheme: SignatureScheme


def _plan(
    signer: Signer,
    digest_algorithm: DigestAlgorithm | None,
    scheme: SignatureScheme | None,
) -> _Plan:
    algorithm = signer.algorithm
    # RFC 4880 §5.2.2: OpenPGP v4 RSA signatures are PKCS#1 v1.5 only; RFC 6637
    # signatures are ECDSA.
    wanted = SignatureScheme.RSA_PKCS1V15 if algorithm.is_rsa else SignatureScheme.ECDSA
    if scheme is not None and scheme is not wanted:
        raise OpenPgpKeyUnsupported(
            f"OpenPGP signs {algorithm.value} keys with {wanted.value} only, not {scheme.value}"
        )
    default = default_digest(algorithm)
    chosen = digest_algorithm or default
    if algorithm.is_ec and chosen.size < default.size:
        # RFC 6637 §13 pairs each curve with a hash of its strength; gpg refuses
        # to sign with a shorter one, and so do we.
        raise OpenPgpKeyUnsupported(
            f"a {algorithm.value} key needs {default.value} or longer for OpenPGP, "
            f"not {chosen.value}"
        )
    try:
        key = OpenPgpKey.for_signer(signer)
    except UnsupportedAlgorithm as e:
        raise OpenPgpKeyUnsupported(e.detail) from None
    return _Plan(key, chosen, wanted)


def _hashed_part(
    sig_type: int, key: OpenPgpKey, digest: DigestAlgorithm, subpackets: bytes
) -> bytes:
    """Version through hashed subpackets (RFC 4880 §5.2.3): the signed header."""
    return (
        struct.pack(">BBBBH", 4, sig_type, key.pk_algorithm, HASH_IDS[digest], len(subpackets))
        + subpackets
    )


def _trailer(hashed_part: bytes) -> bytes:
    # RFC 4880 §5.2.4: v4 trailer, 0x04 0xFF and the hashed part's length (4 octets).
    return b"\x04\xff" + struct.pack(">I", len(hashed_part))


def _signature_time(key: OpenPgpKey, when: datetime | None = None) -> int:
    # A signature cannot predate its key (gpg reports a time conflict and fails):
    # a build machine whose clock is a little behind the server's still produces
    # a verifiable signature.
    return max(int(when.timestamp()) if when is not None else int(time.time()), key.created)


def _sign_packet(
    signer: Signer,
    plan: _Plan,
    h: _Hash,
    hashed_part: bytes,
) -> tuple[bytes, Hashed, int]:
    """Finish the OpenPGP hash, have the service sign it, check the answer and
    return the signature packet, the signed digest and the key version."""
    h.update(hashed_part)
    h.update(_trailer(hashed_part))
    hashed = Hashed(plan.digest_algorithm, h.digest())
    response = signer.sign_detailed(hashed, plan.scheme)
    if signer.key_version is not None and response.key_version != signer.key_version:
        # The fingerprint (and the creation time in it) belong to the listed version.
        raise OpenPgpKeyChanged(
            f"key {signer.key_name!r} moved from version {signer.key_version} to "
            f"{response.key_version} while signing; sign again"
        )
    # Verify-after-sign with the key the fingerprint was computed from: a faulty
    # server never leaves an unverifiable signature behind.
    if not verify_signature(signer.public_key, hashed, plan.scheme, response.signature):
        raise OpenPgpKeyChanged(
            f"the signature from key {signer.key_name!r} does not verify with its public key"
        )
    if plan.key.pk_algorithm == PK_RSA:
        mpis = _mpi(int.from_bytes(response.signature, "big"))
    else:
        r, s = decode_dss_signature(response.signature)
        mpis = _mpi(r) + _mpi(s)
    unhashed = _subpacket(SUB_ISSUER, plan.key.fingerprint_bytes[-8:])
    body = (
        hashed_part
        + struct.pack(">H", len(unhashed))
        + unhashed
        + hashed.digest[:2]  # RFC 4880 §5.2.3: left 16 bits of the hash
        + mpis
    )
    return _packet(TAG_SIGNATURE, body), hashed, response.key_version


def _hash_file(
    file: Path, digest: DigestAlgorithm, progress: Callable[[int], None] | None
) -> _Hash:
    """The file streamed into a hash that stays open for the signature trailer."""
    h = hashlib.new(digest.value)
    with file.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h


def _check_user_id(user_id: str) -> bytes:
    # RFC 4880 §5.11: UTF-8 text, by convention "Name <email>"; one line.
    data = user_id.encode("utf-8")
    if not user_id.strip():
        raise OpenPgpInvalidUserId("the User ID is empty; give e.g. 'Release <release@example>'")
    if len(data) > MAX_USER_ID_BYTES:
        raise OpenPgpInvalidUserId(f"the User ID is longer than {MAX_USER_ID_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user_id):
        raise OpenPgpInvalidUserId("the User ID must be one line without control characters")
    return data


def export_public_key(signer: Signer, user_id: str) -> OpenPgpPublicKey:
    """The remote key's OpenPGP public key with ``user_id``, self-certified through
    the service (signature type 0x13, RFC 4880 §5.2.1), ready for ``gpg --import``.

    The same key version always gives the same fingerprint (its creation time is
    the server's); only the self-signature's creation time differs between exports."""
    uid = _check_user_id(user_id)
    plan = _plan(signer, None, None)
    preferences = [plan.digest_algorithm] + [
        d
        for d in (DigestAlgorithm.SHA512, DigestAlgorithm.SHA384, DigestAlgorithm.SHA256)
        if d is not plan.digest_algorithm
    ]
    subpackets = (
        _subpacket(SUB_CREATION_TIME, struct.pack(">I", _signature_time(plan.key)))
        + _subpacket(SUB_KEY_FLAGS, bytes([KEY_FLAGS_CERTIFY_SIGN]))
        + _subpacket(SUB_PREFERRED_HASH, bytes(HASH_IDS[d] for d in preferences))
        + _subpacket(SUB_ISSUER_FINGERPRINT, b"\x04" + plan.key.fingerprint_bytes)
    )
    hashed_part = _hashed_part(
        SIG_POSITIVE_CERTIFICATION, plan.key, plan.digest_algorithm, subpackets
    )
    # RFC 4880 §5.2.4: a certification hashes the key, then 0xB4, the User ID's
    # 4-octet length and the User ID.
    h = hashlib.new(plan.digest_algorithm.value)
    h.update(plan.key.hash_prefix())
    h.update(b"\xb4" + struct.pack(">I", len(uid)) + uid)
    signature, _, version = _sign_packet(signer, plan, h, hashed_part)
    packets = _packet(TAG_PUBLIC_KEY, plan.key.body) + _packet(TAG_USER_ID, uid) + signature
    return OpenPgpPublicKey(plan.key, user_id, packets, version)


# ------------------------------------------------------------------ parsing


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """A v4 binary-document signature, checked for shape only (not yet verified)."""

    pk_algorithm: int
    digest_algorithm: DigestAlgorithm
    hashed_part: bytes
    hash_check: bytes
    created: int
    issuer_fingerprint: bytes | None
    issuer_key_id: bytes | None
    values: tuple[int, ...]

    def signature_for(self, public_key: PublicKey) -> tuple[SignatureScheme, bytes] | None:
        """The signature in the form ``verify_signature`` takes, for a key of the
        signature's algorithm; None for a key of another algorithm."""
        if self.pk_algorithm == PK_RSA and isinstance(public_key, rsa.RSAPublicKey):
            size = (public_key.key_size + 7) // 8
            if self.values[0].bit_length() > public_key.key_size:
                return None
            # The MPI dropped leading zero octets; RFC 8017 §8.2.2 wants k octets.
            return SignatureScheme.RSA_PKCS1V15, self.values[0].to_bytes(size, "big")
        if self.pk_algorithm == PK_ECDSA and isinstance(public_key, ec.EllipticCurvePublicKey):
            return SignatureScheme.ECDSA, encode_dss_signature(*self.values)
        return None


def _read_packet(data: bytes) -> tuple[int, bytes, bytes]:
    """One packet (RFC 4880 §4.2, old or new format): tag, body, the rest."""
    if not data or not data[0] & 0x80:
        raise OpenPgpMalformed("not an OpenPGP packet (bad first octet)")
    first = data[0]
    if first & 0x40:  # new format
        tag = first & 0x3F
        if len(data) < 2:
            raise OpenPgpMalformed("truncated packet header")
        o = data[1]
        if o < 192:
            length, start = o, 2
        elif o < 224:
            if len(data) < 3:
                raise OpenPgpMalformed("truncated packet header")
            length, start = ((o - 192) << 8) + data[2] + 192, 3
        elif o == 255:
            if len(data) < 6:
                raise OpenPgpMalformed("truncated packet header")
            length, start = struct.unpack(">I", data[2:6])[0], 6
        else:
            # §4.2.2.4: partial lengths are for data packets only.
            raise OpenPgpMalformed("partial body length in a signature packet")
    else:  # old format
        tag, kind = (first >> 2) & 0x0F, first & 0x03
        if kind == 3:
            raise OpenPgpMalformed("indeterminate packet length")
        size = 1 << kind
        if len(data) < 1 + size:
            raise OpenPgpMalformed("truncated packet header")
        length, start = int.from_bytes(data[1 : 1 + size], "big"), 1 + size
    if len(data) < start + length:
        raise OpenPgpMalformed("truncated packet: the signature file is cut short")
    return tag, data[start : start + length], data[start + length :]


def _subpackets(area: bytes) -> list[tuple[int, bool, bytes]]:
    """(type, critical, data) of each subpacket (RFC 4880 §5.2.3.1)."""
    found: list[tuple[int, bool, bytes]] = []
    i = 0
    while i < len(area):
        o = area[i]
        if o < 192:
            length, i = o, i + 1
        elif o < 255:
            if i + 1 >= len(area):
                raise OpenPgpMalformed("truncated subpacket length")
            length, i = ((o - 192) << 8) + area[i + 1] + 192, i + 2
        else:
            if i + 5 > len(area):
                raise OpenPgpMalformed("truncated subpacket length")
            length, i = struct.unpack(">I", area[i + 1 : i + 5])[0], i + 5
        if length == 0 or i + length > len(area):
            raise OpenPgpMalformed("subpacket runs past its area")
        kind = area[i]
        found.append((kind & 0x7F, bool(kind & 0x80), area[i + 1 : i + length]))
        i += length
    return found


def _read_mpis(data: bytes, count: int) -> tuple[int, ...]:
    values: list[int] = []
    i = 0
    for _ in range(count):
        if i + 2 > len(data):
            raise OpenPgpMalformed("truncated signature value")
        bits = struct.unpack(">H", data[i : i + 2])[0]
        size = (bits + 7) // 8
        if i + 2 + size > len(data):
            raise OpenPgpMalformed("truncated signature value")
        values.append(int.from_bytes(data[i + 2 : i + 2 + size], "big"))
        i += 2 + size
    if i != len(data):
        raise OpenPgpMalformed("extra bytes after the signature value")
    return tuple(values)


def parse_signature(data: bytes) -> ParsedSignature:
    """A detached signature file, armored or binary, down to its checked fields.
    Anything but one v4 binary-document RSA/ECDSA signature packet is refused."""
    if data.lstrip().startswith(b"-----BEGIN PGP "):
        data = dearmor(data, "SIGNATURE")
    tag, body, rest = _read_packet(data)
    if tag != TAG_SIGNATURE:
        raise OpenPgpMalformed(f"packet tag {tag} is not a signature (tag {TAG_SIGNATURE})")
    if rest:
        raise OpenPgpMalformed("more than one packet: a detached signature has exactly one")
    if len(body) < 6:
        raise OpenPgpMalformed("truncated signature packet")
    version, sig_type, pk_algorithm, hash_id, hashed_length = struct.unpack(">BBBBH", body[:6])
    if version != 4:
        raise OpenPgpMalformed(f"signature version {version}; only v4 is supported")
    if sig_type != SIG_BINARY_DOCUMENT:
        raise OpenPgpMalformed(
            f"signature type 0x{sig_type:02x} is not a binary document signature (0x00)"
        )
    if pk_algorithm not in (PK_RSA, PK_ECDSA):
        raise OpenPgpMalformed(f"public-key algorithm {pk_algorithm} is not RSA (1) or ECDSA (19)")
    if hash_id not in _HASH_BY_ID:
        raise OpenPgpMalformed(f"hash algorithm {hash_id} is not SHA-256, SHA-384 or SHA-512")
    end = 6 + hashed_length
    if len(body) < end + 2:
        raise OpenPgpMalformed("truncated hashed subpackets")
    unhashed_length = struct.unpack(">H", body[end : end + 2])[0]
    tail = end + 2 + unhashed_length
    if len(body) < tail + 2:
        raise OpenPgpMalformed("truncated unhashed subpackets")
    hashed = _subpackets(body[6:end])
    unhashed = _subpackets(body[end + 2 : tail])
    for kind, critical, _ in hashed + unhashed:
        # §5.2.3.1: an unknown critical subpacket makes the signature invalid.
        if critical and kind not in _KNOWN_SUBPACKETS:
            raise OpenPgpMalformed(f"unknown critical subpacket type {kind}")
    times = [d for k, _, d in hashed if k == SUB_CREATION_TIME]
    # §5.2.3.4: the creation time MUST be in the hashed area.
    if len(times) != 1 or len(times[0]) != 4:
        raise OpenPgpMalformed("no signature creation time in the hashed subpackets")
    fingerprints = [d[1:] for k, _, d in hashed if k == SUB_ISSUER_FINGERPRINT and len(d) == 21]
    key_ids = [d for k, _, d in hashed + unhashed if k == SUB_ISSUER and len(d) == 8]
    values = _read_mpis(body[tail + 2 :], 1 if pk_algorithm == PK_RSA else 2)
    return ParsedSignature(
        pk_algorithm=pk_algorithm,
        digest_algorithm=_HASH_BY_ID[hash_id],
        hashed_part=body[:end],
        hash_check=body[tail : tail + 2],
        created=struct.unpack(">I", times[0])[0],
        issuer_fingerprint=fingerprints[0] if fingerprints else None,
        issuer_key_id=key_ids[0] if key_ids else None,
        values=values,
    )


# ------------------------------------------------------------------ the format


class OpenPgpFormat:
    """Detached OpenPGP v4 signatures: ``FILE.asc`` (armored) or, with
    ``options.binary``, ``FILE.pgp`` (the bare signature packet).

    ``SignResult.digest`` is the OpenPGP hash the service signed (file, hashed
    part and trailer), not the file's plain hash."""

    name = "openpgp"

    def default_output(self, file: Path, options: SignOptions) -> Path:
        return self.binary_output(file) if options.binary else file.with_name(file.name + ".asc")

    def binary_output(self, file: Path) -> Path:
        # .sig is the raw format's; .pgp keeps the two apart.
        return file.with_name(file.name + ".pgp")

    def sign(self, signer: Signer, file: Path, output: Path, options: SignOptions) -> SignResult:
        # Refusals first: nothing reaches the server for a request we cannot honour.
        if options.timestamper is not None:
            raise OpenPgpTimestampUnsupported(
                "OpenPGP has no place for an RFC 3161 token; sign without --timestamp"
            )
        plan = _plan(signer, options.digest_algorithm, options.scheme)
        subpackets = _subpacket(
            SUB_CREATION_TIME, struct.pack(">I", _signature_time(plan.key, options.signing_time))
        ) + _subpacket(SUB_ISSUER_FINGERPRINT, b"\x04" + plan.key.fingerprint_bytes)
        hashed_part = _hashed_part(SIG_BINARY_DOCUMENT, plan.key, plan.digest_algorithm, subpackets)
        h = _hash_file(file, plan.digest_algorithm, options.on_chunk)
        packet, hashed, version = _sign_packet(signer, plan, h, hashed_part)
        data = packet if options.binary else armor("SIGNATURE", packet).encode("ascii")
        write_atomically(output, data, before_commit=options.check_interrupted)
        return SignResult(
            file=file,
            output=output,
            digest_algorithm=plan.digest_algorithm,
            digest=hashed.hex,
            key_name=signer.key_name,
            key_version=version,
            scheme=plan.scheme,
        )

    def verify(
        self, file: Path, signature: Path, public_keys: list[PublicKey], options: SignOptions
    ) -> VerifyResult:
        if signature == self.default_output(file, options) and not signature.exists():
            binary = self.binary_output(file)
            signature = binary if binary.exists() else signature
        try:
            with signature.open("rb") as f:
                raw = f.read(MAX_SIGNATURE_FILE + 1)
        except OSError as e:
            raise ClientError(f"cannot read signature {signature}: {e.strerror}") from None
        if len(raw) > MAX_SIGNATURE_FILE:
            raise OpenPgpMalformed(f"{signature} is too large for a detached signature")
        try:
            parsed = parse_signature(raw)
        except OpenPgpMalformed as e:
            raise OpenPgpMalformed(f"{signature}: {e.detail}") from None
        if options.digest_algorithm and options.digest_algorithm is not parsed.digest_algorithm:
            return VerifyResult(
                file,
                signature,
                False,
                f"signed with {parsed.digest_algorithm.value}, "
                f"not {options.digest_algorithm.value}",
            )
        h = _hash_file(file, parsed.digest_algorithm, options.on_chunk)
        h.update(parsed.hashed_part)
        h.update(_trailer(parsed.hashed_part))
        hashed = Hashed(parsed.digest_algorithm, h.digest())
        issuer = (parsed.issuer_fingerprint or parsed.issuer_key_id or b"").hex().upper()
        if hashed.digest[:2] != parsed.hash_check:
            # §5.2.3: the left 16 bits of the hash, a quick reject of a changed file.
            return VerifyResult(
                file, signature, False, "signature does not match the file (hash check differs)"
            )
        for index, key in enumerate(public_keys):
            candidate = parsed.signature_for(key)
            if candidate is None:
                continue
            scheme, value = candidate
            if verify_signature(key, hashed, scheme, value):
                made = datetime.fromtimestamp(parsed.created, UTC).isoformat()
                return VerifyResult(
                    file,
                    signature,
                    True,
                    f"valid (OpenPGP v4, {scheme.value}, {parsed.digest_algorithm.value}, "
                    f"issuer {issuer or 'unnamed'}, made {made}, key #{index + 1})",
                )
        return VerifyResult(
            file, signature, False, f"signature does not verify with the key (issuer {issuer})"
        )
