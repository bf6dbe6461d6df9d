"""signery.client's RFC 3161 requester (make_query, check_reply, request_timestamp),
against the in-process server's TSA: the query is what the TSA parses, and a reply
is used only if it is granted and echoes the query's imprint and nonce."""

from __future__ import annotations

import pytest
from asn1crypto import tsp

from signery.client import TimestampFailed, TimestampRefused, request_timestamp
from signery.client._timestamp import check_reply, make_query
from signery.crypto import hash_bytes
from signery.errors import ClientError, FailureInfo, UnsupportedImprintAlgorithm
from signery.protocol import DigestAlgorithm
from signery.server.config import DEFAULT_TSA_POLICY_OID
from signery.server.tsa.token import rejection_reply
from tests.support import Api

URL = "http://signery.test/api/v1/tsa"


def test_the_query_is_what_the_tsa_parses() -> None:
    for algorithm in (DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512):
        imprint = hash_bytes(b"artifact", algorithm)
        query = make_query(imprint)
        req = tsp.TimeStampReq.load(query.der)
        assert req["version"].native == "v1"
        assert req["message_imprint"]["hashed_message"].native == imprint.digest
        assert req["message_imprint"]["hash_algorithm"]["algorithm"].native == algorithm.value
        assert req["cert_req"].native is True
        assert req["nonce"].native == query.nonce
        assert 0 < query.nonce < 2**64
    assert make_query(imprint).nonce != make_query(imprint).nonce


def test_a_granted_reply_is_checked_against_its_query(api: Api) -> None:
    imprint = hash_bytes(b"release.tar.gz", DigestAlgorithm.SHA384)
    query, stamp = request_timestamp(URL, imprint, http=api.http)
    assert stamp.policy == DEFAULT_TSA_POLICY_OID
    assert stamp.serial > 0
    assert stamp.token in stamp.reply
    assert check_reply(query, stamp.reply) == stamp

    # The same reply for another query is refused: another nonce, another imprint.
    other = make_query(imprint)
    with pytest.raises(TimestampFailed, match="nonce"):
        check_reply(other, stamp.reply)
    with pytest.raises(TimestampFailed, match="another message imprint"):
        check_reply(make_query(hash_bytes(b"other", DigestAlgorithm.SHA384)), stamp.reply)


def test_a_rejection_is_reported_with_its_fail_info(api: Api) -> None:
    query = make_query(hash_bytes(b"x", DigestAlgorithm.SHA256))
    reply = rejection_reply(UnsupportedImprintAlgorithm("use SHA-256"))
    with pytest.raises(TimestampRefused) as refused:
        check_reply(query, reply)
    assert refused.value.extra["fail_info"] == [FailureInfo.BAD_ALG.value]
    assert "use SHA-256" in refused.value.detail


@pytest.mark.parametrize("body", [b"", b"garbage", b"\x30\x03\x02\x01\x00"])
def test_an_answer_that_is_not_a_reply_is_refused(body: bytes) -> None:
    query = make_query(hash_bytes(b"x", DigestAlgorithm.SHA256))
    with pytest.raises(TimestampFailed):
        check_reply(query, body)


def test_http_failures_say_what_the_tsa_answered(api: Api) -> None:
    imprint = hash_bytes(b"x", DigestAlgorithm.SHA256)
    with pytest.raises(TimestampFailed, match="404"):
        request_timestamp("http://signery.test/api/v1/nope", imprint, http=api.http)
    with pytest.raises(TimestampFailed, match="cannot reach"):
        request_timestamp("http://127.0.0.1:9/tsa", imprint, timeout=2)
    with pytest.raises(ClientError, match="https://"):
        request_timestamp("ftp://tsa.example", imprint)
