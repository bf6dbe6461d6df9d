"""A grant signs what its approvers saw: the request's exact (digest, digest
algorithm, scheme) set, each once by default. A batch of files is one request
listing every digest; its set is fixed from the first decision on. A pre-approval
says which kind it is: a list of digests, or ``any_digest`` on purpose. SQLite
and PostgreSQL (the ``api`` fixture)."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.server.approvals.test_approvals import (
    Signer,
    decide,
    guarded_key,
    kinds,
    pending,
    pre_approve,
    refusal_of,
    signer,
)
from tests.server.users.test_users import Person
from tests.support import Api


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def approver(api: Api, tsg: dict[str, Any]) -> Person:
    return Person(api, tsg["id"], "approver")


@pytest.fixture(scope="module")
def approver2(api: Api, tsg: dict[str, Any]) -> Person:
    return Person(api, tsg["id"], "approver")


def shown(api: Api, who: Person, request_id: str) -> dict[str, Any]:
    return api.ok(api.http.get(f"/api/v1/approvals/{request_id}", headers=who.headers))  # type: ignore[no-any-return]


def listed_digests(item: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d["digest_algorithm"], d["digest"], d["scheme"]) for d in item["digests"]]


def sha256_item(digest: bytes, scheme: str = "ecdsa") -> tuple[str, str, str]:
    return ("sha256", digest.hex(), scheme)


def test_a_grant_signs_only_the_digest_the_approvers_saw(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    first = pending(s.sign())
    approved = api.ok(decide(api, approver, first["request_id"], "approve"))

    seq = api.last_seq()
    other = s.sign(digest=s.digest(99))
    assert other.status_code == 202, "a grant for one digest signs no other"
    assert other.json()["request_id"] != first["request_id"]
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.approval.requested"
    assert event["details"]["grant_state"] == "grant_digest_mismatch"
    request = shown(api, approver, first["request_id"])
    assert request["scope"] == "digests"
    assert listed_digests(request) == [sha256_item(s.digest(1))]
    assert approved["grant"]["scope"] == "digests"

    seq = api.last_seq()
    assert s.sign(digest=s.digest(1)).status_code == 200
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.sign.succeeded"
    assert event["digest"] == s.digest(1).hex()
    assert event["details"]["grant_id"] == approved["grant"]["id"]
    assert event["details"]["grant_scope"] == "digests"


def test_the_grant_binds_the_scheme_and_the_digest_algorithm(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    rsa = api.create_key(tsg["id"], "RSA_2048")
    api.ok(
        api.http.put(
            f"/api/v1/keys/{rsa['id']}/policy",
            json={"approval": {"required": 1}},
            headers=api.admin,
        )
    )
    token = api.access_token(api.create_account(tsg["id"]))
    digest = hashlib.sha256(b"one artifact").digest()
    asked = api.sign(token, rsa["id"], digest, "sha256", "rsa-pkcs1v15")
    request_id = pending(asked)["request_id"]
    api.ok(decide(api, approver, request_id, "approve"))
    assert api.sign(token, rsa["id"], digest, "sha256", "rsa-pss").status_code == 202
    # The same 32 bytes named as another algorithm's digest are another artifact.
    sha512 = hashlib.sha512(b"one artifact").digest()
    assert api.sign(token, rsa["id"], sha512, "sha512", "rsa-pkcs1v15").status_code == 202
    assert api.sign(token, rsa["id"], digest, "sha256", "rsa-pkcs1v15").status_code == 200


def test_a_batch_is_one_request_listing_every_digest_and_each_signs_once(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    seq = api.last_seq()
    answers = [pending(s.sign(digest=s.digest(i))) for i in range(3)]
    # The same file again while it waits adds nothing.
    answers.append(pending(s.sign(digest=s.digest(0))))
    assert len({a["request_id"] for a in answers}) == 1
    request_id = answers[0]["request_id"]
    events = api.events_after(seq)
    assert [e["digest"] for e in events] == [s.digest(i).hex() for i in (0, 1, 2, 0)]
    assert [e["details"]["digest_count"] for e in events] == [1, 2, 3, 3]

    expected = [sha256_item(s.digest(i)) for i in range(3)]
    assert listed_digests(shown(api, approver, request_id)) == expected
    in_list = api.ok(api.http.get("/api/v1/approvals", headers=approver.headers))
    (entry,) = [r for r in in_list if r["id"] == request_id]
    assert listed_digests(entry) == expected

    seq = api.last_seq()
    decided = api.ok(decide(api, approver, request_id, "approve", digest_count=3))
    grant = decided["grant"]
    assert listed_digests(grant) == expected
    assert [d["uses"] for d in grant["digests"]] == [0, 0, 0]
    created = [e for e in api.events_after(seq) if e["kind"] == "signing.grant.created"]
    assert created[0]["details"]["scope"] == "digests"
    assert [
        (d["digest_algorithm"], d["digest"], d["scheme"]) for d in created[0]["details"]["digests"]
    ] == expected

    assert [s.sign(digest=s.digest(i)).status_code for i in (2, 0, 1)] == [200, 200, 200]
    # Each digest signs once (the policy's single use), then waits for approval again.
    again = pending(s.sign(digest=s.digest(0)))
    assert again["request_id"] != request_id
    grants = api.ok(
        api.http.get("/api/v1/grants", params={"key": s.key["id"]}, headers=approver.headers)
    )
    (used,) = [g for g in grants if g["id"] == grant["id"]]
    assert (used["uses"], used["max_uses"], used["status"]) == (3, 1, "used_up")
    assert [d["uses"] for d in used["digests"]] == [1, 1, 1]


def test_the_digests_of_a_request_are_fixed_once_an_approver_decided(
    api: Api, tsg: dict[str, Any], approver: Person, approver2: Person
) -> None:
    s = signer(api, tsg, required=2)
    first = pending(s.sign(digest=s.digest(0)))["request_id"]
    api.ok(decide(api, approver, first, "approve"))
    late = pending(s.sign(digest=s.digest(1)))["request_id"]
    assert late != first, "a request an approver decided on takes no new digest"
    assert listed_digests(shown(api, approver2, first)) == [sha256_item(s.digest(0))]
    api.ok(decide(api, approver2, first, "approve"))
    assert s.sign(digest=s.digest(1)).status_code == 202
    assert s.sign(digest=s.digest(0)).status_code == 200


def test_a_decision_on_a_request_that_changed_since_it_was_read_is_refused(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    request_id = pending(s.sign(digest=s.digest(0)))["request_id"]
    seen = shown(api, approver, request_id)
    assert len(seen["digests"]) == 1
    # Another file joins the request while the approver looks at it.
    assert pending(s.sign(digest=s.digest(1)))["request_id"] == request_id
    seq = api.last_seq()
    refused = decide(api, approver, request_id, "approve", digest_count=len(seen["digests"]))
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "approval_request_changed"
    refusal_of(api, seq, "approval_request_changed")
    assert shown(api, approver, request_id)["status"] == "pending_approval"
    assert api.ok(decide(api, approver, request_id, "approve", digest_count=2))["status"] == (
        "approved"
    )


def test_a_pre_approval_must_say_what_it_covers(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1, grant_max_uses=None, grant_ttl_hours=48)
    unsaid = pre_approve(api, approver, s, max_uses=2)
    assert unsaid.status_code == 400, "no silent default to any digest"
    digest = s.digest(7)
    item = {"digest": digest.hex(), "digest_algorithm": "sha256", "scheme": "ecdsa"}
    for body in (
        {"scope": "digests"},
        {"scope": "digests", "digests": []},
        {"scope": "any_digest", "digests": [item]},
        {"scope": "digests", "digests": [{**item, "digest": digest.hex()[:-2]}]},
        {"scope": "digests", "digests": [{**item, "digest": "zz" * 32}]},
        {"scope": "everything"},
    ):
        bad = pre_approve(api, approver, s, max_uses=2, **body)
        assert bad.status_code == 400, (body, bad.text)


def test_a_pre_approval_of_listed_digests_signs_those_only(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    wanted = s.digest(5)
    seq = api.last_seq()
    created = api.ok(
        pre_approve(
            api,
            approver,
            s,
            max_uses=1,
            scope="digests",
            digests=[{"digest": wanted.hex(), "digest_algorithm": "sha256", "scheme": "ecdsa"}],
        ),
        201,
    )
    assert created["scope"] == "digests"
    assert listed_digests(created) == [sha256_item(wanted)]
    assert created["grant"]["scope"] == "digests"
    events = api.events_after(seq)
    requested = next(e for e in events if e["kind"] == "signing.approval.requested")
    assert requested["details"]["scope"] == "digests"
    assert requested["details"]["digests"] == [
        {"digest_algorithm": "sha256", "digest": wanted.hex(), "scheme": "ecdsa"}
    ]
    assert s.sign(digest=s.digest(6)).status_code == 202
    assert s.sign(digest=wanted).status_code == 200
    assert s.sign(digest=wanted).status_code == 202


def test_an_any_digest_pre_approval_says_so_everywhere(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1, grant_max_uses=None, grant_ttl_hours=48)
    seq = api.last_seq()
    created = api.ok(pre_approve(api, approver, s, max_uses=2, scope="any_digest"), 201)
    assert created["scope"] == "any_digest"
    assert created["digests"] == []
    assert created["grant"]["scope"] == "any_digest"
    events = api.events_after(seq)
    assert kinds(events) == [
        "signing.approval.requested",
        "signing.approval.approved",
        "signing.grant.created",
    ]
    assert {e["details"]["scope"] for e in events} == {"any_digest"}
    listed = api.ok(api.http.get("/api/v1/approvals?status=all", headers=approver.headers))
    assert next(r for r in listed if r["id"] == created["id"])["scope"] == "any_digest"
    grants = api.ok(
        api.http.get("/api/v1/grants", params={"key": s.key["id"]}, headers=approver.headers)
    )
    assert [g["scope"] for g in grants] == ["any_digest"]
    # Any two artifacts, then the two uses are spent.
    seq = api.last_seq()
    assert [s.sign().status_code for _ in range(3)] == [200, 200, 202]
    signed = [e for e in api.events_after(seq) if e["kind"] == "signing.sign.succeeded"]
    assert {e["details"]["grant_scope"] for e in signed} == {"any_digest"}


def test_an_approved_digest_signs_exactly_once_under_concurrency(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    request_id = pending(s.sign(digest=s.digest(0)))["request_id"]
    grant = api.ok(decide(api, approver, request_id, "approve"))["grant"]
    body = {
        "digest": base64.b64encode(s.digest(0)).decode(),
        "digest_algorithm": "sha256",
        "scheme": "ecdsa",
    }

    def sign(_: int) -> httpx.Response:
        return api.http.post(
            f"/api/v1/signing/keys/{s.key['id']}/sign",
            json=body,
            headers={"Authorization": f"Bearer {s.token}"},
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(sign, range(8)))
    assert sorted(a.status_code for a in answers) == [200] + [202] * 7
    assert len({a.json()["request_id"] for a in answers if a.status_code == 202}) == 1
    grants = api.ok(
        api.http.get("/api/v1/grants", params={"key": s.key["id"]}, headers=approver.headers)
    )
    (used,) = [g for g in grants if g["id"] == grant["id"]]
    assert (used["uses"], [d["uses"] for d in used["digests"]]) == (1, [1])


def test_a_signer_from_another_key_gains_nothing_from_a_grant(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    other = Signer(api, s.account, guarded_key(api, tsg["id"], required=1))
    request_id = pending(s.sign(digest=s.digest(0)))["request_id"]
    api.ok(decide(api, approver, request_id, "approve"))
    assert other.sign(digest=s.digest(0)).status_code == 202
    assert s.sign(digest=s.digest(0)).status_code == 200
