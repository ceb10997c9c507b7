"""The ``easyref`` command line. Thin: parse, call the library, map typed errors to exit codes.

Heavy imports (torch, diffusers, transformers) happen inside command bodies so ``easyref --help``
and ``--dry-run`` stay instant.

Exit codes: 0 ok, 1 some jobs failed, 2 usage/config/model error before work, 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from easyref_cli import __version__
from easyref_cli.clitools import handle_errors, setup_logging
from easyref_cli.options import (
    AdapterOpt,
    BaseModelOpt,
    BidirectionalOpt,
    DeviceOpt,
    DtypeOpt,
    ExifOpt,
    InstructionOpt,
    MllmOpt,
    OutFileOpt,
    QuietOpt,
    VerboseOpt,
    with_setting_options,
)

app = typer.Typer(
    name="easyref",
    help="Multi-reference image generation with EasyRef (SDXL + Qwen2-VL reference tokens).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"easyref-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Multi-reference image generation with EasyRef (SDXL + Qwen2-VL reference tokens).

    Set EASYREF_DEBUG=1 for full tracebacks, EASYREF_HOME for where tiny models and caches live.
    """


@app.command()
@handle_errors
def encode(
    group_dir: Annotated[Path, typer.Argument(help="Folder of reference images (one group).")],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="Caption given to the MLLM after the instruction.")
    ] = "",
    mllm: MllmOpt = None,
    adapter: AdapterOpt = None,
    out: OutFileOpt = Path("conditions.safetensors"),
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    instruction: InstructionOpt = None,
    bidirectional_final: BidirectionalOpt = False,
    exif_orientation: ExifOpt = "apply",
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Encode one reference group into EasyRef condition tokens.

    Writes tensors `cond` and `uncond` of shape (64, cross_attention_dim) to a safetensors file, with model ids, hashes, instruction and caption in its metadata.
    """
    setup_logging(verbose, quiet)
    from easyref_cli.commands.encode import encode_group

    result = encode_group(
        group_dir,
        caption=prompt,
        mllm=mllm,
        adapter=adapter,
        out=out,
        dtype=dtype,
        device=device,
        instruction=instruction,
        bidirectional_final=bidirectional_final,
        exif_orientation=exif_orientation,
    )
    typer.echo(f"wrote {result.path}: cond {tuple(result.cond_shape)}, uncond {tuple(result.uncond_shape)}", err=True)


@app.command(no_args_is_help=True)
@handle_errors
@with_setting_options
def generate(
    groups: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Group folders: a folder of images is one group; a folder of folders is many.", show_default=False
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="Prompt file, or - for standard input: YAML (defaults: + prompts:), .txt (one prompt per line, "
            "# comments) or .jsonl (one JSON object per line, the keys of a YAML prompts: item, or a JSON string). "
            "The format goes by extension (.yaml/.yml, .txt, .jsonl/.ndjson); for - or another extension, by "
            "content: JSONL if every line (blank and # lines aside) starts with {, YAML if it is a mapping with "
            "prompts:, else one prompt per line.",
            allow_dash=True,
            rich_help_panel="Input",
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="One prompt (instead of --prompts).", rich_help_panel="Input")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (required).", rich_help_panel="Input", show_default=False)
    ] = ...,
    from_image: Annotated[
        Path | None,
        typer.Option("--from-image", help="Regenerate the image an easyref PNG records.", rich_help_panel="Input"),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Built-in preset name (see `easyref presets list`) or a YAML file.",
            rich_help_panel="Settings",
        ),
    ] = None,
    settings: dict | None = None,  # one option per setting of the schema (easyref_cli/settings.py)
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="'demo': the tiny EasyRef shipped with the package, trained on synthetic coloured shapes (64×64; offline). 'tiny': random tiny models built locally, for a smoke run (noise pictures).",
            rich_help_panel="Models",
        ),
    ] = None,
    base_model: BaseModelOpt = None,
    mllm: MllmOpt = None,
    adapter: AdapterOpt = None,
    base_config: Annotated[
        str | None,
        typer.Option(
            "--base-config",
            help="With a single-file --base-model (an A1111/ComfyUI .safetensors): the SDXL diffusers folder or hub id its component configs come from (default: the SDXL base repo, from the Hugging Face cache).",
            rich_help_panel="Models",
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            "--vae",
            help="A VAE replacing the base model's: diffusers folder, hub id or single .safetensors file (e.g. an fp16-safe SDXL VAE, which is decoded without the fp32 upcast).",
            rich_help_panel="Models",
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="A community SDXL LoRA (kohya or diffusers format) as FILE_OR_ID[:WEIGHT], fused after EasyRef's own LoRA; repeat for several. Also 'loras:' in presets and prompt-file defaults.",
            rich_help_panel="Models",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention",
            help="auto (xformers if a real probe call works, else PyTorch SDPA), sdpa or xformers.",
            rich_help_panel="Runtime",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Condition cache folder (share it between runs and machines). Default: $EASYREF_HOME/conditions.",
            rich_help_panel="Runtime",
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the condition cache.", rich_help_panel="Runtime")
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the UNet (CUDA only; falls back to eager elsewhere).",
            rich_help_panel="Runtime",
        ),
    ] = False,
    offload: Annotated[
        str | None,
        typer.Option(
            "--offload",
            help="none, model (accelerate model CPU offload) or sequential, for small GPUs. Default: none.",
            rich_help_panel="Runtime",
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            min=1,
            help="Run N processes on this node through `accelerate launch` (one per GPU); groups are sharded across them.",
            rich_help_panel="Runtime",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="K/N: make only the K-th of N shares of the plan (whole groups, the same share whenever it runs), for job arrays and plain parallel processes over a shared OUT; each share writes its own manifest shard, folded into manifest.jsonl when it ends (or by --merge-manifest).",
            rich_help_panel="Runtime",
        ),
    ] = None,
    merge_manifest: Annotated[
        bool,
        typer.Option(
            "--merge-manifest",
            help="Fold finished manifest shards into OUT/manifest.jsonl and report how many of the plan's images exist (exit 1 if some are missing); generates nothing.",
            rich_help_panel="Runtime",
        ),
    ] = False,
    name_template: Annotated[
        str | None,
        typer.Option(
            "--name-template",
            help="Output names from {group} {prompt_id} {seed} {index} {preset} {input} (the control/init image's "
            "name when a folder gave it). Default: {group}/{prompt_id}_{seed}.png, with _{input} before _{seed} "
            "for jobs from a folder of control/init images.",
            rich_help_panel="Output",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Regenerate images that already exist (default: skip them, i.e. resume).",
            rich_help_panel="Output",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (jobs, outputs, which exist) and stop. Loads no model.",
            rich_help_panel="Output",
        ),
    ] = False,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first failed job.", rich_help_panel="Output")
    ] = False,
    metadata: Annotated[
        str | None,
        typer.Option(
            "--metadata",
            help="What each PNG carries: full (the easyref record + A1111 parameters), minimal (the settings only, no model or file names) or none. Every PNG also carries the XMP 'AI-generated' label (IPTC trainedAlgorithmicMedia); the manifest keeps the full record. Default: full.",
            rich_help_panel="Output",
        ),
    ] = None,
    record_paths: Annotated[
        str | None,
        typer.Option(
            "--record-paths",
            help="relative: references as group/file and local models by name in PNG records (safe to share); absolute: full paths. Default: relative.",
            rich_help_panel="Output",
        ),
    ] = None,
    groups_root: Annotated[
        Path | None,
        typer.Option(
            "--groups-root",
            help="With --from-image: the folder holding the group folders its record names relatively. Default: the current folder.",
            rich_help_panel="Input",
        ),
    ] = None,
    c2pa_cert: Annotated[
        Path | None,
        typer.Option(
            "--c2pa-cert",
            help="Sign C2PA content credentials into every PNG with this certificate chain (PEM; needs the c2pa extra).",
            rich_help_panel="Output",
        ),
    ] = None,
    c2pa_key: Annotated[
        Path | None,
        typer.Option("--c2pa-key", help="The private key (PEM) of --c2pa-cert.", rich_help_panel="Output"),
    ] = None,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json", help="Print manifest lines (JSON) to stdout; logs stay on stderr.", rich_help_panel="Output"
        ),
    ] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Generate images for reference GROUPS × prompts × seeds into OUT.

    Settings precedence, lowest to highest: built-in defaults < --preset < the prompt file's `defaults:` < command-line flags < fields of an individual prompt.

    Outputs go to OUT/{group}/{prompt_id}_{seed}.png with full provenance in PNG text chunks; OUT/manifest.jsonl gets one line per job. Rerunning the same command skips finished images (resume).

    Exit codes: 0 ok, 1 some jobs failed, 2 usage/config/model error, 130 interrupted.
    """
    setup_logging(verbose, quiet)
    from easyref_cli.commands.generate import generate as run_generate

    if lora:
        settings = {**(settings or {}), "loras": lora}
    code = run_generate(
        settings=settings, dry_run=dry_run, json_lines=json_lines, progress=not quiet, cache_dir=cache_dir,
        no_cache=no_cache, compile=compile, num_processes=num_processes, groups=groups or [], out_dir=out,
        prompts_file=prompts, prompt=prompt, from_image=from_image, preset=preset, model=model,
        base_model=base_model, mllm=mllm, adapter=adapter, vae=vae, base_config=base_config, device=device,
        dtype=dtype, attention=attention,
        offload=offload, name_template=name_template, overwrite=overwrite, fail_fast=fail_fast, metadata=metadata,
        record_paths=record_paths, groups_root=groups_root, c2pa_cert=c2pa_cert, c2pa_key=c2pa_key, shard=shard,
        merge_manifest=merge_manifest,
    )  # fmt: skip
    raise typer.Exit(code=code)


@app.command()
@handle_errors
def inspect(
    image: Annotated[Path, typer.Argument(help="A PNG written by easyref.")],
    parameters: Annotated[
        bool, typer.Option("--parameters", help="Print the A1111 'parameters' text instead of the JSON record.")
    ] = False,
) -> None:
    """Print the provenance record stored in an easyref PNG; stderr says what the image carries
    (record, A1111 text, the XMP AI label, C2PA credentials and whether they verify)."""
    from easyref_cli.commands.inspect import inspect_image

    text, lines = inspect_image(image, parameters=parameters)
    for line in lines:
        typer.echo(line, err=True)
    typer.echo(text)


presets_app = typer.Typer(help="List and show presets (built-in and user YAML files).", no_args_is_help=True)
app.add_typer(presets_app, name="presets")


@presets_app.command("list")
@handle_errors
def presets_list() -> None:
    """List built-in presets."""
    from easyref_cli.presets import list_presets

    for info in list_presets():
        typer.echo(f"{info.name:<12} {info.description}")


@presets_app.command("show")
@handle_errors
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or YAML path.")]) -> None:
    """Print a preset's YAML (with its comments)."""
    from easyref_cli.presets import find_preset, load_preset

    load_preset(name)  # validates
    typer.echo(find_preset(name).read_text(encoding="utf-8").rstrip())


@app.command()
@handle_errors
def doctor(
    device: DeviceOpt = None,
    base_model: BaseModelOpt = None,
    base_config: Annotated[
        str | None, typer.Option("--base-config", help="As for generate: show what it resolves to.")
    ] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="As for generate: show what it resolves to.")] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="As for generate (repeatable): show what each resolves to.")
    ] = None,
    controlnet: Annotated[
        list[str] | None,
        typer.Option("--controlnet", help="As for generate (repeatable): what each resolves to, and if it fits."),
    ] = None,
) -> None:
    """Versions, devices, dtype support, the attention-backend probe, which default models resolve locally,
    what --base-model/--base-config/--vae/--lora/--controlnet resolve to, and whether output folders here can
    be shared (file locks)."""
    from easyref_cli.commands.doctor import report

    models = {"base_model": base_model, "base_config": base_config, "vae": vae, "loras": lora or [],
              "controlnets": controlnet or []}  # fmt: skip
    typer.echo(report(device=device, models=models))


from easyref_cli.eval.command import eval_command, report_command  # noqa: E402 - torch-free at import
from easyref_cli.train.command import train_command  # noqa: E402 - torch-free at import

app.command("train")(handle_errors(train_command))

app.command("eval")(handle_errors(eval_command))
app.command("report")(handle_errors(report_command))


def main() -> None:
    app()
