"""Helpers shared by the key lifecycle tests (rotation, disable, destruction, scheduler)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from fastapi.testclient import TestClient
from sqlalchemy import select

from signery.keystores._builtin import BuiltinKeyMaterialRow
from signery.server.container import Services
from signery.server.keys.models import KeyVersionRow
from signery.server.persistence.db import make_engine
from tests.support import Api, Installation


def sign(
    api: Api, token: str, key: str, digest: bytes, version: int | None = None
) -> httpx.Response:
    """An ECDSA/SHA-256 signing request, naming a key version when given."""
    body: dict[str, Any] = {
        "digest": base64.b64encode(digest).decode(),
        "digest_algorithm": "sha256",
        "scheme": "ecdsa",
    }
    if version is not None:
        body["key_version"] = version
    return api.http.post(
        f"/api/v1/signing/keys/{key}/sign",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


def verifies(public_key_pem: str, signature: bytes, digest: bytes) -> bool:
    """ECDSA over a SHA-256 digest, checked with cryptography directly."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except Exception:
        return False
    return True


def key_of(api: Api, key_id: str) -> dict[str, Any]:
    return api.ok(api.http.get(f"/api/v1/keys/{key_id}", headers=api.admin))  # type: ignore[no-any-return]


def action(api: Api, key_id: str, name: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return api.http.post(f"/api/v1/keys/{key_id}/{name}", json=body or {}, headers=api.admin)


def version(key: dict[str, Any], number: int) -> dict[str, Any]:
    return next(v for v in key["versions"] if v["version"] == number)  # type: ignore[no-any-return]


def services_of(app_client: TestClient) -> Services:
    found: Services = app_client.app.state.services  # type: ignore[attr-defined]
    return found


def set_min_signing_version(api: Api, key_id: str, minimum: int | None) -> None:
    """Through the policy API (PUT / DELETE /api/v1/keys/{key}/policy)."""
    if minimum is None:
        response = api.http.delete(f"/api/v1/keys/{key_id}/policy", headers=api.admin)
    else:
        response = api.http.put(
            f"/api/v1/keys/{key_id}/policy",
            json={"min_signing_version": minimum},
            headers=api.admin,
        )
    assert response.status_code in (200, 204), response.text


def store_refs(installation: Installation, key_id: str) -> list[str]:
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return [
                r[0]
                for r in conn.execute(
                    select(KeyVersionRow.store_ref)
                    .where(KeyVersionRow.key_id == key_id)
                    .order_by(KeyVersionRow.version)
                )
            ]
    finally:
        engine.dispose()


def builtin_material(installation: Installation, refs: list[str]) -> int:
    """How many of these refs still have a row in builtin_key_material."""
    engine = make_engine(installation.settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return len(
                conn.execute(
                    select(BuiltinKeyMaterialRow.ref).where(BuiltinKeyMaterialRow.ref.in_(refs))
                ).all()
            )
    finally:
        engine.dispose()


def events_of(api: Api, seq: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in api.events_after(seq) if e["kind"] == kind]
