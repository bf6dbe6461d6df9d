"""The demo's walk: every chapter's steps, in the order they are shown."""

from __future__ import annotations

import functools
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from demo._audit import AuditSteps
from demo._common import (
    AWS_KMS,
    MARKER,
    StepResult,
)
from demo._formats import FormatSteps
from demo._lifecycle import LifecycleSteps
from demo._pkcs11 import Pkcs11Steps
from demo._server import ServerSteps
from demo._signing import SigningSteps


# The signing chapter builds on the management one, the formats chapter on the
# certificate one: each chapter is named once, after those it builds on.
class Demo(ServerSteps, SigningSteps, Pkcs11Steps, FormatSteps, LifecycleSteps, AuditSteps):
    """One run of the demo: a temporary installation, a server and the walk."""

    def __init__(
        self,
        console: Console,
        out: Path,
        tmp: Path,
        debug_break: str | None,
        *,
        hardware: bool = True,
    ) -> None:
        super().__init__(console, out, tmp, debug_break, hardware=hardware)
        self.steps = [
            ("Check the tools", self.step_tools),
            ("Initialize an installation in a temporary data directory", self.step_init),
        ]
        if self.hardware:
            self.steps.append((self.hardware_title(), self.step_hardware))
        self.steps += [
            ("Start the server on 127.0.0.1", self.step_serve),
            ("Log in as the administrator", self.step_admin_login),
            ("Show the key stores and their health", self.step_keystores),
            ("Create a child TSG", self.step_tsg),
            (
                "Set the child TSG's subject policy: the certificate subjects it may get",
                self.step_subject_policy,
            ),
            ("Create a built-in account with a generated key pair", self.step_account),
            ("Create an EC P-256 signing key with a built-in CA certificate", self.step_ec_key),
            ("Create an RSA 3072 signing key with a built-in CA certificate", self.step_rsa_key),
            ("Export the public keys and the certificate chain", self.step_export),
            ("Check the certificate chain with openssl", self.step_chain_openssl),
            ("Log in as the built-in account", self.step_account_login),
            ("List the keys the account may sign with", self.step_keys),
            ("Sign two sample artifacts with the EC key", self.step_sign_ec),
            ("Sign the binary with the RSA key as well", self.step_sign_rsa),
            ("Verify the signatures with signery", self.step_verify_signery),
            ("Verify the signatures with openssl", self.step_verify_openssl),
            ("Renew the EC key's certificate: same key pair, new certificate", self.step_renew),
            ("Revoke the old certificate; the CRL lists it for openssl", self.step_crl),
            ("Timestamp the signature with Signery's RFC 3161 TSA", self.step_timestamp),
            ("CMS: sign hello.txt with a timestamp; openssl cms -verify", self.step_cms),
            (
                "Authenticode: sign a Windows program with a timestamp; osslsigncode verify",
                self.step_authenticode,
            ),
            ("JAR: sign a Java archive with a timestamp; jarsigner -verify -strict", self.step_jar),
            ("OpenPGP: export the public key, sign, gpg --verify", self.step_openpgp),
            (
                "PKCS#11: osslsigncode and jarsigner sign through `signery exec`; both verify",
                self.step_pkcs11_tools,
            ),
            (
                "Rotate the RSA key: a new version signs, the old one still verifies",
                self.step_rotate,
            ),
            (
                "Require approval for a key: pending, approved by a release manager, signed once",
                self.step_approval,
            ),
        ]
        for store in self.hardware:
            self.steps.append(
                (
                    f"Sign with an EC P-256 key in the {store.storage} store ({store.device})",
                    functools.partial(self.step_hardware_key, store),
                )
            )
        stop = "Stop the server and the AWS KMS double" if AWS_KMS in self.hardware else ""
        self.steps += [
            ("Disable the account: signing is refused", self.step_refusal),
            ("Enable the account again: signing works", self.step_reenable),
            ("Show the audit events", self.step_audit),
            (
                "Check the audit hash chains and a signed checkpoint; catch an edited copy",
                self.step_audit_verify,
            ),
            ("Show the usage counters", self.step_usage),
            (stop or "Stop the server", self.step_stop),
        ]
        self.results = [StepResult(i, title) for i, (title, _) in enumerate(self.steps, 1)]

    def summary(self, ok: bool) -> None:
        """The table of steps, the outputs and the verdict."""
        self.console.print()
        self.console.rule("[bold]Summary", align="left")
        table = Table(header_style="bold", box=None, pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("step")
        table.add_column("result")
        table.add_column("time", justify="right")
        style = {"ok": "[green]ok[/]", "failed": "[bold red]FAILED[/]", "not run": "[dim]not run"}
        for r in self.results:
            seconds = f"{r.seconds:.1f} s" if r.status != "not run" else ""
            table.add_row(str(r.number), escape(r.title), style[r.status], seconds)
        self.console.print(Padding(table, (0, 0, 0, 2), expand=False))
        if self.out.is_dir():
            files = sorted(p for p in self.out.iterdir() if p.is_file() and p.name != MARKER)
            self.console.print(f"\n  outputs in [bold]{escape(str(self.out))}[/]:")
            for p in files:
                self.console.print(f"    {escape(p.name):<22} {p.stat().st_size:>8} bytes")
        stores = ", ".join(
            ["builtin", *(f"{store.storage} ({store.device})" for store in self.hardware)]
        )
        if self.skipped:
            stores += f"; skipped: {', '.join(self.skipped)} (see step 1)"
        self.console.print(f"\n  key stores of this run: {escape(stores)}", highlight=False)
        passed = sum(r.status == "ok" for r in self.results)
        if ok:
            self.console.print(
                f"\n[bold green]Demo succeeded:[/] all {passed} steps passed.", highlight=False
            )
        else:
            failed = next(r for r in self.results if r.status != "ok")
            self.console.print(
                f"\n[bold red]Demo failed[/] at step {failed.number} ({escape(failed.title)}); "
                f"{passed} of {len(self.results)} steps passed.",
                highlight=False,
            )
