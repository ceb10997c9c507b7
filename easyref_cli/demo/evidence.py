"""Does the demo model follow its references? ``python -m easyref_cli.demo.evidence OUT_DIR``.

For held-out synthetic groups (seeds the training never saw; every colour × shape pair once) it
runs the real ``easyref generate --model demo`` twice:

* **as given**: each group folder holds its own references;
* **references swapped**: the same folder names, prompts and seeds, but every folder holds the
  references of a group of *another* colour and *another* shape.

The prompts name a position and a size only ("a large shape in the centre"), so the colour and the
shape of a picture can only come from its references. Each picture is scored by the tested
classifiers of :mod:`~easyref_cli.demo.synthetic`: its dominant colour, the shape of the pixels in
that colour, and where (3×3 grid cell) and how large that shape is. The report gives the share of
pictures whose colour and shape are the references', whose position and size are the prompt's,
and in the swapped run the share that kept the folder's original colour or shape (which should fall
to about zero). Chance: 1/6 for colour, 1/4 for shape.

Options after the known ones go to ``easyref generate`` (``--guidance 7``); ``--weights WORK``
measures a build folder that is not installed yet. Writes ``OUT_DIR/evidence.json``,
``OUT_DIR/evidence.md`` (the README table) and ``OUT_DIR/contact-sheet.png`` (one row per group:
references | pictures, both runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from easyref_cli.demo.synthetic import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    Drawing,
    classify_placement,
    classify_shape,
    dominant_colour,
    make_group,
)

#: Held-out group seeds start here (training uses seeds below 10⁹).
HELD_OUT_SEED = 2_000_000_000
#: (prompt id, prompt): the centre and the four corners, large and small.
PROMPTS = (
    ("centre", "a large shape in the centre"),
    ("top-left", "a small shape at the top left"),
    ("bottom-right", "a large shape at the bottom right"),
    ("top-right", "a small shape at the top right"),
    ("bottom-left", "a large shape at the bottom left"),
)


def asked_placement(prompt: str) -> tuple[tuple[int, int], str]:
    """The grid cell and size a demo prompt asks for (``"a small shape at the top left"`` → ``((0, 0), "small")``)."""
    size, position = prompt.split(" shape ", 1)
    cells = {words: cell for cell, words in POSITIONS.items()}
    return cells[position], size.split()[-1]


@dataclass(frozen=True)
class Group:
    name: str
    colour: str
    shape: str
    references: tuple[Drawing, ...]


def held_out_groups(count: int | None = None, references: int = 4, seed: int = HELD_OUT_SEED) -> list[Group]:
    """One group per colour × shape pair (``count`` of them): group ``i`` has colour ``i mod 6`` and shape
    ``(i + i // 6) mod 4``, so every colour comes before any repeats and the first six cover every shape."""
    colours = list(COLOURS)
    pairs = [
        (colours[i % len(colours)], SHAPES[(i + i // len(colours)) % len(SHAPES)])
        for i in range(len(colours) * len(SHAPES))
    ]
    if count is not None:
        pairs = pairs[:count]
    groups = []
    for i, (colour, shape) in enumerate(pairs):
        drawings = tuple(make_group(seed + i, references, colour, shape))
        groups.append(Group(f"{colour}-{shape}", colour, shape, drawings))
    return groups


def swapped(groups: Sequence[Group]) -> list[Group]:
    """Each folder keeps its name but gets the references of the next group of another colour and
    another shape."""
    out = []
    for i, group in enumerate(groups):
        donors = list(groups[i + 1 :]) + list(groups[:i])
        donor = next(g for g in donors if g.colour != group.colour and g.shape != group.shape)
        out.append(Group(group.name, donor.colour, donor.shape, donor.references))
    return out


def write_groups(groups: Sequence[Group], root: Path) -> Path:
    for group in groups:
        folder = root / group.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, drawing in enumerate(group.references):
            drawing.render().save(folder / f"{i:02d}.png")
    return root


def write_prompts(path: Path, images_per_prompt: int, seed: int, prompts: Sequence[tuple[str, str]] = PROMPTS) -> Path:
    import yaml

    data = {
        "defaults": {"images_per_prompt": images_per_prompt, "seed": seed},
        "prompts": [{"id": pid, "prompt": text} for pid, text in prompts],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def model_args(weights: Path | None) -> list[str]:
    """``--model demo``, or the three model options for a build folder that is not installed yet."""
    if weights is None:
        return ["--model", "demo"]
    from easyref_cli.models import DEMO_DEFAULTS

    weights = Path(weights)
    args = [
        "--base-model",
        str(weights / "sdxl"),
        "--mllm",
        str(weights / "qwen2vl"),
        "--adapter",
        str(weights / "easyref.safetensors"),
    ]
    for key, value in DEMO_DEFAULTS.items():  # the settings --model demo implies
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def generate(groups_root: Path, prompts: Path, out: Path, extra: Sequence[str] = ()) -> None:
    """The real command line, as a user runs it."""
    command = [
        sys.executable, "-m", "easyref_cli", "generate", str(groups_root), "--prompts", str(prompts),
        "-o", str(out), "--quiet", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True)


def outputs(out: Path, group: Group) -> list[Path]:
    return sorted((out / group.name).glob("*.png"))


def judge(image: Image.Image) -> dict:
    """What a picture shows, by the classifiers of :mod:`~easyref_cli.demo.synthetic`: its dominant
    colour, and the shape, grid cell and size of the pixels in that colour (``None`` without one)."""
    colour = dominant_colour(image)
    placement = classify_placement(image, colour) if colour else None
    return {
        "colour": colour,
        "shape": classify_shape(image, colour) if colour else None,
        "cell": list(placement[0]) if placement else None,
        "size": placement[1] if placement else None,
    }


#: The shares :func:`score` reports: name → (what the picture shows, what it should match).
CHECKS = {
    "colour": ("colour", "references_colour"),
    "shape": ("shape", "references_shape"),
    "position": ("cell", "asked_cell"),
    "size": ("size", "asked_size"),
    "keeps_folder_colour": ("colour", "folder_colour"),
    "keeps_folder_shape": ("shape", "folder_shape"),
}


def score(groups: Sequence[Group], out: Path, original: Sequence[Group] | None = None) -> dict:
    """Each picture judged (:func:`judge`) against its references, its prompt and (swapped run) the
    folder's original group; the shares of pictures that match."""
    asked = {pid: asked_placement(text) for pid, text in PROMPTS}
    rows = []
    for i, group in enumerate(groups):
        for path in outputs(out, group):
            prompt_id = path.stem.rsplit("_", 1)[0]
            if prompt_id not in asked:
                raise RuntimeError(f"{path} is not named {{prompt_id}}_{{seed}}.png for one of the evidence prompts")
            cell, size = asked[prompt_id]
            with Image.open(path) as image:
                row = {"image": str(path.relative_to(out)), **judge(image)}
            row.update(
                references_colour=group.colour, references_shape=group.shape, asked_cell=list(cell), asked_size=size
            )
            if original is not None:
                row.update(folder_colour=original[i].colour, folder_shape=original[i].shape)
            rows.append(row)
    if not rows:
        raise RuntimeError(f"no pictures under {out}")
    result: dict = {"images": len(rows)}
    for name, (shown, expected) in CHECKS.items():
        if expected in rows[0]:
            result[name] = sum(r[shown] == r[expected] for r in rows) / len(rows)
    result["no_colour"] = sum(r["colour"] is None for r in rows) / len(rows)
    result["rows"] = rows
    return result


@dataclass(frozen=True)
class SheetRow:
    """One contact-sheet row: a title, a subtitle, the references, the generated pictures."""

    title: str
    subtitle: str
    references: tuple[Path | Image.Image, ...]
    pictures: tuple[Path, ...]


def contact_sheet(sections: Sequence[tuple[str, Sequence[SheetRow]]], path: Path, *, scale: int = 2) -> Path:
    """``references | pictures`` rows under one label per section, pixels enlarged ``scale``×."""
    cell = IMAGE_SIZE * scale
    gap, label_h, left = 6, 18, 136
    rows = [row for _, section in sections for row in section]
    n_refs = max(len(r.references) for r in rows)
    n_out = max(len(r.pictures) for r in rows)
    sheet = Image.new(
        "RGB", (left + (n_refs + n_out) * cell + gap * 2, len(sections) * label_h + len(rows) * cell), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)

    def paste(source: Path | Image.Image, x: int, y: int) -> None:
        image = Image.open(source) if isinstance(source, Path) else source
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))

    y = 0
    for label, section in sections:
        draw.text((4, y + 3), f"{label}:  references  |  easyref generate --model demo", fill="black", font=font)
        y += label_h
        for row in section:
            draw.text((4, y + cell // 2 - 14), row.title, fill="black", font=font)
            draw.text((4, y + cell // 2 + 2), row.subtitle, fill="dimgray", font=font)
            for i, reference in enumerate(row.references):
                paste(reference, left + i * cell, y)
            for i, picture in enumerate(row.pictures):
                paste(picture, left + n_refs * cell + gap * 2 + i * cell, y)
            y += cell
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def group_rows(groups: Sequence[Group], out: Path) -> list[SheetRow]:
    return [
        SheetRow(g.name, f"refs: {g.colour} {g.shape}", tuple(d.render() for d in g.references), tuple(outputs(out, g)))
        for g in groups
    ]


def folder_rows(groups_root: Path, out: Path) -> list[SheetRow]:
    """Rows for ``easyref generate GROUPS_ROOT -o OUT`` (one per group folder)."""
    rows = []
    for folder in sorted(p for p in Path(groups_root).iterdir() if p.is_dir()):
        references = tuple(sorted(folder.glob("*.png")))
        rows.append(SheetRow(folder.name, "", references, tuple(sorted((Path(out) / folder.name).glob("*.png")))))
    return rows


def markdown(result: dict) -> str:
    given, swap = result["as_given"], result["swapped"]
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    runs = (
        f"{result['groups']} held-out groups × {len(result['prompts'])} prompts × {result['images_per_prompt']} seeds"
    )
    given_by, swap_by = tallies(given["rows"]), tallies(swap["rows"])
    return "\n".join(
        [
            f"| run ({runs}) | pictures | colour = references' | shape = references' | position = prompt's "
            "| size = prompt's | colour = folder's original | shape = folder's original |",
            "|---|---|---|---|---|---|---|---|",
            f"| references as given | {given['images']} | **{pct(given['colour'])}** | **{pct(given['shape'])}** "
            f"| **{pct(given['position'])}** | **{pct(given['size'])}** | — | — |",
            f"| references swapped between groups | {swap['images']} | **{pct(swap['colour'])}** "
            f"| **{pct(swap['shape'])}** | **{pct(swap['position'])}** | **{pct(swap['size'])}** "
            f"| {pct(swap['keeps_folder_colour'])} | {pct(swap['keeps_folder_shape'])} |",
            "",
            "References as given, per colour: " + _counts(given_by["colour"])
            + "; per shape: " + _counts(given_by["shape"]) + "; per asked position: " + _counts(given_by["position"])
            + ". Swapped, per colour: " + _counts(swap_by["colour"]) + "; per shape: " + _counts(swap_by["shape"])
            + f". No dominant colour: {pct(given['no_colour'])} / {pct(swap['no_colour'])}."
            " Chance: 17% for colour (six), 25% for shape (four).",
        ]
    )  # fmt: skip


def _counts(counts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{name} {n}/{total}" for name, (n, total) in counts.items())


def tallies(rows: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per references' colour, per references' shape and per asked position: ``(pictures right, pictures)``
    for that property (colour, shape, grid cell)."""
    positions = {
        tuple(cell): words.removeprefix("at the ").removeprefix("in the ") for cell, words in POSITIONS.items()
    }
    keys = {
        "colour": (lambda r: r["references_colour"], "colour", "references_colour", list(COLOURS)),
        "shape": (lambda r: r["references_shape"], "shape", "references_shape", list(SHAPES)),
        "position": (lambda r: positions[tuple(r["asked_cell"])], "cell", "asked_cell", list(positions.values())),
    }
    out = {}
    for name, (key, shown, expected, order) in keys.items():
        counts = {k: [0, 0] for k in order}
        for row in rows:
            counts[key(row)][0] += row[shown] == row[expected]
            counts[key(row)][1] += 1
        out[name] = {k: (n, total) for k, (n, total) in counts.items() if total}
    return out


def run(
    out: Path,
    *,
    groups: int | None = None,
    images_per_prompt: int = 2,
    seed: int = 0,
    sheet_groups: int = 6,
    weights: Path | None = None,
    extra: Sequence[str] = (),
    prompt_ids: Sequence[str] | None = None,
) -> dict:
    """Both runs (``prompt_ids``: a subset of :data:`PROMPTS`); returns what ``evidence.json`` holds."""
    out.mkdir(parents=True, exist_ok=True)
    extra = [*model_args(weights), *extra]
    given = held_out_groups(groups)
    swap = swapped(given)
    chosen = [(pid, text) for pid, text in PROMPTS if prompt_ids is None or pid in prompt_ids]
    prompts = write_prompts(out / "prompts.yaml", images_per_prompt, seed, chosen)
    result: dict = {"groups": len(given), "images_per_prompt": images_per_prompt, "prompts": dict(chosen)}
    for key, run_groups in (("as_given", given), ("swapped", swap)):
        root = write_groups(run_groups, out / key / "groups")
        generate(root, prompts, out / key / "images", extra)
        result[key] = score(run_groups, out / key / "images", original=given if key == "swapped" else None)
    contact_sheet(
        [
            ("references as given", group_rows(given[:sheet_groups], out / "as_given" / "images")),
            ("references swapped", group_rows(swap[:sheet_groups], out / "swapped" / "images")),
        ],
        out / "contact-sheet.png",
    )
    (out / "evidence.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "evidence.md").write_text(markdown(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyref_cli.demo.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the groups, pictures and results")
    parser.add_argument(
        "--groups", type=int, default=None, help="how many held-out groups (default: all 24 colour × shape pairs)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a build folder of `easyref_cli.demo.build` (default: the installed demo model)",
    )
    parser.add_argument(
        "--sheet-of", nargs=2, type=Path, metavar=("GROUPS", "OUTPUTS"),
        help="only draw OUT_DIR (a .png path) for an existing `easyref generate GROUPS -o OUTPUTS` run",
    )  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    if args.sheet_of:
        print(contact_sheet([("examples", folder_rows(*args.sheet_of))], args.out))
        return
    result = run(
        args.out,
        groups=args.groups,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        weights=args.weights,
        extra=extra,
    )
    print(markdown(result))


if __name__ == "__main__":
    main()
