"""Approvals on the signing plane and for approvers: 202 pending requests, M-of-N
decisions, grants bounded in uses and time, pre-approvals, revocation; every step
audited. SQLite and PostgreSQL (the ``api`` fixture)."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from signery.crypto import Hashed, load_public_key_pem, verify_signature
from signery.protocol import DigestAlgorithm, SignatureScheme
from tests.server.keys.lifecycle_helpers import services_of
from tests.server.users.test_users import Person
from tests.support import Account, Api, FakeClock

HOUR = 3600


@pytest.fixture(scope="module")
def tsg(api: Api) -> dict[str, Any]:
    return api.create_tsg()


@pytest.fixture(scope="module")
def approver(api: Api, tsg: dict[str, Any]) -> Person:
    return Person(api, tsg["id"], "approver")


@pytest.fixture(scope="module")
def approver2(api: Api, tsg: dict[str, Any]) -> Person:
    return Person(api, tsg["id"], "approver")


@pytest.fixture(scope="module")
def viewer(api: Api, tsg: dict[str, Any]) -> Person:
    return Person(api, tsg["id"], "key_viewer")


class Signer:
    """An account with a token, signing digests with one key."""

    def __init__(self, api: Api, account: Account, key: dict[str, Any]) -> None:
        self.api, self.account, self.key = api, account, key
        self.token = api.access_token(account)
        self.n = 0

    def digest(self, n: int) -> bytes:
        """This signer's ``n``-th artifact digest (SHA-256)."""
        return hashlib.sha256(f"{self.account.id}-{n}".encode()).digest()

    def sign(
        self, justification: str | None = None, *, again: bool = False, digest: bytes | None = None
    ) -> httpx.Response:
        """Sign the next digest (``again``: the same one as last time, as a client
        does once its request is approved; or exactly ``digest``)."""
        if digest is None:
            if not again:
                self.n += 1
            digest = self.digest(self.n)
        body: dict[str, Any] = {
            "digest": base64.b64encode(digest).decode(),
            "digest_algorithm": "sha256",
            "scheme": "ecdsa",
        }
        if justification:
            body["justification"] = justification
        response = self.api.http.post(
            f"/api/v1/signing/keys/{self.key['id']}/sign",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        if response.status_code == 200:
            public = load_public_key_pem(self.key["public_key_pem"])
            signature = base64.b64decode(response.json()["signature"])
            assert verify_signature(
                public, Hashed(DigestAlgorithm.SHA256, digest), SignatureScheme.ECDSA, signature
            )
        return response

    def new_token(self, clock: FakeClock) -> None:
        """A token valid at the (advanced) time of the server's clock."""
        self.token = self.api.access_token(self.account, now=clock.now().timestamp())

    def request(self, request_id: str) -> httpx.Response:
        return self.api.http.get(
            f"/api/v1/signing/requests/{request_id}",
            headers={"Authorization": f"Bearer {self.token}"},
        )


def guarded_key(api: Api, tsg_id: str, **approval: Any) -> dict[str, Any]:
    key = api.create_key(tsg_id)
    api.ok(
        api.http.put(
            f"/api/v1/keys/{key['id']}/policy", json={"approval": approval}, headers=api.admin
        )
    )
    return key


def signer(api: Api, tsg: dict[str, Any], **approval: Any) -> Signer:
    return Signer(api, api.create_account(tsg["id"]), guarded_key(api, tsg["id"], **approval))


def decide(
    api: Api, who: Person | dict[str, str], request_id: str, action: str, **body: Any
) -> httpx.Response:
    headers = who.headers if isinstance(who, Person) else who
    return api.http.post(f"/api/v1/approvals/{request_id}/{action}", json=body, headers=headers)


def pre_approve(api: Api, who: Person, s: Signer, **body: Any) -> httpx.Response:
    return api.http.post(
        "/api/v1/approvals",
        json={"key": s.key["id"], "account": s.account.id, **body},
        headers=who.headers,
    )


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def pending(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "pending_approval"
    assert response.headers["location"] == f"/api/v1/signing/requests/{body['request_id']}"
    return body


# ------------------------------------------------------------------ the whole flow


def test_request_approve_sign_once_then_pending_again(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    seq = api.last_seq()
    usage = api.usage()
    first = pending(s.sign(justification="release 1.2"))
    # Concurrent retries of the same account share the one pending request.
    again = pending(s.sign(again=True))
    assert again["request_id"] == first["request_id"]
    assert api.usage() == usage, "a pending request is not a signature and is not counted"
    events = api.events_after(seq)
    assert kinds(events) == ["signing.approval.requested"] * 2
    assert {e["reason"] for e in events} == {"approval_required"}
    assert [e["details"]["reused"] for e in events] == [False, True]

    listed = api.ok(api.http.get("/api/v1/approvals", headers=approver.headers))
    mine = [r for r in listed if r["id"] == first["request_id"]]
    assert len(mine) == 1
    assert mine[0]["justification"] == "release 1.2"
    assert mine[0]["requested_by"]["id"] == s.account.id

    seq = api.last_seq()
    decided = api.ok(decide(api, approver, first["request_id"], "approve", comment="ok"))
    assert decided["status"] == "approved"
    grant = decided["grant"]
    assert grant["max_uses"] == 1
    assert grant["uses"] == 0
    assert grant["status"] == "valid"
    assert kinds(api.events_after(seq)) == ["signing.approval.approved", "signing.grant.created"]
    state = api.ok(s.request(first["request_id"]))
    assert state["status"] == "approved"
    assert state["approvals"] == 1
    assert state["grant"]["id"] == grant["id"]

    seq = api.last_seq()
    # The client signs again what it asked for: the grant covers that digest.
    signed = s.sign(again=True)
    assert signed.status_code == 200, signed.text
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.sign.succeeded"
    assert event["details"]["grant_id"] == grant["id"]
    grants = api.ok(
        api.http.get("/api/v1/grants", params={"key": s.key["id"]}, headers=approver.headers)
    )
    assert [(g["uses"], g["max_uses"], g["status"]) for g in grants] == [(1, 1, "used_up")]

    seq = api.last_seq()
    again = pending(s.sign())
    assert again["request_id"] != first["request_id"]
    (event,) = api.events_after(seq)
    assert event["details"]["grant_state"] == "grant_used_up"


def test_other_accounts_cannot_see_a_signing_request(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg)
    other = Signer(api, api.create_account(tsg["id"]), s.key)
    request_id = pending(s.sign())["request_id"]
    assert s.request(request_id).status_code == 200
    refused = other.request(request_id)
    assert refused.status_code == 404
    assert refused.json()["code"] == "approval_request_not_found"
    # The other account's own signing makes its own request: grants are per account.
    assert pending(other.sign())["request_id"] != request_id


# ------------------------------------------------------------------ who may decide


def refusal_of(api: Api, seq: int, code: str) -> None:
    events = api.events_after(seq)
    assert kinds(events) == ["signing.approval.refused"], events
    assert events[0]["reason"] == code


def test_the_requesting_account_cannot_approve_its_own_request(
    api: Api, tsg: dict[str, Any]
) -> None:
    s = signer(api, tsg)
    request_id = pending(s.sign())["request_id"]
    seq = api.last_seq()
    refused = decide(api, {"Authorization": f"Bearer {s.token}"}, request_id, "approve")
    assert refused.status_code == 403
    assert refused.json()["code"] == "self_approval_forbidden"
    refusal_of(api, seq, "self_approval_forbidden")


def test_a_pre_approver_cannot_approve_again_and_two_of_two_needs_two_people(
    api: Api, tsg: dict[str, Any], approver: Person, approver2: Person
) -> None:
    s = signer(api, tsg, required=2)
    created = api.ok(pre_approve(api, approver, s, max_uses=1, scope="any_digest"), 201)
    assert created["status"] == "pending_approval"
    assert created["approvals"] == 1
    assert created["requested_by"]["id"] == approver.id
    seq = api.last_seq()
    refused = decide(api, approver, created["id"], "approve")
    assert refused.status_code == 403
    assert refused.json()["code"] == "self_approval_forbidden"
    refusal_of(api, seq, "self_approval_forbidden")
    # Still one approval: the account has no grant and is pending.
    assert pending(s.sign())["request_id"] == created["id"]
    done = api.ok(decide(api, approver2, created["id"], "approve"))
    assert done["status"] == "approved"
    assert done["approvals"] == 2
    assert s.sign().status_code == 200


def test_two_of_two_on_a_signing_request(
    api: Api, tsg: dict[str, Any], approver: Person, approver2: Person
) -> None:
    s = signer(api, tsg, required=2)
    request_id = pending(s.sign())["request_id"]
    first = api.ok(decide(api, approver, request_id, "approve"))
    assert first["status"] == "pending_approval"
    assert first["grant"] is None
    seq = api.last_seq()
    twice = decide(api, approver, request_id, "approve")
    assert twice.status_code == 409
    assert twice.json()["code"] == "approval_already_decided"
    refusal_of(api, seq, "approval_already_decided")
    assert s.sign().status_code == 202
    assert api.ok(decide(api, approver2, request_id, "approve"))["status"] == "approved"
    assert s.sign(digest=s.digest(1)).status_code == 200
    seq = api.last_seq()
    closed = decide(api, approver2, request_id, "deny", comment="too late")
    assert closed.status_code == 409
    assert closed.json()["code"] == "approval_request_closed"
    refusal_of(api, seq, "approval_request_closed")


def test_non_approvers_and_approvers_outside_the_policy_list_are_refused(
    api: Api, tsg: dict[str, Any], approver: Person, approver2: Person, viewer: Person
) -> None:
    s = signer(api, tsg, required=1, approvers=[approver2.username])
    request_id = pending(s.sign())["request_id"]
    for who in (viewer, approver):
        seq = api.last_seq()
        refused = decide(api, who, request_id, "approve")
        assert refused.status_code == 403
        assert refused.json()["code"] == "not_an_approver"
        refusal_of(api, seq, "not_an_approver")
    outsider = Person(api, api.create_tsg()["id"], "approver")
    seq = api.last_seq()
    hidden = decide(api, outsider, request_id, "approve")
    assert hidden.status_code == 404
    assert hidden.json()["code"] == "approval_request_not_found"
    refusal_of(api, seq, "approval_request_not_found")
    assert request_id not in {
        r["id"] for r in api.ok(api.http.get("/api/v1/approvals", headers=outsider.headers))
    }
    assert api.ok(decide(api, approver2, request_id, "approve"))["status"] == "approved"


def test_one_deny_denies_and_the_account_sees_the_comment(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=2)
    request_id = pending(s.sign())["request_id"]
    seq = api.last_seq()
    denied = api.ok(decide(api, approver, request_id, "deny", comment="not this build"))
    assert denied["status"] == "denied"
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.approval.denied"
    assert event["details"]["comment"] == "not this build"
    state = api.ok(s.request(request_id))
    assert state["status"] == "denied"
    assert state["comment"] == "not this build"
    # A new signing makes a new request: a denial is not a ban.
    assert pending(s.sign())["request_id"] != request_id


# ------------------------------------------------------------------ grants in time and uses


def test_an_expired_grant_is_refused(
    api: Api, tsg: dict[str, Any], approver: Person, clock: FakeClock
) -> None:
    s = signer(api, tsg, required=1)
    created = api.ok(
        pre_approve(api, approver, s, max_uses=5, expires_in_hours=1, scope="any_digest"), 201
    )
    assert created["status"] == "approved"
    assert created["grant"]["max_uses"] == 1, "the policy's single use bounds the grant"
    clock.advance(HOUR + 1)
    s.new_token(clock)
    seq = api.last_seq()
    usage = api.usage()
    body = pending(s.sign())
    assert body["request_id"] != created["id"]
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.approval.requested"
    assert event["outcome"] == "denied"
    assert event["details"]["grant_state"] == "grant_expired"
    assert api.usage() == usage


def test_a_pending_request_past_its_time_expires_and_cannot_be_approved(
    api: Api, tsg: dict[str, Any], approver: Person, clock: FakeClock
) -> None:
    s = signer(api, tsg, required=1, request_ttl_hours=1)
    request_id = pending(s.sign())["request_id"]
    clock.advance(HOUR + 1)
    s.new_token(clock)
    seq = api.last_seq()
    closed = decide(api, approver, request_id, "approve")
    assert closed.status_code == 409
    assert closed.json()["code"] == "approval_request_closed"
    assert kinds(api.events_after(seq)) == ["signing.approval.expired", "signing.approval.refused"]
    assert api.ok(s.request(request_id))["status"] == "expired"


def test_the_scheduler_expires_overdue_requests_once_even_when_two_sweep(
    api: Api, app_client: TestClient, tsg: dict[str, Any], clock: FakeClock
) -> None:
    s = signer(api, tsg, required=1, request_ttl_hours=1)
    request_id = pending(s.sign())["request_id"]
    services = services_of(app_client)
    assert services.approval_expiry.expire_due(clock.now())["expired"] == 0
    clock.advance(HOUR + 1)
    seq = api.last_seq()
    with ThreadPoolExecutor(2) as pool:
        swept = list(pool.map(lambda _: services.approval_expiry.expire_due(clock.now()), range(2)))
    assert sum(r["expired"] for r in swept) >= 1
    expired = [
        e
        for e in api.events_after(seq)
        if e["kind"] == "signing.approval.expired" and e["details"]["request_id"] == request_id
    ]
    assert len(expired) == 1, "expired (and audited) exactly once"
    assert expired[0]["principal"]["type"] == "system"
    s.new_token(clock)
    assert api.ok(s.request(request_id))["status"] == "expired"


def test_n_use_and_unlimited_grants_and_revocation(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1, grant_max_uses=None, grant_ttl_hours=48)
    three = api.ok(
        pre_approve(api, approver, s, max_uses=3, expires_in_hours=24, scope="any_digest"), 201
    )
    assert three["grant"]["max_uses"] == 3
    assert [s.sign().status_code for _ in range(4)] == [200, 200, 200, 202]

    t = Signer(api, api.create_account(tsg["id"]), s.key)
    no_expiry = pre_approve(api, approver, t, unlimited=True, max_uses=None, scope="any_digest")
    assert no_expiry.status_code == 201  # expires_in_hours defaults to 24 on pre-approvals
    grant = no_expiry.json()["grant"]
    assert grant["max_uses"] is None
    assert grant["status"] == "valid"
    assert [t.sign().status_code for _ in range(5)] == [200] * 5
    seq = api.last_seq()
    revoked = api.ok(
        api.http.post(f"/api/v1/grants/{grant['id']}/revoke", headers=approver.headers)
    )
    assert revoked["status"] == "revoked"
    assert revoked["uses"] == 5
    (event,) = api.events_after(seq)
    assert event["kind"] == "signing.grant.revoked"
    assert event["details"]["grant_id"] == grant["id"]
    seq = api.last_seq()
    pending(t.sign())
    assert api.events_after(seq)[0]["details"]["grant_state"] == "grant_revoked"


def test_an_approver_narrows_the_grant_and_unlimited_needs_an_expiry(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1, grant_max_uses=10, grant_ttl_hours=48)
    request_id = pending(s.sign())["request_id"]
    bad = decide(api, approver, request_id, "approve", unlimited=True)
    assert bad.status_code == 400
    decided = api.ok(decide(api, approver, request_id, "approve", max_uses=2, expires_in_hours=8))
    assert decided["grant"]["max_uses"] == 2
    assert decided["grant_ttl_hours"] == 8
    # Two uses of the one digest approved.
    assert [s.sign(again=True).status_code for _ in range(3)] == [200, 200, 202]


def test_a_single_use_grant_signs_exactly_once_under_concurrency(
    api: Api, tsg: dict[str, Any], approver: Person
) -> None:
    s = signer(api, tsg, required=1)
    api.ok(pre_approve(api, approver, s, max_uses=1, scope="any_digest"), 201)
    seq = api.last_seq()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: s.sign(), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [202] * 7, [a.text for a in answers]
    # Every loser waits on the same new request.
    assert len({a.json()["request_id"] for a in answers if a.status_code == 202}) == 1
    events = api.events_after(seq)
    assert kinds(events).count("signing.sign.succeeded") == 1
    grants = api.ok(
        api.http.get("/api/v1/grants", params={"key": s.key["id"]}, headers=approver.headers)
    )
    assert [(g["uses"], g["max_uses"]) for g in grants] == [(1, 1)]


def test_keys_without_approval_sign_as_before(api: Api, tsg: dict[str, Any]) -> None:
    key = api.create_key(tsg["id"])
    s = Signer(api, api.create_account(tsg["id"]), key)
    assert s.sign().status_code == 200
