"""Signed bundles: Ed25519 keys, signing a bundle's content, and the trust policy on restore.

Key files are PEM, as OpenSSL writes them: the private key is PKCS#8 (``-----BEGIN PRIVATE
KEY-----``, unencrypted, mode 0600), the public key SubjectPublicKeyInfo (``-----BEGIN PUBLIC
KEY-----``); ``openssl pkey -in KEY -pubout`` turns one into the other. A directory of trusted
keys holds one ``*.pub`` file per key. What is signed is defined in spec/smolmachine.md §4.2: the
bundle's content, so a re-encoded (``pack``) bundle keeps its signature.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import smolformat
from smolformat import signature
from smolformat.files import read_regular
from smolformat.payloads import MAX_SIGNATURES
from smolvmm.errors import BundleError, ConfigError, SmolvmmError

TrustedKeys = dict[bytes, str]  # raw 32-byte public key -> the file it came from
MAX_KEY_FILE = 64 << 10  # an Ed25519 key's PEM is ~120 bytes: a key file is read whole, never more


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key: ``ed25519:`` and 16 hex digits of its SHA-256."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file ``path`` (never over an existing one), atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)  # fails if path exists: a key is never overwritten
    except FileExistsError:
        raise ConfigError(f"{path} exists: keygen never overwrites a key") from None
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


def generate_signing_key(path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 private key to ``path`` (mode 0600) and its public key to ``path.pub``;
    returns the key's fingerprint. Refuses to overwrite either file."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise ConfigError(f"{existing} exists: keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename or private_path}: {exc.strerror}") from None
    return fingerprint(_raw(key.public_key()))


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_regular(path, MAX_KEY_FILE), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):  # cryptography's text ends in a URL: the file's name says enough
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def load_trusted_keys(directory: str | os.PathLike[str]) -> TrustedKeys:
    """Every ``*.pub`` file of ``directory`` as an Ed25519 public key; a file that is not one, or
    a directory without any, is a ConfigError."""
    folder = Path(directory)
    try:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(".pub"))
    except OSError as exc:
        raise ConfigError(f"cannot read trusted keys in {folder}: {exc.strerror}") from None
    keys: TrustedKeys = {}
    for file in files:
        try:
            key = serialization.load_pem_public_key(read_regular(file, MAX_KEY_FILE))
        except OSError as exc:
            raise ConfigError(f"cannot read trusted key {file}: {exc.strerror}") from None
        except ValueError:  # cryptography's text ends in a URL: the file's name says enough
            raise ConfigError(f"trusted key {file} is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"trusted key {file} is not an Ed25519 key")
        keys[_raw(key)] = file.name
    if not keys:
        raise ConfigError(f"no trusted keys (*.pub files) in {folder}")
    return keys


def sign_bundle(
    bundle: str | os.PathLike[str], key: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> str:
    """Sign ``bundle``'s content with the private key at ``key``; the signed bundle is a new file
    renamed over ``output`` (default: ``bundle`` itself). A signature by the same key is replaced,
    others are kept. Returns the key's fingerprint."""
    private = _load_private(Path(key))
    public = _raw(private.public_key())
    try:
        with smolformat.open_bundle(bundle) as opened:
            message = signature.signed_message(opened)
            kept = [
                {"algorithm": r.algorithm, "public_key": r.public_key, "signature": r.signature}
                for r in opened.signatures
                if r.public_key != public
            ]
        if len(kept) >= MAX_SIGNATURES:
            raise BundleError(f"{bundle} already carries {len(kept)} signatures, the most a bundle holds")
    except smolformat.FormatError as exc:
        raise BundleError(f"{bundle}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot sign {bundle}: {exc.strerror}") from exc
    record = {"algorithm": signature.ED25519, "public_key": public, "signature": private.sign(message)}
    target = output or bundle
    try:
        signature.write_signed(bundle, target, [*kept, record])
    except smolformat.FormatError as exc:
        raise BundleError(f"{bundle}: {exc}") from exc
    except OSError as exc:
        raise SmolvmmError(f"cannot write {target}: {exc.strerror}") from exc
    return fingerprint(public)


def check_signature(bundle: smolformat.Bundle, trusted: TrustedKeys) -> str:
    """The name of the trusted key whose valid signature ``bundle`` carries; else BundleError.

    Hashes the whole content (guest RAM and disks, decoded), like a verify.
    """
    candidates = [r for r in bundle.signatures if r.algorithm == signature.ED25519 and r.public_key in trusted]
    if not bundle.signatures:
        raise BundleError(f"{bundle.path} is not signed, and a signature by a trusted key is required")
    if not candidates:
        signers = ", ".join(fingerprint(r.public_key) for r in bundle.signatures)
        raise BundleError(f"{bundle.path} is signed only by keys that are not trusted here ({signers})")
    try:
        message = signature.signed_message(bundle)
    except smolformat.FormatError as exc:
        raise BundleError(f"{bundle.path}: {exc}") from exc
    for record in candidates:
        try:
            Ed25519PublicKey.from_public_bytes(record.public_key).verify(record.signature, message)
        except InvalidSignature:
            continue
        return trusted[record.public_key]
    names = ", ".join(trusted[r.public_key] for r in candidates)
    raise BundleError(f"{bundle.path}: the signature by {names} does not match the bundle's content")


def verify_signed_bundle(path: str | os.PathLike[str], trusted_keys: str | os.PathLike[str]) -> str:
    """Open ``path`` and check that a key of the ``trusted_keys`` directory signed its content;
    returns that key's file name. Raises BundleError (or ConfigError for the key directory)."""
    trusted = load_trusted_keys(trusted_keys)
    try:
        with smolformat.open_bundle(path) as bundle:
            return check_signature(bundle, trusted)
    except smolformat.FormatError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot open {path}: {exc.strerror}") from exc
