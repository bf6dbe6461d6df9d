"""Typed management sub-clients: one per noun of the REST API.

``Client(url, api_token=...)`` carries them as attributes (``client.tsgs``,
``client.users``, ``client.roles``, ``client.accounts``, ``client.signing_keys``,
``client.ca``, ``client.ca_connectors``, ``client.keystores``, ``client.approvals``,
``client.grants``, ``client.audit``). Each method takes the request model of
``signery.protocol`` and returns the response model, over the path
``signery.endpoints`` names for it; a refusal raises the server's error class
(``signery.errors``), as every client call does.

A request body is sent as the fields the caller set (``exclude_unset``): the
server fills in the defaults of the same shared model.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from signery import endpoints as e
from signery import protocol as p
from signery.endpoints import Endpoint

M = TypeVar("M")


class Transport(Protocol):
    """What the sub-clients need of :class:`~signery.client.Client`: a management
    call (user token) that parses its answer, a raw one, and a streamed one."""

    def _api(
        self,
        endpoint: Endpoint,
        model: type[M],
        *,
        segments: Mapping[str, str] | None = None,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> M: ...

    def _api_raw(
        self,
        endpoint: Endpoint,
        *,
        segments: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> bytes: ...

    def _api_stream(
        self, endpoint: Endpoint, *, params: Mapping[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]: ...


class _SubClient:
    def __init__(self, transport: Transport) -> None:
        self._t = transport


def _when(moment: datetime | date | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class Tsgs(_SubClient):
    """Tenant Security Groups and their certificate subject policies."""

    def create(self, request: p.TsgCreate) -> p.Tsg:
        return self._t._api(e.TSG_CREATE, p.Tsg, body=request)

    def list(self) -> builtins.list[p.Tsg]:
        return self._t._api(e.TSG_LIST, list[p.Tsg])

    def get(self, tsg_id: str) -> p.Tsg:
        return self._t._api(e.TSG_GET, p.Tsg, segments={"tsg_id": tsg_id})

    def tree(self, root: str | None = None) -> builtins.list[p.TsgTree]:
        return self._t._api(e.TSG_TREE, list[p.TsgTree], params={"root": root})

    def subject_policy(self, tsg_id: str) -> p.SubjectPolicy:
        """The TSG's own subject policy, the inherited ones, and their effect."""
        return self._t._api(e.SUBJECT_POLICY_GET, p.SubjectPolicy, segments={"tsg_id": tsg_id})

    def set_subject_policy(self, tsg_id: str, rules: p.SubjectPolicyRules) -> p.SubjectPolicy:
        return self._t._api(
            e.SUBJECT_POLICY_SET, p.SubjectPolicy, segments={"tsg_id": tsg_id}, body=rules
        )

    def clear_subject_policy(self, tsg_id: str) -> None:
        self._t._api_raw(e.SUBJECT_POLICY_CLEAR, segments={"tsg_id": tsg_id})


class Users(_SubClient):
    """Users (administrators) and their personal API tokens. ``user`` is a
    username or an id; ``"me"`` is the caller."""

    def create(self, request: p.UserCreate) -> p.UserCreated:
        return self._t._api(e.USER_CREATE, p.UserCreated, body=request)

    def list(self) -> builtins.list[p.User]:
        return self._t._api(e.USER_LIST, list[p.User])

    def get(self, user: str) -> p.User:
        return self._t._api(e.USER_GET, p.User, segments={"user": user})

    def me(self) -> p.User:
        return self.get("me")

    def create_token(self, user: str, request: p.ApiTokenCreate) -> p.ApiTokenCreated:
        """A new API token; its secret is in the answer only."""
        return self._t._api(
            e.USER_TOKEN_CREATE, p.ApiTokenCreated, segments={"user": user}, body=request
        )

    def tokens(self, user: str = "me") -> builtins.list[p.ApiToken]:
        return self._t._api(e.USER_TOKEN_LIST, list[p.ApiToken], segments={"user": user})

    def revoke_token(self, token_id: str) -> p.ApiToken:
        return self._t._api(e.TOKEN_REVOKE, p.ApiToken, segments={"token_id": token_id})


class Roles(_SubClient):
    """Role bindings of principals at TSGs."""

    def bind(self, request: p.RoleBindingCreate) -> p.RoleBinding:
        return self._t._api(e.ROLE_BIND, p.RoleBinding, body=request)

    def list(self, tsg_id: str | None = None) -> builtins.list[p.RoleBinding]:
        return self._t._api(e.ROLE_LIST, list[p.RoleBinding], params={"tsg_id": tsg_id})

    def unbind(self, binding_id: str) -> None:
        self._t._api_raw(e.ROLE_UNBIND, segments={"binding_id": binding_id})


class Accounts(_SubClient):
    """Built-in accounts; ``account`` is an account id or a client id."""

    def create(self, request: p.AccountCreate) -> p.AccountCreated:
        """A new account; a generated private key is in the answer only."""
        return self._t._api(e.ACCOUNT_CREATE, p.AccountCreated, body=request)

    def list(self, tsg_id: str | None = None) -> builtins.list[p.Account]:
        return self._t._api(e.ACCOUNT_LIST, list[p.Account], params={"tsg_id": tsg_id})

    def get(self, account: str) -> p.Account:
        return self._t._api(e.ACCOUNT_GET, p.Account, segments={"account": account})

    def disable(self, account: str) -> p.Account:
        return self._t._api(e.ACCOUNT_DISABLE, p.Account, segments={"account": account})

    def enable(self, account: str) -> p.Account:
        return self._t._api(e.ACCOUNT_ENABLE, p.Account, segments={"account": account})

    def add_key(self, account: str, request: p.AccountKeyAdd) -> p.Account:
        return self._t._api(
            e.ACCOUNT_KEY_ADD, p.Account, segments={"account": account}, body=request
        )

    def remove_key(self, account: str, key_id: str) -> p.Account:
        return self._t._api(
            e.ACCOUNT_KEY_REMOVE, p.Account, segments={"account": account, "key_id": key_id}
        )


class SigningKeys(_SubClient):
    """Signing keys: lifecycle, certificates and policy. ``key`` is a name or an
    id; ``tsg_id`` says in which TSG a name is looked up (default: the nearest)."""

    def _key(
        self,
        endpoint: Endpoint,
        key: str,
        tsg_id: str | None,
        body: BaseModel | None = None,
    ) -> p.SigningKey:
        return self._t._api(
            endpoint, p.SigningKey, segments={"key": key}, body=body, params={"tsg_id": tsg_id}
        )

    def _text(self, endpoint: Endpoint, key: str, tsg_id: str | None) -> str:
        raw = self._t._api_raw(endpoint, segments={"key": key}, params={"tsg_id": tsg_id})
        return raw.decode("utf-8")

    def create(self, request: p.KeyCreate) -> p.SigningKey:
        return self._t._api(e.KEY_CREATE, p.SigningKey, body=request)

    def list(
        self, tsg_id: str | None = None, *, expiring_within_days: int | None = None
    ) -> builtins.list[p.SigningKey]:
        params = {"tsg_id": tsg_id, "expiring_within_days": expiring_within_days}
        return self._t._api(e.KEY_LIST, list[p.SigningKey], params=params)

    def get(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_GET, key, tsg_id)

    def public_key(self, key: str, tsg_id: str | None = None) -> str:
        """The current version's public key (PEM)."""
        return self._text(e.KEY_PUBLIC_KEY, key, tsg_id)

    def chain(self, key: str, tsg_id: str | None = None) -> str:
        """The certificate chain (PEM, leaf first)."""
        return self._text(e.KEY_CHAIN, key, tsg_id)

    def csr(self, key: str, tsg_id: str | None = None) -> str:
        """The CSR of the key's pending certificate request (PEM)."""
        return self._text(e.KEY_CSR, key, tsg_id)

    def certificates(
        self, key: str, tsg_id: str | None = None
    ) -> builtins.list[p.CertificateRecord]:
        return self._t._api(
            e.KEY_CERTIFICATES,
            list[p.CertificateRecord],
            segments={"key": key},
            params={"tsg_id": tsg_id},
        )

    def renew(
        self, key: str, request: p.CertificateRenew, tsg_id: str | None = None
    ) -> p.SigningKey:
        return self._key(e.KEY_RENEW, key, tsg_id, request)

    def reissue(
        self, key: str, request: p.CertificateReissue, tsg_id: str | None = None
    ) -> p.SigningKey:
        return self._key(e.KEY_REISSUE, key, tsg_id, request)

    def revoke_certificate(
        self, key: str, request: p.CertificateRevoke, tsg_id: str | None = None
    ) -> p.CertificateRecord:
        return self._t._api(
            e.KEY_REVOKE_CERTIFICATE,
            p.CertificateRecord,
            segments={"key": key},
            body=request,
            params={"tsg_id": tsg_id},
        )

    def rotate(self, key: str, request: p.KeyRotate, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_ROTATE, key, tsg_id, request)

    def cancel_rotation(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_CANCEL_ROTATION, key, tsg_id, _EMPTY)

    def set_rotation(
        self, key: str, request: p.KeyRotationSchedule, tsg_id: str | None = None
    ) -> p.SigningKey:
        return self._key(e.KEY_ROTATION, key, tsg_id, request)

    def disable(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_DISABLE, key, tsg_id, _EMPTY)

    def enable(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_ENABLE, key, tsg_id, _EMPTY)

    def destroy(self, key: str, request: p.KeyDestroy, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_DESTROY, key, tsg_id, request)

    def cancel_destroy(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_CANCEL_DESTROY, key, tsg_id, _EMPTY)

    def upload_certificate(
        self, key: str, request: p.CertificateUpload, tsg_id: str | None = None
    ) -> p.SigningKey:
        return self._key(e.KEY_CERTIFICATE_UPLOAD, key, tsg_id, request)

    def enroll(self, key: str, tsg_id: str | None = None) -> p.SigningKey:
        return self._key(e.KEY_ENROLL, key, tsg_id)

    def policy(self, key: str, tsg_id: str | None = None) -> p.KeyPolicy | None:
        return self._t._api(
            e.KEY_POLICY_GET,
            p.KeyPolicy | None,  # type: ignore[arg-type]
            segments={"key": key},
            params={"tsg_id": tsg_id},
        )

    def set_policy(
        self, key: str, policy: p.KeyPolicy, tsg_id: str | None = None
    ) -> p.KeyPolicy | None:
        """Replace the key's whole policy."""
        return self._t._api(
            e.KEY_POLICY_SET,
            p.KeyPolicy | None,  # type: ignore[arg-type]
            segments={"key": key},
            body=policy,
            params={"tsg_id": tsg_id},
        )

    def clear_policy(self, key: str, tsg_id: str | None = None) -> None:
        self._t._api_raw(e.KEY_POLICY_CLEAR, segments={"key": key}, params={"tsg_id": tsg_id})


class _Empty(p.WireModel):
    """The empty body of an action (``POST /keys/{key}/disable``...)."""


_EMPTY = _Empty()


class Ca(_SubClient):
    """The built-in CA."""

    def chain(self) -> str:
        """The issuing and root certificates (PEM)."""
        return self._t._api_raw(e.CA_CHAIN).decode("utf-8")

    def crl(self) -> bytes:
        """The current certificate revocation list (DER)."""
        return self._t._api_raw(e.CA_CRL)

    def revoke(self, serial: str, request: p.CaCertificateRevoke) -> p.CaCertificate:
        """Revoke a certificate the CA issued, by its hex serial."""
        return self._t._api(e.CA_REVOKE, p.CaCertificate, segments={"serial": serial}, body=request)


class CaConnectors(_SubClient):
    """External CA connectors, configured on a TSG."""

    def create(self, request: p.CaConnectorCreate) -> p.CaConnector:
        return self._t._api(e.CA_CONNECTOR_CREATE, p.CaConnector, body=request)

    def list(self, tsg_id: str | None = None) -> builtins.list[p.CaConnector]:
        return self._t._api(e.CA_CONNECTOR_LIST, list[p.CaConnector], params={"tsg_id": tsg_id})

    def get(self, connector: str, tsg_id: str | None = None) -> p.CaConnector:
        return self._t._api(
            e.CA_CONNECTOR_GET,
            p.CaConnector,
            segments={"connector": connector},
            params={"tsg_id": tsg_id},
        )

    def update(
        self, connector: str, request: p.CaConnectorUpdate, tsg_id: str | None = None
    ) -> p.CaConnector:
        return self._t._api(
            e.CA_CONNECTOR_UPDATE,
            p.CaConnector,
            segments={"connector": connector},
            body=request,
            params={"tsg_id": tsg_id},
        )

    def delete(self, connector: str, tsg_id: str | None = None) -> None:
        self._t._api_raw(
            e.CA_CONNECTOR_DELETE, segments={"connector": connector}, params={"tsg_id": tsg_id}
        )


class KeyStores(_SubClient):
    """The server's key stores."""

    def list(self) -> builtins.list[p.KeyStoreInfo]:
        return self._t._api(e.KEYSTORE_LIST, list[p.KeyStoreInfo])


class Approvals(_SubClient):
    """Signing requests waiting for approval, and pre-approvals."""

    def list(self, status: str = "pending_approval") -> builtins.list[p.ApprovalRequest]:
        """Requests in the TSGs where you may approve (``status="all"`` for every one)."""
        return self._t._api(e.APPROVAL_LIST, list[p.ApprovalRequest], params={"status": status})

    def get(self, request_id: str) -> p.ApprovalRequest:
        return self._t._api(e.APPROVAL_GET, p.ApprovalRequest, segments={"request_id": request_id})

    def approve(self, request_id: str, decision: p.ApprovalDecide) -> p.ApprovalRequest:
        return self._t._api(
            e.APPROVAL_APPROVE,
            p.ApprovalRequest,
            segments={"request_id": request_id},
            body=decision,
        )

    def deny(self, request_id: str, decision: p.ApprovalDecide) -> p.ApprovalRequest:
        return self._t._api(
            e.APPROVAL_DENY, p.ApprovalRequest, segments={"request_id": request_id}, body=decision
        )

    def pre_approve(self, request: p.PreApprovalCreate) -> p.ApprovalRequest:
        """Approve an account's signing ahead of a release (approved at once)."""
        return self._t._api(e.APPROVAL_CREATE, p.ApprovalRequest, body=request)


class Grants(_SubClient):
    """What approvals allow an account to sign."""

    def list(
        self, *, key: str | None = None, account: str | None = None
    ) -> builtins.list[p.SigningGrant]:
        return self._t._api(
            e.GRANT_LIST, list[p.SigningGrant], params={"key": key, "account": account}
        )

    def revoke(self, grant_id: str) -> p.SigningGrant:
        return self._t._api(e.GRANT_REVOKE, p.SigningGrant, segments={"grant_id": grant_id})


class Audit(_SubClient):
    """Audit events, checkpoints, exports and usage counters."""

    PAGE_MAX = 1000
    """The largest page ``GET /audit/events`` serves."""

    def events(
        self,
        *,
        tsg_id: str | None = None,
        key_id: str | None = None,
        account_id: str | None = None,
        outcome: p.AuditOutcome | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        newest_first: bool = False,
    ) -> p.AuditEventPage:
        """One page of the events you may read; ``next_cursor`` leads to the next."""
        params = {
            "tsg_id": tsg_id,
            "key_id": key_id,
            "account_id": account_id,
            "outcome": outcome.value if outcome else None,
            "kind": kind,
            "since": _when(since),
            "until": _when(until),
            "limit": limit,
            "cursor": cursor,
            "order": "desc" if newest_first else "asc",
        }
        return self._t._api(e.AUDIT_EVENTS, p.AuditEventPage, params=params)

    def all_events(self) -> Iterator[p.AuditEvent]:
        """Every event you may read, oldest first, one page at a time."""
        cursor: str | None = None
        while True:
            page = self.events(limit=self.PAGE_MAX, cursor=cursor)
            yield from page.events
            cursor = page.next_cursor
            if cursor is None:
                return

    def checkpoints(self) -> p.AuditCheckpointList:
        return self._t._api(e.AUDIT_CHECKPOINTS, p.AuditCheckpointList)

    def checkpoint(self) -> p.AuditCheckpointList:
        """Sign a checkpoint of every chain head that moved, now."""
        return self._t._api(e.AUDIT_CHECKPOINT_CREATE, p.AuditCheckpointList)

    def public_key(self) -> p.AuditSigningKey:
        """The key that verifies checkpoints."""
        return self._t._api(e.AUDIT_PUBLIC_KEY, p.AuditSigningKey)

    def export(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        fmt: p.ExportFormat = p.ExportFormat.JSONL,
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """The events, oldest first, as the chunks of a stream (any size)."""
        params = {"since": _when(since), "until": _when(until), "format": fmt.value}
        return self._t._api_stream(e.AUDIT_EXPORT, params=params)

    def usage(
        self,
        *,
        scope: p.UsageScope | None = None,
        tsg_id: str | None = None,
        since: date | None = None,
        until: date | None = None,
        top: int | None = None,
        by_day: bool = False,
    ) -> p.UsageReport:
        """Usage counters: lifetime, or per day between ``since`` and ``until``."""
        params = {
            "scope": scope.value if scope else None,
            "tsg_id": tsg_id,
            "since": _when(since),
            "until": _when(until),
            "top": top,
            "group_by": "day" if by_day else None,
        }
        return self._t._api(e.USAGE, p.UsageReport, params=params)
