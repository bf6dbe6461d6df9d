"""The typed management sub-clients of signery.client against a real ``signery serve``
process (SQLite and PostgreSQL): each method reaches its route with the request
model and parses the answer into the response model; a refusal raises the
server's error class."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signery import errors
from signery import protocol as p
from signery.client import Client, ServerUnreachable
from signery.crypto import hash_bytes
from signery.errors import ClientError
from tests.support import Api, Installation, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def admin(installation: Installation, server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, api_token=installation.admin_token) as c:
        yield c


@pytest.fixture(scope="module")
def team(admin: Client, server_api: Api) -> p.Tsg:
    return admin.tsgs.create(p.TsgCreate(name=server_api.unique("team")))


def public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def new_key(admin: Client, api: Api, tsg: p.Tsg, **fields: Any) -> p.SigningKey:
    request = p.KeyCreate(
        name=api.unique("key"),
        tsg_id=tsg.id,
        algorithm=p.Algorithm.EC_P256,
        certificate_authority=p.CertificateAuthority.BUILTIN,
        **fields,
    )
    return admin.signing_keys.create(request)


# ------------------------------------------------------------------ TSGs, users, roles


def test_tsgs(admin: Client, team: p.Tsg, installation: Installation) -> None:
    child = admin.tsgs.create(p.TsgCreate(name="child", parent_id=team.id))
    assert child.parent_id == team.id
    assert admin.tsgs.get(child.id) == child
    assert {team.id, child.id} <= {t.id for t in admin.tsgs.list()}
    (tree,) = admin.tsgs.tree(team.id)
    assert [c.id for c in tree.children] == [child.id]

    rules = p.SubjectPolicyRules(organization=["Example"], common_name=["*"])
    policy = admin.tsgs.set_subject_policy(child.id, rules)
    assert policy.effect is p.SubjectPolicyEffect.POLICIES
    assert policy.own is not None
    assert policy.own.rules.organization == ["Example"]
    assert policy.own.rules.country == []  # omitted: may not appear
    assert admin.tsgs.subject_policy(child.id).own == policy.own
    admin.tsgs.clear_subject_policy(child.id)
    assert admin.tsgs.subject_policy(child.id).own is None


def test_users_and_their_tokens(admin: Client, team: p.Tsg, server_api: Api) -> None:
    created = admin.users.create(p.UserCreate(username=server_api.unique("user"), tsg_id=team.id))
    assert created.password, "a generated password is shown once"
    assert admin.users.get(created.username).id == created.id
    assert created.id in {u.id for u in admin.users.list()}
    me = admin.users.me()
    assert me.username != created.username

    token = admin.users.create_token("me", p.ApiTokenCreate(name="ci", expires_in_days=1))
    assert token.token
    assert token.id in {t.id for t in admin.users.tokens()}
    with Client(admin.server, api_token=token.token) as as_me:
        assert as_me.users.me().id == me.id
    revoked = admin.users.revoke_token(token.id)
    assert revoked.revoked
    with (
        Client(admin.server, api_token=token.token) as as_me,
        pytest.raises(errors.InvalidToken),
    ):
        as_me.users.me()


def test_role_bindings(admin: Client, team: p.Tsg, server_api: Api) -> None:
    user = admin.users.create(p.UserCreate(username=server_api.unique("viewer"), tsg_id=team.id))
    binding = admin.roles.bind(
        p.RoleBindingCreate(principal_id=user.id, role=p.Role.KEY_VIEWER, tsg_id=team.id)
    )
    assert binding.role is p.Role.KEY_VIEWER
    assert binding.id in {b.id for b in admin.roles.list(team.id)}
    admin.roles.unbind(binding.id)
    assert binding.id not in {b.id for b in admin.roles.list(team.id)}


# ------------------------------------------------------------------ accounts


def test_accounts(admin: Client, team: p.Tsg, server_api: Api) -> None:
    account = admin.accounts.create(p.AccountCreate(name=server_api.unique("bot"), tsg_id=team.id))
    assert account.private_key_pem, "a generated private key is returned once"
    assert admin.accounts.get(account.client_id).id == account.id
    assert account.id in {a.id for a in admin.accounts.list(team.id)}
    assert admin.accounts.disable(account.id).status is p.AccountStatus.DISABLED
    assert admin.accounts.enable(account.id).status is p.AccountStatus.ACTIVE

    added = admin.accounts.add_key(account.id, p.AccountKeyAdd(public_key_pem=public_pem()))
    assert len(added.keys) == 2
    new = next(k for k in added.keys if k.id not in {k.id for k in account.keys})
    assert [k.id for k in admin.accounts.remove_key(account.id, new.id).keys] == [
        k.id for k in account.keys
    ]


# ------------------------------------------------------------------ signing keys, CA


def test_signing_key_reads(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team)
    assert admin.signing_keys.get(key.name, team.id).id == key.id
    assert key.id in {k.id for k in admin.signing_keys.list(team.id)}
    assert key.id in {k.id for k in admin.signing_keys.list(expiring_within_days=3650)}
    pem = admin.signing_keys.public_key(key.id)
    assert serialization.load_pem_public_key(pem.encode())
    chain = x509.load_pem_x509_certificates(admin.signing_keys.chain(key.id).encode())
    assert len(chain) >= 2
    (record,) = admin.signing_keys.certificates(key.id)
    assert record.status == "current"


def test_signing_key_certificates(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team, subject=p.KeySubject(common_name="Old"))
    renewed = admin.signing_keys.renew(key.id, p.CertificateRenew(validity_days=30))
    assert renewed.current_version == key.current_version
    reissued = admin.signing_keys.reissue(
        key.id, p.CertificateReissue(subject=p.KeySubject(common_name="New"))
    )
    current = next(v for v in reissued.versions if v.version == reissued.current_version)
    assert current.certificate is not None
    assert "New" in current.certificate.subject
    records = admin.signing_keys.certificates(key.id)
    assert len(records) == 3
    old = next(r for r in records if r.status != "current")
    revoked = admin.signing_keys.revoke_certificate(
        key.id, p.CertificateRevoke(serial=old.serial, reason="superseded")
    )
    assert revoked.revocation_reason == "superseded"
    crl = x509.load_der_x509_crl(admin.ca.crl())
    assert crl.get_revoked_certificate_by_serial_number(int(old.serial.replace(":", ""), 16))


def test_signing_key_lifecycle(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team)
    rotated = admin.signing_keys.rotate(key.id, p.KeyRotate())
    assert rotated.current_version == key.current_version + 1
    scheduled = admin.signing_keys.set_rotation(
        key.id, p.KeyRotationSchedule(rotation_period_days=90)
    )
    assert scheduled.rotation_period_days == 90
    assert admin.signing_keys.disable(key.id).status is p.KeyStatus.DISABLED
    assert admin.signing_keys.enable(key.id).status is p.KeyStatus.ACTIVE
    doomed = admin.signing_keys.destroy(key.id, p.KeyDestroy(after_days=7))
    assert doomed.destroy_at is not None
    assert admin.signing_keys.cancel_destroy(key.id).destroy_at is None


def test_signing_key_policy(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team)
    assert admin.signing_keys.policy(key.id) is None
    policy = p.KeyPolicy(max_signatures_per_day=10, allowed_schemes=[p.SignatureScheme.ECDSA])
    assert admin.signing_keys.set_policy(key.id, policy) == policy
    assert admin.signing_keys.policy(key.id) == policy
    admin.signing_keys.clear_policy(key.id)
    assert admin.signing_keys.policy(key.id) is None


def test_ca_connectors_and_key_stores(admin: Client, team: p.Tsg, server_api: Api) -> None:
    roots = x509.load_pem_x509_certificates(admin.ca.chain().encode())[-1]
    request = p.CaConnectorCreate(
        name=server_api.unique("corp-ca"),
        tsg_id=team.id,
        kind=p.ConnectorKind.CSR,
        roots_pem=roots.public_bytes(serialization.Encoding.PEM).decode(),
    )
    connector = admin.ca_connectors.create(request)
    assert admin.ca_connectors.get(connector.name, team.id).id == connector.id
    assert connector.id in {c.id for c in admin.ca_connectors.list(team.id)}
    updated = admin.ca_connectors.update(connector.id, p.CaConnectorUpdate(public=True))
    assert updated.public
    admin.ca_connectors.delete(connector.id)
    with pytest.raises(errors.SigneryError) as e:
        admin.ca_connectors.get(connector.id)
    assert e.value.code.endswith("not_found")

    assert "builtin" in {s.name for s in admin.keystores.list()}


def test_ca_revoke(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team)
    (record,) = admin.signing_keys.certificates(key.id)
    revoked = admin.ca.revoke(record.serial, p.CaCertificateRevoke(reason="keyCompromise"))
    assert revoked.status == "revoked"
    assert revoked.key_id == key.id


# ------------------------------------------------------------------ approvals and grants


def test_approvals_and_grants(admin: Client, team: p.Tsg, server_api: Api) -> None:
    key = new_key(admin, server_api, team)
    account = server_api.create_account(team.id)
    admin.signing_keys.set_policy(key.id, p.KeyPolicy(approval=p.ApprovalPolicy()))
    hashed = hash_bytes(b"release", p.DigestAlgorithm.SHA256)
    with Client(admin.server, credentials=account.credentials()) as build:
        with pytest.raises(errors.SigneryError) as pending:
            build.sign(key.name, hashed, p.SignatureScheme.ECDSA)
        request_id = str(pending.value.extra["request_id"])
        assert request_id in {r.id for r in admin.approvals.list()}
        assert admin.approvals.get(request_id).status is p.ApprovalStatus.PENDING_APPROVAL
        approved = admin.approvals.approve(request_id, p.ApprovalDecide(comment="ok"))
        assert approved.status is p.ApprovalStatus.APPROVED
        assert build.sign(key.name, hashed, p.SignatureScheme.ECDSA).signature

        with pytest.raises(errors.SigneryError) as again:
            build.sign(key.name, hashed, p.SignatureScheme.ECDSA)
        denied = admin.approvals.deny(
            str(again.value.extra["request_id"]), p.ApprovalDecide(comment="no")
        )
        assert denied.status is p.ApprovalStatus.DENIED

    ahead = admin.approvals.pre_approve(
        p.PreApprovalCreate(key=key.id, account=account.id, scope=p.GrantScope.ANY_DIGEST)
    )
    assert ahead.grant is not None
    assert ahead.id in {r.id for r in admin.approvals.list("all")}
    grants = admin.grants.list(key=key.id, account=account.id)
    assert ahead.grant.id in {g.id for g in grants}
    assert admin.grants.revoke(ahead.grant.id).status == "revoked"


# ------------------------------------------------------------------ audit and usage


def test_audit(admin: Client, team: p.Tsg) -> None:
    newest = admin.audit.events(newest_first=True, limit=1)
    assert len(newest.events) == 1
    every = list(admin.audit.all_events())
    assert every[-1].id == newest.events[0].id
    assert [e.seq for e in every] == sorted(e.seq for e in every)
    created = admin.audit.events(kind="tsg.created", tsg_id=team.id)
    assert {e.kind for e in created.events} == {"tsg.created"}

    made = admin.audit.checkpoint()
    assert made.checkpoints
    assert {c.id for c in made.checkpoints} <= {c.id for c in admin.audit.checkpoints().checkpoints}
    assert "PUBLIC KEY" in admin.audit.public_key().public_key_pem

    with admin.audit.export() as chunks:
        lines = b"".join(chunks).decode().splitlines()
    assert len(lines) >= len(every)
    assert {json.loads(line)["id"] for line in lines} >= {e.id for e in every}
    with admin.audit.export(fmt=p.ExportFormat.CSV) as chunks:
        header = b"".join(chunks).decode().splitlines()[0]
    assert "kind" in header.split(",")

    usage = admin.audit.usage(scope=p.UsageScope.KEY)
    assert {c.subject_type for c in usage.counters} <= {"key"}
    assert admin.audit.usage(by_day=True).counters is not None


# ------------------------------------------------------------------ errors


def test_refusals_raise_the_servers_error_class(admin: Client) -> None:
    with pytest.raises(errors.SigneryError) as e:
        admin.signing_keys.get("no-such-key")
    assert e.value.code == "key_not_found"
    with pytest.raises(ClientError, match="invalid key"):
        admin.signing_keys.get("..")


def test_management_needs_a_token_and_a_server(server: ServerProcess) -> None:
    with Client(server.url) as anonymous, pytest.raises(ClientError, match="no API token"):
        anonymous.tsgs.list()
    with (
        Client("http://127.0.0.1:9", api_token="sgy_pat_x") as nowhere,
        pytest.raises(ServerUnreachable),
    ):
        nowhere.keystores.list()
