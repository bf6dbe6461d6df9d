"""How ``signery key ...`` prints a signing key: its details, its lifecycle, and
what an administrator should do about a pending certificate request."""

from __future__ import annotations

from datetime import datetime

from signery import protocol as p
from signery.cli._common import day, details, err, table


def key_details(k: p.SigningKey) -> None:
    current = next((v for v in k.versions if v.version == k.current_version), None)
    cert = current.certificate if current else None
    details(
        [
            ("id", k.id),
            ("name", k.name),
            ("tsg", k.tsg_id),
            ("algorithm", k.algorithm.value),
            ("storage", k.storage),
            ("status", k.status.value),
            ("version", k.current_version),
            ("schemes", ", ".join(s.value for s in k.schemes)),
            ("CA", k.certificate_authority.value),
            (
                "certificate",
                f"{cert.subject} (serial {cert.serial}, until {cert.not_after})"
                if cert
                else "none",
            ),
        ]
    )


def key_lifecycle(k: p.SigningKey) -> None:
    """The rotation and destruction schedule, and every version with its status."""
    if k.rotation_period_days:
        rotation = f"every {k.rotation_period_days} days, next {k.next_rotation_at}"
    else:
        rotation = "manual only"
    if k.destroyed_at is not None:
        destruction = f"destroyed at {k.destroyed_at}"
    elif k.destroy_at is not None:
        destruction = f"scheduled for {k.destroy_at} (cancel: signery key cancel-destroy)"
    else:
        destruction = "not scheduled"
    details([("rotation", rotation), ("destruction", destruction)])

    def since(v: p.KeyVersion) -> datetime | None:
        return v.destroyed_at or v.archived_at or v.created_at

    table(
        "versions",
        ["version", "status", "since", "certificate serial", "not after"],
        [
            (
                v.version,
                v.status.value + (" (current)" if v.version == k.current_version else ""),
                since(v),
                v.certificate.serial if v.certificate else None,
                day(v.certificate.not_after) if v.certificate else None,
            )
            for v in k.versions
        ],
    )


def request_note(key: p.SigningKey) -> None:
    """What an administrator should do about a key waiting for its CA connector."""
    request = key.certificate_request
    if request is None or request.status is not p.CertificateRequestStatus.PENDING:
        return
    if request.error:
        err.print(f"[yellow]certificate request {request.id}: {request.error}[/]", highlight=False)
        err.print(f"retry with: signery key enroll {key.name}", highlight=False)
    else:
        err.print(
            f"[yellow]waiting for the CA ({request.purpose}): get the CSR with "
            f"`signery key csr {key.name} -o {key.name}.csr`, then "
            f"`signery key upload-certificate {key.name} chain.pem`[/]",
            highlight=False,
        )
