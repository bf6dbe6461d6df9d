"""signery.client against a real ``signery serve`` process (SQLite and PostgreSQL).

Signatures are checked with pyca/cryptography against the certificate the server
issued; errors must come back as the SigneryError subclass named by the problem
document's code, and transport failures as ServerUnreachable.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signery import errors
from signery import protocol as p
from signery.client import (
    AccountCredentials,
    Client,
    RemoteSigner,
    ServerUnreachable,
)
from signery.crypto import hash_bytes
from signery.errors import ClientError, SigneryError
from signery.protocol import DigestAlgorithm, SignatureScheme
from tests.support import Account, Api, ServerProcess, free_port

pytestmark = pytest.mark.e2e

SHA256 = DigestAlgorithm.SHA256


@pytest.fixture(scope="module")
def world(server_api: Api) -> dict[str, Any]:
    """team ── child, child2; sibling. The account lives in `team`; `dup` names two
    keys as near to it (in child and child2), `near` one in team and one in child."""
    api = server_api
    team = api.create_tsg()
    child = api.create_tsg(parent=team["id"])
    child2 = api.create_tsg(parent=team["id"])
    sibling = api.create_tsg()
    dup, near = api.unique("dup"), api.unique("near")
    return {
        "team": team,
        "account": api.create_account(team["id"]),
        "ec_key": api.create_key(team["id"], "EC_P256"),
        "rsa_key": api.create_key(team["id"], "RSA_2048"),
        "child_key": api.create_key(child["id"], "EC_P384", ca="none"),
        "sibling_key": api.create_key(sibling["id"], "EC_P256", ca="none"),
        "dup_name": dup,
        "dup_keys": [
            api.create_key(child["id"], "EC_P256", ca="none", name=dup),
            api.create_key(child2["id"], "EC_P256", ca="none", name=dup),
        ],
        "near_name": near,
        "near_keys": [
            api.create_key(team["id"], "EC_P256", ca="none", name=near),
            api.create_key(child["id"], "EC_P256", ca="none", name=near),
        ],
    }


@pytest.fixture(scope="module")
def client(server: ServerProcess, world: dict[str, Any]) -> Iterator[Client]:
    with Client(server.url, credentials=world["account"].credentials()) as c:
        yield c


def leaf_certificate(signer: RemoteSigner) -> x509.Certificate:
    assert signer.certificate_chain, "a key certified by the built-in CA has a chain"
    return signer.certificate_chain[0]


# ------------------------------------------------------------------ keys and signatures


def test_keys_are_exactly_those_of_the_account_subtree(
    client: Client, world: dict[str, Any]
) -> None:
    usable = client.keys()
    ids = {k.id for k in usable}
    assert len(ids) == len(usable)
    expected = {world[k]["id"] for k in ("ec_key", "rsa_key", "child_key")}
    expected |= {k["id"] for k in world["dup_keys"] + world["near_keys"]}
    assert ids == expected
    assert world["sibling_key"]["id"] not in ids


def test_ecdsa_signature_verifies_with_the_leaf_certificate(
    client: Client, world: dict[str, Any]
) -> None:
    signer = client.signer(world["ec_key"]["name"])
    data = b"release artifact, EC P-256"
    signature = signer.sign(hash_bytes(data, SHA256))
    leaf_key = leaf_certificate(signer).public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    # Raises InvalidSignature if the server signed anything but sha256(data).
    leaf_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    assert signer.last_response is not None
    assert signer.last_response.key_version == 1
    assert signer.last_response.key_id == world["ec_key"]["id"]
    assert signer.last_response.scheme is SignatureScheme.ECDSA
    with pytest.raises(InvalidSignature):
        leaf_key.verify(signature, data + b"!", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("scheme", "rsa_padding"),
    [
        pytest.param(SignatureScheme.RSA_PKCS1V15, padding.PKCS1v15(), id="pkcs1v15"),
        pytest.param(
            SignatureScheme.RSA_PSS,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            id="pss",
        ),
    ],
)
def test_rsa_signature_verifies_with_the_leaf_certificate(
    client: Client, world: dict[str, Any], scheme: SignatureScheme, rsa_padding: Any
) -> None:
    signer = client.signer(world["rsa_key"]["name"])
    data = f"release artifact, RSA {scheme.value}".encode()
    signature = signer.sign(hash_bytes(data, SHA256), scheme)
    leaf_key = leaf_certificate(signer).public_key()
    assert isinstance(leaf_key, rsa.RSAPublicKey)
    assert leaf_key.public_numbers() == signer.public_key.public_numbers()
    leaf_key.verify(signature, data, rsa_padding, hashes.SHA256())
    assert len(signature) == 256


@pytest.mark.parametrize(
    ("key", "scheme"),
    [
        ("ec_key", SignatureScheme.RSA_PSS),
        ("ec_key", SignatureScheme.RSA_PKCS1V15),
        ("rsa_key", SignatureScheme.ECDSA),
    ],
)
def test_signer_refuses_a_scheme_its_key_cannot_make_before_sending(
    client: Client, server_api: Api, world: dict[str, Any], key: str, scheme: SignatureScheme
) -> None:
    """Regression: RemoteSigner sent RSA-PSS for an EC key and let the server
    refuse it; it knows the key's algorithm, so nothing leaves the machine."""
    signer = client.signer(world[key]["name"])
    seq = server_api.last_seq()
    with pytest.raises(errors.SchemeNotAllowed) as caught:
        signer.sign(hash_bytes(b"never sent", SHA256), scheme)
    assert (
        f"{scheme.value} cannot be used with a {signer.algorithm.value} key" in caught.value.detail
    )
    with pytest.raises(errors.SchemeNotAllowed):
        signer.sign_detailed(hash_bytes(b"never sent", SHA256), scheme)
    assert server_api.events_after(seq) == []


def test_access_token_is_fetched_once_and_reused(
    server: ServerProcess, server_api: Api, world: dict[str, Any]
) -> None:
    seq = server_api.last_seq()
    artifacts = [f"artifact {i}".encode() for i in range(5)]
    with Client(server.url, credentials=world["account"].credentials()) as c:
        signer = c.signer(world["ec_key"]["name"])
        for data in artifacts:
            signer.sign(hash_bytes(data, SHA256))
        c.keys()
    kinds = [e["kind"] for e in server_api.events_after(seq)]
    assert kinds.count("auth.token.issued") == 1, kinds
    assert kinds.count("signing.sign.succeeded") == len(artifacts), kinds


class SignBodies(httpx.HTTPTransport):
    """A real HTTP transport that keeps the body of every signing request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sign"):
            self.bodies.append(request.read())
        return super().handle_request(request)


def test_sign_sends_the_shared_sign_request_model(
    server: ServerProcess, world: dict[str, Any]
) -> None:
    """The body is protocol.SignRequest, so client and server cannot drift apart;
    unset fields are left out, as before."""
    transport = SignBodies()
    hashed = hash_bytes(b"artifact", SHA256)
    info = p.ClientInfo(tool="tests")
    with Client(server.url, credentials=world["account"].credentials(), transport=transport) as c:
        c.sign(world["ec_key"]["id"], hashed, SignatureScheme.ECDSA, client_info=info)
    [body] = transport.bodies
    assert json.loads(body) == {
        "digest": base64.b64encode(hashed.digest).decode("ascii"),
        "digest_algorithm": "sha256",
        "scheme": "ecdsa",
        "client": {"tool": "tests"},
    }
    assert p.SignRequest.model_validate_json(body).client == info


@pytest.mark.parametrize("justification", ["x" * 1025, "line\x00break"])
def test_a_request_the_model_refuses_is_validation_failed_before_sending(
    server: ServerProcess, world: dict[str, Any], justification: str
) -> None:
    transport = SignBodies()
    with (
        Client(server.url, credentials=world["account"].credentials(), transport=transport) as c,
        pytest.raises(errors.ValidationFailed, match="justification"),
    ):
        c.sign(
            world["ec_key"]["id"],
            hash_bytes(b"artifact", SHA256),
            SignatureScheme.ECDSA,
            justification=justification,
        )
    assert transport.bodies == []


def test_a_name_means_the_nearest_key_to_the_client_and_the_server(
    client: Client, world: dict[str, Any]
) -> None:
    near, far = world["near_keys"]
    assert client.key(world["near_name"]).id == near["id"]
    signer = client.signer(world["near_name"])
    signer.sign(hash_bytes(b"nearest", SHA256))
    assert signer.last_response is not None
    assert signer.last_response.key_id == near["id"]
    # By name on the wire too (the signer sends the id): the server picks the same.
    by_name = client.sign(world["near_name"], hash_bytes(b"by name", SHA256), SignatureScheme.ECDSA)
    assert by_name.key_id == near["id"]
    usable = client.keys()
    assert {k.id: k.distance for k in usable}[far["id"]] == 1


def test_a_key_that_cannot_sign_is_refused_before_anything_is_sent(
    client: Client, server_api: Api, world: dict[str, Any]
) -> None:
    key = server_api.create_key(world["team"]["id"], "EC_P256", ca="none")
    server_api.admin_client.signing_keys.disable(key["id"])
    usable = client.keys()
    assert key["id"] not in {k.id for k in usable}
    listed = {k.id: k for k in client.keys(everything=True)}
    assert (listed[key["id"]].usable, listed[key["id"]].unusable_reason) == (False, "key_disabled")
    seq = server_api.last_seq()
    with pytest.raises(errors.KeyDisabled):
        client.signer(key["name"])
    kinds = [e["kind"] for e in server_api.events_after(seq)]
    assert not [k for k in kinds if k.startswith("signing.")], kinds
    # Its public key is still there to verify what it signed before.
    assert client.key(key["name"], usable=False).public_key_pem == key["public_key_pem"]


# ------------------------------------------------------------------ error mapping


def _sign(key: str, scheme: SignatureScheme = SignatureScheme.ECDSA) -> Callable[[Client], Any]:
    return lambda c: c.sign(key, hash_bytes(b"x", SHA256), scheme)


ERROR_CASES = [
    pytest.param(lambda w: _sign("no-such-key"), errors.KeyNotFound, id="server-unknown-key-name"),
    pytest.param(
        lambda w: lambda c: c.signer("no-such-key"), errors.KeyNotFound, id="client-unknown-key"
    ),
    pytest.param(
        lambda w: _sign(w["sibling_key"]["id"]), errors.KeyNotFound, id="sibling-key-by-id"
    ),
    pytest.param(
        lambda w: _sign(w["dup_name"]), errors.KeyNameAmbiguous, id="server-ambiguous-name"
    ),
    pytest.param(
        lambda w: lambda c: c.key(w["dup_name"]),
        errors.KeyNameAmbiguous,
        id="client-ambiguous-name",
    ),
    pytest.param(
        lambda w: _sign(w["ec_key"]["name"], SignatureScheme.RSA_PSS),
        errors.SchemeNotAllowed,
        id="rsa-pss-with-ec-key",
    ),
    pytest.param(
        lambda w: _sign(w["rsa_key"]["name"], SignatureScheme.ECDSA),
        errors.SchemeNotAllowed,
        id="ecdsa-with-rsa-key",
    ),
]


@pytest.mark.parametrize(("make_call", "expected"), ERROR_CASES)
def test_refusals_map_to_the_error_class_of_their_code(
    client: Client,
    world: dict[str, Any],
    make_call: Callable[[dict[str, Any]], Callable[[Client], Any]],
    expected: type[SigneryError],
) -> None:
    with pytest.raises(SigneryError) as caught:
        make_call(world)(client)
    assert type(caught.value) is expected
    assert caught.value.code == expected.code


def test_unknown_client_id_is_unknown_client(server: ServerProcess, world: dict[str, Any]) -> None:
    stranger = AccountCredentials(
        "00000000-0000-4000-8000-000000000000", world["account"].credentials().private_key
    )
    with Client(server.url, credentials=stranger) as c, pytest.raises(errors.UnknownClient) as e:
        c.keys()
    assert e.value.code == "unknown_client"
    assert isinstance(e.value, errors.InvalidGrant)


def test_wrong_private_key_is_assertion_signature_invalid(
    server: ServerProcess, server_api: Api, world: dict[str, Any]
) -> None:
    other: Account = server_api.create_account(world["team"]["id"])
    impostor = AccountCredentials(world["account"].client_id, other.credentials().private_key)
    with (
        Client(server.url, credentials=impostor) as c,
        pytest.raises(errors.AssertionSignatureInvalid),
    ):
        c.keys()


def test_wrong_api_token_is_invalid_token(server: ServerProcess) -> None:
    with (
        Client(server.url, api_token="sgy_not-a-real-token") as c,
        pytest.raises(errors.InvalidToken) as e,
    ):
        c.users.me()
    assert e.value.code == "invalid_token"


def test_missing_credentials_are_client_errors(server: ServerProcess) -> None:
    with Client(server.url) as c:
        with pytest.raises(ClientError, match="no account credentials"):
            c.keys()
        with pytest.raises(ClientError, match="no API token"):
            c.users.me()


def test_disabled_account_is_refused_with_and_without_a_live_token(
    server: ServerProcess, server_api: Api, world: dict[str, Any]
) -> None:
    account = server_api.create_account(world["team"]["id"])
    key = world["ec_key"]["name"]
    with Client(server.url, credentials=account.credentials()) as live:
        signer = live.signer(key)  # the access token is now held by `live`
        server_api.admin_client.accounts.disable(account.id)
        # A live token stops working at once, on the signing endpoint.
        with pytest.raises(errors.AccountDisabled):
            signer.sign(hash_bytes(b"after disable", SHA256))
    # A new client cannot even get a token.
    with (
        Client(server.url, credentials=account.credentials()) as fresh,
        pytest.raises(errors.ClientDisabled),
    ):
        fresh.keys()


# ------------------------------------------------------------------ transport and input


def test_server_down_is_server_unreachable(world: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, credentials=world["account"].credentials(), timeout=5) as c:
        with pytest.raises(ServerUnreachable) as e:
            c.keys()
        assert e.value.code == "server_unreachable"
        assert url in e.value.detail
        with pytest.raises(ServerUnreachable):
            c.metadata()


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/", "127.0.0.1:8443", "file:///etc/passwd", "", "HTTPS//x"]
)
def test_client_refuses_a_non_http_url(url: str) -> None:
    with pytest.raises(ClientError, match="must start with https://"):
        Client(url)


@pytest.mark.parametrize(
    "key", ["a/b", "../sign", "..", ".", "", "k?x=1", "k#frag", "k%2Fx", "a\\b"]
)
def test_key_reference_that_could_change_the_path_is_refused_before_any_request(
    client: Client, server_api: Api, key: str
) -> None:
    seq = server_api.last_seq()
    with pytest.raises(ClientError, match="invalid key reference") as e:
        client.sign(key, hash_bytes(b"x", SHA256), SignatureScheme.ECDSA)
    assert type(e.value) is ClientError
    assert server_api.events_after(seq) == [], "the refusal must happen before any request"
