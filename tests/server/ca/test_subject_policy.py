"""Subject policies: which certificate subjects the built-in CA issues in a TSG.

The installation starts the way an upgraded one does: no policy anywhere. Keys in
the root TSG get any subject; below it nothing is certified until a root
superuser sets a policy; every policy on the path applies; key creation,
reissue, renewal, rotation (scheduled too) and EST enrollment are all checked;
only a superuser at the root sets policies, and EST enrollment of keys Signery
does not hold is authorized at the root only. SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from signery import protocol as p
from signery.errors import SubjectPolicyInvalid
from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.app import create_app
from signery.server.ca.subject_policy import compile_pattern, validate_rules
from signery.server.persistence.db import make_engine
from tests.server.connectors.test_est_server import EST, make_csr, post
from tests.server.keys.lifecycle_helpers import action, key_of, services_of
from tests.server.users.test_users import Person, basic
from tests.support import Api, FakeClock, Installation, new_installation, refused_once

DAY = 86400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    """As after an upgrade: no subject policy anywhere (and no background scheduler:
    the tests run scheduled rotations themselves)."""
    data_dir = tmp_path_factory.mktemp(f"signery-subject-{request.param}")
    with new_installation(
        request.param, data_dir, any_subject=False, scheduler_interval_seconds=0
    ) as inst:
        yield inst


@pytest.fixture(scope="module")
def https(app_client: TestClient) -> TestClient:
    """The in-process server as seen over HTTPS (the scheme EST requires)."""
    return TestClient(app_client.app, base_url="https://signery.test")


def set_policy(
    api: Api, tsg_id: str, headers: dict[str, str] | None = None, **rules: list[str]
) -> httpx.Response:
    return api.http.put(
        f"/api/v1/tsgs/{tsg_id}/subject-policy", json=rules, headers=headers or api.admin
    )


def allow(api: Api, tsg_id: str, **rules: list[str]) -> dict[str, Any]:
    return api.ok(set_policy(api, tsg_id, **rules))  # type: ignore[no-any-return]


def create_key(api: Api, tsg_id: str, **subject: str) -> httpx.Response:
    body: dict[str, Any] = {
        "name": api.unique("key"),
        "tsg_id": tsg_id,
        "algorithm": "EC_P256",
        "certificate_authority": "builtin",
    }
    if subject:
        body["subject"] = subject
    return api.http.post("/api/v1/keys", json=body, headers=api.admin)


def refused_code(response: httpx.Response, status: int = 403) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["code"])


def material_rows(installation: Installation) -> int:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(BuiltinKeyMaterialRow)).scalar_one()
            )
    finally:
        engine.dispose()


def subject_of(key: dict[str, Any]) -> str:
    certificate = next(v for v in key["versions"] if v["version"] == key["current_version"])
    return str(certificate["certificate"]["subject"])


def name(cn: str, **more: str) -> x509.Name:
    oids = {"o": NameOID.ORGANIZATION_NAME, "ou": NameOID.ORGANIZATIONAL_UNIT_NAME}
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            *(x509.NameAttribute(oids[k], v) for k, v in more.items()),
        ]
    )


def admin_basic(installation: Installation) -> dict[str, str]:
    return basic(installation.init.admin_username or "", installation.init.admin_password or "")


# ------------------------------------------------------------------ EST enrollment


def test_a_subtree_superuser_cannot_enroll_keys_signery_does_not_hold(
    api: Api, https: TestClient
) -> None:
    """Regression: a superuser of any TSG got a code-signing certificate from the
    shared built-in CA, for any subject, at its own TSG or a label below it."""
    team = api.create_tsg()
    local = Person(api, team["id"], "superuser")
    csr = make_csr(name("Release", o="Example Inc"))
    with refused_once(api, reason="permission_denied"):
        response = post(https, f"{EST}/simpleenroll", csr, basic(local.username, local.password))
        assert response.status_code == 403, response.text
    assert "root TSG" in response.json()["detail"]
    with refused_once(api, reason="permission_denied"):
        labelled = post(https, f"{EST}/{team['id']}/simpleenroll", csr, local.headers)
        assert labelled.status_code == 403, labelled.text
    with refused_once(api, reason="permission_denied"):
        again = post(https, f"{EST}/{team['id']}/simplereenroll", csr, local.headers)
        assert again.status_code == 403, again.text


def test_a_root_superuser_enrolls_under_the_label_tsgs_subject_policy(
    api: Api, installation: Installation, https: TestClient
) -> None:
    team = api.create_tsg()
    at_team = f"{EST}/{team['id']}/simpleenroll"
    # Unlabelled: the root TSG's certificate, any subject while the root has no policy.
    assert (
        post(
            https, f"{EST}/simpleenroll", make_csr(name("Anything")), admin_basic(installation)
        ).status_code
        == 200
    )
    # Labelled with a TSG below the root that has no policy: nothing is certified.
    with refused_once(api, reason="subject_policy_missing"):
        missing = post(https, at_team, make_csr(name("Build", o="Example Inc")), api.admin)
        assert missing.status_code == 403, missing.text
    allow(api, team["id"], common_name=["Build *"], organization=["Example Inc"])
    with refused_once(api, reason="subject_not_allowed"):
        other = post(https, at_team, make_csr(name("Build 1", o="Other Inc")), api.admin)
        assert other.status_code == 403, other.text
    assert other.json()["attribute"] == "organization"
    assert other.json()["policy_tsg_id"] == team["id"]
    seq = api.last_seq()
    issued = post(https, at_team, make_csr(name("Build 1", o="Example Inc")), api.admin)
    assert issued.status_code == 200, issued.text
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(issued.content.split())))
    assert cert.subject.rfc4514_string() == "O=Example Inc,CN=Build 1"
    (event,) = [e for e in api.events_after(seq) if e["kind"] == "ca.certificate.issued"]
    assert event["tsg_id"] == team["id"]
    assert event["details"]["protocol"] == "est"


# ------------------------------------------------------------------ key creation


def test_keys_below_the_root_get_no_certificate_without_a_policy(
    api: Api, installation: Installation
) -> None:
    """Regression: without any policy, a key in any TSG got any subject."""
    team = api.create_tsg()
    material = material_rows(installation)
    with refused_once(api, reason="subject_policy_missing"):
        response = create_key(api, team["id"], organization="Example Inc")
        assert response.status_code == 403, response.text
    assert "signery tsg subject-policy set" in response.json()["detail"]
    assert material_rows(installation) == material, "no key pair was generated"
    assert (
        api.ok(api.http.get("/api/v1/keys", params={"tsg_id": team["id"]}, headers=api.admin)) == []
    )
    assert create_key(api, team["id"]).status_code == 403
    # Without a certificate there is no subject to constrain.
    body = {"name": api.unique("raw"), "tsg_id": team["id"], "algorithm": "EC_P256"}
    assert api.http.post("/api/v1/keys", json=body, headers=api.admin).status_code == 201
    # The root TSG, the CA's own tenant, gets any subject while it has no policy.
    root_key = create_key(api, api.root_tsg_id, organization="Whatever Corp")
    assert root_key.status_code == 201, root_key.text
    view = api.ok(api.http.get(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin))
    assert view == {"tsg_id": team["id"], "own": None, "path": [], "effect": "refused"}
    root_view = api.ok(
        api.http.get(f"/api/v1/tsgs/{api.root_tsg_id}/subject-policy", headers=api.admin)
    )
    assert root_view["effect"] == "any_subject"


RULES: dict[str, list[str]] = {
    "common_name": ["Build *", "Release"],
    "organization": ["Example Inc"],
    "organizational_unit": ["", "Team ?"],
    "email": ["", "*@example.com"],
}


@pytest.mark.parametrize(
    ("subject", "refused_attribute"),
    [
        ({"common_name": "Build 7", "organization": "Example Inc"}, None),
        (
            {
                "common_name": "Release",
                "organization": "Example Inc",
                "organizational_unit": "Team A",
            },
            None,
        ),
        (
            {"common_name": "Build 7", "organization": "Example Inc", "email": "ci@example.com"},
            None,
        ),
        # The CN defaults to the key's name, which no pattern allows.
        ({"organization": "Example Inc"}, "common_name"),
        ({"common_name": "Release 2", "organization": "Example Inc"}, "common_name"),
        ({"common_name": "Build 7"}, "organization"),
        ({"common_name": "Build 7", "organization": "Example Inc."}, "organization"),
        ({"common_name": "Build 7", "organization": "example inc"}, "organization"),
        (
            {
                "common_name": "Build 7",
                "organization": "Example Inc",
                "organizational_unit": "Team AB",
            },
            "organizational_unit",
        ),
        ({"common_name": "Build 7", "organization": "Example Inc", "country": "US"}, "country"),
        (
            {
                "common_name": "Build 7",
                "organization": "Example Inc",
                "email": "ci@example.com.evil",
            },
            "email",
        ),
    ],
    ids=[
        "allowed",
        "optional-ou",
        "email",
        "default-cn",
        "cn",
        "o-missing",
        "o-other",
        "o-case",
        "ou-other",
        "c-not-allowed",
        "email-domain",
    ],
)
def test_key_creation_is_held_to_the_tsgs_policy(
    api: Api, subject: dict[str, str], refused_attribute: str | None
) -> None:
    team = api.create_tsg()
    allow(api, team["id"], **RULES)
    response = create_key(api, team["id"], **subject)
    if refused_attribute is None:
        assert response.status_code == 201, response.text
        assert f"CN={subject['common_name']}" in subject_of(response.json())
        return
    with refused_once(api, reason="subject_not_allowed"):
        response = create_key(api, team["id"], **subject)
        assert response.status_code == 403, response.text
    assert response.json()["attribute"] == refused_attribute
    assert response.json()["policy_tsg_id"] == team["id"]


def test_every_policy_on_the_path_applies_and_a_child_only_narrows(api: Api) -> None:
    parent = api.create_tsg()
    child = api.create_tsg(parent=parent["id"])
    grandchild = api.create_tsg(parent=child["id"])
    allow(api, parent["id"], common_name=["*"], organization=["Example *"])
    # The child lists a wider organization: it still cannot have it.
    allow(api, child["id"], common_name=["*"], organization=["Example Inc", "Other Inc"])

    assert create_key(api, child["id"], organization="Example Inc").status_code == 201
    narrowed = create_key(api, child["id"], organization="Example Corp")
    assert refused_code(narrowed) == "subject_not_allowed"
    assert narrowed.json()["policy_tsg_id"] == child["id"]
    wider = create_key(api, child["id"], organization="Other Inc")
    assert refused_code(wider) == "subject_not_allowed"
    assert wider.json()["policy_tsg_id"] == parent["id"], "the parent's policy refuses it"
    assert f"above TSG {child['id']}" in wider.json()["detail"]
    # The grandchild, without a policy of its own, inherits both.
    assert create_key(api, grandchild["id"], organization="Example Inc").status_code == 201
    assert refused_code(create_key(api, grandchild["id"], organization="Example Corp")) == (
        "subject_not_allowed"
    )
    # The parent keeps what its own policy allows.
    assert create_key(api, parent["id"], organization="Example Corp").status_code == 201

    view = api.ok(
        api.http.get(f"/api/v1/tsgs/{grandchild['id']}/subject-policy", headers=api.admin)
    )
    assert view["own"] is None
    assert view["effect"] == "policies"
    assert [level["tsg_id"] for level in view["path"]] == [parent["id"], child["id"]]
    assert view["path"][1]["rules"]["organization"] == ["Example Inc", "Other Inc"]


# ------------------------------------------------------------------ renew, reissue, rotate


def test_reissue_and_renewal_are_held_to_the_policy_in_force(api: Api) -> None:
    team = api.create_tsg()
    allow(api, team["id"], common_name=["*"], organization=["Example Inc", "Example Ltd"])
    key = api.ok(create_key(api, team["id"], common_name="Build", organization="Example Inc"), 201)

    with refused_once(api, reason="subject_not_allowed"):
        reissued = action(
            api,
            key["id"],
            "reissue",
            {"subject": {"common_name": "Build", "organization": "Rogue"}},
        )
        assert reissued.status_code == 403, reissued.text
    after = key_of(api, key["id"])
    assert subject_of(after) == subject_of(key), "the certificate did not change"
    assert (
        len(api.ok(api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=api.admin))) == 1
    )

    # The policy narrows after the key got its certificate: the next one is refused.
    allow(api, team["id"], common_name=["*"], organization=["Example Ltd"])
    with refused_once(api, reason="subject_not_allowed"):
        renewed = action(api, key["id"], "renew")
        assert renewed.status_code == 403, renewed.text
    fixed = api.ok(
        action(
            api,
            key["id"],
            "reissue",
            {"subject": {"common_name": "Build", "organization": "Example Ltd"}},
        )
    )
    assert "O=Example Ltd" in subject_of(fixed)
    assert api.ok(action(api, key["id"], "renew"))["current_version"] == 1


def test_rotation_is_held_to_the_policy_in_force(
    api: Api, installation: Installation, app_client: TestClient, clock: FakeClock
) -> None:
    team = api.create_tsg()
    allow(api, team["id"], common_name=["*"], organization=["Example Inc"])
    manual = api.ok(create_key(api, team["id"], organization="Example Inc"), 201)
    scheduled = api.ok(
        api.http.post(
            "/api/v1/keys",
            json={
                "name": api.unique("sched"),
                "tsg_id": team["id"],
                "algorithm": "EC_P256",
                "certificate_authority": "builtin",
                "subject": {"organization": "Example Inc"},
                "rotation_period_days": 30,
            },
            headers=api.admin,
        ),
        201,
    )
    allow(api, team["id"], common_name=["*"], organization=["Example Ltd"])
    material = material_rows(installation)

    with refused_once(api, reason="subject_not_allowed"):
        rotated = action(api, manual["id"], "rotate")
        assert rotated.status_code == 403, rotated.text
    assert key_of(api, manual["id"])["current_version"] == 1

    clock.advance(30 * DAY + 60)
    seq = api.last_seq()
    summary = services_of(app_client).lifecycle.rotate_due(clock.now())
    assert (summary.done, summary.failed) == (0, 1)
    (failed,) = [e for e in api.events_after(seq) if e["kind"] == "key.rotation.failed"]
    assert failed["key_id"] == scheduled["id"]
    assert failed["reason"] == "subject_not_allowed"
    assert key_of(api, scheduled["id"])["current_version"] == 1
    assert material_rows(installation) == material, "no key pair was generated"


# ------------------------------------------------------------------ who sets, who reads


def test_only_a_root_superuser_sets_or_clears_subject_policies(api: Api) -> None:
    team = api.create_tsg()
    sibling = api.create_tsg()
    rules = {"common_name": ["*"], "organization": ["Team Inc"]}
    local = Person(api, team["id"], "superuser")
    with refused_once(api, reason="permission_denied"):
        assert refused_code(set_policy(api, team["id"], local.headers, **rules)) == (
            "permission_denied"
        )
    with refused_once(api, reason="tsg_not_found"):
        assert refused_code(set_policy(api, sibling["id"], local.headers, **rules), 404) == (
            "tsg_not_found"
        )
    root_key_admin = Person(api, api.root_tsg_id, "key_admin")
    assert refused_code(set_policy(api, team["id"], root_key_admin.headers, **rules)) == (
        "permission_denied"
    )
    allow(api, team["id"], **rules)
    with refused_once(api, reason="permission_denied"):
        cleared = api.http.delete(
            f"/api/v1/tsgs/{team['id']}/subject-policy", headers=local.headers
        )
        assert refused_code(cleared) == "permission_denied"

    # Whoever reads the TSG reads the policies that apply to it.
    viewer = Person(api, team["id"], "key_viewer")
    seen = api.ok(api.http.get(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=viewer.headers))
    assert seen["own"]["rules"]["organization"] == ["Team Inc"]
    assert seen["own"]["updated_by"] is not None
    hidden = api.http.get(f"/api/v1/tsgs/{sibling['id']}/subject-policy", headers=viewer.headers)
    assert refused_code(hidden, 404) == "tsg_not_found"
    assert (
        refused_code(api.http.get("/api/v1/tsgs/1000000000/subject-policy", headers=api.admin), 404)
        == "tsg_not_found"
    )

    deleted = api.http.delete(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin)
    assert deleted.status_code == 204, deleted.text
    again = api.http.delete(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin)
    assert refused_code(again, 404) == "subject_policy_not_found"


def test_setting_and_clearing_a_policy_are_audited(api: Api) -> None:
    team = api.create_tsg()
    seq = api.last_seq()
    allow(api, team["id"], common_name=["*"], organization=["A Inc"])
    allow(api, team["id"], common_name=["*"], organization=["B Inc", "B Inc"])
    assert (
        api.http.delete(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin).status_code
        == 204
    )
    events = [e for e in api.events_after(seq) if e["kind"] == "ca.subject_policy.updated"]
    assert [e["tsg_id"] for e in events] == [team["id"]] * 3
    assert all(e["principal"]["name"] == "admin" for e in events)
    first, second, cleared = (e["details"] for e in events)
    assert first["previous_policy"] is None
    assert first["policy"]["organization"] == ["A Inc"]
    assert second["previous_policy"]["organization"] == ["A Inc"]
    assert second["policy"]["organization"] == ["B Inc"], "duplicates are dropped"
    assert cleared["policy"] is None
    assert cleared["previous_policy"]["organization"] == ["B Inc"]


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"organization": ["Example Inc"]}, "subject_policy_invalid", "common_name"),
        (
            {"common_name": ["*"], "organization": ["Example\\"]},
            "subject_policy_invalid",
            "backslash",
        ),
        # Control characters are refused in every request body at the edge of the
        # wire models, before the policy's own checks.
        (
            {"common_name": ["*"], "organization": ["Exa\u0000mple"]},
            "validation_failed",
            "organization",
        ),
        (
            {"common_name": ["*"], "email": ["\u0085@example.com"]},
            "validation_failed",
            "email",
        ),
        ({"common_name": ["x" * 129]}, "subject_policy_invalid", "128"),
        ({"common_name": [f"cn {i}" for i in range(33)]}, "validation_failed", "common_name"),
        ({"common_name": ["*"], "locality": ["Berlin"]}, "validation_failed", "locality"),
        ({"common_name": "*"}, "validation_failed", "common_name"),
    ],
    ids=[
        "no-cn",
        "lone-backslash",
        "nul",
        "c1-control",
        "too-long",
        "too-many",
        "unknown",
        "not-a-list",
    ],
)
def test_bad_policies_are_refused_and_change_nothing(
    api: Api, body: dict[str, Any], code: str, fragment: str
) -> None:
    team = api.create_tsg()
    allow(api, team["id"], common_name=["*"], organization=["Kept Inc"])
    with refused_once(api, reason=code):
        response = api.http.put(
            f"/api/v1/tsgs/{team['id']}/subject-policy", json=body, headers=api.admin
        )
        assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert fragment in response.json()["detail"]
    view = api.ok(api.http.get(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin))
    assert view["own"]["rules"]["organization"] == ["Kept Inc"]


# ------------------------------------------------------------------ patterns (no server)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("Example Inc", "Example Inc", True),
        ("Example Inc", "Example Inc ", False),
        ("Example Inc", "example inc", False),
        ("*", "", True),
        ("*", "anything at all", True),
        ("", "", True),
        ("", "x", False),
        ("?*", "", False),
        ("?*", "x", True),
        ("Team ?", "Team A", True),
        ("Team ?", "Team", False),
        ("Team ?", "Team AB", False),
        ("*@example.com", "ci@example.com", True),
        ("*@example.com", "ci@example.com.evil", False),
        ("*@example.com", "ci@sub.example.com", False),
        ("Build *-release", "Build app-release", True),
        ("Build *-release", "Build app-release-2", False),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXcYb", False),
        ("**", "x", True),
        ("100\\%", "100%", True),
        ("Star\\*", "Star*", True),
        ("Star\\*", "Starry", False),
        ("Why\\?", "Why?", True),
        ("Why\\?", "WhyX", False),
        ("back\\\\slash", "back\\slash", True),
        # Many stars against a long value that almost matches: answered at once
        # (a backtracking matcher is exponential here).
        ("*a*a*a*a*a*a*a*a*a*a*a*b", "a" * 128, False),
    ],
)
def test_glob_patterns(pattern: str, value: str, matches: bool) -> None:
    assert compile_pattern(pattern).matches(value) is matches


def test_validation_keeps_order_and_drops_duplicates() -> None:
    rules = validate_rules(
        p.SubjectPolicyRules(common_name=["b", "a", "b"], organization=["", "*", ""])
    )
    assert rules.common_name == ["b", "a"]
    assert rules.organization == ["", "*"]
    with pytest.raises(SubjectPolicyInvalid, match=r"organization\[1\]"):
        validate_rules(p.SubjectPolicyRules(common_name=["*"], organization=["ok", "bad\\"]))


def test_the_server_warns_about_keys_no_policy_covers(
    api: Api, installation: Installation, caplog: pytest.LogCaptureFixture
) -> None:
    """As after an upgrade: a key below the root certified by the built-in CA, and
    no policy on its path any more. A starting server says so in its log."""
    team = api.create_tsg()
    allow(api, team["id"], common_name=["*"])
    key = api.ok(create_key(api, team["id"]), 201)
    assert (
        api.http.delete(f"/api/v1/tsgs/{team['id']}/subject-policy", headers=api.admin).status_code
        == 204
    )
    with (
        caplog.at_level("WARNING", logger="signery.server"),
        TestClient(create_app(installation.settings), base_url="http://signery.test"),
    ):
        pass
    warnings = [r for r in caplog.records if hasattr(r, "keys_outside_every_subject_policy")]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].keys_outside_every_subject_policy >= 1
    assert "signery tsg subject-policy set" in warnings[0].getMessage()
    assert refused_code(action(api, key["id"], "renew")) == "subject_policy_missing"
