"""RFC 3161 §2.4.1 timestamp queries: a DER TimeStampReq becomes a
:class:`TimestampQuery` only after full validation; a query that fails raises the
TimestampQueryRejected whose ``failInfo`` RFC 3161 §2.4.2 assigns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asn1crypto import core, tsp  # type: ignore[import-untyped]

from signery.crypto import (
    Hashed,
)
from signery.errors import (
    DigestLengthMismatch,
    ImprintLengthMismatch,
    MalformedTimestampQuery,
    UnacceptedTimestampExtension,
    UnacceptedTimestampPolicy,
    UnsupportedImprintAlgorithm,
    UnsupportedTimestampQueryVersion,
)
from signery.protocol import DigestAlgorithm

# A query is a hash and a few small fields (~60-130 bytes from openssl); anything
# near this is not a timestamp query, and is refused before it is read (413).
MAX_QUERY_BYTES = 8 * 1024

# RFC 3161 §2.4.1 and RFC 5754 §2: the imprints this TSA timestamps, by OID. Matched
# on the dotted OID: asn1crypto's names are ambiguous (it calls HMAC-SHA1 "sha1").
IMPRINT_ALGORITHMS: dict[str, DigestAlgorithm] = {
    "2.16.840.1.101.3.4.2.1": DigestAlgorithm.SHA256,
    "2.16.840.1.101.3.4.2.2": DigestAlgorithm.SHA384,
    "2.16.840.1.101.3.4.2.3": DigestAlgorithm.SHA512,
}
# Errors asn1crypto raises on malformed input (it parses lazily, on field access).
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)


@dataclass(frozen=True, slots=True)
class TimestampQuery:
    """A fully validated TimeStampReq (RFC 3161 §2.4.1)."""

    imprint: Hashed
    imprint_der: bytes  # the MessageImprint, DER, echoed into TSTInfo (§2.4.2)
    nonce: int | None
    cert_req: bool
    policy: str | None


class _AlgorithmIdentifier(core.Sequence):  # type: ignore[misc]
    """RFC 5280 §4.1.1.2 AlgorithmIdentifier with its parameters as written:
    asn1crypto's DigestAlgorithm forces NULL parameters onto SHA-2 identifiers,
    where RFC 5754 §2 allows absent or NULL and nothing else."""

    _fields = [
        ("algorithm", core.ObjectIdentifier),
        ("parameters", core.Any, {"optional": True}),
    ]


class _MessageImprint(core.Sequence):  # type: ignore[misc]
    _fields = [("hash_algorithm", _AlgorithmIdentifier), ("hashed_message", core.OctetString)]


_DER_NULL = b"\x05\x00"


def parse_query(der: bytes, *, policy: str) -> TimestampQuery:
    """A DER TimeStampReq -> TimestampQuery, or a TimestampQueryRejected with the
    failInfo RFC 3161 §2.4.2 assigns (checked in ``openssl ts -reply``'s order:
    format, version, algorithm, imprint length, policy, extensions)."""
    try:
        req = tsp.TimeStampReq.load(der, strict=True)  # strict: no trailing bytes
        version = req["version"].native
        imprint = req["message_imprint"]
        algorithm = _AlgorithmIdentifier.load(imprint["hash_algorithm"].dump(), strict=True)
        oid = str(algorithm["algorithm"].dotted)
        parameters = algorithm["parameters"]
        null_parameters = not isinstance(parameters, core.Void)
        well_formed_parameters = not null_parameters or parameters.dump() == _DER_NULL
        digest = imprint["hashed_message"].native
        req_policy = req["req_policy"]
        requested_policy = None if isinstance(req_policy, core.Void) else str(req_policy.dotted)
        nonce = req["nonce"].native
        cert_req = req["cert_req"].native
        extensions = req["extensions"]
        has_extensions = not isinstance(extensions, core.Void) and len(extensions) > 0
    except _DECODE_ERRORS as e:
        raise MalformedTimestampQuery(
            f"the body is not a DER TimeStampReq (RFC 3161 section 2.4.1): {type(e).__name__}"
        ) from None
    if not isinstance(digest, bytes) or not isinstance(cert_req, bool):
        raise MalformedTimestampQuery("the body is not a TimeStampReq (RFC 3161 section 2.4.1)")
    if version != "v1":
        raise UnsupportedTimestampQueryVersion(f"version {version} is not supported; use 1")
    digest_algorithm = IMPRINT_ALGORITHMS.get(oid)
    if digest_algorithm is None:
        raise UnsupportedImprintAlgorithm(
            f"hash algorithm {oid[:64]} is not accepted; use SHA-256, SHA-384 or SHA-512"
        )
    if not well_formed_parameters:
        # RFC 5754 §2: SHA-2 identifiers have absent or NULL parameters.
        raise UnsupportedImprintAlgorithm("the hash algorithm has parameters other than NULL")
    try:
        hashed = Hashed(digest_algorithm, digest)
    except DigestLengthMismatch:
        raise ImprintLengthMismatch(
            f"a {digest_algorithm.value} imprint has {digest_algorithm.size} bytes, "
            f"got {len(digest)}"
        ) from None
    if requested_policy is not None and requested_policy != policy:
        raise UnacceptedTimestampPolicy(
            f"policy {requested_policy[:64]} is not offered; this TSA issues under {policy}"
        )
    if has_extensions:
        # RFC 3161 §2.4.1: an extension the TSA does not recognize, critical or not,
        # is refused with unacceptedExtension. This TSA recognizes none.
        raise UnacceptedTimestampExtension("request extensions are not supported")
    # RFC 3161 §2.4.2: TSTInfo's messageImprint has the same value as the query's:
    # the same algorithm, parameters absent or NULL as sent, the same hash; in DER.
    hash_algorithm: dict[str, Any] = {"algorithm": oid}
    if null_parameters:
        hash_algorithm["parameters"] = core.Null()
    echoed = _MessageImprint({"hash_algorithm": hash_algorithm, "hashed_message": digest})
    return TimestampQuery(
        imprint=hashed,
        imprint_der=bytes(echoed.dump()),
        nonce=nonce if isinstance(nonce, int) else None,
        cert_req=cert_req,
        policy=requested_policy,
    )
