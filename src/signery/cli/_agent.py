"""``signery agent`` and ``signery exec``: options and printing.

The agent logs in exactly as ``signery sign`` does (profile, ``--client-id`` /
``--key-file``, the ``SIGNERY_*`` variables) and serves the account's keys as a
PKCS#11 token (:mod:`signery.agent`). ``exec`` runs one tool beside a private
agent that lives as long as the tool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer

from signery import protocol as p
from signery.agent import (
    ADDRESS_VARIABLE,
    Agent,
    AgentSettings,
    default_socket,
    prepare_socket_directory,
    running_in_thread,
    server_address,
)
from signery.cli._common import JsonOpt, connection, err, parse_duration, print_json
from signery.client import Client
from signery.errors import ClientError

DEFAULT_LABEL = "Signery"

ApprovalWaitOpt = Annotated[
    str | None,
    typer.Option(
        "--approval-wait",
        help="When a key requires approval, wait this long for it (e.g. 10m) before the "
        "tool is refused (default: refuse at once; the log names the request).",
    ),
]
CacheOpt = Annotated[
    str,
    typer.Option("--cache", help="How long the key list and certificates are reused (e.g. 30s)."),
]
LabelOpt = Annotated[
    str, typer.Option("--token-label", help="The token's label (pkcs11:token=...).")
]


def agent(
    ctx: typer.Context,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            help="Socket path (default: $XDG_RUNTIME_DIR/signery/agent.sock, or "
            "/tmp/signery-UID/agent.sock); its directory must be yours alone.",
        ),
    ] = None,
    print_env: Annotated[
        bool,
        typer.Option(
            "--print-env",
            help="Go to the background and print the shell lines that point tools at it: "
            'eval "$(signery agent --print-env)".',
        ),
    ] = False,
    approval_wait: ApprovalWaitOpt = None,
    cache: CacheOpt = "30s",
    label: LabelOpt = DEFAULT_LABEL,
    as_json: JsonOpt = False,
) -> None:
    """Serve the account's keys as a PKCS#11 token for p11-kit-client.so.

    Tools load /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so with
    P11_KIT_SERVER_ADDRESS=unix:path=SOCKET and sign through Signery: policy,
    approvals, limits and the audit trail apply to every signature.
    """
    settings = _settings(socket or default_socket(), approval_wait, cache)
    # In the background the agent logs in itself (its errors go to its log,
    # and the foreground says it failed, with the log's last lines).
    ready = _daemonize(settings.socket, as_json) if print_env else None
    client = _logged_in(ctx)
    built = _agent(client, settings, label)
    _configure_logging()
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await built.start()
        if ready is None:
            address = server_address(settings.socket)
            if as_json:
                print_json(
                    {ADDRESS_VARIABLE: address, "socket": str(settings.socket), "pid": os.getpid()}
                )
                sys.stdout.flush()
            else:
                err.print(f"{ADDRESS_VARIABLE}={address}", highlight=False)
        else:
            os.write(ready, b"1")
            os.close(ready)
        try:
            await stop.wait()
        finally:
            await built.stop()

    try:
        asyncio.run(main())
    finally:
        client.close()


def exec_(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="The tool and its arguments, after --.")],
    approval_wait: ApprovalWaitOpt = None,
    cache: CacheOpt = "30s",
    label: LabelOpt = DEFAULT_LABEL,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Do not print the keys' PKCS#11 URIs.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the keys' URIs as JSON (on stderr: stdout is the tool's)."
        ),
    ] = False,
) -> None:
    """Run a tool with a private agent: signery exec -- jarsigner ... / osslsigncode ...

    The agent's socket is set in P11_KIT_SERVER_ADDRESS for the tool; the agent
    stops when the tool exits, and the tool's exit status is returned.
    """
    if not command:
        raise ClientError("name the tool to run: signery exec -- TOOL ARGS...")
    with tempfile.TemporaryDirectory(prefix="signery-agent-") as private:
        settings = _settings(Path(private) / "agent.sock", approval_wait, cache)
        client = _logged_in(ctx)
        try:
            built = _agent(client, settings, label)
            if not quiet:
                keys = client.keys()
                uris = [{"name": k.name, "uri": pkcs11_uri(label, k)} for k in keys]
                if as_json:
                    err.print_json(data={"keys": uris})
                for entry in [] if as_json else uris:
                    err.print(f"{entry['name']}: {entry['uri']}", highlight=False)
            _configure_logging()
            env = {**os.environ, ADDRESS_VARIABLE: server_address(settings.socket)}
            with running_in_thread(built):
                try:
                    completed = subprocess.run(command, env=env, check=False)  # noqa: S603
                except FileNotFoundError:
                    raise ClientError(f"{command[0]}: no such program") from None
        finally:
            client.close()
    raise typer.Exit(
        completed.returncode if completed.returncode >= 0 else 128 - completed.returncode
    )


def pkcs11_uri(label: str, key: p.SigningKeySummary) -> str:
    """The RFC 7512 URI of a key's private key object on the agent's token."""
    return (
        f"pkcs11:token={_uri_text(label)};object={_uri_text(key.name)};"
        f"id={''.join(f'%{b:02x}' for b in bytes.fromhex(key.id.replace('-', '')))};type=private"
    )


def _uri_text(text: str) -> str:
    # RFC 7512 §2.3: pk11-pchar is unreserved, ":", "[", "]", "@", "!", "$", "'",
    # "(", ")", "*", "+", ",", "=", "&"; everything else percent-encoded.
    return quote(text, safe=":[]@!$'()*+,=&")


def _settings(socket: Path, approval_wait: str | None, cache: str) -> AgentSettings:
    return AgentSettings(
        socket=socket,
        approval_wait=float(parse_duration(approval_wait)) if approval_wait else 0.0,
        cache_seconds=float(parse_duration(cache)),
    )


def _logged_in(ctx: typer.Context) -> Client:
    """The account's client, its credentials checked now (a tool should not be
    the first to learn that the key file is wrong)."""
    client = connection(ctx).signing()
    try:
        client.access_token()
    except BaseException:
        client.close()
        raise
    return client


def _agent(client: Client, settings: AgentSettings, label: str) -> Agent:
    serial = (client.client_id or "").replace("-", "")[:16]
    return Agent(client, settings, label=label, serial=serial)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("signery-agent: %(levelname)s %(message)s"))
    logger = logging.getLogger("signery.agent")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _daemonize(socket: Path, as_json: bool) -> int:
    """Fork: the parent prints the lines for ``eval`` and returns to the shell;
    the child serves, detached from the terminal (ssh-agent's way), its log in
    ``agent.log`` beside the socket (an open stderr would hold up whoever reads
    the parent's output to its end)."""
    prepare_socket_directory(socket)
    log_path = socket.absolute().parent / "agent.log"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        # Wait until the child has bound its socket (or failed), so that the
        # lines printed point at a live agent.
        status = os.read(read_end, 1)
        os.close(read_end)
        if status != b"1":
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ClientError("the agent did not start: " + (" / ".join(tail) or f"see {log_path}"))
        address = server_address(socket)
        if as_json:
            print_json(
                {ADDRESS_VARIABLE: address, "SIGNERY_AGENT_PID": pid, "socket": str(socket),
                 "log": str(log_path)}
            )  # fmt: skip
            raise typer.Exit(0)
        print(f"{ADDRESS_VARIABLE}='{address}'; export {ADDRESS_VARIABLE};")
        print(f"SIGNERY_AGENT_PID={pid}; export SIGNERY_AGENT_PID;")
        print(f"echo signery agent pid {pid} on {socket}, log {log_path};")
        raise typer.Exit(0)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    return write_end  # the child writes "1" on it once it serves
