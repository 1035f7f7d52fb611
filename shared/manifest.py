"""Model manifests and their ed25519 signatures.

The cloud signs a canonical byte string made of the fields that decide what the edge will run
(name, version, features, output, artifact sha256, rollback flag); the edge verifies it against a
pinned public key before it loads anything. Keys are stored PEM-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.records import RecordError

__all__ = [
    "ManifestError",
    "ModelManifest",
    "SignatureError",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "sha256_hex",
    "sign_manifest",
    "verify_manifest",
]


class ManifestError(RecordError):
    """A manifest is malformed."""


class SignatureError(Exception):
    """A manifest's signature is missing or does not verify against the pinned key."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ModelManifest:
    name: str
    version: int
    features: tuple[str, ...]
    output: str
    sha256: str
    created: int  # ns since the epoch
    metrics: dict[str, float] = field(default_factory=dict)
    parent: int | None = None
    signature: str = ""  # base64 ed25519 over signing_payload()
    artifact_url: str = ""
    rollback: bool = False
    kind: str = "classifier"  # classifier | regressor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ManifestError(
                f"ModelManifest.name: expected a non-empty string, got {self.name!r}"
            )
        if type(self.version) is not int or self.version < 1:
            raise ManifestError(
                f"ModelManifest.version: expected an integer >= 1, got {self.version!r}"
            )
        feats = tuple(self.features)
        if not feats or not all(isinstance(f, str) and f for f in feats):
            raise ManifestError(
                f"ModelManifest.features: expected a non-empty list of names, got {self.features!r}"
            )
        if len(set(feats)) != len(feats):
            raise ManifestError(f"ModelManifest.features: duplicate names in {list(feats)}")
        object.__setattr__(self, "features", feats)
        if (
            not isinstance(self.sha256, str)
            or len(self.sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ManifestError(
                f"ModelManifest.sha256: expected 64 lowercase hex digits, got {self.sha256!r}"
            )
        if self.kind not in ("classifier", "regressor"):
            raise ManifestError(
                f"ModelManifest.kind: expected 'classifier' or 'regressor', got {self.kind!r}"
            )

    def signing_payload(self) -> bytes:
        """The canonical bytes a signature covers."""
        doc = {
            "name": self.name,
            "version": self.version,
            "features": list(self.features),
            "output": self.output,
            "sha256": self.sha256,
            "rollback": self.rollback,
            "kind": self.kind,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["features"] = list(self.features)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> ModelManifest:
        try:
            doc = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except ValueError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(doc) - known
        if unknown:
            raise ManifestError(f"manifest has unknown fields: {sorted(unknown)}")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise ManifestError(f"manifest is incomplete: {exc}") from exc


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 key pair as (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the private key is not an ed25519 key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the public key is not an ed25519 key")
    return key


def sign_manifest(manifest: ModelManifest, private_key: Ed25519PrivateKey) -> ModelManifest:
    sig = private_key.sign(manifest.signing_payload())
    return replace(manifest, signature=base64.b64encode(sig).decode())


def verify_manifest(manifest: ModelManifest, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless the manifest carries a valid signature."""
    if not manifest.signature:
        raise SignatureError(f"model {manifest.name} v{manifest.version}: manifest is unsigned")
    try:
        sig = base64.b64decode(manifest.signature, validate=True)
        public_key.verify(sig, manifest.signing_payload())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"model {manifest.name} v{manifest.version}: signature does not verify against the "
            "pinned public key"
        ) from exc
