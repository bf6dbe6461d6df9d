"""The data directory (the SQLite database, the master key file, the writers'
lock file) belongs to the server's user alone.

`signery init` creates it 0700, and the commands that write into it (`init`,
`serve`, `db upgrade`, `keystore rotate-master-key`) run with the umask 077, so
each file they create is 0600; SQLite gives its ``-wal`` and ``-shm`` files the
mode of the database file. A directory that group or others can enter, list or
write is refused when a server starts and by `init`, with the command that
fixes it: through it, the database could be read or a file replaced.
"""

from __future__ import annotations

import os
import shlex
import stat

from signery.errors import DataDirectoryNotPrivate
from signery.server.config import Settings

PRIVATE_UMASK = 0o077
PRIVATE_DIRECTORY_MODE = 0o700


def use_private_umask() -> None:
    """Every file this process creates from now on is its user's alone (0600, a
    directory 0700), whatever the umask it inherited from its shell or service
    manager. For the server's commands only: a signed artifact written by the
    client keeps the usual permissions."""
    os.umask(PRIVATE_UMASK)


def uses_data_dir(settings: Settings) -> bool:
    """Whether the installation keeps anything in the data directory: the SQLite
    database, or the master key file (unless the key comes from the settings)."""
    return settings.resolved_database_url.startswith("sqlite") or settings.master_key is None


def create_private(settings: Settings) -> None:
    """Create the data directory 0700 if it is missing (`signery init`), then
    refuse it as :func:`require_private` does."""
    if uses_data_dir(settings):
        settings.data_dir.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    require_private(settings)


def require_private(settings: Settings) -> None:
    """Refuse (DataDirectoryNotPrivate) a data directory that group or others may
    access in any way, naming the command that fixes it. Signery never loosens
    nor tightens a directory it did not create itself: the operator decides."""
    if not uses_data_dir(settings):
        return
    path = settings.data_dir.absolute()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return  # nothing in it to protect; opening the database says what is missing
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DataDirectoryNotPrivate(
            f"the data directory {path} is accessible by group or others (mode {mode:o}); "
            f"make it the server user's alone: chmod 700 {shlex.quote(str(path))}"
        )
