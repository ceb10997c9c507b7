"""Optional C2PA content credentials for the PNGs easyref writes (the ``c2pa`` extra).

Torch-free, and ``c2pa`` (``c2pa-python``) is imported lazily inside the functions, so this module
imports without the extra; :func:`available` says whether it is installed.

Flow: :func:`load_signer` once per run (reads and checks the certificate chain and key, then does
one trial signature so a certificate the SDK refuses is a clear :class:`UsageError` before any
work), :func:`sign_png` for every PNG (the bytes of a finished PNG in, the same PNG with an
embedded manifest out), :func:`read_credentials` to inspect a file.

The manifest written by :func:`sign_png` (C2PA v2 claim):

* ``claim_generator_info``: ``[{"name": "easyref-cli", "version": "0.1.0"}]`` (from ``generator``);
* ``title``;
* ``c2pa.actions.v2``: one ``c2pa.created`` action with ``digitalSourceType``
  :data:`TRAINED_ALGORITHMIC_MEDIA`, ``softwareAgent`` (the generator) and, in its parameters,
  hashed links to the reference ingredients;
* one ``c2pa.ingredient.v3`` per reference image, relationship ``inputTo``, ``title`` = the
  reference name, ``format`` guessed from its extension (no file data, thumbnail or hash: the
  ingredient is declared, not embedded);
* ``org.easyref.references`` (custom JSON assertion, :data:`REFERENCES_LABEL`):
  ``{"references": [{"name": ..., "sha256": ...}, ...]}`` in encoding order; this is where the
  exact SHA-256 of each reference lives, since C2PA ingredients have no field for a plain file
  digest.

No thumbnail is embedded (the SDK default would add a JPEG copy of the image, over 1 MB for a
noisy 1024x1024 render), and no timestamp authority is used, so signing is fully offline; the
signing time is therefore not attested. Reading never fetches anything either (no OCSP, no
remote manifests).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import mimetypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref_cli.errors import InputError, JobError, UsageError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
REFERENCES_LABEL = "org.easyref.references"
INSTALL_HINT = "install the c2pa extra: pip install 'easyref-cli[c2pa]'"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Settings for the SDK (c2pa-rs); unknown keys are ignored by the SDK, these are checked by tests.
_SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}
_READ_SETTINGS = {"verify": {"ocsp_fetch": False, "remote_manifest_fetch": False}}

# Validation failure codes about *who* signed (trust list, certificate status, time stamps), as
# opposed to whether the content and the claim are intact.
_TRUST_PREFIXES = ("signingCredential.", "timeStamp.")
_TRUST_CODES = frozenset({"claimSignature.outsideValidity"})


def _import_c2pa():
    try:
        import c2pa
    except (ImportError, OSError) as e:  # OSError: the native library failed to load
        raise UsageError(f"C2PA content credentials need the c2pa-python package ({e}); {INSTALL_HINT}") from None
    return c2pa


def available() -> bool:
    """Whether ``c2pa-python`` can be imported (the ``c2pa`` extra is installed and loads)."""
    try:
        _import_c2pa()
    except UsageError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Signing
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CredentialSigner:
    """What :func:`load_signer` returns; pass it to :func:`sign_png`. Reusable for many images."""

    cert_path: Path
    key_path: Path
    alg: str  # C2PA algorithm name: es256, es384, es512, ps256, ed25519
    subject: str  # RFC 4514 subject of the signing (leaf) certificate
    not_after: dt.datetime
    _signer: Any = field(repr=False)
    _context: Any = field(repr=False)


def _read_file(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the C2PA {what} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise UsageError(f"the C2PA {what} {path} is empty")
    return data


def _algorithm(key: Any, key_path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
        if alg is None:
            raise UsageError(
                f"{key_path}: EC curve {key.curve.name} is not allowed by C2PA (use P-256, P-384 or P-521)"
            )
        return alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"  # C2PA allows RSA only with PSS padding
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise UsageError(
        f"{key_path}: {type(key).__name__} keys cannot sign C2PA manifests (use ECDSA P-256, RSA-PSS or Ed25519)"
    )


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def _load_pem(cert_path: Path, key_path: Path) -> tuple[list[Any], Any]:
    """The certificate chain and private key, checked to belong together and to be in date."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_data = _read_file(cert_path, "certificate chain")
    key_data = _read_file(key_path, "private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError as e:
        raise UsageError(f"{cert_path} is not a PEM certificate chain ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise UsageError(f"{key_path} is an encrypted private key; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise UsageError(f"{key_path} is not a PEM private key ({e})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise UsageError(
            f"the private key {key_path} does not belong to the first certificate in {cert_path} "
            "(the chain must start with the signing certificate)"
        )
    not_after = chain[0].not_valid_after_utc
    if not_after <= dt.datetime.now(dt.timezone.utc):
        raise UsageError(f"the signing certificate in {cert_path} expired on {not_after:%Y-%m-%d}")
    return chain, key


def load_signer(cert_path: Path, key_path: Path) -> CredentialSigner:
    """Load and check a signing certificate chain and its private key, once per run.

    ``cert_path``: PEM, the signing (end-entity) certificate first, then its intermediates/CA.
    ``key_path``: the leaf's unencrypted private key, PEM (PKCS#8 or traditional).

    C2PA wants an end-entity certificate issued by a CA (not self-signed) with the
    ``digitalSignature`` key usage and an extended key usage such as ``emailProtection`` or
    ``documentSigning``; a trial signature of a 1x1 PNG checks that the SDK accepts it.

    Raises:
        UsageError: the ``c2pa`` extra is missing, a file is unreadable, not PEM, encrypted, the key
            does not match the certificate, the certificate has expired or the SDK refuses it.
    """
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = Path(cert_path), Path(key_path)
    c2pa = _import_c2pa()
    chain, key = _load_pem(cert_path, key_path)
    alg = _algorithm(key, key_path)
    chain_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None))
        context = c2pa.Context.from_dict(_SIGN_SETTINGS)
    except c2pa.C2paError as e:
        raise UsageError(f"the C2PA SDK cannot use {cert_path} with {key_path}: {e}") from None
    loaded = CredentialSigner(
        cert_path=cert_path,
        key_path=key_path,
        alg=alg,
        subject=chain[0].subject.rfc4514_string(),
        not_after=chain[0].not_valid_after_utc,
        _signer=signer,
        _context=context,
    )
    try:
        sign_png(_tiny_png(), loaded, title="easyref-cli signer check", generator="easyref-cli", ingredients=[])
    except JobError as e:
        raise UsageError(
            f"the C2PA SDK refuses the certificate {cert_path} ({e.__cause__ or e}); C2PA needs an end-entity "
            "certificate issued by a CA (not self-signed), with the digitalSignature key usage and the "
            "emailProtection or documentSigning extended key usage"
        ) from None
    return loaded


def _generator_info(generator: str) -> dict[str, str]:
    name, _, version = generator.strip().rpartition(" ")
    if name and version[:1].isdigit():
        return {"name": name, "version": version}
    return {"name": generator.strip()}


def _references(ingredients: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    refs = []
    for i, ingredient in enumerate(ingredients):
        name = ingredient.get("name", ingredient.get("path"))
        sha = str(ingredient.get("sha256", "")).lower()
        if not isinstance(name, str) or not name or not _SHA256.fullmatch(sha):
            raise ValueError(f"ingredient {i} needs a 'name' (or 'path') and a hex 'sha256': {dict(ingredient)!r}")
        refs.append({"name": name, "sha256": sha})
    return refs


def build_manifest(*, title: str, generator: str, ingredients: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest definition :func:`sign_png` signs (JSON for ``c2pa.Builder``)."""
    agent = _generator_info(generator)
    refs = _references(ingredients)
    declared = []
    for i, ref in enumerate(refs):
        ingredient = {"title": ref["name"], "relationship": "inputTo", "label": f"reference_{i}"}
        mime, _ = mimetypes.guess_type(ref["name"])
        if mime:
            ingredient["format"] = mime
        declared.append(ingredient)
    created: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
    }
    if declared:
        created["parameters"] = {"ingredientIds": [ingredient["label"] for ingredient in declared]}
    return {
        "claim_generator_info": [agent],
        "title": title,
        "ingredients": declared,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [created]}},
            {"label": REFERENCES_LABEL, "data": {"references": refs}},
        ],
    }


def sign_png(png: bytes, signer: CredentialSigner, *, title: str, generator: str, ingredients: list[dict]) -> bytes:
    """Return ``png`` with a signed C2PA manifest embedded (a ``caBX`` chunk); other chunks
    (``tEXt``/``iTXt`` metadata included) are kept as they are.

    Sign last: the manifest hashes every byte outside its own chunk, so any later change to the
    file (even rewriting a text chunk) makes the credentials invalid.

    ``ingredients``: the reference images, ``{"name": str, "sha256": hex}`` (``"path"`` is accepted
    for ``"name"``, as in the generation record).

    Raises:
        JobError: signing this image failed (not a PNG, SDK error).
        ValueError: a malformed ingredient entry (a programming error).
    """
    if not isinstance(signer, CredentialSigner):
        raise TypeError(f"signer must come from load_signer(), not {type(signer).__name__}")
    c2pa = _import_c2pa()
    manifest = build_manifest(title=title, generator=generator, ingredients=ingredients)
    if not png.startswith(PNG_SIGNATURE):
        raise JobError(f"cannot add content credentials to {title}: the data is not a PNG")
    out = io.BytesIO()
    try:
        builder = c2pa.Builder(manifest, context=signer._context)
        builder.sign(signer._signer, "image/png", io.BytesIO(png), out)
    except c2pa.C2paError as e:
        raise JobError(f"cannot add content credentials to {title}: {e}") from e
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _status_text(entry: Mapping[str, Any]) -> str:
    code = str(entry.get("code", "unknown"))
    explanation = entry.get("explanation")
    return f"{code}: {explanation}" if explanation else code


def _is_trust_code(code: str) -> bool:
    return code.startswith(_TRUST_PREFIXES) or code in _TRUST_CODES


def _failures(store: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    results = store.get("validation_results")
    if not isinstance(results, Mapping):
        return [s for s in store.get("validation_status") or [] if isinstance(s, Mapping)]
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    for delta in results.get("ingredientDeltas") or []:
        failures.extend(((delta or {}).get("validationDeltas") or {}).get("failure") or [])
    return [f for f in failures if isinstance(f, Mapping)]


def _summary(store: Mapping[str, Any]) -> dict[str, Any]:
    manifest = (store.get("manifests") or {}).get(store.get("active_manifest")) or {}
    info = (manifest.get("claim_generator_info") or [{}])[0]
    generator = " ".join(str(info[k]) for k in ("name", "version") if info.get(k)) or manifest.get("claim_generator")
    actions: list[dict[str, Any]] = []
    references: list[dict[str, Any]] | None = None
    for assertion in manifest.get("assertions") or []:
        label = str(assertion.get("label", ""))
        data = assertion.get("data") or {}
        if label == "c2pa.actions" or label.startswith("c2pa.actions."):
            for action in data.get("actions") or []:
                keep = ("action", "digitalSourceType", "softwareAgent", "when", "description")
                actions.append({k: action[k] for k in keep if k in action})
        elif label == REFERENCES_LABEL:
            references = [dict(r) for r in data.get("references") or []]
    if references is None:  # signed by another tool: fall back to the declared ingredients
        references = [{"name": i.get("title"), "sha256": None} for i in manifest.get("ingredients") or []]
    signature = manifest.get("signature_info") or {}
    issues, trust_issues = [], []
    for failure in _failures(store):
        text = _status_text(failure)
        bucket = trust_issues if _is_trust_code(str(failure.get("code", ""))) else issues
        if text not in bucket:
            bucket.append(text)
    state = store.get("validation_state")
    valid = not issues
    return {
        "generator": generator,
        "title": manifest.get("title"),
        "actions": actions,
        "references": references,
        "signer": {k: signature[k] for k in ("common_name", "issuer", "alg", "time") if k in signature},
        "valid": valid,
        "trusted": valid and not trust_issues and state == "Trusted",
        "state": state,
        "issues": issues,
        "trust_issues": trust_issues,
    }


def read_credentials(path_or_bytes: Path | str | bytes, *, trust_anchors: Path | None = None) -> dict | None:
    """Content credentials of an image (PNG; other formats the SDK reads work too), or ``None`` when
    it carries no C2PA manifest. Nothing is fetched from the network.

    Returns ``{"generator", "title", "actions", "references", "signer", "valid", "trusted",
    "state", "issues", "trust_issues"}``:

    * ``valid``: the image and its manifest are intact (no failure other than trust-related ones);
      ``issues`` lists those integrity failures as ``"code: explanation"``;
    * ``trusted``: valid *and* the signer chains to a trust anchor (``trust_anchors``: a PEM file of
      CA certificates; the SDK has no trust list of its own, so without it a valid manifest is
      ``trusted: False`` with ``signingCredential.untrusted`` in ``trust_issues``);
    * ``state``: the SDK's ``validation_state`` (``Invalid``/``Valid``/``Trusted``, ``Unreadable``
      when the manifest is present but cannot be parsed: then ``valid`` is False).

    Raises:
        InputError: the file cannot be read, or is not an image the SDK recognises.
        UsageError: the ``c2pa`` extra is missing, or ``trust_anchors`` cannot be read.
    """
    c2pa = _import_c2pa()
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data, label = bytes(path_or_bytes), "the image"
    else:
        path = Path(path_or_bytes)
        label = str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    settings: dict[str, Any] = dict(_READ_SETTINGS)
    if trust_anchors is not None:
        anchors = _read_file(Path(trust_anchors), "trust anchors file").decode("ascii", errors="replace")
        settings["trust"] = {"trust_anchors": anchors}
    try:
        context = c2pa.Context.from_dict(settings)
        stream = io.BytesIO(data)
        if data.startswith(PNG_SIGNATURE):
            reader = c2pa.Reader.try_create("image/png", stream, context=context)
        else:
            reader = c2pa.Reader.try_create(None, stream, context=context)
        if reader is None:
            return None
        with reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as e:
        if b"caBX" not in data and b"jumb" not in data:
            raise InputError(f"cannot read {label}: {e}") from None
        return {
            "generator": None,
            "title": None,
            "actions": [],
            "references": [],
            "signer": {},
            "valid": False,
            "trusted": False,
            "state": "Unreadable",
            "issues": [f"manifest unreadable: {e}"],
            "trust_issues": [],
        }
    return _summary(store)
