"""``edgekit keys generate``, ``edgekit sign``, ``edgekit verify``."""

from __future__ import annotations

import sys

import click

from edgekit.artifact import sign_package, verify_package
from edgekit.errors import UsageError
from edgekit.host.cli._app import cli, emit_json
from edgekit.host.keys import KEY_ROLES
from edgekit.signing import generate_keypair, load_private_key, load_public_key


@cli.group()
def keys() -> None:
    """Manage Ed25519 signing keys."""


_TRUST_FLAG = {"release": "--trusted-key (model.trusted_keys)",
               "operator": "--intent-key (ota.intent_keys) and to controllers as"
                           " controller.operator_keys"}


@keys.command("generate")
@click.argument("prefix", required=False)
@click.option("--role", type=click.Choice(KEY_ROLES), default="release", show_default=True,
              help="release: signs packages; operator: signs desired documents and rollout"
                   " requests.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@click.option("--json", "as_json", is_flag=True, help="Print the key id and paths as JSON.")
def keys_generate(prefix: str | None, role: str, force: bool, as_json: bool) -> None:
    """Write PREFIX.key (private, mode 0600) and PREFIX.pub (public); PREFIX defaults to
    edgekit-ROLE (edgekit-release, edgekit-operator)."""
    pair = generate_keypair(prefix or f"edgekit-{role}", overwrite=force)
    if as_json:
        emit_json({"private": str(pair.private_path), "public": str(pair.public_path),
                   "key_id": pair.key_id, "role": role})
        return
    click.echo(f"{role} key:  {pair.private_path} (keep it secret)")
    click.echo(f"public key:  {pair.public_path} (give it to devices as {_TRUST_FLAG[role]})")
    click.echo(f"key id:      {pair.key_id}")


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Private key file from `edgekit keys generate`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the signed package here instead of in place.")
def sign(package: str, key_path: str, output: str | None) -> None:
    """Sign PACKAGE (its manifest, which pins every file's sha256)."""
    kid = sign_package(package, load_private_key(key_path), output)
    click.echo(f"signed {output or package} with key {kid}")


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(dir_okay=False),
              help="Public key to trust (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="Check hashes only; accept no signature.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(package: str, trusted: tuple[str, ...], allow_unsigned: bool, as_json: bool) -> None:
    """Check every file's sha256 and the signature; exit 1 on any mismatch.

    Needs --trusted-key (a signature is checked against the keys you trust), or
    --allow-unsigned to check the hashes only; neither is a usage error (exit 2).
    """
    if not trusted and not allow_unsigned:
        raise UsageError("verify needs --trusted-key KEY.pub (or --allow-unsigned)",
                         hint="pass the public key the package was signed with:"
                              " edgekit verify PKG --trusted-key signing.pub")
    report = verify_package(package, [load_public_key(k) for k in trusted],
                            require_signature=not allow_unsigned)
    if as_json:
        emit_json(report.to_dict())
        return
    signer = f"signed by {report.key_id}" if report.key_id else (
        "signed (signature not checked)" if report.signed else "unsigned")
    click.echo(f"OK {report.name} {report.version}: {report.files_checked} files, {signer}")
    sys.stdout.flush()
