from dataclasses import replace

import pytest

from shared.manifest import (
    ManifestError,
    ModelManifest,
    SignatureError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sha256_hex,
    sign_manifest,
    verify_manifest,
)


def _manifest(**kw):
    base = dict(
        name="defect",
        version=3,
        features=("temp_mean", "vib_max"),
        output="probability",
        sha256=sha256_hex(b"model"),
        created=1,
    )
    base.update(kw)
    return ModelManifest(**base)


def test_signed_manifest_verifies_and_tampering_is_refused():
    priv, pub = generate_keypair()
    signed = sign_manifest(_manifest(), load_private_key(priv))
    verify_manifest(signed, load_public_key(pub))
    with pytest.raises(SignatureError):
        verify_manifest(replace(signed, sha256=sha256_hex(b"other")), load_public_key(pub))
    with pytest.raises(SignatureError):
        verify_manifest(replace(signed, version=4), load_public_key(pub))
    _, other_pub = generate_keypair()
    with pytest.raises(SignatureError):
        verify_manifest(signed, load_public_key(other_pub))
    with pytest.raises(SignatureError, match="unsigned"):
        verify_manifest(_manifest(), load_public_key(pub))


def test_manifest_json_round_trip_and_validation():
    m = _manifest(metrics={"accuracy": 0.9}, parent=2)
    assert ModelManifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match="sha256"):
        _manifest(sha256="xyz")
    with pytest.raises(ManifestError, match="duplicate"):
        _manifest(features=("a", "a"))
    with pytest.raises(ManifestError, match="unknown fields"):
        ModelManifest.from_json(b'{"name": "x", "evil": 1}')
    with pytest.raises(ManifestError, match="not valid JSON"):
        ModelManifest.from_json(b"{")
