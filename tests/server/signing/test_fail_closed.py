"""Fail closed: no signature leaves without its durable audit record, and a key
store that returns a bad signature never reaches the client."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient

from signery.crypto import Hashed
from signery.keystores import BuiltinKeyStore, KeyHandle, KeyStoreRegistry
from signery.protocol import SignatureScheme
from signery.server.app import create_app
from signery.server.container import Core
from tests.support import Api, Installation, inserts_fail

DIGEST = hashlib.sha256(b"fail closed").digest()


def audit_writes_fail(installation: Installation) -> contextlib.AbstractContextManager[None]:
    return inserts_fail(installation, "audit_events")


@pytest.fixture(scope="module")
def setup(api: Api) -> dict[str, Any]:
    tsg = api.create_tsg()
    account = api.create_account(tsg["id"])
    return {
        "tsg": tsg,
        "account": account,
        "key": api.create_key(tsg["id"], "EC_P256"),
        "token": api.access_token(account),
    }


def test_no_signature_when_the_audit_event_cannot_be_committed(
    api: Api, installation: Installation, setup: dict[str, Any]
) -> None:
    key, account = setup["key"], setup["account"]
    seq = api.last_seq()
    before = api.usage()
    with audit_writes_fail(installation):
        response = api.sign(setup["token"], key["name"], DIGEST)
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["code"] == "audit_unavailable"
        assert "signature" not in body
        assert response.headers["retry-after"]
        # Refusals fail closed too: a 503, never an unaudited answer.
        bad = api.sign(setup["token"], key["name"], b"short")
        assert bad.status_code == 503
        assert bad.json()["code"] == "audit_unavailable"
    assert api.usage() == before, "nothing may be counted for a signing that was not audited"
    assert api.events_after(seq) == []
    # Once the audit store is back, signing works again.
    assert api.sign(setup["token"], key["name"], DIGEST).status_code == 200
    after = api.usage()
    assert (
        api.counter(after, "account", account.id)[0]
        == api.counter(before, "account", account.id)[0] + 1
    )


def test_no_token_when_its_issuance_cannot_be_audited(
    api: Api, installation: Installation, setup: dict[str, Any]
) -> None:
    assertion = setup["account"].credentials().assertion(api.issuer)
    with audit_writes_fail(installation):
        response = api.token_response(assertion)
        assert response.status_code == 503, response.text
        assert "access_token" not in response.json()
    # The jti was not spent by the failed attempt: the transaction rolled back.
    assert api.token_response(assertion).status_code == 200


def test_no_management_change_without_its_event(api: Api, installation: Installation) -> None:
    with audit_writes_fail(installation):
        response = api.http.post("/api/v1/tsgs", json={"name": "unaudited"}, headers=api.admin)
        assert response.status_code == 503
    names = {t["name"] for t in api.ok(api.http.get("/api/v1/tsgs", headers=api.admin))}
    assert "unaudited" not in names


class CorruptingStore(BuiltinKeyStore):
    """A key store whose signatures are wrong (a faulty HSM, a fault attack)."""

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        good = bytearray(super()._sign(handle, hashed, scheme))
        good[-1] ^= 0x01
        return bytes(good)


def test_a_signature_that_does_not_verify_is_never_returned(
    api: Api, installation: Installation, setup: dict[str, Any], module_clock: Any
) -> None:
    core = Core.build(installation.settings, clock=module_clock)
    core.keystores = KeyStoreRegistry([CorruptingStore(core.db.engine, core.keyring)])
    app = create_app(installation.settings, core=core)
    with TestClient(app, base_url="http://faulty.test") as client:
        faulty = Api(client, api.admin_token, api.issuer, api.root_tsg_id)
        key = setup["key"]
        seq = faulty.last_seq()
        response = faulty.sign(faulty.access_token(setup["account"]), key["name"], DIGEST)
        assert response.status_code == 500
        assert response.json()["code"] == "signature_self_check_failed"
        assert "signature" not in response.json()
        events = [e for e in faulty.events_after(seq) if e["kind"].startswith("signing.")]
        assert [(e["kind"], e["reason"]) for e in events] == [
            ("signing.sign.error", "signature_self_check_failed")
        ]
