"""Installation facts shared by every replica (issuer, root TSG, master key id)."""

from __future__ import annotations

from sqlalchemy import String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from signery.server.persistence.db import Base


class ServerMetaRow(Base):
    __tablename__ = "server_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


INSTALLATION_ID = "installation_id"
ISSUER = "issuer"
ROOT_TSG_ID = "root_tsg_id"
MASTER_KEY_ID = "master_key_id"
INITIALIZED_AT = "initialized_at"


def read_meta(session: Session) -> dict[str, str]:
    return {row.key: row.value for row in session.scalars(select(ServerMetaRow))}


def write_meta(session: Session, key: str, value: str) -> None:
    session.merge(ServerMetaRow(key=key, value=value))
