"""C2PA content credentials (easyref_cli.credentials): signing, reading back, tamper detection, errors."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from easyref_cli import credentials
from easyref_cli.errors import InputError, JobError, UsageError

REFS = [
    {"name": "cats/ref_00.png", "sha256": hashlib.sha256(b"ref 0").hexdigest()},
    {"name": "cats/ref_01.jpg", "sha256": hashlib.sha256(b"ref 1").hexdigest()},
]
GENERATOR = "easyref-cli 0.1.0"


def _png(text: str = "a cat, seed 7") -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    info.add_itxt("easyref", '{"seed": 7}')
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 90)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _chunks(png: bytes) -> list[tuple[bytes, int, int]]:
    """(type, data offset, data length) of every PNG chunk."""
    out, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        out.append((png[pos + 4 : pos + 8], pos + 8, length))
        pos += 12 + length
    return out


def test_missing_extra_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "c2pa", None)
    assert credentials.available() is False
    with pytest.raises(UsageError, match=r"easyref-cli\[c2pa\]"):
        credentials.load_signer(tmp_path / "chain.pem", tmp_path / "signer.key")
    with pytest.raises(UsageError, match="c2pa extra"):
        credentials.read_credentials(_png())


def test_manifest_definition_without_the_extra():
    manifest = credentials.build_manifest(title="out.png", generator=GENERATOR, ingredients=REFS)
    assert manifest["claim_generator_info"] == [{"name": "easyref-cli", "version": "0.1.0"}]
    (created,) = manifest["assertions"][0]["data"]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == credentials.TRAINED_ALGORITHMIC_MEDIA
    assert created["parameters"]["ingredientIds"] == ["reference_0", "reference_1"]
    assert [i["format"] for i in manifest["ingredients"]] == ["image/png", "image/jpeg"]
    assert manifest["assertions"][1] == {"label": credentials.REFERENCES_LABEL, "data": {"references": REFS}}
    # The generation record's {"path", "sha256"} form is accepted too.
    as_record = [{"path": r["name"], "sha256": r["sha256"]} for r in REFS]
    assert credentials.build_manifest(title="t", generator="g", ingredients=as_record)["assertions"][1]["data"] == {
        "references": REFS
    }
    with pytest.raises(ValueError, match="sha256"):
        credentials.build_manifest(title="t", generator="g", ingredients=[{"name": "a.png", "sha256": "nothex"}])


c2pa_tests = pytest.mark.usefixtures("c2pa_module")


@pytest.fixture(scope="module")
def c2pa_module():
    return pytest.importorskip("c2pa", reason="the c2pa extra (c2pa-python) is not installed")


@pytest.fixture(scope="module")
def certs(c2pa_module, tmp_path_factory) -> tuple[Path, Path]:
    from tests.c2pa_certs import make_test_certificate

    return make_test_certificate(tmp_path_factory.mktemp("c2pa_certs"))


@pytest.fixture(scope="module")
def signer(certs):
    return credentials.load_signer(*certs)


@pytest.fixture(scope="module")
def signed(signer) -> bytes:
    return credentials.sign_png(_png(), signer, title="cats_p0_s7.png", generator=GENERATOR, ingredients=REFS)


@c2pa_tests
def test_available():
    assert credentials.available() is True


@c2pa_tests
def test_round_trip(signer, signed, tmp_path):
    assert signer.alg == "es256" and "easyref-cli test signer" in signer.subject
    original = _png()
    assert signed.startswith(credentials.PNG_SIGNATURE) and len(signed) > len(original)
    # Existing metadata chunks survive; the manifest goes in a caBX chunk.
    with Image.open(io.BytesIO(signed)) as im:
        assert im.text == {"parameters": "a cat, seed 7", "easyref": '{"seed": 7}'}
        assert im.tobytes() == Image.open(io.BytesIO(original)).tobytes()
    assert b"caBX" in [kind for kind, _, _ in _chunks(signed)]

    path = tmp_path / "cats_p0_s7.png"
    path.write_bytes(signed)
    for source in (signed, path, str(path)):
        info = credentials.read_credentials(source)
        assert info["generator"] == GENERATOR
        assert info["title"] == "cats_p0_s7.png"
        (action,) = info["actions"]
        assert action["action"] == "c2pa.created"
        assert action["digitalSourceType"] == credentials.TRAINED_ALGORITHMIC_MEDIA
        assert action["softwareAgent"] == {"name": "easyref-cli", "version": "0.1.0"}
        assert info["references"] == REFS
        assert info["signer"]["common_name"] == "easyref-cli test signer"
        assert info["valid"] is True and info["issues"] == []
        # The test CA is on no trust list: intact but not trusted.
        assert info["trusted"] is False
        assert any(issue.startswith("signingCredential.untrusted") for issue in info["trust_issues"])


@c2pa_tests
def test_trust_anchor_makes_it_trusted(signed, certs):
    info = credentials.read_credentials(signed, trust_anchors=certs[0].parent / "ca.pem")
    assert info["valid"] is True and info["trusted"] is True
    assert info["state"] == "Trusted" and info["trust_issues"] == []


@c2pa_tests
def test_no_references(signer):
    png = credentials.sign_png(_png(), signer, title="t.png", generator="easyref-cli", ingredients=[])
    info = credentials.read_credentials(png)
    assert info["valid"] is True and info["references"] == [] and info["generator"] == "easyref-cli"


@c2pa_tests
def test_flipped_pixel_byte_is_invalid(signed):
    kind, offset, length = next(c for c in _chunks(signed) if c[0] == b"IDAT")
    tampered = bytearray(signed)
    tampered[offset + length // 2] ^= 0x01
    info = credentials.read_credentials(bytes(tampered))
    assert info["valid"] is False and info["trusted"] is False
    assert any(issue.startswith("assertion.dataHash.mismatch") for issue in info["issues"])


@c2pa_tests
def test_rewritten_text_chunk_is_invalid(signed):
    tampered = signed.replace(b"a cat, seed 7", b"a dog, seed 7")
    assert tampered != signed
    info = credentials.read_credentials(tampered)
    assert info["valid"] is False and info["issues"]


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        (b"cats/ref_00.png", b"cats/ref_99.png", "assertion.hashedURI.mismatch"),  # an assertion's data
        (b"cats_p0_s7.png", b"cats_p0_s8.png", "claimSignature.mismatch"),  # the signed claim
        (b"easyref-cli test signer", b"easyref-cli test signeR", "claimSignature.mismatch"),  # the certificate
        (b"jumb", b"xumb", "manifest unreadable"),  # the manifest store's structure
    ],
)
@c2pa_tests
def test_damaged_manifest_is_invalid_not_a_crash(signed, old, new, code):
    kind, offset, length = next(c for c in _chunks(signed) if c[0] == b"caBX")
    where = signed.index(old, offset, offset + length)
    tampered = signed[:where] + new + signed[where + len(old) :]
    info = credentials.read_credentials(tampered)
    assert info["valid"] is False and info["trusted"] is False
    assert any(issue.startswith(code) for issue in info["issues"]), info["issues"]


@c2pa_tests
def test_png_without_manifest_is_none(tmp_path):
    assert credentials.read_credentials(_png()) is None
    path = tmp_path / "plain.png"
    path.write_bytes(_png())
    assert credentials.read_credentials(path) is None


@c2pa_tests
def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        credentials.read_credentials(tmp_path / "missing.png")
    with pytest.raises(InputError):
        credentials.read_credentials(b"this is not an image at all")


@c2pa_tests
def test_sign_errors(signer):
    with pytest.raises(JobError, match="not a PNG"):
        credentials.sign_png(b"GIF89a....", signer, title="x.png", generator=GENERATOR, ingredients=[])
    with pytest.raises(TypeError):
        credentials.sign_png(_png(), object(), title="x.png", generator=GENERATOR, ingredients=[])


@c2pa_tests
def test_bad_certificate_or_key_files(certs, tmp_path):
    chain, key = certs
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases = [
        (tmp_path / "nope.pem", key, "nope.pem"),
        (chain, tmp_path / "nope.key", "nope.key"),
        (garbage, key, "garbage.pem"),
        (chain, garbage, "garbage.pem"),
        (empty, key, "empty.pem"),
        (key, key, "signer.key"),  # a key where the chain should be
        (chain, chain, "chain.pem"),  # a certificate where the key should be
    ]
    for cert_path, key_path, named in cases:
        with pytest.raises(UsageError, match=named):
            credentials.load_signer(cert_path, key_path)


@c2pa_tests
def test_key_must_match_and_not_be_encrypted(certs, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    chain, key = certs
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(UsageError, match="does not belong"):
        credentials.load_signer(chain, other)

    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(UsageError, match="encrypted"):
        credentials.load_signer(chain, encrypted)

    # A traditional ("EC PRIVATE KEY") PEM is converted to PKCS#8 for the SDK.
    sec1 = tmp_path / "sec1.key"
    sec1.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    assert credentials.load_signer(chain, sec1).alg == "es256"


@c2pa_tests
def test_self_signed_certificate_is_refused(tmp_path):
    from tests.c2pa_certs import make_self_signed_certificate

    cert_path, key_path = make_self_signed_certificate(tmp_path)
    with pytest.raises(UsageError, match="self_signed.pem"):
        credentials.load_signer(cert_path, key_path)
