"""RFC 3161 timestamps on the client: make a query, ask any TSA, check the reply.

Any RFC 3161 TSA reachable over HTTP works (RFC 3161 §3.4): Signery's own
(``/api/v1/tsa``) or a public one. Only the message imprint (a hash) leaves the
machine. The reply is checked against the query before it is used: status
``granted`` (or ``grantedWithMods``), the same message imprint and the same nonce
(RFC 3161 §2.4.2), so that a TSA, or anything between, cannot hand back a token for
something else. The token's signature is the verifier's business (``openssl ts
-verify``, signtool, jarsigner), as it is for every timestamp client.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from asn1crypto import tsp  # type: ignore[import-untyped]

from signery import __version__
from signery.crypto import Hashed
from signery.errors import ClientError
from signery.protocol import DigestAlgorithm
from signery.rfc3161 import QUERY_MEDIA_TYPE, REPLY_MEDIA_TYPE, TimeStampResp

MAX_REPLY_BYTES = 1024 * 1024  # a reply is a few KiB: refuse to buffer more
DEFAULT_TIMEOUT = 30.0
# asn1crypto's names of the SHA-2 digest algorithms (RFC 5754 §2).
_ALGORITHM_NAMES = {
    DigestAlgorithm.SHA256: "sha256",
    DigestAlgorithm.SHA384: "sha384",
    DigestAlgorithm.SHA512: "sha512",
}
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)


class TimestampRefused(ClientError):
    """The TSA answered with a rejection (its PKIStatusInfo says why)."""

    code = "timestamp_refused"
    title = "The timestamp authority refused the query"


class TimestampFailed(ClientError):
    """The TSA could not be reached, or its answer is not a usable timestamp reply."""

    code = "timestamp_failed"
    title = "No timestamp was obtained"


@dataclass(frozen=True, slots=True)
class TimestampQuery:
    """A TimeStampReq (DER) and what its reply must echo."""

    der: bytes
    imprint: Hashed
    nonce: int


@dataclass(frozen=True, slots=True)
class Timestamp:
    """A granted timestamp: the whole reply, the token, and what the token says."""

    reply: bytes  # the DER TimeStampResp (what `openssl ts -verify -in` reads)
    token: bytes  # the DER TimeStampToken (ContentInfo), for embedding in signatures
    gen_time: datetime
    serial: int
    policy: str


def make_query(
    imprint: Hashed, *, cert_req: bool = True, policy: str | None = None
) -> TimestampQuery:
    """A version 1 TimeStampReq over ``imprint`` with a random 64-bit nonce.

    ``cert_req`` asks the TSA to put its certificate into the token (RFC 3161
    §2.4.1), which verifiers and the formats that embed tokens expect."""
    # RFC 3161 §2.4.1: the nonce is a large random number that ties the reply to
    # this query; 64 bits, positive, so that it is one DER INTEGER of at most 9 bytes.
    nonce = secrets.randbits(64) | 1
    fields: dict[str, Any] = {
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": {"algorithm": _ALGORITHM_NAMES[imprint.algorithm]},
            "hashed_message": imprint.digest,
        },
        "nonce": nonce,
        "cert_req": cert_req,
    }
    if policy is not None:
        fields["req_policy"] = policy
    return TimestampQuery(bytes(tsp.TimeStampReq(fields).dump()), imprint, nonce)


def check_reply(query: TimestampQuery, der: bytes) -> Timestamp:
    """The granted timestamp in ``der``, after checking it answers ``query``.

    Raises TimestampRefused for a rejection, TimestampFailed for anything that is
    not a reply to this query."""
    try:
        reply = TimeStampResp.load(der, strict=True)
        status = reply["status"]
        state = status["status"].native
        texts = status["status_string"].native or []
        fail_info = status["fail_info"].native
        token = reply["time_stamp_token"]
    except _DECODE_ERRORS:
        raise TimestampFailed("the answer is not a DER TimeStampResp (RFC 3161 §2.4.2)") from None
    if state not in ("granted", "granted_with_mods"):
        reason = "; ".join(str(t) for t in texts)[:300] or "no reason given"
        failures = ", ".join(sorted(fail_info)) if fail_info else "none"
        raise TimestampRefused(
            f"the TSA answered {state} (failInfo: {failures}): {reason}",
            status=state,
            fail_info=sorted(fail_info) if fail_info else [],
        )
    try:
        if token["content_type"].native != "signed_data":
            raise ValueError("not SignedData")
        content = token["content"]["encap_content_info"]
        if content["content_type"].native != "tst_info":
            raise ValueError("not TSTInfo")
        info = content["content"].parsed
        imprint = info["message_imprint"]
        hashed = bytes(imprint["hashed_message"].native)
        algorithm = imprint["hash_algorithm"]["algorithm"].native
        nonce = info["nonce"].native
        gen_time = info["gen_time"].native
        serial = info["serial_number"].native
        policy = info["policy"].dotted
        token_der = bytes(token.dump())
    except _DECODE_ERRORS:
        raise TimestampFailed("the granted reply carries no readable TimeStampToken") from None
    # RFC 3161 §2.4.2: the requester MUST check the imprint and the nonce.
    if algorithm != _ALGORITHM_NAMES[query.imprint.algorithm] or hashed != query.imprint.digest:
        raise TimestampFailed("the token timestamps another message imprint than the one sent")
    if nonce != query.nonce:
        raise TimestampFailed("the token does not carry the query's nonce (a replayed reply?)")
    return Timestamp(der, token_der, gen_time, serial, str(policy))


def request_timestamp(
    url: str,
    imprint: Hashed,
    *,
    http: httpx.Client | None = None,
    headers: dict[str, str] | None = None,
    verify: bool | str = True,
    timeout: float = DEFAULT_TIMEOUT,
    policy: str | None = None,
) -> tuple[TimestampQuery, Timestamp]:
    """Ask the TSA at ``url`` for a timestamp over ``imprint`` (RFC 3161 §3.4)."""
    if not url.startswith(("http://", "https://")):
        raise ClientError("the TSA URL must start with https:// (or http://)")
    query = make_query(imprint, policy=policy)
    send_headers = {
        "Content-Type": QUERY_MEDIA_TYPE,
        "Accept": REPLY_MEDIA_TYPE,
        "User-Agent": f"signery-client/{__version__}",
        **(headers or {}),
    }
    own = http is None
    client = http or httpx.Client(verify=verify, timeout=timeout)
    try:
        with client.stream("POST", url, content=query.der, headers=send_headers) as response:
            body = _read_bounded(response)
    except httpx.HTTPError as e:
        raise TimestampFailed(f"cannot reach the TSA at {url}: {type(e).__name__}") from None
    finally:
        if own:
            client.close()
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if response.status_code != 200 or media_type != REPLY_MEDIA_TYPE:
        raise TimestampFailed(_http_failure(url, response.status_code, media_type, body))
    return query, check_reply(query, body)


def _read_bounded(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise TimestampFailed(f"the TSA's answer is larger than {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _http_failure(url: str, status: int, media_type: str, body: bytes) -> str:
    detail = f"HTTP {status} ({media_type or 'no content type'}) from {url}"
    if media_type == "application/problem+json":
        try:
            problem = json.loads(body)
        except ValueError:
            return detail
        if isinstance(problem, dict):
            code, text = problem.get("code"), problem.get("detail") or problem.get("title")
            return f"{detail}: {code}: {str(text)[:300]}"
    return detail
