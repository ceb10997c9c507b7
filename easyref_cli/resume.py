"""Resume: an existing output is skipped only if it is this job's image; anything else under the
same name is a usage error, never silently kept or clobbered. Torch-free (but for the official
seed mode, whose noise device it checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from easyref_cli import files
from easyref_cli.errors import InputError, UsageError
from easyref_cli.jobs import Job
from easyref_cli.plan import Plan


class Existing:
    """What is already at each job's output: this job's image, or something else (lazily reads the
    manifest for images whose PNG carries no record: ``--metadata minimal/none``, or not ours)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._manifest: dict[str, dict] | None = None

    def record(self, path: Path, *, fresh: bool = False) -> dict:
        """The record of the image at ``path``: its PNG's, else its manifest line's (``fresh``: the
        manifest is read again when the image is not in the copy read before — another run may have
        written it since)."""
        try:
            return files.read_png_record(path)
        except InputError:
            if self._manifest is None or (fresh and str(path) not in self._manifest):
                self._manifest = _manifest_records(self.plan.out_dir)
            return self._manifest.get(str(path), {})

    def is_ours(self, job: Job, record: dict) -> bool:
        """``record`` describes ``job``'s image: the same id, or an image of easyref-cli 0.2 and earlier
        (ids from model paths) whose references still have the recorded content; its noise device too."""
        if record.get("job_id") != job.job_id and not _legacy_match(job, record, self.plan.model_identity):
            return False
        return _same_noise_device(job, record, self.plan.device)


def _legacy_match(job: Job, record: dict, identity: Mapping[str, Any]) -> bool:
    if "model_identity" in record or not job.legacy_id or record.get("job_id") != job.legacy_id:
        return False
    adapter = str(identity.get("adapter", ""))
    if adapter.startswith("sha256:") and record.get("adapter_sha256") not in (None, adapter.removeprefix("sha256:")):
        return False  # retrained at the same path
    refs = record.get("references")
    recorded = [r.get("sha256") for r in refs if isinstance(r, dict)] if isinstance(refs, list) else None
    return recorded == list(job.reference_sha256)


def check_existing_outputs(plan: Plan) -> None:
    """Resume skips an output only if it is *this* job's image: a file made with other settings or
    other references (or not by easyref) under the same name is a usage error, never silently kept or
    clobbered. ``--dry-run`` runs the same check, so it never promises a skip the run would refuse."""
    if plan.overwrite:
        return
    clashes, old_empty_negative = [], False
    existing = Existing(plan)
    for job in plan.jobs:
        path = plan.output_path(job)
        if not path.exists():
            continue
        record = existing.record(path)
        if not existing.is_ours(job, record):
            clashes.append(str(path))
            old_empty_negative |= record.get("negative_prompt") == "" and "zero_negative" not in record
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" … and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        hint = (
            " (Images made before easyref-cli 0.2 with an empty negative prompt had it zeroed: "
            '--negative-prompt "" --zero-negative empty resumes them.)'
            if old_empty_negative
            else ""
        )
        raise UsageError(
            f"{len(clashes)} output file(s) already exist but were made with other settings or other reference "
            f"images (or not by easyref): {shown}. Use another -o folder or --name-template, or --overwrite to "
            f"replace them.{hint}"
        )


def _manifest_records(out_dir: Path) -> dict[str, dict]:
    """The full record of each finished output in ``out_dir``'s manifest, by path (latest line wins)."""
    records = {}
    # the manifest, then the shards of runs still going (or not yet folded in), whose lines are newer
    for path in [out_dir / files.MANIFEST_NAME, *sorted(out_dir.glob(files.SHARD_GLOB))]:
        try:
            entries = files.read_manifest(path)
        except UsageError:
            continue
        for entry in entries:
            if entry.get("status") == "ok" and isinstance(entry.get("record"), dict):
                records[str(entry.get("path"))] = entry["record"]
    return records


def _same_noise_device(job: Job, record: dict, device: str | None) -> bool:
    """``seed_mode: official`` noise is drawn on the run's device: a CPU and a CUDA stream differ."""
    if job.settings.seed_mode != "official" or "device" not in record:
        return True
    from easyref_cli.env import default_device

    return record["device"] == (device or default_device()).split(":")[0]
