"""HTTPS for `signery serve`: the uvicorn options for the configured TLS files.

The files are loaded here once before anything listens, so that a missing file,
a key that does not match its certificate or an unreadable client CA bundle
stops the start with one clear ConfigurationError (uvicorn would raise it in
every worker instead).
"""

from __future__ import annotations

import ssl
from typing import Any

from signery.errors import ConfigurationError
from signery.server.config import Settings


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's ``ssl_*`` options; empty when TLS is not configured (plain HTTP)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigurationError(
            f"cannot load tls_cert_file {settings.tls_cert_file} with tls_key_file "
            f"{settings.tls_key_file}: {getattr(e, 'strerror', None) or e}"
        ) from None
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
    }
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigurationError(
                f"cannot load tls_client_ca_file {settings.tls_client_ca_file}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None
        # A client without a certificate from these CAs is refused in the handshake.
        options["ssl_ca_certs"] = str(settings.tls_client_ca_file)
        options["ssl_cert_reqs"] = int(ssl.CERT_REQUIRED)
    return options
