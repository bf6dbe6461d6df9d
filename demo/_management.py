"""The management chapter: key stores, TSG and subject policy, account, keys, chain."""

from __future__ import annotations

import json
import os
import stat

from rich.markup import escape

from demo._common import (
    ACCOUNT_NAME,
    DEMO_ORG,
    EC_KEY,
    RSA_KEY,
    TSG_NAME,
    split_certificates,
)
from demo._runner import Runner


class ManagementSteps(Runner):
    """The management chapter."""

    def step_keystores(self) -> None:
        self.cli("keystore", "list")
        stores = self.cli_json("keystore", "list")  # the same list, for a robust check
        listed = {str(s.get("name")): s for s in stores}
        for name in ("builtin", *(store.storage for store in self.hardware)):
            found = listed.get(name)
            self.expect(
                found is not None,
                f"`signery keystore list` does not list the {name} store",
                json.dumps(stores, indent=2),
            )
            assert found is not None
            self.expect(
                found.get("healthy") is True,
                f"the {name} store is not healthy: {found.get('detail')}",
                json.dumps(stores, indent=2),
            )
            self.note(f"[bold]{name}[/] is healthy: {escape(str(found.get('detail')))}")

    def step_tsg(self) -> None:
        tsg = self.cli_json("tsg", "create", TSG_NAME)
        self.state.tsg_id = str(tsg["id"])
        self.expect(
            tsg.get("parent_id") == self.state.root_tsg_id,
            f"TSG {TSG_NAME} is not a child of the root TSG {self.state.root_tsg_id}",
            json.dumps(tsg, indent=2),
        )
        self.note(f"TSG [bold]{TSG_NAME}[/] has id [bold]{self.state.tsg_id}[/]")
        done = self.cli("tsg", "tree")
        self.expect(self.state.tsg_id in done.stdout, "the new TSG is missing from `tsg tree`")

    def step_subject_policy(self) -> None:
        # The built-in CA certifies keys below the root TSG only under a subject
        # policy that the root superuser (the demo's administrator) sets.
        self.cli(
            "tsg", "subject-policy", "set", self.state.tsg_id,
            "--cn", f"{DEMO_ORG} *", "--org", DEMO_ORG,
        )  # fmt: skip
        policy = self.cli_json("tsg", "subject-policy", "show", self.state.tsg_id)
        self.expect(
            policy.get("effect") == "policies"
            and (policy.get("own") or {}).get("rules", {}).get("organization") == [DEMO_ORG],
            "the TSG's subject policy is not in force",
            json.dumps(policy, indent=2),
        )
        refused = self.cli(
            "key", "create", "not-ours", "--tsg", self.state.tsg_id, "--algorithm", "EC_P256",
            "--ca", "builtin", "--cn", "Someone Else", "--org", "Someone Else Inc",
            check=False,
        )  # fmt: skip
        self.expect(
            refused.returncode == 1 and "subject_not_allowed" in refused.stderr,
            "a key whose subject is outside the policy was not refused",
            refused.stdout + refused.stderr,
        )
        self.note(
            f"keys in TSG {self.state.tsg_id} get certificates only for O={DEMO_ORG} and "
            f"CN={DEMO_ORG} *; another subject is refused (subject_not_allowed)"
        )

    def step_account(self) -> None:
        key_file = self.tmp / f"{ACCOUNT_NAME}.key"
        account = self.cli_json(
            "account", "create", ACCOUNT_NAME, "--tsg", self.state.tsg_id, "--key-out", key_file
        )
        self.state.client_id = str(account["client_id"])
        self.state.account_id = str(account["id"])
        self.state.key_file = key_file
        self.expect(key_file.is_file(), f"the private key was not written to {key_file}")
        mode = stat.S_IMODE(key_file.stat().st_mode)
        self.expect(
            os.name == "nt" or mode & 0o077 == 0,
            f"the private key file has mode {mode:o}, readable by others",
        )
        fingerprints = ", ".join(k["fingerprint"][:16] for k in account.get("keys", []))
        self.note(
            f"account [bold]{ACCOUNT_NAME}[/] in TSG {self.state.tsg_id}, "
            f"status {escape(str(account.get('status')))}"
        )
        self.note(f"client id [bold]{self.state.client_id}[/]")
        self.note(f"public key registered on the server (fingerprint {fingerprints}...)")
        self.note(
            f"private key written to $DEMO_TMP/{key_file.name} with mode {mode:o}; "
            "the server does not keep it"
        )

    def create_key(self, name: str, algorithm: str, cn: str, storage: str = "builtin") -> None:
        """Create a signing key in ``storage``, certified by the built-in CA, and describe it."""
        where: tuple[str, ...] = () if storage == "builtin" else ("--storage", storage)
        key = self.cli_json(
            "key",
            "create",
            name,
            "--tsg",
            self.state.tsg_id,
            "--algorithm",
            algorithm,
            "--ca",
            "builtin",
            "--cn",
            cn,
            "--org",
            DEMO_ORG,
            *where,
        )
        self.state.key_ids[name] = str(key["id"])
        chain = key.get("certificate_chain") or []
        self.expect(key.get("status") == "active", f"key {name} is not active", json.dumps(key))
        self.expect(
            key.get("storage") == storage,
            f"key {name} is in the {key.get('storage')} store, not in {storage}",
            json.dumps(key),
        )
        self.expect(len(chain) >= 2, f"key {name} has no certificate chain", json.dumps(key))
        cert = next(
            (v.get("certificate") for v in key.get("versions", []) if v.get("version") == 1), None
        )
        self.note(
            f"key [bold]{name}[/] ({algorithm}, storage {key.get('storage')}), "
            f"id {key['id']}, schemes {', '.join(key.get('schemes', []))}"
        )
        if cert:
            self.note(f"certificate subject {escape(str(cert.get('subject')))}")
            self.note(f"issued by {escape(str(cert.get('issuer')))}, until {cert.get('not_after')}")

    def step_ec_key(self) -> None:
        self.create_key(EC_KEY, "EC_P256", "Signery Demo Release (EC)")

    def step_rsa_key(self) -> None:
        self.create_key(RSA_KEY, "RSA_3072", "Signery Demo Release (RSA)")

    def step_export(self) -> None:
        self.cli("key", "public-key", EC_KEY, "-o", "pubkey.pem")
        self.cli("key", "public-key", RSA_KEY, "-o", "pubkey-rsa.pem")
        self.cli("key", "chain", EC_KEY, "-o", "chain.pem")
        certs = split_certificates((self.out / "chain.pem").read_text("ascii"))
        self.expect(
            len(certs) >= 3,
            f"chain.pem holds {len(certs)} certificates; expected leaf, issuing CA and root",
            (self.out / "chain.pem").read_text("ascii"),
        )
        (self.out / "leaf.pem").write_text(certs[0], "ascii")
        (self.out / "issuing-ca.pem").write_text("".join(certs[1:-1]), "ascii")
        (self.out / "root-ca.pem").write_text(certs[-1], "ascii")
        self.note(
            f"chain.pem holds {len(certs)} certificates, split into "
            "leaf.pem, issuing-ca.pem and root-ca.pem"
        )

    def step_chain_openssl(self) -> None:
        done = self.openssl_run(
            "verify", "-CAfile", "root-ca.pem", "-untrusted", "issuing-ca.pem", "leaf.pem"
        )
        self.expect("leaf.pem: OK" in done.stdout, "openssl did not say `leaf.pem: OK`")
        for name in ("root-ca.pem", "issuing-ca.pem", "leaf.pem"):
            self.openssl_run("x509", "-in", name, "-noout", "-subject", "-issuer")
        done = self.openssl_run(
            "x509", "-in", "leaf.pem", "-noout", "-ext", "keyUsage,extendedKeyUsage"
        )
        self.expect("Code Signing" in done.stdout, "the leaf certificate lacks EKU Code Signing")
        self.expect(
            "Digital Signature" in done.stdout, "the leaf certificate lacks KU digitalSignature"
        )
        done = self.openssl_run("x509", "-in", "leaf.pem", "-noout", "-pubkey")
        self.expect(
            done.stdout.strip() == (self.out / "pubkey.pem").read_text("ascii").strip(),
            "the leaf certificate does not certify the key's public key (pubkey.pem)",
            done.stdout,
        )
        self.note("the chain verifies up to the built-in root; the leaf is for code signing")
        self.note("and it certifies the same public key as pubkey.pem")
