"""How a plan runs and writes, checked before any work: device, dtype, attention, offload, output
names, overwrite policy, what the PNGs carry (``--metadata``, ``--record-paths``) and optional C2PA
signing. Nothing here changes pixels. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from easyref_cli.errors import UsageError
from easyref_cli.files import METADATA_CHOICES
from easyref_cli.naming import DEFAULT_NAME_TEMPLATE, check_name_template
from easyref_cli.records import RECORD_PATHS_CHOICES
from easyref_cli.settings import ATTENTION_CHOICES, OFFLOAD_CHOICES, check_choice, check_device_name, check_dtype


@dataclass(frozen=True)
class Runtime:
    """The checked runtime options a plan carries (field names as :class:`~easyref_cli.plan.Plan`'s)."""

    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    offload: str = "none"
    name_template: str = DEFAULT_NAME_TEMPLATE
    overwrite: bool = False
    fail_fast: bool = False
    metadata: str = "full"
    record_paths: str = "relative"
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
    shard: tuple[int, int] | None = None  # (K, N): this run makes the K-th of N shares (1-based)


def check_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` → ``(K, N)`` with 1 ≤ K ≤ N; ``None`` kept."""
    if value is None:
        return None
    k, sep, n = str(value).strip().partition("/")
    try:
        shard = (int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None or shard[1] < 1:
        raise UsageError(f"--shard must be K/N (e.g. 2/8 for the second of eight shares), got {value!r}")
    if not 1 <= shard[0] <= shard[1]:
        raise UsageError(f"--shard {value}: K must be between 1 and N={shard[1]}")
    return shard


def _check_c2pa(cert: Path | None, key: Path | None) -> tuple[Path | None, Path | None]:
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise UsageError("C2PA signing needs both --c2pa-cert and --c2pa-key")
    from easyref_cli import credentials

    for flag, path in (("--c2pa-cert", cert), ("--c2pa-key", key)):
        if not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    credentials.load_signer(Path(cert), Path(key))  # the extra is installed and the PEM files are usable
    return Path(cert), Path(key)


def check_runtime(
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    offload: str | None = None,
    name_template: str | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    metadata: str | None = None,
    record_paths: str | None = None,
    c2pa_cert: Path | None = None,
    c2pa_key: Path | None = None,
    shard: str | None = None,
) -> Runtime:
    """Every runtime option checked and normalised; ``None`` means the default.

    Raises:
        UsageError: naming the flag of the first bad value.
    """
    offload = check_choice("--offload", offload, OFFLOAD_CHOICES) or "none"
    check_device_name(device)
    attention = check_choice("--attention", attention, ATTENTION_CHOICES) or "auto"
    dtype = check_dtype(dtype)
    template = DEFAULT_NAME_TEMPLATE if name_template is None else name_template
    check_name_template(template)
    metadata = check_choice("--metadata", metadata, METADATA_CHOICES) or "full"
    record_paths = check_choice("--record-paths", record_paths, RECORD_PATHS_CHOICES) or "relative"
    cert, key = _check_c2pa(c2pa_cert, c2pa_key)
    return Runtime(
        device, dtype, attention, offload, template, overwrite, fail_fast, metadata, record_paths, cert, key,
        check_shard(shard),
    )  # fmt: skip
