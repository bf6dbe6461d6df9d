"""The authorization matrix: every route of the app, for every role bound at the
root, at a TSG, at that TSG's child and at a sibling, against an object in each of
those four TSGs.

What each route needs is written down here, once, as an independent statement of
the contract (the permission, and where it is checked); the answer expected in a
cell follows from the rule of ``signery.server.access.authz``: a role reaches its TSG's
subtree, never ancestors or siblings; inside its reach a missing permission is 403,
outside it everything is 404 (an object's existence does not leak). Listings may
return nothing outside the caller's reach and must return what is inside it.

The routes are enumerated from the application itself: a route without an entry
in ``CASES`` fails ``test_every_route_is_in_the_matrix``, so a new route cannot be
added without saying who may call it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from signery.protocol import Role
from signery.server.access.authz import ROLE_PERMISSIONS, Permission
from tests.support import Account, Api

_P = Permission
POSITIONS = ("R", "A", "A1", "B")  # the root, a TSG, its child, its sibling
ROLES = tuple(Role)
Json = dict[str, Any]
ANY = {f: ["*"] for f in ("common_name", "organization", "organizational_unit", "country", "email")}


# ------------------------------------------------------------------ the world


@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    https: bool = False


def _reusable(make: Callable[..., Any]) -> Callable[..., Any]:
    """A factory of the world that honours ``World.reuse``."""

    @functools.wraps(make)
    def factory(self: World, of: Any, **body: Any) -> Any:
        if not self.reuse:
            return make(self, of, **body)
        key = (f"{make.__name__}{sorted(body.items())}", of if isinstance(of, str) else of["id"])
        if key not in self._made:
            # What the factory makes on the way is its own, never reused.
            self.reuse = False
            try:
                self._made[key] = make(self, of, **body)
            finally:
                self.reuse = True
        return self._made[key]

    return factory


@dataclass
class World:
    """Four TSGs (root R -> A -> A1, and R -> B), a caller per role and position,
    and in each TSG one object of every kind."""

    api: Api
    tsg: dict[str, str]  # position -> TSG id
    path: dict[str, str]  # position -> TSG path
    callers: dict[tuple[Role, str], dict[str, str]]  # (role, position) -> headers
    accounts: dict[str, Account]  # position -> an account there
    account_tokens: dict[str, str]
    keys: dict[str, Json]  # position -> a key with a built-in CA certificate
    guarded_keys: dict[str, Json]  # position -> a key whose policy asks for approval
    connectors: dict[str, Json]
    connector_keys: dict[str, Json]  # position -> a key waiting for its CSR's certificate
    users: dict[str, Json]  # position -> a user homed there, without roles
    bindings: dict[str, Json]
    requests: dict[str, str]  # position -> a pending approval request id
    grants: dict[str, Json]
    tsg_of: dict[str, str] = field(default_factory=dict)  # object id -> TSG id
    # While a refused cell runs, factories hand out one object per (factory, TSG)
    # instead of a fresh one: a refusal changes nothing, and should one wrongly
    # succeed, its status code already fails the cell.
    reuse: bool = False
    _made: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def admin(self) -> dict[str, str]:
        return self.api.admin

    def position_of(self, tsg_id: str | None) -> str:
        """The world's position of a TSG; objects outside the four are refused."""
        for pos, tid in self.tsg.items():
            if tid == tsg_id:
                return pos
        raise AssertionError(f"an object in TSG {tsg_id} is not part of the world")

    def path_of_tsg(self, tsg_id: str | None) -> str:
        if tsg_id is None:
            return self.path["R"]
        for pos, tid in self.tsg.items():
            if tid == tsg_id:
                return self.path[pos]
        # A TSG created by a matrix cell (POST /tsgs): its path comes from the server.
        tsg = self.api.ok(self.api.http.get(f"/api/v1/tsgs/{tsg_id}", headers=self.admin))
        return self.path_of_tsg(tsg["parent_id"]) + f"{tsg_id}/"

    # ---------------------------------------------------------- fresh objects

    @_reusable
    def key(self, pos: str, **body: Any) -> Json:
        key = self.api.create_key(self.tsg[pos], **body)
        self.tsg_of[key["id"]] = self.tsg[pos]
        return key

    @_reusable
    def account(self, pos: str) -> Account:
        account = self.api.create_account(self.tsg[pos])
        self.tsg_of[account.id] = self.tsg[pos]
        return account

    @_reusable
    def user(self, pos: str) -> Json:
        body = {"username": self.api.unique("target"), "tsg_id": self.tsg[pos]}
        user = self.api.ok(self.api.http.post("/api/v1/users", json=body, headers=self.admin), 201)
        self.tsg_of[user["id"]] = self.tsg[pos]
        return user  # type: ignore[no-any-return]

    @_reusable
    def binding(self, pos: str) -> Json:
        body = {"principal_id": self.user(pos)["id"], "role": "key_viewer", "tsg_id": self.tsg[pos]}
        return self.api.ok(  # type: ignore[no-any-return]
            self.api.http.post("/api/v1/role-bindings", json=body, headers=self.admin), 201
        )

    @_reusable
    def token_of(self, user: Json) -> Json:
        return self.api.ok(  # type: ignore[no-any-return]
            self.api.http.post(
                f"/api/v1/users/{user['id']}/tokens", json={"name": "t"}, headers=self.admin
            ),
            201,
        )

    @_reusable
    def connector(self, pos: str) -> Json:
        body = {
            "name": self.api.unique("ca"),
            "tsg_id": self.tsg[pos],
            "kind": "csr",
            "roots_pem": self.api.http.get("/api/v1/ca/chain").text,
        }
        connector = self.api.ok(
            self.api.http.post("/api/v1/ca-connectors", json=body, headers=self.admin), 201
        )
        self.tsg_of[connector["id"]] = self.tsg[pos]
        return connector  # type: ignore[no-any-return]

    @_reusable
    def guarded_key(self, pos: str) -> Json:
        key = self.key(pos)
        policy = {"approval": {"required": 1}}
        self.api.ok(
            self.api.http.put(f"/api/v1/keys/{key['id']}/policy", json=policy, headers=self.admin)
        )
        return key

    @_reusable
    def pending_request(self, pos: str) -> str:
        """A signing request waiting for approval: an account asked to sign with a
        key whose policy wants one approval."""
        key = self.guarded_key(pos)
        response = self.api.sign(
            self.account_tokens[pos], key["id"], hashlib.sha256(key["id"].encode()).digest()
        )
        assert response.status_code == 202, response.text
        request_id = str(response.json()["request_id"])
        self.tsg_of[request_id] = self.tsg[pos]
        return request_id

    @_reusable
    def grant(self, pos: str) -> Json:
        body = {
            "key": self.guarded_keys[pos]["id"],
            "account": self.accounts[pos].id,
            "scope": "any_digest",
        }
        request = self.api.ok(
            self.api.http.post("/api/v1/approvals", json=body, headers=self.admin), 201
        )
        grant = request["grant"]
        self.tsg_of[grant["id"]] = self.tsg[pos]
        return grant  # type: ignore[no-any-return]

    @_reusable
    def subject_policy(self, pos: str) -> str:
        """The TSG at ``pos`` with a policy of its own (allowing any subject)."""
        self.api.ok(
            self.api.http.put(
                f"/api/v1/tsgs/{self.tsg[pos]}/subject-policy", json=ANY, headers=self.admin
            )
        )
        return self.tsg[pos]

    @_reusable
    def second_account_key(self, pos: str) -> str:
        """The path of an account key that may be removed (the account has another)."""
        account = self.account(pos)
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        added = self.api.ok(
            self.api.http.post(
                f"/api/v1/accounts/{account.id}/keys",
                json={"public_key_pem": pem},
                headers=self.admin,
            ),
            201,
        )
        key_id = next(k["id"] for k in added["keys"] if k["public_key_pem"].strip() == pem.strip())
        return f"/api/v1/accounts/{account.id}/keys/{key_id}"

    @_reusable
    def certificate_serial(self, pos: str) -> str:
        """The serial of a fresh key's certificate from the built-in CA."""
        key = self.key(pos)
        certificates = self.api.ok(
            self.api.http.get(f"/api/v1/keys/{key['id']}/certificates", headers=self.admin)
        )
        return str(certificates[0]["serial"])

    @_reusable
    def disabled_key(self, pos: str) -> Json:
        key = self.key(pos, ca="none")
        self.api.ok(self.api.http.post(f"/api/v1/keys/{key['id']}/disable", headers=self.admin))
        return key

    @_reusable
    def destroy_scheduled_key(self, pos: str) -> Json:
        key = self.key(pos, ca="none")
        self.api.ok(
            self.api.http.post(
                f"/api/v1/keys/{key['id']}/destroy", json={"after_days": 7}, headers=self.admin
            )
        )
        return key


def _make_person(api: Api, tsg_id: str, role: Role) -> dict[str, str]:
    user = api.ok(
        api.http.post(
            "/api/v1/users",
            json={"username": api.unique(f"m-{role.value}"), "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )
    api.ok(
        api.http.post(
            "/api/v1/role-bindings",
            json={"principal_id": user["id"], "role": role.value, "tsg_id": tsg_id},
            headers=api.admin,
        ),
        201,
    )
    token = api.ok(
        api.http.post(
            f"/api/v1/users/{user['id']}/tokens", json={"name": "matrix"}, headers=api.admin
        ),
        201,
    )
    return {"Authorization": f"Bearer {token['token']}"}


@pytest.fixture(scope="module")
def world(api: Api) -> World:
    tsg = {"R": api.root_tsg_id}
    tsg["A"] = api.create_tsg()["id"]
    tsg["A1"] = api.create_tsg(parent=tsg["A"])["id"]
    tsg["B"] = api.create_tsg()["id"]
    root = api.ok(api.http.get(f"/api/v1/tsgs/{tsg['R']}", headers=api.admin))
    assert root["parent_id"] is None
    path = {"R": f"/{tsg['R']}/"}
    path["A"] = f"{path['R']}{tsg['A']}/"
    path["A1"] = f"{path['A']}{tsg['A1']}/"
    path["B"] = f"{path['R']}{tsg['B']}/"
    w = World(
        api=api,
        tsg=tsg,
        path=path,
        callers={},
        accounts={},
        account_tokens={},
        keys={},
        guarded_keys={},
        connectors={},
        connector_keys={},
        users={},
        bindings={},
        requests={},
        grants={},
    )
    for role, pos in itertools.product(ROLES, POSITIONS):
        w.callers[(role, pos)] = _make_person(api, tsg[pos], role)
    for pos in POSITIONS:
        w.accounts[pos] = w.account(pos)
        w.account_tokens[pos] = api.access_token(w.accounts[pos])
        w.keys[pos] = w.key(pos)
        # One signature each, so that usage has counters in every TSG.
        signed = api.sign(w.account_tokens[pos], w.keys[pos]["id"], hashlib.sha256(b"w").digest())
        assert signed.status_code == 200, signed.text
        w.guarded_keys[pos] = w.guarded_key(pos)
        w.connectors[pos] = w.connector(pos)
        w.connector_keys[pos] = w.key(
            pos, ca="connector", ca_connector=w.connectors[pos]["id"], subject={"common_name": "m"}
        )
        w.users[pos] = w.user(pos)
        w.bindings[pos] = w.binding(pos)
        w.requests[pos] = w.pending_request(pos)
        w.grants[pos] = w.grant(pos)
    return w


# ------------------------------------------------------------------ what each route needs


@dataclass(frozen=True)
class Managed:
    """A management route on an object in one TSG: allowed when the caller holds
    any of ``needs`` there, 403 inside its reach, 404 outside.

    ``at_root``: the act is the root TSG's own (the built-in CA revoking a
    certificate), so only callers bound at the root see it. ``granted_at_root``:
    the object is the TSG's (404 outside the caller's reach, as usual) but the
    permission counts only when held at the root (subject policies)."""

    needs: frozenset[Permission]
    call: Callable[[World, str], Call]
    ok: int = 200
    at_root: bool = False
    granted_at_root: bool = False
    after: Callable[[World], None] | None = None


@dataclass(frozen=True)
class Listing:
    """A listing: only objects inside the reach of ``needs``, and all of the world's
    objects there. ``items`` turns an answer into (object id, TSG path) pairs;
    ``expected`` names the world's objects of a TSG the listing must show."""

    needs: frozenset[Permission]
    call: Callable[[World], Call]
    items: Callable[[World, Any], list[tuple[str, str]]]
    expected: Callable[[World, str], set[str]]


@dataclass(frozen=True)
class Installation:
    """An act or data of the whole installation: allowed only with ``needs`` bound
    at the root. A caller bound at the root without it gets 403; a caller bound
    lower gets ``below_root`` (404 where the act is the root TSG's own, as for the
    built-in CA; 403 where the data exists for everyone, as audit checkpoints)."""

    needs: frozenset[Permission]
    call: Callable[[World], Call]
    ok: int = 200
    below_root: int = 403


@dataclass(frozen=True)
class AnyUser:
    """Configuration or one's own objects: every signed-in user, any role."""

    call: Callable[[World], Call]
    ok: int = 200


@dataclass(frozen=True)
class Public:
    """No credential by design; ``why`` says why that is safe."""

    why: str
    call: Callable[[World], Call]
    ok: int = 200


@dataclass(frozen=True)
class SigningPlane:
    """Built-in accounts only: an account reaches the keys of its TSG's subtree
    (404 outside it); a user's credential is refused (401)."""

    call: Callable[[World, str], Call]
    ok: int = 200


Case = Managed | Listing | Installation | AnyUser | Public | SigningPlane


def perms(*p: Permission) -> frozenset[Permission]:
    return frozenset(p)


def _key(w: World, pos: str) -> str:
    return str(w.keys[pos]["id"])


def _json_body(path: str, body: Any = None, ca: str = "none") -> Callable[[World, str], Call]:
    """POST to a key route (``{key}`` replaced by a fresh key of the TSG)."""

    def call(w: World, pos: str) -> Call:
        return Call("POST", path.format(key=w.key(pos, ca=ca)["id"]), json=body or {})

    return call


def _csr_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matrix enrollment")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _est(path: str) -> Callable[[World], Call]:
    def call(w: World) -> Call:
        return Call(
            "POST",
            path.format(label=w.tsg["R"]),
            content=_csr_pem(),
            headers={"Content-Type": "application/pkcs10"},
            https=True,
        )

    return call


def _tsg_items(w: World, body: Any) -> list[tuple[str, str]]:
    return [(t["id"], w.path_of_tsg(t["id"])) for t in body]


def _tree_items(w: World, body: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def walk(nodes: list[Json]) -> None:
        for n in nodes:
            out.append((n["id"], w.path_of_tsg(n["id"])))
            walk(n["children"])

    walk(body)
    return out


def _by_tsg_id(w: World, body: Any) -> list[tuple[str, str]]:
    return [(o["id"], w.path_of_tsg(o["tsg_id"])) for o in body]


def _grant_items(w: World, body: Any) -> list[tuple[str, str]]:
    return [(g["id"], w.path_of_tsg(w.tsg_of.get(g["key_id"]))) for g in body]


def _event_items(w: World, body: Any) -> list[tuple[str, str]]:
    return [(e["id"], e["tsg_path"] or w.path["R"]) for e in body["events"]]


def _export_items(w: World, body: Any) -> list[tuple[str, str]]:
    return [(e["id"], e["tsg_path"] or w.path["R"]) for e in body]


def _usage_items(w: World, body: Any) -> list[tuple[str, str]]:
    return [(c["subject_id"], w.path_of_tsg(c["tsg_id"])) for c in body["counters"]]


def _restore_subject_policies(w: World) -> None:
    for pos in POSITIONS:
        w.subject_policy(pos)


def _nothing(w: World, pos: str) -> set[str]:
    return set()


CASES: dict[tuple[str, str], Case] = {
    # ---------------------------------------------------------------- public
    ("GET", "/healthz"): Public("liveness only", lambda w: Call("GET", "/healthz")),
    ("GET", "/readyz"): Public("readiness without tenant data", lambda w: Call("GET", "/readyz")),
    ("GET", "/.well-known/oauth-authorization-server"): Public(
        "RFC 8414 metadata", lambda w: Call("GET", "/.well-known/oauth-authorization-server")
    ),
    ("GET", "/api/v1/meta"): Public("server metadata", lambda w: Call("GET", "/api/v1/meta")),
    ("GET", "/api/v1/openapi.json"): Public(
        "the API's description", lambda w: Call("GET", "/api/v1/openapi.json")
    ),
    ("GET", "/api/v1/docs"): Public(
        "the API's documentation", lambda w: Call("GET", "/api/v1/docs")
    ),
    ("GET", "/docs/oauth2-redirect"): Public(
        "Swagger UI's static OAuth2 redirect page", lambda w: Call("GET", "/docs/oauth2-redirect")
    ),
    ("GET", "/api/v1/ca/chain"): Public(
        "the CA certificates verifiers need", lambda w: Call("GET", "/api/v1/ca/chain")
    ),
    ("GET", "/api/v1/ca/crl"): Public(
        "the CRL relying parties fetch", lambda w: Call("GET", "/api/v1/ca/crl")
    ),
    ("GET", "/api/v1/ca/issuing.der"): Public(
        "the AIA caIssuers certificate", lambda w: Call("GET", "/api/v1/ca/issuing.der")
    ),
    ("GET", "/.well-known/est/cacerts"): Public(
        "RFC 7030 §4.1: CA certificates", lambda w: Call("GET", "/.well-known/est/cacerts")
    ),
    ("GET", "/.well-known/est/{label}/cacerts"): Public(
        "RFC 7030 §4.1: CA certificates",
        lambda w: Call("GET", f"/.well-known/est/{w.tsg['A']}/cacerts"),
    ),
    ("GET", "/api/v1/tsa/certificate"): Public(
        "the TSA chain verifiers need", lambda w: Call("GET", "/api/v1/tsa/certificate")
    ),
    ("POST", "/api/v1/tsa"): Public(
        "RFC 3161 timestamps are public by default (tsa_access), rate-limited per client; "
        "a malformed query is answered by a TimeStampResp with status rejection",
        lambda w: Call(
            "POST",
            "/api/v1/tsa",
            content=b"\x30\x00",
            headers={"Content-Type": "application/timestamp-query"},
        ),
    ),
    ("POST", "/api/v1/oauth/token"): Public(
        "the RFC 7523 assertion is the credential",
        lambda w: Call(
            "POST",
            "/api/v1/oauth/token",
            content=b"grant_type=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ok=400,
    ),
    # ---------------------------------------------------------------- signing plane
    ("GET", "/api/v1/signing/keys"): SigningPlane(
        lambda w, pos: Call("GET", "/api/v1/signing/keys")
    ),
    ("POST", "/api/v1/signing/keys/{key}/sign"): SigningPlane(
        lambda w, pos: Call(
            "POST",
            f"/api/v1/signing/keys/{_key(w, pos)}/sign",
            json={
                "digest": base64.b64encode(hashlib.sha256(b"matrix").digest()).decode(),
                "digest_algorithm": "sha256",
                "scheme": "ecdsa",
            },
        )
    ),
    ("GET", "/api/v1/signing/requests/{request_id}"): SigningPlane(
        lambda w, pos: Call("GET", f"/api/v1/signing/requests/{w.requests[pos]}")
    ),
    # ---------------------------------------------------------------- TSGs
    ("POST", "/api/v1/tsgs"): Managed(
        perms(_P.TSG_CREATE),
        lambda w, pos: Call(
            "POST", "/api/v1/tsgs", json={"name": w.api.unique("t"), "parent_id": w.tsg[pos]}
        ),
        ok=201,
    ),
    ("GET", "/api/v1/tsgs"): Listing(
        perms(_P.TSG_READ),
        lambda w: Call("GET", "/api/v1/tsgs"),
        _tsg_items,
        lambda w, pos: {w.tsg[pos]},
    ),
    ("GET", "/api/v1/tsgs/tree"): Listing(
        perms(_P.TSG_READ),
        lambda w: Call("GET", "/api/v1/tsgs/tree"),
        _tree_items,
        lambda w, pos: {w.tsg[pos]},
    ),
    ("GET", "/api/v1/tsgs/{tsg_id}/subject-policy"): Managed(
        perms(_P.TSG_READ),
        lambda w, pos: Call("GET", f"/api/v1/tsgs/{w.tsg[pos]}/subject-policy"),
    ),
    ("PUT", "/api/v1/tsgs/{tsg_id}/subject-policy"): Managed(
        perms(_P.CA_SUBJECT_POLICY_MANAGE),
        lambda w, pos: Call("PUT", f"/api/v1/tsgs/{w.tsg[pos]}/subject-policy", json=ANY),
        granted_at_root=True,
    ),
    ("DELETE", "/api/v1/tsgs/{tsg_id}/subject-policy"): Managed(
        perms(_P.CA_SUBJECT_POLICY_MANAGE),
        lambda w, pos: Call("DELETE", f"/api/v1/tsgs/{w.subject_policy(pos)}/subject-policy"),
        ok=204,
        granted_at_root=True,
        # Keys made later in other cells need certificates everywhere again.
        after=lambda w: _restore_subject_policies(w),
    ),
    ("GET", "/api/v1/tsgs/{tsg_id}"): Managed(
        perms(_P.TSG_READ), lambda w, pos: Call("GET", f"/api/v1/tsgs/{w.tsg[pos]}")
    ),
    # ---------------------------------------------------------------- users, tokens, roles
    ("POST", "/api/v1/users"): Managed(
        perms(_P.USER_MANAGE),
        lambda w, pos: Call(
            "POST", "/api/v1/users", json={"username": w.api.unique("u"), "tsg_id": w.tsg[pos]}
        ),
        ok=201,
    ),
    ("GET", "/api/v1/users"): Listing(
        perms(_P.USER_READ),
        lambda w: Call("GET", "/api/v1/users"),
        _by_tsg_id,
        lambda w, pos: {w.users[pos]["id"]},
    ),
    ("GET", "/api/v1/users/me"): AnyUser(lambda w: Call("GET", "/api/v1/users/me")),
    ("GET", "/api/v1/users/me/tokens"): AnyUser(lambda w: Call("GET", "/api/v1/users/me/tokens")),
    ("POST", "/api/v1/users/me/tokens"): AnyUser(
        lambda w: Call("POST", "/api/v1/users/me/tokens", json={"name": "own"}), ok=201
    ),
    ("GET", "/api/v1/users/{user}"): Managed(
        perms(_P.USER_READ), lambda w, pos: Call("GET", f"/api/v1/users/{w.users[pos]['id']}")
    ),
    ("POST", "/api/v1/users/{user}/tokens"): Managed(
        perms(_P.USER_MANAGE),
        lambda w, pos: Call(
            "POST", f"/api/v1/users/{w.users[pos]['id']}/tokens", json={"name": "minted"}
        ),
        ok=201,
    ),
    ("GET", "/api/v1/users/{user}/tokens"): Managed(
        perms(_P.USER_READ),
        lambda w, pos: Call("GET", f"/api/v1/users/{w.users[pos]['id']}/tokens"),
    ),
    ("DELETE", "/api/v1/tokens/{token_id}"): Managed(
        perms(_P.USER_MANAGE),
        lambda w, pos: Call("DELETE", f"/api/v1/tokens/{w.token_of(w.users[pos])['id']}"),
    ),
    ("POST", "/api/v1/role-bindings"): Managed(
        perms(_P.ROLE_BINDING_MANAGE),
        lambda w, pos: Call(
            "POST",
            "/api/v1/role-bindings",
            json={"principal_id": w.user(pos)["id"], "role": "key_viewer", "tsg_id": w.tsg[pos]},
        ),
        ok=201,
    ),
    ("GET", "/api/v1/role-bindings"): Listing(
        perms(_P.ROLE_BINDING_READ),
        lambda w: Call("GET", "/api/v1/role-bindings"),
        _by_tsg_id,
        lambda w, pos: {w.bindings[pos]["id"]},
    ),
    ("DELETE", "/api/v1/role-bindings/{binding_id}"): Managed(
        perms(_P.ROLE_BINDING_MANAGE),
        lambda w, pos: Call("DELETE", f"/api/v1/role-bindings/{w.binding(pos)['id']}"),
        ok=204,
    ),
    # ---------------------------------------------------------------- built-in accounts
    ("POST", "/api/v1/accounts"): Managed(
        perms(_P.ACCOUNT_MANAGE),
        lambda w, pos: Call(
            "POST", "/api/v1/accounts", json={"name": w.api.unique("a"), "tsg_id": w.tsg[pos]}
        ),
        ok=201,
    ),
    ("GET", "/api/v1/accounts"): Listing(
        perms(_P.ACCOUNT_READ),
        lambda w: Call("GET", "/api/v1/accounts"),
        _by_tsg_id,
        lambda w, pos: {w.accounts[pos].id},
    ),
    ("GET", "/api/v1/accounts/{account}"): Managed(
        perms(_P.ACCOUNT_READ),
        lambda w, pos: Call("GET", f"/api/v1/accounts/{w.accounts[pos].id}"),
    ),
    ("POST", "/api/v1/accounts/{account}/disable"): Managed(
        perms(_P.ACCOUNT_MANAGE),
        lambda w, pos: Call("POST", f"/api/v1/accounts/{w.account(pos).id}/disable"),
    ),
    ("POST", "/api/v1/accounts/{account}/enable"): Managed(
        perms(_P.ACCOUNT_MANAGE),
        lambda w, pos: Call("POST", f"/api/v1/accounts/{w.account(pos).id}/enable"),
    ),
    ("POST", "/api/v1/accounts/{account}/keys"): Managed(
        perms(_P.ACCOUNT_MANAGE),
        lambda w, pos: Call(
            "POST",
            f"/api/v1/accounts/{w.account(pos).id}/keys",
            json={
                "public_key_pem": ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode()
            },
        ),
        ok=201,
    ),
    ("DELETE", "/api/v1/accounts/{account}/keys/{key_id}"): Managed(
        perms(_P.ACCOUNT_MANAGE),
        lambda w, pos: Call("DELETE", w.second_account_key(pos)),
    ),
    # ---------------------------------------------------------------- signing keys
    ("POST", "/api/v1/keys"): Managed(
        perms(_P.KEY_CREATE),
        lambda w, pos: Call(
            "POST",
            "/api/v1/keys",
            json={"name": w.api.unique("k"), "tsg_id": w.tsg[pos], "algorithm": "EC_P256"},
        ),
        ok=201,
    ),
    ("GET", "/api/v1/keys"): Listing(
        perms(_P.KEY_READ),
        lambda w: Call("GET", "/api/v1/keys"),
        _by_tsg_id,
        lambda w, pos: {w.keys[pos]["id"], w.guarded_keys[pos]["id"]},
    ),
    ("GET", "/api/v1/keys/{key}"): Managed(
        perms(_P.KEY_READ), lambda w, pos: Call("GET", f"/api/v1/keys/{_key(w, pos)}")
    ),
    ("GET", "/api/v1/keys/{key}/public-key"): Managed(
        perms(_P.KEY_READ), lambda w, pos: Call("GET", f"/api/v1/keys/{_key(w, pos)}/public-key")
    ),
    ("GET", "/api/v1/keys/{key}/chain"): Managed(
        perms(_P.KEY_READ), lambda w, pos: Call("GET", f"/api/v1/keys/{_key(w, pos)}/chain")
    ),
    ("GET", "/api/v1/keys/{key}/certificates"): Managed(
        perms(_P.KEY_READ),
        lambda w, pos: Call("GET", f"/api/v1/keys/{_key(w, pos)}/certificates"),
    ),
    ("POST", "/api/v1/keys/{key}/renew"): Managed(
        perms(_P.KEY_MANAGE), _json_body("/api/v1/keys/{key}/renew", ca="builtin")
    ),
    ("POST", "/api/v1/keys/{key}/reissue"): Managed(
        perms(_P.KEY_MANAGE),
        _json_body(
            "/api/v1/keys/{key}/reissue", {"subject": {"common_name": "reissued"}}, ca="builtin"
        ),
    ),
    ("POST", "/api/v1/keys/{key}/revoke-certificate"): Managed(
        perms(_P.KEY_MANAGE), _json_body("/api/v1/keys/{key}/revoke-certificate", ca="builtin")
    ),
    ("POST", "/api/v1/keys/{key}/rotate"): Managed(
        perms(_P.KEY_MANAGE), _json_body("/api/v1/keys/{key}/rotate")
    ),
    ("POST", "/api/v1/keys/{key}/cancel-rotation"): Managed(
        # Allowed callers reach the key, which has no rotation waiting: 409.
        perms(_P.KEY_MANAGE),
        _json_body("/api/v1/keys/{key}/cancel-rotation"),
        ok=409,
    ),
    ("PUT", "/api/v1/keys/{key}/rotation"): Managed(
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call(
            "PUT",
            f"/api/v1/keys/{w.key(pos, ca='none')['id']}/rotation",
            json={"rotation_period_days": 90},
        ),
    ),
    ("POST", "/api/v1/keys/{key}/disable"): Managed(
        perms(_P.KEY_MANAGE), _json_body("/api/v1/keys/{key}/disable")
    ),
    ("POST", "/api/v1/keys/{key}/enable"): Managed(
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call("POST", f"/api/v1/keys/{w.disabled_key(pos)['id']}/enable"),
    ),
    ("POST", "/api/v1/keys/{key}/destroy"): Managed(
        perms(_P.KEY_MANAGE), _json_body("/api/v1/keys/{key}/destroy", {"after_days": 7})
    ),
    ("POST", "/api/v1/keys/{key}/cancel-destroy"): Managed(
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call(
            "POST", f"/api/v1/keys/{w.destroy_scheduled_key(pos)['id']}/cancel-destroy"
        ),
    ),
    ("GET", "/api/v1/keys/{key}/policy"): Managed(
        perms(_P.KEY_READ),
        lambda w, pos: Call("GET", f"/api/v1/keys/{w.guarded_keys[pos]['id']}/policy"),
    ),
    ("PUT", "/api/v1/keys/{key}/policy"): Managed(
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call(
            "PUT",
            f"/api/v1/keys/{w.key(pos, ca='none')['id']}/policy",
            json={"allowed_digests": ["sha256"]},
        ),
    ),
    ("DELETE", "/api/v1/keys/{key}/policy"): Managed(
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call("DELETE", f"/api/v1/keys/{w.guarded_key(pos)['id']}/policy"),
        ok=204,
    ),
    ("GET", "/api/v1/keys/{key}/csr"): Managed(
        perms(_P.KEY_READ),
        lambda w, pos: Call("GET", f"/api/v1/keys/{w.connector_keys[pos]['id']}/csr"),
    ),
    ("POST", "/api/v1/keys/{key}/certificate"): Managed(
        # Allowed callers reach the key; the chain is then refused as not a chain.
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call(
            "POST",
            f"/api/v1/keys/{w.connector_keys[pos]['id']}/certificate",
            content=b"not a chain",
            headers={"Content-Type": "application/x-pem-file"},
        ),
        ok=400,
    ),
    ("POST", "/api/v1/keys/{key}/enroll"): Managed(
        # Allowed callers reach the key, whose connector takes CSR uploads, not EST.
        perms(_P.KEY_MANAGE),
        lambda w, pos: Call("POST", f"/api/v1/keys/{w.connector_keys[pos]['id']}/enroll"),
        ok=400,
    ),
    ("GET", "/api/v1/keystores"): AnyUser(lambda w: Call("GET", "/api/v1/keystores")),
    # ---------------------------------------------------------------- CA and connectors
    ("POST", "/api/v1/ca/certificates/{serial}/revoke"): Managed(
        perms(_P.CA_REVOKE),
        lambda w, pos: Call(
            "POST",
            f"/api/v1/ca/certificates/{w.certificate_serial(pos)}/revoke",
            json={},
        ),
        at_root=True,
    ),
    ("POST", "/.well-known/est/simpleenroll"): Installation(
        perms(_P.CA_ENROLL), _est("/.well-known/est/simpleenroll")
    ),
    ("POST", "/.well-known/est/{label}/simpleenroll"): Installation(
        perms(_P.CA_ENROLL), _est("/.well-known/est/{label}/simpleenroll")
    ),
    ("POST", "/.well-known/est/simplereenroll"): Installation(
        perms(_P.CA_ENROLL), _est("/.well-known/est/simplereenroll")
    ),
    ("POST", "/.well-known/est/{label}/simplereenroll"): Installation(
        perms(_P.CA_ENROLL), _est("/.well-known/est/{label}/simplereenroll")
    ),
    ("POST", "/api/v1/ca-connectors"): Managed(
        perms(_P.CA_CONNECTOR_MANAGE),
        lambda w, pos: Call(
            "POST",
            "/api/v1/ca-connectors",
            json={
                "name": w.api.unique("c"),
                "tsg_id": w.tsg[pos],
                "kind": "csr",
                "roots_pem": w.api.http.get("/api/v1/ca/chain").text,
            },
        ),
        ok=201,
    ),
    ("GET", "/api/v1/ca-connectors"): Listing(
        perms(_P.CA_CONNECTOR_READ),
        lambda w: Call("GET", "/api/v1/ca-connectors"),
        _by_tsg_id,
        lambda w, pos: {w.connectors[pos]["id"]},
    ),
    ("GET", "/api/v1/ca-connectors/{connector}"): Managed(
        perms(_P.CA_CONNECTOR_READ),
        lambda w, pos: Call("GET", f"/api/v1/ca-connectors/{w.connectors[pos]['id']}"),
    ),
    ("PATCH", "/api/v1/ca-connectors/{connector}"): Managed(
        perms(_P.CA_CONNECTOR_MANAGE),
        lambda w, pos: Call(
            "PATCH",
            f"/api/v1/ca-connectors/{w.connectors[pos]['id']}",
            json={"roots_pem": w.api.http.get("/api/v1/ca/chain").text},
        ),
    ),
    ("DELETE", "/api/v1/ca-connectors/{connector}"): Managed(
        perms(_P.CA_CONNECTOR_MANAGE),
        lambda w, pos: Call("DELETE", f"/api/v1/ca-connectors/{w.connector(pos)['id']}"),
        ok=204,
    ),
    # ---------------------------------------------------------------- approvals and grants
    ("GET", "/api/v1/approvals"): Listing(
        perms(_P.SIGNING_APPROVE),
        lambda w: Call("GET", "/api/v1/approvals"),
        _by_tsg_id,
        lambda w, pos: {w.requests[pos]},
    ),
    ("POST", "/api/v1/approvals"): Managed(
        perms(_P.SIGNING_APPROVE),
        lambda w, pos: Call(
            "POST",
            "/api/v1/approvals",
            json={
                "key": w.guarded_keys[pos]["id"],
                "account": w.accounts[pos].id,
                "scope": "any_digest",
            },
        ),
        ok=201,
    ),
    ("GET", "/api/v1/approvals/{request_id}"): Managed(
        perms(_P.SIGNING_APPROVE),
        lambda w, pos: Call("GET", f"/api/v1/approvals/{w.requests[pos]}"),
    ),
    ("POST", "/api/v1/approvals/{request_id}/approve"): Managed(
        perms(_P.SIGNING_APPROVE),
        lambda w, pos: Call("POST", f"/api/v1/approvals/{w.pending_request(pos)}/approve", json={}),
    ),
    ("POST", "/api/v1/approvals/{request_id}/deny"): Managed(
        perms(_P.SIGNING_APPROVE),
        lambda w, pos: Call("POST", f"/api/v1/approvals/{w.pending_request(pos)}/deny", json={}),
    ),
    ("GET", "/api/v1/grants"): Listing(
        perms(_P.SIGNING_APPROVE),
        lambda w: Call("GET", "/api/v1/grants"),
        _grant_items,
        lambda w, pos: {w.grants[pos]["id"]},
    ),
    ("POST", "/api/v1/grants/{grant_id}/revoke"): Managed(
        perms(_P.SIGNING_APPROVE, _P.KEY_MANAGE),
        lambda w, pos: Call("POST", f"/api/v1/grants/{w.grant(pos)['id']}/revoke"),
    ),
    # ---------------------------------------------------------------- audit and usage
    ("GET", "/api/v1/audit/events"): Listing(
        perms(_P.AUDIT_READ),
        lambda w: Call("GET", "/api/v1/audit/events", params={"limit": 1000, "order": "desc"}),
        _event_items,
        _nothing,
    ),
    ("GET", "/api/v1/audit/export"): Listing(
        perms(_P.AUDIT_READ),
        lambda w: Call("GET", "/api/v1/audit/export"),
        _export_items,
        _nothing,
    ),
    ("GET", "/api/v1/usage"): Listing(
        perms(_P.USAGE_READ),
        lambda w: Call("GET", "/api/v1/usage"),
        _usage_items,
        lambda w, pos: {w.accounts[pos].id, w.keys[pos]["id"]},
    ),
    ("GET", "/metrics"): Installation(
        # Counts of the whole installation (or the scrape token, tested in test_ops).
        perms(_P.METRICS_READ),
        lambda w: Call("GET", "/metrics"),
    ),
    ("GET", "/api/v1/audit/checkpoints"): Installation(
        perms(_P.AUDIT_READ), lambda w: Call("GET", "/api/v1/audit/checkpoints")
    ),
    ("POST", "/api/v1/audit/checkpoints"): Installation(
        perms(_P.AUDIT_READ), lambda w: Call("POST", "/api/v1/audit/checkpoints")
    ),
    ("GET", "/api/v1/audit/checkpoints/public-key"): Installation(
        perms(_P.AUDIT_READ), lambda w: Call("GET", "/api/v1/audit/checkpoints/public-key")
    ),
}


# ------------------------------------------------------------------ running a cell


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route the application serves, documented or not."""
    out: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            # FastAPI includes routers lazily: the included router is kept whole.
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes, prefix)
            elif isinstance(route, Mount):
                out.add(("GET", f"{prefix}{route.path}/{{path}}"))
            elif isinstance(route, Route):
                out.update((m, f"{prefix}{route.path}") for m in route.methods or () if m != "HEAD")

    walk(app.routes, "")
    # The walk above relies on how routers are included: the OpenAPI document is a
    # second, independent list of (documented) routes that it must not miss.
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert documented <= out, f"routes the walk missed: {sorted(documented - out)}"
    return out


def send(w: World, call: Call, headers: dict[str, str] | None) -> Any:
    http = w.api.http
    url = call.path
    if call.https:
        assert isinstance(http, TestClient)
        url = f"https://signery.test{call.path}"
    return http.request(
        call.method,
        url,
        json=call.json,
        params=call.params,
        content=call.content,
        headers={**call.headers, **(headers or {})},
    )


def reach(role: Role, pos: str, needs: frozenset[Permission]) -> bool:
    return bool(needs & ROLE_PERMISSIONS[role])


def cells() -> Iterator[tuple[Role, str, str]]:
    """(role, where it is bound, where the object is)."""
    return itertools.product(ROLES, POSITIONS, POSITIONS)


def check_managed(w: World, case: Managed) -> list[str]:
    wrong: list[str] = []
    for role, at, obj in cells():
        scope = w.path[at]
        target = w.path["R"] if case.at_root else w.path[obj]
        visible = target.startswith(scope)
        allowed = visible and reach(role, at, case.needs)
        if case.granted_at_root:
            allowed = allowed and at == "R"
        expected = case.ok if allowed else 403 if visible else 404
        w.reuse = not allowed
        try:
            call = case.call(w, obj)
        finally:
            w.reuse = False
        response = send(w, call, w.callers[(role, at)])
        if response.status_code != expected:
            wrong.append(
                f"{role.value}@{at} on an object in {obj}: {response.status_code}, "
                f"expected {expected}: {response.text[:200]}"
            )
    if case.after is not None:
        case.after(w)
    return wrong


def check_listing(w: World, case: Listing) -> list[str]:
    wrong: list[str] = []
    for role, at in itertools.product(ROLES, POSITIONS):
        response = send(w, case.call(w), w.callers[(role, at)])
        if response.status_code != 200:
            wrong.append(f"{role.value}@{at}: {response.status_code}: {response.text[:200]}")
            continue
        body = (
            [json.loads(line) for line in response.text.splitlines() if line]
            if response.headers["content-type"].startswith("application/x-ndjson")
            or response.headers["content-type"].startswith("application/jsonl")
            else response.json()
        )
        scope = w.path[at] if reach(role, at, case.needs) else None
        seen = case.items(w, body)
        outside = [(i, p) for i, p in seen if scope is None or not p.startswith(scope)]
        if outside:
            wrong.append(f"{role.value}@{at} sees {len(outside)} objects outside its reach")
        missing = set()
        if scope is not None:
            for pos in POSITIONS:
                if w.path[pos].startswith(scope):
                    missing |= case.expected(w, pos) - {i for i, _ in seen}
        if missing:
            wrong.append(f"{role.value}@{at} misses {sorted(missing)}")
    return wrong


def check_installation(w: World, case: Installation) -> list[str]:
    wrong: list[str] = []
    for role, at in itertools.product(ROLES, POSITIONS):
        allowed = at == "R" and reach(role, at, case.needs)
        expected = case.ok if allowed else 403 if at == "R" else case.below_root
        response = send(w, case.call(w), w.callers[(role, at)])
        if response.status_code != expected:
            wrong.append(f"{role.value}@{at}: {response.status_code}, expected {expected}")
    anonymous = send(w, case.call(w), None)
    if anonymous.status_code != 401:
        wrong.append(f"anonymous: {anonymous.status_code}, expected 401")
    return wrong


def check_any_user(w: World, case: AnyUser) -> list[str]:
    wrong = []
    for role, at in itertools.product(ROLES, POSITIONS):
        response = send(w, case.call(w), w.callers[(role, at)])
        if response.status_code != case.ok:
            wrong.append(f"{role.value}@{at}: {response.status_code}")
    response = send(w, case.call(w), None)
    if response.status_code != 401:
        wrong.append(f"anonymous: {response.status_code}, expected 401")
    return wrong


def check_public(w: World, case: Public) -> list[str]:
    response = send(w, case.call(w), None)
    if response.status_code != case.ok:
        return [f"anonymous: {response.status_code}, expected {case.ok}: {response.text[:200]}"]
    return []


def check_signing_plane(w: World, case: SigningPlane, route: tuple[str, str]) -> list[str]:
    wrong: list[str] = []
    for at, obj in itertools.product(POSITIONS, POSITIONS):
        headers = {"Authorization": f"Bearer {w.account_tokens[at]}"}
        call = case.call(w, obj)
        response = send(w, call, headers)
        if route[1].endswith("/signing/keys"):
            if response.status_code != 200:
                wrong.append(f"account@{at}: {response.status_code}")
                continue
            seen = [(k["id"], w.path_of_tsg(w.tsg_of.get(k["id"]))) for k in response.json()]
            if any(not p.startswith(w.path[at]) for _, p in seen):
                wrong.append(f"account@{at} is offered a key outside its subtree")
            if w.path[obj].startswith(w.path[at]) and _key(w, obj) not in {i for i, _ in seen}:
                wrong.append(f"account@{at} is not offered the key in {obj}")
            continue
        if route[1].endswith("{request_id}"):
            # A signing request is its requester's: another account never sees it.
            expected = case.ok if at == obj else 404
        else:
            expected = case.ok if w.path[obj].startswith(w.path[at]) else 404
        if response.status_code != expected:
            wrong.append(
                f"account@{at} on {obj}: {response.status_code}, expected {expected}: "
                f"{response.text[:200]}"
            )
    for role, at in itertools.product(ROLES, POSITIONS):
        response = send(w, case.call(w, at), w.callers[(role, at)])
        if response.status_code != 401:
            wrong.append(f"user {role.value}@{at}: {response.status_code}, expected 401")
    return wrong


def test_every_route_is_in_the_matrix(app_client: TestClient) -> None:
    routes = app_routes(app_client.app)
    assert sorted(routes - CASES.keys()) == [], "routes without an authorization-matrix entry"
    assert sorted(CASES.keys() - routes) == [], "matrix entries for routes that do not exist"


@pytest.mark.parametrize("route", sorted(CASES), ids=lambda r: f"{r[0]} {r[1]}")
def test_route(world: World, route: tuple[str, str]) -> None:
    case = CASES[route]
    world._made.clear()
    if isinstance(case, Managed):
        wrong = check_managed(world, case)
    elif isinstance(case, Listing):
        wrong = check_listing(world, case)
    elif isinstance(case, Installation):
        wrong = check_installation(world, case)
    elif isinstance(case, AnyUser):
        wrong = check_any_user(world, case)
    elif isinstance(case, Public):
        wrong = check_public(world, case)
    else:
        wrong = check_signing_plane(world, case, route)
    assert wrong == [], "\n".join(wrong)
