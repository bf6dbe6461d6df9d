"""Every path of the REST API, named once, beside the wire models (``protocol.py``).

The client builds its requests from these and nothing else, and
``tests/test_endpoints.py`` checks each one against the server's routes, so a
path cannot drift between the two sides. A path parameter is written
``{name}`` as in the server's routes; :meth:`Endpoint.path` fills it in, one
percent-encoded segment per value, so a value can never change the path (a
``/``, ``?`` or ``#`` in a key name stays inside its segment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from signery.errors import ClientError
from signery.protocol import API_PREFIX

_PARAMETER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Endpoint:
    """One route of the API: its method and its path template."""

    method: str
    template: str

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the path's parameters, in order."""
        return tuple(_PARAMETER.findall(self.template))

    def path(self, **values: str) -> str:
        """The path with each parameter filled in as one encoded segment.

        Refuses a missing or unexpected parameter (a programming error) and the
        dot segments ``.`` and ``..``, which an HTTP client resolves into
        another path."""
        if set(values) != set(self.parameters):
            raise TypeError(f"{self.template} takes {self.parameters}, got {tuple(values)}")
        for name, value in values.items():
            if value in (".", ".."):
                raise ClientError(f"invalid {name} {value!r}")
        return _PARAMETER.sub(lambda m: quote(values[m[1]], safe=""), self.template)


def _get(template: str) -> Endpoint:
    return Endpoint("GET", API_PREFIX + template)


def _post(template: str) -> Endpoint:
    return Endpoint("POST", API_PREFIX + template)


def _put(template: str) -> Endpoint:
    return Endpoint("PUT", API_PREFIX + template)


def _patch(template: str) -> Endpoint:
    return Endpoint("PATCH", API_PREFIX + template)


def _delete(template: str) -> Endpoint:
    return Endpoint("DELETE", API_PREFIX + template)


# ------------------------------------------------------------------ health (outside the API prefix)

HEALTHZ: Final = Endpoint("GET", "/healthz")
READYZ: Final = Endpoint("GET", "/readyz")

# ------------------------------------------------------------------ discovery and signing plane

META: Final = _get("/meta")
TOKEN: Final = _post("/oauth/token")
SIGNING_KEYS: Final = _get("/signing/keys")
SIGN: Final = _post("/signing/keys/{key}/sign")
SIGNING_REQUEST: Final = _get("/signing/requests/{request_id}")
TSA: Final = _post("/tsa")

# ------------------------------------------------------------------ TSGs and subject policies

TSG_CREATE: Final = _post("/tsgs")
TSG_LIST: Final = _get("/tsgs")
TSG_TREE: Final = _get("/tsgs/tree")
TSG_GET: Final = _get("/tsgs/{tsg_id}")
SUBJECT_POLICY_GET: Final = _get("/tsgs/{tsg_id}/subject-policy")
SUBJECT_POLICY_SET: Final = _put("/tsgs/{tsg_id}/subject-policy")
SUBJECT_POLICY_CLEAR: Final = _delete("/tsgs/{tsg_id}/subject-policy")

# ------------------------------------------------------------------ users, tokens, roles

USER_CREATE: Final = _post("/users")
USER_LIST: Final = _get("/users")
USER_GET: Final = _get("/users/{user}")
USER_TOKEN_CREATE: Final = _post("/users/{user}/tokens")
USER_TOKEN_LIST: Final = _get("/users/{user}/tokens")
TOKEN_REVOKE: Final = _delete("/tokens/{token_id}")
ROLE_BIND: Final = _post("/role-bindings")
ROLE_LIST: Final = _get("/role-bindings")
ROLE_UNBIND: Final = _delete("/role-bindings/{binding_id}")

# ------------------------------------------------------------------ built-in accounts

ACCOUNT_CREATE: Final = _post("/accounts")
ACCOUNT_LIST: Final = _get("/accounts")
ACCOUNT_GET: Final = _get("/accounts/{account}")
ACCOUNT_DISABLE: Final = _post("/accounts/{account}/disable")
ACCOUNT_ENABLE: Final = _post("/accounts/{account}/enable")
ACCOUNT_KEY_ADD: Final = _post("/accounts/{account}/keys")
ACCOUNT_KEY_REMOVE: Final = _delete("/accounts/{account}/keys/{key_id}")

# ------------------------------------------------------------------ signing keys

KEY_CREATE: Final = _post("/keys")
KEY_LIST: Final = _get("/keys")
KEY_GET: Final = _get("/keys/{key}")
KEY_PUBLIC_KEY: Final = _get("/keys/{key}/public-key")
KEY_CHAIN: Final = _get("/keys/{key}/chain")
KEY_CERTIFICATES: Final = _get("/keys/{key}/certificates")
KEY_RENEW: Final = _post("/keys/{key}/renew")
KEY_REISSUE: Final = _post("/keys/{key}/reissue")
KEY_REVOKE_CERTIFICATE: Final = _post("/keys/{key}/revoke-certificate")
KEY_ROTATE: Final = _post("/keys/{key}/rotate")
KEY_CANCEL_ROTATION: Final = _post("/keys/{key}/cancel-rotation")
KEY_ROTATION: Final = _put("/keys/{key}/rotation")
KEY_DISABLE: Final = _post("/keys/{key}/disable")
KEY_ENABLE: Final = _post("/keys/{key}/enable")
KEY_DESTROY: Final = _post("/keys/{key}/destroy")
KEY_CANCEL_DESTROY: Final = _post("/keys/{key}/cancel-destroy")
KEY_CSR: Final = _get("/keys/{key}/csr")
KEY_CERTIFICATE_UPLOAD: Final = _post("/keys/{key}/certificate")
KEY_ENROLL: Final = _post("/keys/{key}/enroll")
KEY_POLICY_GET: Final = _get("/keys/{key}/policy")
KEY_POLICY_SET: Final = _put("/keys/{key}/policy")
KEY_POLICY_CLEAR: Final = _delete("/keys/{key}/policy")

# ------------------------------------------------------------------ CA, connectors, key stores

CA_CHAIN: Final = _get("/ca/chain")
CA_CRL: Final = _get("/ca/crl")
CA_REVOKE: Final = _post("/ca/certificates/{serial}/revoke")
CA_CONNECTOR_CREATE: Final = _post("/ca-connectors")
CA_CONNECTOR_LIST: Final = _get("/ca-connectors")
CA_CONNECTOR_GET: Final = _get("/ca-connectors/{connector}")
CA_CONNECTOR_UPDATE: Final = _patch("/ca-connectors/{connector}")
CA_CONNECTOR_DELETE: Final = _delete("/ca-connectors/{connector}")
KEYSTORE_LIST: Final = _get("/keystores")

# ------------------------------------------------------------------ approvals and grants

APPROVAL_LIST: Final = _get("/approvals")
APPROVAL_CREATE: Final = _post("/approvals")
APPROVAL_GET: Final = _get("/approvals/{request_id}")
APPROVAL_APPROVE: Final = _post("/approvals/{request_id}/approve")
APPROVAL_DENY: Final = _post("/approvals/{request_id}/deny")
GRANT_LIST: Final = _get("/grants")
GRANT_REVOKE: Final = _post("/grants/{grant_id}/revoke")

# ------------------------------------------------------------------ audit and usage

AUDIT_EVENTS: Final = _get("/audit/events")
AUDIT_EXPORT: Final = _get("/audit/export")
AUDIT_CHECKPOINTS: Final = _get("/audit/checkpoints")
AUDIT_CHECKPOINT_CREATE: Final = _post("/audit/checkpoints")
AUDIT_PUBLIC_KEY: Final = _get("/audit/checkpoints/public-key")
USAGE: Final = _get("/usage")


def all_endpoints() -> dict[str, Endpoint]:
    """Every endpoint of this module by its constant's name."""
    return {name: value for name, value in globals().items() if isinstance(value, Endpoint)}
