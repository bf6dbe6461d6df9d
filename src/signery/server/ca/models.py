"""The built-in CA's authorities (root and issuing)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from signery.server.db import Base, UtcDateTime


class CaAuthorityRow(Base):
    __tablename__ = "ca_authorities"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), unique=True)  # "root" | "issuing"
    algorithm: Mapped[str] = mapped_column(String(16))
    storage: Mapped[str] = mapped_column(String(32))
    store_ref: Mapped[str] = mapped_column(String(512))
    tsg_id: Mapped[str] = mapped_column(String(10))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
