"""Signing and verification keys of certificate bundles.

Configuration (environment):

``MI300X_CERT_SIGNING_KEY``
    path to the PEM private key that signs bundles (PKCS#8, ECDSA P-256, unencrypted).
``MI300X_CERT_VERIFY_KEY``
    path to the PEM public key that verifiers trust.

``<home>/host-signing-key.pem``
    this host's own key, made on the host by ``mi300x-cert keys generate`` (the private key never
    leaves it; its public half is enrolled on the control plane with ``mi300x-cert keys enroll``).
    Used when ``MI300X_CERT_SIGNING_KEY`` is unset.

Without either, a local *development* key is created on first use at
``$MI300X_CERT_HOME_DIR/dev-signing-key.pem`` (default ``~/.mi300x-cert/``), mode 0600. Bundles
signed with it say so (``key-info.json`` and the statement's ``signer`` block) and verify as
``trusted: false`` unless that key is explicitly trusted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError

__all__ = [
    "SIGNING_KEY_ENV",
    "VERIFY_KEY_ENV",
    "HOME_DIR_ENV",
    "DEV_KEY_NAME",
    "SignerInfo",
    "home_dir",
    "dev_key_path",
    "host_key_path",
    "generate_host_key",
    "load_signer",
    "load_public_key",
    "public_key_from_pem",
    "public_pem",
    "trusted_keyids",
    "generate_key_file",
]

SIGNING_KEY_ENV = "MI300X_CERT_SIGNING_KEY"
VERIFY_KEY_ENV = "MI300X_CERT_VERIFY_KEY"
HOME_DIR_ENV = "MI300X_CERT_HOME_DIR"
DEV_KEY_NAME = "dev-signing-key.pem"
HOST_KEY_NAME = "host-signing-key.pem"


@dataclass
class SignerInfo:
    """A ready signer and where its key came from."""

    signer: object  # securesystemslib.signer.CryptoSigner
    keyid: str
    scheme: str
    public_pem: bytes
    development_key: bool
    source: str  # "argument" | "environment" | "host" | "development"
    path: Path


def home_dir() -> Path:
    env = os.environ.get(HOME_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".mi300x-cert"


def dev_key_path() -> Path:
    return home_dir() / DEV_KEY_NAME


def host_key_path() -> Path:
    return home_dir() / HOST_KEY_NAME


def generate_host_key(path: str | Path | None = None, *, force: bool = False) -> dict:
    """Make this host's signing key (ECDSA P-256, mode 0600) and its public half beside it
    (``<name>.pub.pem``, what the operator carries to the control plane); return ``{"path",
    "public_path", "keyid", "public_pem"}``. An existing key is kept (and described) unless ``force``."""
    from securesystemslib.signer import SSlibKey

    path = Path(path).expanduser() if path else host_key_path()
    if path.exists() and force:
        path.unlink()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            generate_key_file(path)
        except FileExistsError:
            pass  # made concurrently: use it
        except OSError as e:
            raise BundleError(f"host signing key {path} cannot be created: {e.strerror or e}") from e
    private = _load_private(path, "host signing key")
    pub = SSlibKey.from_crypto(private.public_key())
    pem = public_pem(private.public_key())
    pub_path = path.with_name(path.name.removesuffix(".pem") + ".pub.pem")
    try:
        if not pub_path.is_file() or pub_path.read_bytes() != pem:
            pub_path.write_bytes(pem)
    except OSError as e:
        raise BundleError(f"public key {pub_path} cannot be written: {e.strerror or e}") from e
    return {"path": str(path), "public_path": str(pub_path), "keyid": pub.keyid, "public_pem": pem.decode("ascii")}


def _check_curve(key: object, path: Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise BundleError(f"{what} {path}: expected an ECDSA P-256 key, got {type(key).__name__}")
    if not isinstance(key.curve, ec.SECP256R1):
        raise BundleError(f"{what} {path}: expected curve P-256 (secp256r1), got {key.curve.name}")


def _load_private(path: Path, what: str):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{what} {path} cannot be read: {e.strerror or e}") from e
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{what} {path} is not an unencrypted PEM private key: {e}") from e
    _check_curve(key, path, what)
    return key


def public_pem(public_key: object) -> bytes:
    """SubjectPublicKeyInfo PEM of a cryptography public key (the canonical signer.pub.pem bytes)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def generate_key_file(path: Path) -> Path:
    """Write a new ECDSA P-256 PKCS#8 private key to ``path`` (mode 0600; fails if it exists)."""
    from securesystemslib.signer import CryptoSigner

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signer = CryptoSigner.generate_ecdsa()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
    return path


def _ensure_dev_key() -> Path:
    path = dev_key_path()
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # write to a temporary name then link into place: a concurrent first use sees either no
        # key or a whole key, never half of one
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            generate_key_file(tmp)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise BundleError(f"development signing key {path} cannot be created: {e.strerror or e}") from e
    return path


def load_signer(key: str | Path | None = None) -> SignerInfo:
    """The signer for a new bundle: ``key`` (a private PEM path), else ``$MI300X_CERT_SIGNING_KEY``,
    else this host's key (``mi300x-cert keys generate``), else the local development key (created on
    first use)."""
    from securesystemslib.signer import CryptoSigner, SSlibKey

    if key:
        path, source, dev, what = Path(key).expanduser(), "argument", False, "signing key"
    elif os.environ.get(SIGNING_KEY_ENV):
        path, source, dev, what = Path(os.environ[SIGNING_KEY_ENV]).expanduser(), "environment", False, f"signing key ({SIGNING_KEY_ENV})"
    elif host_key_path().exists():
        path, source, dev, what = host_key_path(), "host", False, "host signing key"
    else:
        path, source, dev, what = _ensure_dev_key(), "development", True, "development signing key"
    # a key file given explicitly that happens to be the development key is still the development key
    try:
        if not dev and dev_key_path().exists() and path.resolve() == dev_key_path().resolve():
            dev = True
    except OSError:
        pass
    private = _load_private(path, what)
    public = SSlibKey.from_crypto(private.public_key())
    signer = CryptoSigner(private, public)
    return SignerInfo(signer=signer, keyid=public.keyid, scheme=public.scheme,
                      public_pem=public_pem(private.public_key()), development_key=dev, source=source, path=path)


def public_key_from_pem(data: bytes, origin: str):
    """(SSlibKey, cryptography public key) from PEM bytes; ``origin`` names the file in errors.

    Accepts a public key PEM, or a private key PEM (its public half is used)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
    from securesystemslib.signer import SSlibKey

    try:
        pub = load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            pub = load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise BundleError(f"{origin} is not a PEM public key: {e}") from e
    _check_curve(pub, Path(origin), "key")
    return SSlibKey.from_crypto(pub), pub


def load_public_key(path: str | Path):
    """SSlibKey of a public (or private) PEM key file."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"verification key {path} cannot be read: {e.strerror or e}") from e
    return public_key_from_pem(data, str(path))[0]


def trusted_keyids() -> set[str]:
    """Keyids a verifier trusts without being given a key: ``$MI300X_CERT_VERIFY_KEY`` and the public
    half of ``$MI300X_CERT_SIGNING_KEY``. The development key is never trusted implicitly."""
    ids: set[str] = set()
    if os.environ.get(VERIFY_KEY_ENV):
        ids.add(load_public_key(os.environ[VERIFY_KEY_ENV]).keyid)
    if os.environ.get(SIGNING_KEY_ENV):
        ids.add(load_signer(os.environ[SIGNING_KEY_ENV]).keyid)
    return ids
