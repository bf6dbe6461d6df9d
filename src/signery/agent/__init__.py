"""``signery agent``: a PKCS#11 token served over p11-kit's RPC protocol, so that
the signing tools people already run (jarsigner, osslsigncode, openssl,
pkcs11-tool...) sign through Signery by loading Debian's stock
``p11-kit-client.so``. See docs/pkcs11.md."""

from signery.agent._agent import (
    ADDRESS_VARIABLE,
    P11_KIT_CLIENT,
    Agent,
    AgentSettings,
    default_socket,
    prepare_socket_directory,
    running_in_thread,
    server_address,
)

__all__ = [
    "ADDRESS_VARIABLE",
    "P11_KIT_CLIENT",
    "Agent",
    "AgentSettings",
    "default_socket",
    "prepare_socket_directory",
    "running_in_thread",
    "server_address",
]
