"""The RFC 3161 time-stamping authority (signery.server.tsa), in process, on
SQLite and PostgreSQL.

Granted timestamps are checked by the real verifiers (`openssl ts -verify`, and
rfc3161-client), refusals by the failInfo of RFC 3161 §2.4.2 and by the audit
contract: exactly one event with the reason, the TSA's failure counted, no
timestamp counted as issued. Also: the TSA certificate's profile (RFC 3161 §2.3),
the TSA made by `signery init`, or on first use by an installation without one,
exactly once when two workers race.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asn1crypto import algos, cms, core, tsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from signery.crypto import Hashed, PublicKey
from signery.errors import (
    ConfigurationError,
    FailureInfo,
    ImprintLengthMismatch,
    MalformedTimestampQuery,
    SignatureVerificationFailed,
    TimestampQueryRejected,
    UnacceptedTimestampExtension,
    UnsupportedImprintAlgorithm,
    UnsupportedTimestampQueryVersion,
)
from signery.keystores import (
    DestroyableKeyStore,
    GeneratedKey,
    HealthCheckedKeyStore,
    KeyContext,
    KeyHandle,
    KeyStore,
    KeyStoreRegistry,
    StoreHealth,
)
from signery.protocol import Algorithm, SignatureScheme
from signery.server.app import create_app
from signery.server.ca.models import CaAuthorityRow
from signery.server.config import DEFAULT_TSA_POLICY_OID, TsaAccess, load_settings
from signery.server.container import Core, Services
from signery.server.persistence.db import make_engine
from signery.server.tsa.authority import TSA, TimestampAuthority, TsaConfig, authority_of
from signery.server.tsa.provisioning import provision_tsa
from signery.server.tsa.query import parse_query
from signery.server.tsa.ratelimit import ClientRateLimiter
from signery.server.tsa.service import TsaService
from signery.server.tsa.token import TokenBuilder, granted_reply
from tests.support import (
    Api,
    FakeClock,
    Installation,
    inserts_fail,
    missing,
    new_installation,
    refused_once,
    require_tool,
)

QUERY = "application/timestamp-query"
REPLY = "application/timestamp-reply"
ARTIFACT = b"release-1.2.3.tar.gz contents\n"
SHA1_OID = "1.3.14.3.2.26"


class Reply(core.Sequence):  # type: ignore[misc]
    """TimeStampResp with the token OPTIONAL, as RFC 3161 §2.4.2 has it (the test's
    own parser: asn1crypto 1.5 declares the token required)."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


# ------------------------------------------------------------------ helpers


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done


def openssl_query(
    tmp_path: Path,
    digest: str = "sha256",
    *,
    cert: bool = True,
    nonce: bool = True,
    policy: str | None = None,
) -> Path:
    """`openssl ts -query` over ARTIFACT; returns the .tsq file."""
    openssl = require_tool("openssl")
    data = tmp_path / "artifact.bin"
    data.write_bytes(ARTIFACT)
    out = tmp_path / f"{digest}-{cert}-{nonce}-{policy}.tsq"
    args = [openssl, "ts", "-query", "-data", str(data), f"-{digest}", "-out", str(out)]
    if cert:
        args.append("-cert")
    if not nonce:
        args.append("-no_nonce")
    if policy:
        args += ["-tspolicy", policy]
    run(*args)
    return out


def post(api: Api, body: bytes, content_type: str | None = QUERY) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return api.http.post("/api/v1/tsa", content=body, headers=headers)


def query_der(
    digest_oid: str = "2.16.840.1.101.3.4.2.1",
    digest: bytes = hashlib.sha256(ARTIFACT).digest(),
    **fields: Any,
) -> bytes:
    """A TimeStampReq built field by field, for queries openssl will not make."""
    req: dict[str, Any] = {
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": algos.DigestAlgorithm({"algorithm": digest_oid}),
            "hashed_message": digest,
        },
    }
    req.update(fields)
    return bytes(tsp.TimeStampReq(req).dump())


class RawAlgorithm(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("algorithm", core.ObjectIdentifier),
        ("parameters", core.Any, {"optional": True}),
    ]


class RawImprint(core.Sequence):  # type: ignore[misc]
    _fields = [("hash_algorithm", RawAlgorithm), ("hashed_message", core.OctetString)]


class RawQuery(core.Sequence):  # type: ignore[misc]
    _fields = [("version", core.Integer), ("message_imprint", RawImprint)]


def raw_query_der(parameters: Any | None = None) -> bytes:
    """A query whose SHA-256 identifier has ``parameters`` as given (or none)."""
    algorithm: dict[str, Any] = {"algorithm": "2.16.840.1.101.3.4.2.1"}
    if parameters is not None:
        algorithm["parameters"] = parameters
    imprint = {"hash_algorithm": algorithm, "hashed_message": hashlib.sha256(ARTIFACT).digest()}
    return bytes(RawQuery({"version": 1, "message_imprint": imprint}).dump())


def reply_of(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == REPLY
    return Reply.load(response.content)


def tst_info_of(reply: Any) -> Any:
    return reply["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed


def assert_rejected(response: httpx.Response, failure: FailureInfo) -> str:
    """A TimeStampResp with status rejection, this failInfo and no token; its text."""
    reply = reply_of(response)
    status = reply["status"]
    assert status["status"].native == "rejection"
    assert status["fail_info"].native == {failure.value}
    assert isinstance(reply["time_stamp_token"], core.Void)
    return str(status["status_string"].native[0])


@dataclass
class Chain:
    tsa: x509.Certificate
    issuing: x509.Certificate
    root: x509.Certificate
    tsa_pem: Path
    cas_pem: Path  # issuing + root: the -CAfile of openssl ts -verify


def fetch_chain(api: Api, tmp_path: Path) -> Chain:
    response = api.http.get("/api/v1/tsa/certificate")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pem-certificate-chain"
    tsa, issuing, root = x509.load_pem_x509_certificates(response.content)
    tsa_pem, cas_pem = tmp_path / "tsa.pem", tmp_path / "cas.pem"
    tsa_pem.write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
    cas_pem.write_bytes(
        issuing.public_bytes(serialization.Encoding.PEM)
        + root.public_bytes(serialization.Encoding.PEM)
    )
    return Chain(tsa, issuing, root, tsa_pem, cas_pem)


def openssl_verify(reply: Path, query: Path, chain: Chain, *, untrusted: bool = True) -> str:
    openssl = require_tool("openssl")
    args = [openssl, "ts", "-verify", "-in", str(reply), "-queryfile", str(query)]
    args += ["-CAfile", str(chain.cas_pem)]
    if untrusted:
        args += ["-untrusted", str(chain.tsa_pem)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


@contextlib.contextmanager
def issued_once(api: Api, tsa_id: str) -> Iterator[dict[str, Any]]:
    """Exactly one tsa.timestamp.issued event, and one success counted for the TSA."""
    seq, before = api.last_seq(), api.usage()
    found: dict[str, Any] = {}
    yield found
    events = api.events_after(seq)
    assert [(e["kind"], e["outcome"]) for e in events] == [("tsa.timestamp.issued", "succeeded")]
    found.update(events[0])
    after = api.usage()
    assert api.counter(after, "tsa", tsa_id)[0] == api.counter(before, "tsa", tsa_id)[0] + 1


@contextlib.contextmanager
def tsa_refused_once(api: Api, tsa_id: str, *, reason: str) -> Iterator[dict[str, Any]]:
    """The refusal contract (tests.support.refused_once) for the TSA: exactly one
    tsa.timestamp.refused event with the reason, the TSA's refusal counted (denied or
    failed), and
    nothing else counted anywhere (no timestamp counted as issued)."""
    seq, before = api.last_seq(), api.usage()
    found: dict[str, Any] = {}
    yield found
    events = api.events_after(seq)
    assert [(e["kind"], e["reason"]) for e in events] == [("tsa.timestamp.refused", reason)]
    assert events[0]["outcome"] != "succeeded"
    assert events[0]["key_id"] == tsa_id
    found.update(events[0])
    after = api.usage()
    # Denied (a decision) and failed (invalid, error) are counted apart.
    column = "denied" if events[0]["outcome"] == "denied" else "failures"
    for (scope, subject), counter in after.items():
        was = before.get((scope, subject), {"successes": 0, "failures": 0, "denied": 0})
        assert counter["successes"] == was["successes"], f"a success was counted for {subject}"
        for name in ("failures", "denied"):
            expected = was[name] + (
                1 if (scope, subject) == ("tsa", tsa_id) and name == column else 0
            )
            assert counter[name] == expected, f"{name} for {scope} {subject}"
    assert ("tsa", tsa_id) in after
    assert api.http.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def services(app_client: TestClient) -> Services:
    found: Services = app_client.app.state.services  # type: ignore[attr-defined]
    return found


@pytest.fixture(scope="module")
def tsa(services: Services) -> TimestampAuthority:
    return services.tsa.authority()


@pytest.fixture
def chain(api: Api, tmp_path: Path) -> Chain:
    return fetch_chain(api, tmp_path)


# ------------------------------------------------------------------ granted, verified by openssl


@pytest.mark.interop
@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize(("cert", "nonce"), [(True, True), (False, False)], ids=["cert", "bare"])
def test_openssl_verifies_a_timestamp(
    api: Api,
    tsa: TimestampAuthority,
    chain: Chain,
    tmp_path: Path,
    digest: str,
    cert: bool,
    nonce: bool,
) -> None:
    query = openssl_query(tmp_path, digest, cert=cert, nonce=nonce)
    with issued_once(api, tsa.id) as event:
        response = post(api, query.read_bytes())
    reply = reply_of(response)
    assert response.headers["cache-control"] == "no-store"
    assert reply["status"]["status"].native == "granted"
    out = tmp_path / "reply.tsr"
    out.write_bytes(response.content)

    assert "Verification: OK" in openssl_verify(out, query, chain)
    signed_data = reply["time_stamp_token"]["content"]
    if cert:
        # RFC 3161 §2.4.1: certReq -> the TSA certificate is in the token (with the
        # issuing CA, never the root), so no -untrusted is needed.
        embedded = {c.chosen.dump() for c in signed_data["certificates"]}
        assert embedded == {
            chain.tsa.public_bytes(serialization.Encoding.DER),
            chain.issuing.public_bytes(serialization.Encoding.DER),
        }
        assert "Verification: OK" in openssl_verify(out, query, chain, untrusted=False)
    else:
        # ... and without certReq the certificates field MUST NOT be present.
        assert isinstance(signed_data["certificates"], core.Void)
        assert "Verification: OK" not in openssl_verify(out, query, chain, untrusted=False)

    info = tst_info_of(reply)
    imprint = hashlib.new(digest, ARTIFACT).hexdigest()
    assert info["message_imprint"]["hashed_message"].native.hex() == imprint
    assert event["digest"] == imprint
    assert event["key_id"] == tsa.id
    assert event["client_ip"] == "testclient"
    assert event["details"]["hash_algorithm"] == digest
    assert event["details"]["serial"] == f"{info['serial_number'].native:x}"
    assert event["details"]["nonce"] is nonce
    assert event["details"]["cert_req"] is cert
    assert event["principal"]["type"] == "anonymous"


@pytest.mark.interop
def test_openssl_shows_policy_nonce_and_accuracy(
    api: Api, tmp_path: Path, installation: Installation
) -> None:
    openssl = require_tool("openssl")
    query = openssl_query(tmp_path, "sha256")
    asked = run(openssl, "ts", "-query", "-in", str(query), "-text").stdout
    nonce = re.search(r"Nonce: (0x[0-9A-F]+)", asked)
    assert nonce is not None
    out = tmp_path / "reply.tsr"
    out.write_bytes(post(api, query.read_bytes()).content)

    shown = run(openssl, "ts", "-reply", "-in", str(out), "-text").stdout

    assert "Status: Granted." in shown
    assert f"Policy OID: {installation.settings.tsa_policy_oid}" in shown
    assert installation.settings.tsa_policy_oid == DEFAULT_TSA_POLICY_OID
    assert f"Nonce: {nonce.group(1)}" in shown
    assert "Accuracy: 0x01 seconds, unspecified millis, unspecified micros" in shown
    assert "Hash Algorithm: sha256" in shown
    assert "Ordering: no" in shown


@pytest.mark.interop
def test_a_query_naming_our_policy_is_granted(
    api: Api, tsa: TimestampAuthority, chain: Chain, tmp_path: Path
) -> None:
    query = openssl_query(tmp_path, policy=DEFAULT_TSA_POLICY_OID)
    with issued_once(api, tsa.id):
        response = post(api, query.read_bytes())
    out = tmp_path / "reply.tsr"
    out.write_bytes(response.content)
    # With a reqPolicy, openssl also checks that the token carries that policy.
    assert "Verification: OK" in openssl_verify(out, query, chain)


@pytest.mark.interop
@pytest.mark.parametrize("cert_req", [True, False])
def test_rfc3161_client_verifies_a_timestamp(api: Api, chain: Chain, cert_req: bool) -> None:
    try:
        import rfc3161_client as rc
    except ImportError:
        missing("rfc3161-client (pip install -e '.[dev]')")
    request = (
        rc.TimestampRequestBuilder()
        .data(ARTIFACT)
        .hash_algorithm(rc.HashAlgorithm.SHA512)
        .cert_request(cert_request=cert_req)
        .build()
    )
    response = post(api, request.as_bytes())
    decoded = rc.decode_timestamp_response(response.content)
    builder = (
        rc.VerifierBuilder.from_request(request)
        .add_root_certificate(chain.root)
        .add_intermediate_certificate(chain.issuing)
    )
    if not cert_req:
        builder = builder.tsa_certificate(chain.tsa)

    assert builder.build().verify_message(decoded, ARTIFACT)
    assert decoded.tst_info.nonce == request.nonce
    assert decoded.tst_info.policy.dotted_string == DEFAULT_TSA_POLICY_OID
    with pytest.raises(rc.VerificationError):
        builder.build().verify_message(decoded, ARTIFACT + b"tampered")


def test_the_token_has_the_structure_rfc_3161_and_rfc_5816_ask_for(
    api: Api, tsa: TimestampAuthority, installation: Installation, clock: FakeClock
) -> None:
    nonce = 2**70 + 12345
    before = clock.now().replace(microsecond=0)
    reply = reply_of(post(api, query_der(nonce=nonce, cert_req=True)))
    signed_data = reply["time_stamp_token"]["content"]
    info = tst_info_of(reply)

    assert reply["time_stamp_token"]["content_type"].native == "signed_data"
    assert signed_data["version"].native == "v3"  # RFC 5652 §5.1: eContentType != id-data
    encap = signed_data["encap_content_info"]
    assert encap["content_type"].dotted == "1.2.840.113549.1.9.16.1.4"  # id-ct-TSTInfo
    assert isinstance(encap["content"], core.ParsableOctetString)  # TSTInfo in an OCTET STRING
    assert info["version"].native == "v1"
    assert info["policy"].dotted == installation.settings.tsa_policy_oid
    assert info["nonce"].native == nonce
    assert info["accuracy"].native == {"seconds": 1, "millis": None, "micros": None}
    serial = info["serial_number"].native
    assert 0 < serial < 2**128  # RFC 3161 §2.4.2: at most 160 bits
    gen_time = info["gen_time"].native
    assert gen_time.microsecond == 0  # whole seconds (RFC 3161 §2.4.2: no needless fraction)
    assert before <= gen_time <= clock.now()
    assert info["gen_time"].contents.endswith(b"Z")

    (signer,) = signed_data["signer_infos"]
    assert signer["version"].native == "v1"
    sid = signer["sid"].chosen
    assert sid["serial_number"].native == tsa.certificate.serial_number
    assert signer["digest_algorithm"]["algorithm"].native == "sha256"  # P-256 key
    assert signer["signature_algorithm"]["algorithm"].native == "sha256_ecdsa"
    attrs = {a["type"].native: a["values"][0] for a in signer["signed_attrs"]}
    assert set(attrs) == {
        "content_type",
        "message_digest",
        "signing_time",
        "signing_certificate_v2",
        "cms_algorithm_protection",
    }
    assert attrs["content_type"].native == "tst_info"
    assert attrs["message_digest"].native == hashlib.sha256(encap["content"].contents).digest()
    assert attrs["signing_time"].native == gen_time
    (ess,) = attrs["signing_certificate_v2"]["certs"]
    # RFC 5816 §2.2.1: SHA-256 is the default hashAlgorithm, hence absent from the
    # DER: the ESSCertIDv2 starts with the certHash OCTET STRING.
    assert ess.contents[0] == 0x04
    assert ess["cert_hash"].native == tsa.certificate.fingerprint(hashes.SHA256())
    assert ess["issuer_serial"]["serial_number"].native == tsa.certificate.serial_number
    protection = attrs["cms_algorithm_protection"]
    assert protection["digest_algorithm"].dump() == signer["digest_algorithm"].dump()
    assert protection["signature_algorithm"].untag().dump() == (
        signer["signature_algorithm"].dump()
    )


def test_two_timestamps_of_one_query_have_distinct_serials(api: Api) -> None:
    body = query_der()
    serials = {tst_info_of(reply_of(post(api, body)))["serial_number"].native for _ in range(3)}
    assert len(serials) == 3


# ------------------------------------------------------------------ refusals


def test_a_malformed_query_is_rejected_with_bad_data_format(
    api: Api, tsa: TimestampAuthority, tmp_path: Path
) -> None:
    with tsa_refused_once(api, tsa.id, reason="timestamp_query_malformed") as event:
        text_ = assert_rejected(post(api, b"\x30\x03garbage"), FailureInfo.BAD_DATA_FORMAT)
    assert "not a DER TimeStampReq" in text_
    assert event["details"]["fail_info"] == "bad_data_format"
    assert event["outcome"] == "invalid"
    # openssl reads the rejection and its reason.
    out = tmp_path / "rejected.tsr"
    out.write_bytes(post(api, b"").content)
    shown = run(require_tool("openssl"), "ts", "-reply", "-in", str(out), "-text").stdout
    assert "Status: Rejected." in shown
    assert "Failure info: the data submitted has the wrong format" in shown


@pytest.mark.parametrize("digest", ["sha1", "md5"])
def test_an_unsupported_hash_is_rejected_with_bad_alg(
    api: Api, tsa: TimestampAuthority, tmp_path: Path, digest: str
) -> None:
    query = openssl_query(tmp_path, digest)
    with tsa_refused_once(api, tsa.id, reason="timestamp_imprint_algorithm") as event:
        text_ = assert_rejected(post(api, query.read_bytes()), FailureInfo.BAD_ALG)
    assert "use SHA-256, SHA-384 or SHA-512" in text_
    assert event["details"] == {"fail_info": "bad_alg"}
    out = tmp_path / "rejected.tsr"
    out.write_bytes(post(api, query.read_bytes()).content)
    shown = run(require_tool("openssl"), "ts", "-reply", "-in", str(out), "-text").stdout
    assert "Failure info: unrecognized or unsupported algorithm identifier" in shown


def test_an_imprint_of_the_wrong_length_is_rejected_with_bad_data_format(
    api: Api, tsa: TimestampAuthority
) -> None:
    body = query_der(digest=b"\x11" * 20)  # 20 bytes labelled SHA-256
    with tsa_refused_once(api, tsa.id, reason="timestamp_imprint_length"):
        text_ = assert_rejected(post(api, body), FailureInfo.BAD_DATA_FORMAT)
    assert "a sha256 imprint has 32 bytes, got 20" in text_


def test_other_refusals_carry_their_own_fail_info(api: Api, tsa: TimestampAuthority) -> None:
    cases = [
        (query_der(version=2), "timestamp_query_version", FailureInfo.BAD_REQUEST),
        (
            query_der(req_policy="1.2.3.4.5"),
            "timestamp_policy_unaccepted",
            FailureInfo.UNACCEPTED_POLICY,
        ),
        (
            query_der(
                extensions=[{"extn_id": "1.2.3.4", "critical": False, "extn_value": b"\x05\x00"}]
            ),
            "timestamp_extension_unaccepted",
            FailureInfo.UNACCEPTED_EXTENSION,
        ),
        (
            # SHA-256 with parameters other than NULL (RFC 5754 §2 allows none).
            raw_query_der(parameters=core.Integer(0)),
            "timestamp_imprint_algorithm",
            FailureInfo.BAD_ALG,
        ),
    ]
    for body, reason, failure in cases:
        with tsa_refused_once(api, tsa.id, reason=reason):
            assert_rejected(post(api, body), failure)


def test_a_body_not_sent_as_a_timestamp_query_is_refused_with_415(
    api: Api, tsa: TimestampAuthority
) -> None:
    for content_type in ("application/octet-stream", None):
        with tsa_refused_once(api, tsa.id, reason="unsupported_media_type"):
            response = post(api, query_der(), content_type)
        assert response.status_code == 415
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "unsupported_media_type"
    # Parameters and case do not matter (RFC 9110 §8.3.1).
    assert reply_of(post(api, query_der(), "Application/Timestamp-Query; x=1"))


def test_an_oversized_body_is_refused_before_it_is_read(api: Api) -> None:
    with refused_once(api, reason="request_too_large", kind="request.refused"):
        response = post(api, b"\x30" * (16 * 1024))
    assert response.status_code == 413


def test_a_client_over_its_rate_gets_429_with_retry_after(
    api: Api, tsa: TimestampAuthority, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    limiter = ClientRateLimiter(2, audit_interval=10.0, monotonic=lambda: now[0])
    monkeypatch.setattr(services.tsa, "limiter", limiter)
    body = query_der()
    for _ in range(2):
        assert reply_of(post(api, body))["status"]["status"].native == "granted"

    with tsa_refused_once(api, tsa.id, reason="rate_limited") as event:
        response = post(api, body)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"  # 2 per minute: one back in 30 s
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "rate_limited"
    assert problem["retry_after"] == 30
    assert event["outcome"] == "denied"
    assert event["digest"] is None  # nothing of the query was read
    assert event["details"]["unaudited_refusals"] == 0

    # A flood of refusals is not a flood of audit rows: within the audit interval
    # further refusals are only counted, and the next audited one reports them.
    seq, before = api.last_seq(), api.usage()
    for _ in range(3):
        assert post(api, body).status_code == 429
    assert api.events_after(seq) == []
    assert api.usage() == before
    now[0] += 10  # a third of a token back: still refused, and audited again
    with tsa_refused_once(api, tsa.id, reason="rate_limited") as event:
        assert post(api, body).status_code == 429
    assert event["details"]["unaudited_refusals"] == 3

    now[0] += 30
    assert reply_of(post(api, body))["status"]["status"].native == "granted"


def test_no_timestamp_without_its_audit_event(
    api: Api, tsa: TimestampAuthority, installation: Installation
) -> None:
    seq, before = api.last_seq(), api.usage()
    with inserts_fail(installation, "audit_events"):
        for body in (query_der(), b"garbage"):
            response = post(api, body)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == "audit_unavailable"
    assert api.events_after(seq) == []
    assert api.usage() == before
    assert reply_of(post(api, query_der()))["status"]["status"].native == "granted"


# ------------------------------------------------------------------ the TSA certificate


def test_the_tsa_certificate_has_the_rfc_3161_profile(
    chain: Chain, installation: Installation, tsa: TimestampAuthority
) -> None:
    cert = chain.tsa
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical  # RFC 3161 §2.3
    assert list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.content_commitment
    assert not usage.value.key_cert_sign
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca

    assert cert.issuer == chain.issuing.subject
    cert.verify_directly_issued_by(chain.issuing)
    chain.issuing.verify_directly_issued_by(chain.root)
    assert cert.not_valid_after_utc <= chain.issuing.not_valid_after_utc
    assert installation.settings.tsa_algorithm is Algorithm.EC_P256
    assert tsa.algorithm is Algorithm.EC_P256
    assert cert == tsa.certificate


@pytest.mark.interop
def test_openssl_accepts_the_certificate_for_the_timestamp_purpose(chain: Chain) -> None:
    openssl = require_tool("openssl")
    args = ["verify", "-purpose", "timestampsign", "-x509_strict", "-CAfile", str(chain.cas_pem)]
    done = subprocess.run(
        [openssl, *args, str(chain.tsa_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{chain.tsa_pem}: OK"


def test_init_made_the_tsa_in_its_transaction(
    installation: Installation, tsa: TimestampAuthority
) -> None:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, role FROM ca_authorities WHERE role = 'tsa'"))
            assert [r.id for r in rows] == [tsa.id]
            material = conn.execute(
                text("SELECT key_id FROM builtin_key_material WHERE ref = :r"),
                {"r": tsa.handle.ref},
            ).all()
            assert [m.key_id for m in material] == [tsa.id]
            created = conn.execute(
                text("SELECT details, key_id FROM audit_events WHERE kind = 'tsa.created'")
            ).all()
    finally:
        engine.dispose()
    assert len(created) == 1
    assert created[0].key_id == tsa.id
    assert '"provisioned": "init"' in created[0].details


def test_the_usage_report_counts_the_tsa(api: Api, tsa: TimestampAuthority) -> None:
    reply_of(post(api, query_der()))
    response = api.http.get("/api/v1/usage", params={"scope": "tsa"}, headers=api.admin)
    counters = api.ok(response)["counters"]
    assert [(c["subject_type"], c["subject_id"], c["name"]) for c in counters] == [
        ("tsa", tsa.id, "tsa")
    ]
    assert counters[0]["successes"] > 0
    assert counters[0]["tsg_id"] == api.root_tsg_id
    bad = api.http.get("/api/v1/usage", params={"scope": "nope"}, headers=api.admin)
    assert bad.status_code == 400
    assert "'key', 'key_version', 'account' or 'tsa'" in bad.json()["detail"]


def test_the_openapi_document_describes_the_tsa(api: Api) -> None:
    paths = api.ok(api.http.get("/api/v1/openapi.json"))["paths"]
    post_ = paths["/api/v1/tsa"]["post"]
    assert QUERY in post_["requestBody"]["content"]
    assert REPLY in post_["responses"]["200"]["content"]
    assert "/api/v1/tsa/certificate" in paths


# ------------------------------------------------------------------ an RSA TSA key


@pytest.mark.interop
def test_an_rsa_tsa_signs_pkcs1_v15_never_pss(
    services: Services, chain: Chain, tmp_path: Path
) -> None:
    core_ = services.core
    with services.db.read() as s:
        issuing_row = s.scalars(
            select(CaAuthorityRow).where(CaAuthorityRow.role == "issuing")
        ).one()
    config = TsaConfig(
        DEFAULT_TSA_POLICY_OID,
        1,
        60,
        Algorithm.RSA_2048,
        "builtin",
        "Signery",
        public_url="https://signery.example/",
    )
    made = provision_tsa(
        core_.keystores,
        core_.clock,
        config,
        issuing=authority_of(issuing_row),
        root_tsg_id=issuing_row.tsg_id,
        installation="rsa-test",
    )
    store = core_.keystores.get("builtin")
    try:
        rsa_tsa = TimestampAuthority(
            id=made.row.id,
            tsg_id=made.row.tsg_id,
            tsg_path="/",
            algorithm=Algorithm.RSA_2048,
            handle=made.handle,
            certificate=made.certificate,
            issuing=chain.issuing,
            root=chain.root,
        )
        builder = TokenBuilder(rsa_tsa)
        assert builder.scheme is SignatureScheme.RSA_PKCS1V15
        query = openssl_query(tmp_path, "sha384")
        parsed = parse_query(query.read_bytes(), policy=DEFAULT_TSA_POLICY_OID)
        token = builder.build(
            parsed,
            serial=7,
            gen_time=core_.clock.now().replace(microsecond=0),
            policy=DEFAULT_TSA_POLICY_OID,
            accuracy_seconds=1,
            sign=lambda hashed: store.sign(made.handle, hashed, builder.scheme),
        )
        out = tmp_path / "rsa.tsr"
        out.write_bytes(granted_reply(token))
        rsa_chain = Chain(
            made.certificate, chain.issuing, chain.root, tmp_path / "rsa.pem", chain.cas_pem
        )
        rsa_chain.tsa_pem.write_bytes(made.certificate.public_bytes(serialization.Encoding.PEM))

        assert "Verification: OK" in openssl_verify(out, query, rsa_chain)
        signer = Reply.load(out.read_bytes())["time_stamp_token"]["content"]["signer_infos"][0]
        # RFC 3370 §3.2: rsaEncryption with NULL parameters, PKCS#1 v1.5.
        assert signer["signature_algorithm"]["algorithm"].dotted == "1.2.840.113549.1.1.1"
        assert signer["signature_algorithm"]["parameters"].native is None

        # With a public_url the TSA certificate points at Signery's CRL and issuer
        # certificate, like the code-signing certificates (RFC 5280 §4.2.1.13, §4.2.2.1).
        extensions = made.certificate.extensions
        cdp = extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert [n.value for n in cdp[0].full_name or []] == [
            "https://signery.example/api/v1/ca/crl"
        ]
        aia = extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert [a.access_location.value for a in aia] == [
            "https://signery.example/api/v1/ca/issuing.der"
        ]
    finally:
        store.destroy(made.handle)


def test_an_unconfigured_tsa_storage_is_a_configuration_error(services: Services) -> None:
    with services.db.read() as s:
        issuing_row = s.scalars(
            select(CaAuthorityRow).where(CaAuthorityRow.role == "issuing")
        ).one()
    config = TsaConfig(DEFAULT_TSA_POLICY_OID, 1, 60, Algorithm.EC_P256, "pkcs11", "Signery")
    with pytest.raises(ConfigurationError, match="tsa_storage 'pkcs11'"):
        provision_tsa(
            services.core.keystores,
            services.core.clock,
            config,
            issuing=authority_of(issuing_row),
            root_tsg_id=issuing_row.tsg_id,
            installation="x",
        )


def test_a_key_store_returning_a_bad_signature_yields_no_token(
    tsa: TimestampAuthority,
) -> None:
    builder = TokenBuilder(tsa)
    query = parse_query(query_der(), policy=DEFAULT_TSA_POLICY_OID)
    with pytest.raises(SignatureVerificationFailed):
        builder.build(
            query,
            serial=1,
            gen_time=FakeClock().now().replace(microsecond=0),
            policy=DEFAULT_TSA_POLICY_OID,
            accuracy_seconds=1,
            sign=lambda hashed: b"\x30\x06\x02\x01\x01\x02\x01\x01",
        )


def test_building_a_token_stays_cheap_whatever_its_lengths(
    services: Services, tsa: TimestampAuthority
) -> None:
    """Regression: asn1crypto 1.5.1 re-encodes, recursively, any value whose cached
    header ends in 0x80 (wbond/asn1crypto#249); tokens built as nested values cost
    70-150 ms of CPU whenever an ECDSA signature made some length 128 + 256k
    (one token in four), against ~1 ms otherwise."""
    builder = TokenBuilder(tsa)
    queries = [
        parse_query(query_der(nonce=n, cert_req=n % 2 == 0), policy=DEFAULT_TSA_POLICY_OID)
        for n in range(64)
    ]
    store = services.core.keystores.get(tsa.handle.store)
    worst = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # measure the encoding, not a collection of the test process's heap
    try:
        for n, query in enumerate(queries):
            started = time.process_time()
            builder.build(
                query,
                serial=n + 1,
                gen_time=FakeClock().now().replace(microsecond=0),
                policy=DEFAULT_TSA_POLICY_OID,
                accuracy_seconds=1,
                sign=lambda hashed: store.sign(tsa.handle, hashed, builder.scheme),
            )
            worst = max(worst, time.process_time() - started)
    finally:
        if gc_was_enabled:
            gc.enable()
    assert worst < 0.025, f"a token took {worst * 1000:.0f} ms of CPU"


# ------------------------------------------------------------------ parsing, rate limit (units)


def test_parse_query_checks_in_rfc_order() -> None:
    good = query_der()
    parsed = parse_query(good, policy="2.25.1")
    assert parsed.imprint.digest == hashlib.sha256(ARTIFACT).digest()
    assert parsed.nonce is None
    assert parsed.cert_req is False
    with pytest.raises(MalformedTimestampQuery):
        parse_query(good + b"\x00", policy="2.25.1")  # trailing bytes
    with pytest.raises(UnsupportedTimestampQueryVersion):
        parse_query(query_der(SHA1_OID, b"x" * 20, version=3), policy="2.25.1")
    with pytest.raises(UnsupportedImprintAlgorithm):
        parse_query(query_der(SHA1_OID, b"x" * 3), policy="2.25.1")
    with pytest.raises(ImprintLengthMismatch):
        parse_query(query_der(digest=b"x" * 31, extensions=[]), policy="2.25.1")
    with pytest.raises(UnacceptedTimestampExtension):
        parse_query(
            query_der(extensions=[{"extn_id": "1.2.3", "extn_value": b"\x05\x00"}]),
            policy="2.25.1",
        )


VALID = query_der(nonce=2**63, cert_req=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
            lambda m: VALID[: m[0]] + bytes([m[1]]) + VALID[m[0] + 1 :]
        ),
        st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    )
)
def test_parse_query_never_fails_with_anything_but_a_rejection(body: bytes) -> None:
    try:
        parsed = parse_query(body, policy="2.25.1")
    except TimestampQueryRejected:
        return  # a rejection, with its failInfo: the only way to fail
    assert len(parsed.imprint.digest) == parsed.imprint.algorithm.size


def test_the_rate_limiter_refills_and_bounds_its_memory() -> None:
    now = [0.0]
    limiter = ClientRateLimiter(60, max_clients=3, monotonic=lambda: now[0])
    assert all(limiter.take("192.0.2.1") is None for _ in range(60))  # a minute's burst
    refusal = limiter.take("192.0.2.1")
    assert refusal is not None
    assert refusal.retry_after == pytest.approx(1.0)
    assert (refusal.audit, refusal.unaudited) == (True, 0)
    assert limiter.take("192.0.2.2") is None  # another client has its own bucket
    now[0] += 1.0
    assert limiter.take("192.0.2.1") is None
    again = limiter.take("192.0.2.1")
    assert again is not None
    assert (again.audit, again.unaudited) == (False, 1)  # within the audit interval
    for n in range(3, 10):
        limiter.take(f"192.0.2.{n}")
    assert len(limiter._buckets) == 3


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    key = ClientRateLimiter.client_key
    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:192.0.2.7") == "192.0.2.7"
    assert key("192.0.2.7") == "192.0.2.7"
    assert key(None) == "unknown"
    assert key("testclient") == "testclient"


def test_the_policy_oid_setting_is_validated(tmp_path: Path) -> None:
    for bad in ("abc", "1.40.3", "3.1", "1", "1.2.03"):
        with pytest.raises(ConfigurationError, match="tsa_policy_oid"):
            load_settings(data_dir=tmp_path, tsa_policy_oid=bad)
    assert load_settings(data_dir=tmp_path, tsa_policy_oid="1.3.6.1.4.1.99999.1").tsa_policy_oid


# ------------------------------------------------------------------ first use, and the race


class RendezvousStore(DestroyableKeyStore, HealthCheckedKeyStore):
    """The built-in store, but generate() waits until ``parties`` callers are inside
    it: every worker has seen "no TSA" and made its key before any inserts a row."""

    kind = "rendezvous"
    supported_algorithms = frozenset(Algorithm)

    def __init__(self, inner: KeyStore, barrier: threading.Barrier) -> None:
        super().__init__(inner.name)
        self._inner = inner
        self._barrier = barrier
        self.destroyed: list[KeyHandle] = []

    def signs_inline(self, algorithm: Algorithm) -> bool:
        return True

    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        made = self._inner.generate(algorithm, context)
        self._barrier.wait(timeout=30)
        return made

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        return self._inner.sign(handle, hashed, scheme)

    def _public_key(self, handle: KeyHandle) -> PublicKey:
        return self._inner.public_key(handle)

    def _destroy(self, handle: KeyHandle) -> None:
        self.destroyed.append(handle)
        self._inner.destroy(handle)

    def _health(self) -> StoreHealth:
        return self._inner.health()


@pytest.fixture(scope="module")
def old_installation(
    installation: Installation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    """An installation of the same backend whose TSA row is removed after init, as
    an installation initialized before the TSA existed has none."""
    data_dir = tmp_path_factory.mktemp(f"signery-old-{installation.backend}")
    with new_installation(installation.backend, data_dir) as inst:
        forget_the_tsa(inst)
        yield inst


def forget_the_tsa(inst: Installation) -> None:
    engine = make_engine(inst.settings.resolved_database_url, pool_size=1)
    role = {"role": TSA}
    try:
        with engine.begin() as conn:
            refs = conn.execute(
                text("SELECT store_ref FROM ca_authorities WHERE role = :role"), role
            ).scalars()
            for ref in list(refs):
                conn.execute(text("DELETE FROM builtin_key_material WHERE ref = :r"), {"r": ref})
            conn.execute(text("DELETE FROM ca_authorities WHERE role = :role"), role)
    finally:
        engine.dispose()


def tsa_rows(inst: Installation) -> list[Any]:
    engine = make_engine(inst.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT a.id, a.store_ref, a.certificate_der, "
                        "(SELECT count(*) FROM builtin_key_material m WHERE m.ref = a.store_ref) "
                        "AS material FROM ca_authorities a WHERE a.role = 'tsa'"
                    )
                )
            )
    finally:
        engine.dispose()


@pytest.mark.interop
def test_an_installation_without_a_tsa_gets_one_on_first_use(
    old_installation: Installation, tmp_path: Path
) -> None:
    assert tsa_rows(old_installation) == []
    app = create_app(old_installation.settings)
    with TestClient(app, base_url="http://signery.test") as client:
        api = Api(
            client,
            old_installation.admin_token,
            old_installation.init.issuer,
            old_installation.init.root_tsg_id,
        )
        seq = api.last_seq()
        query = openssl_query(tmp_path)
        response = post(api, query.read_bytes())
        out = tmp_path / "reply.tsr"
        out.write_bytes(response.content)
        chain = fetch_chain(api, tmp_path)
        assert "Verification: OK" in openssl_verify(out, query, chain)
        kinds = [e["kind"] for e in api.events_after(seq)]
    assert kinds == ["tsa.created", "tsa.timestamp.issued"]
    (row,) = tsa_rows(old_installation)
    assert row.material == 1
    assert x509.load_der_x509_certificate(bytes(row.certificate_der)) == chain.tsa


def test_two_workers_racing_on_first_use_make_exactly_one_tsa(
    old_installation: Installation,
) -> None:
    forget_the_tsa(old_installation)
    barrier = threading.Barrier(2)
    cores = [Core.build(old_installation.settings) for _ in range(2)]
    stores = [RendezvousStore(core_.keystores.get("builtin"), barrier) for core_ in cores]
    workers = [
        TsaService(
            db=core_.db,
            keystores=KeyStoreRegistry([store]),
            recorder=core_.recorder,
            clock=core_.clock,
            config=TsaConfig.of(old_installation.settings),
        )
        for core_, store in zip(cores, stores, strict=True)
    ]
    results: list[TimestampAuthority | BaseException] = [RuntimeError("not run")] * 2

    def first_use(i: int) -> None:
        try:
            results[i] = workers[i].authority()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for core_ in cores:
            core_.keystores.close()
            core_.db.dispose()

    got = [r for r in results if isinstance(r, TimestampAuthority)]
    assert len(got) == 2, results
    assert got[0].id == got[1].id
    assert got[0].certificate == got[1].certificate
    (row,) = tsa_rows(old_installation)
    assert row.id == got[0].id
    assert row.material == 1  # the loser destroyed its key: nothing orphaned
    destroyed = [h for store in stores for h in store.destroyed]
    assert len(destroyed) == 1
    assert destroyed[0].ref != row.store_ref


# ------------------------------------------------------------------ access modes


def test_an_authenticated_tsa_wants_a_token_and_names_the_requester(
    installation: Installation, tsa: TimestampAuthority
) -> None:
    settings = installation.settings.model_copy(update={"tsa_access": TsaAccess.AUTHENTICATED})
    with TestClient(create_app(settings), base_url="http://signery.test") as client:
        api = Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )
        seq, before = api.last_seq(), api.usage()
        refused = post(api, query_der())
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthenticated"
        events = api.events_after(seq)
        assert [e["kind"] for e in events] == ["auth.authentication.failed"]
        assert api.usage() == before  # nothing counted for the TSA

        with issued_once(api, tsa.id) as event:
            granted = api.http.post(
                "/api/v1/tsa",
                content=query_der(),
                headers={"content-type": QUERY, **api.admin},
            )
            assert reply_of(granted)["status"]["status"].native == "granted"
        assert event["principal"]["type"] == "user"
        assert event["principal"]["name"] == "admin"


def test_a_disabled_tsa_answers_404_and_issues_nothing(installation: Installation) -> None:
    settings = installation.settings.model_copy(update={"tsa_access": TsaAccess.DISABLED})
    with TestClient(create_app(settings), base_url="http://signery.test") as client:
        api = Api(
            client,
            installation.admin_token,
            installation.init.issuer,
            installation.init.root_tsg_id,
        )
        before = api.usage()
        for response in (post(api, query_der()), api.http.get("/api/v1/tsa/certificate")):
            assert response.status_code == 404
            assert response.json()["code"] == "tsa_disabled"
        assert api.usage() == before


def test_the_tsa_key_lives_where_the_ca_keys_do_by_default(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, ca_storage="pkcs11")
    assert TsaConfig.of(settings).storage == "pkcs11"
    settings = load_settings(data_dir=tmp_path, ca_storage="pkcs11", tsa_storage="builtin")
    assert TsaConfig.of(settings).storage == "builtin"
    with pytest.raises(ConfigurationError, match="tsa_access"):
        load_settings(data_dir=tmp_path, tsa_access="everyone")
