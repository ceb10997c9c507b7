"""``easyref report``: one contact sheet per group and a static index page.

``OUT/report/<group>.png``: a header (group, counts, the group's metrics when ``easyref eval`` ran),
a row of the group's reference images (file names below), then the generated images in job order,
each captioned with its prompt (wrapped, at most two lines, truncated with ``...``), its seed and,
when ``OUT/eval/per_image.jsonl`` exists, its CLIP-I / CLIP-T / DINO-I.

In a group where an image was made from input images (ControlNet, img2img, inpainting: the record's
``inputs``), each generated image becomes a composite cell, one row ``control | init | mask | result``
of same-size thumbnails, each labelled below (``control: pose01.png``… ``result``; an input file no
longer on disk is a grey placeholder labelled ``(missing)``), then the caption, wrapped to the whole
row. Inputs sit right next to their result (an image with fewer inputs than others leaves the left
slots empty, so the results line up) and ``--columns`` counts thumbnails: ``columns // slots``
composites per row, at least one. A group without inputs (text-to-image) keeps the plain grid.

``OUT/report/index.html``: static (inline CSS, no scripts, nothing fetched), relative links,
every text HTML-escaped; the metrics table from ``OUT/eval/metrics.json`` when it exists, then
each group's sheet, with how many of the group's images were made from input images.

The report overwrites only its own files: each sheet carries a ``easyref-report`` PNG text chunk
and the index a ``generator`` meta tag. A generated image (``--name-template "report/..."``) or any
other file in the way of a sheet is left alone and the sheet takes the next free name
(``<group>-2.png``); an ``index.html`` the report did not write stops it before it writes anything.

Drawing uses Pillow's default font (``ImageFont.load_default``); no torch is imported.
"""

from __future__ import annotations

import html
import io
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from easyref_cli import __version__, files
from easyref_cli.errors import InputError, UsageError
from easyref_cli.eval import (
    INDEX_NAME,
    REPORT_DIRNAME,
    GeneratedImage,
    collect_images,
    distinct,
    require_images,
    write_bytes_atomic,
    write_text_atomic,
)
from easyref_cli.eval.metrics import read_metrics, read_per_image, table_rows

logger = logging.getLogger(__name__)

DEFAULT_THUMB = 192
DEFAULT_COLUMNS = 6
#: Generated images drawn per sheet at most (a 2,000-image group would make a 60,000 px sheet).
DEFAULT_MAX_IMAGES = 120

_MARGIN = 16
_GAP = 10
#: The gap between the thumbnails of one composite cell (an image and its inputs).
_INNER_GAP = 4
_BACKGROUND = (255, 255, 255)
_CELL_BACKGROUND = (236, 236, 236)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_FONT_SIZE = 12
_TITLE_SIZE = 18
_PROMPT_LINES = 2
#: The PNG text chunk that marks a contact sheet as written by ``easyref report``.
SHEET_MARKER = "easyref-report"
#: The tag that marks ``index.html`` as written by ``easyref report``.
_INDEX_MARKER = '<meta name="generator" content="easyref-cli report">'
#: How ``index.html`` began before it carried the tag (easyref-cli 0.1).
_INDEX_LEGACY = ("<!doctype html>", "<title>easyref report:")


@dataclass
class ReportResult:
    sheets: dict[str, Path]
    index: Path


# ----------------------------------------------------------------------------------------------
# Text drawing
# ----------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _drawable(font: Any, text: str) -> str:
    """``text`` with characters the font cannot encode replaced by ``?`` (the bitmap font is latin-1)."""
    text = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    return draw.textlength(text, font=font)


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Hgjy|")
    return int(bottom) + 3


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Every line of a greedy word wrap to ``width`` pixels; over-wide words break between characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _width(draw, candidate, font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and _width(draw, word, font) > width:
            k = len(word) - 1
            while k > 1 and _width(draw, word[:k], font) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        current = word
    if current:
        lines.append(current)
    return lines


def fit_lines(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped to ``width`` pixels in at most ``max_lines`` lines; when cut, the last
    line ends in ``...``."""
    lines = _wrap(draw, _drawable(font, text), font, width)
    if len(lines) <= max_lines:
        return lines
    lines = lines[:max_lines]
    last = lines[-1]
    while last and _width(draw, last + "...", font) > width:
        last = last[:-1]
    lines[-1] = last.rstrip() + "..."
    return lines


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: Any, fill=_TEXT) -> None:
    draw.text(xy, _drawable(font, text), font=font, fill=fill)


# ----------------------------------------------------------------------------------------------
# Contact sheets
# ----------------------------------------------------------------------------------------------


def _thumbnail(path: Path, size: int, what: str = "reference image") -> Image.Image | None:
    try:
        image = files.load_image(path, what=what)
    except InputError as e:
        logger.warning("report: %s", e)
        return None
    scale = min(size / image.width, size / image.height)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Shrink smoothly; enlarge small images (64² smoke runs) with crisp pixels.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(target, resample)


def _cell(path: Path, size: int, font: Any, what: str = "reference image") -> Image.Image:
    cell = Image.new("RGB", (size, size), _CELL_BACKGROUND)
    thumb = _thumbnail(path, size, what)
    if thumb is None:
        draw = ImageDraw.Draw(cell)
        _text(draw, (8, size // 2 - 6), "missing / unreadable", font, _MUTED)
    else:
        cell.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return cell


def _score_line(row: Mapping[str, Any] | None) -> str | None:
    if not row:
        return None
    parts = []
    for key, label in (("clip_i", "CLIP-I"), ("clip_t", "T"), ("dino_i", "DINO")):
        value = row.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.3f}")
    return "  ".join(parts) or None


def _summary_line(summary: Mapping[str, Any] | None) -> str | None:
    if not summary:
        return None
    parts = []
    for key, label in (
        ("clip_i", "CLIP-I"),
        ("clip_t", "CLIP-T"),
        ("dino_i", "DINO-I"),
        ("clip_i_target", "CLIP-I target"),
        ("dino_i_target", "DINO-I target"),
    ):
        value = summary.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4f}")
    return "mean " + ", ".join(parts) if parts else None


#: A caption or header line: ``(text, fill colour)`` / ``(text, font, fill colour)``.
_Caption = list[tuple[str, Any]]
_HeaderLine = tuple[str, Any, Any]


@dataclass(frozen=True)
class _Grid:
    """The cell geometry of a contact sheet: ``columns`` thumbnails of ``thumb`` pixels, each
    followed by caption lines of ``line`` pixels in ``font``."""

    thumb: int
    columns: int
    line: int
    font: Any

    def width(self) -> int:
        return self.columns * self.thumb + (self.columns - 1) * _GAP

    def height(self, n: int, caption_lines: int) -> int:
        """The height of a grid of ``n`` cells with ``caption_lines`` caption lines each."""
        rows = -(-n // self.columns) if n else 0
        return rows * (self.thumb + caption_lines * self.line + _GAP)

    def draw(
        self,
        sheet: Image.Image,
        draw: ImageDraw.ImageDraw,
        paths: Sequence[Path],
        captions: Sequence[Sequence[tuple[str, Any]]],
        lines_per_cell: int,
        top: int,
    ) -> int:
        """Paste the cells of ``paths`` with their captions from ``top``; returns the y below them."""
        thumb, line, font = self.thumb, self.line, self.font
        row_h = thumb + lines_per_cell * line + _GAP
        for i, (path, caption) in enumerate(zip(paths, captions, strict=False)):
            r, c = divmod(i, self.columns)
            x, cy = _MARGIN + c * (thumb + _GAP), top + r * row_h
            sheet.paste(_cell(path, thumb, font), (x, cy))
            for k, (text, fill) in enumerate(caption):
                _text(draw, (x, cy + thumb + 2 + k * line), text, font, fill)
        return top + self.height(len(paths), lines_per_cell)


#: ``load_image``'s name for each input kind, in its warnings.
_INPUT_WHAT = {"control": "control image", "init": "init image", "mask": "mask"}


@dataclass(frozen=True)
class _InputGrid:
    """The generated images of a group with input images: each cell is ``slots`` thumbnails in a row
    (the inputs right-aligned, the result last), a label under each, then the caption lines."""

    thumb: int
    slots: int
    columns: int
    line: int
    font: Any

    def cell_width(self) -> int:
        return self.slots * self.thumb + (self.slots - 1) * _INNER_GAP

    def width(self) -> int:
        return self.columns * self.cell_width() + (self.columns - 1) * 2 * _GAP

    def height(self, n: int, caption_lines: int) -> int:
        rows = -(-n // self.columns) if n else 0
        return rows * (self.thumb + (1 + caption_lines) * self.line + _GAP)

    def draw(
        self,
        sheet: Image.Image,
        draw: ImageDraw.ImageDraw,
        cells: Sequence[Sequence[tuple[str, Path]]],
        captions: Sequence[Sequence[tuple[str, Any]]],
        lines_per_cell: int,
        top: int,
    ) -> int:
        """Paste each cell's ``(label, path)`` thumbnails, labelled, with its caption; returns the y below."""
        thumb, line, font = self.thumb, self.line, self.font
        row_h = thumb + (1 + lines_per_cell) * line + _GAP
        for i, (slots, caption) in enumerate(zip(cells, captions, strict=False)):
            r, c = divmod(i, self.columns)
            x, cy = _MARGIN + c * (self.cell_width() + 2 * _GAP), top + r * row_h
            for k, (label, path) in enumerate(slots, start=self.slots - len(slots)):
                sx = x + k * (thumb + _INNER_GAP)
                sheet.paste(_cell(path, thumb, font, _INPUT_WHAT.get(label.split()[0], "image")), (sx, cy))
                _text(draw, (sx, cy + thumb + 2), _slot_label(draw, label, path, font, thumb), font, _MUTED)
            for k, (text, fill) in enumerate(caption):
                _text(draw, (x, cy + thumb + 2 + (k + 1) * line), text, font, fill)
        return top + self.height(len(cells), lines_per_cell)


def _slot_label(draw: ImageDraw.ImageDraw, label: str, path: Path, font: Any, width: int) -> str:
    """``control: pose01.png``, ``mask (missing)``, ``result``: one line of ``width`` pixels (a narrow
    placeholder's label is ``(missing)``)."""
    if label == "result":
        return label
    text = f"{label}: {path.name}" if path.is_file() else f"{label} (missing)"
    if not path.is_file() and _width(draw, text, font) > width:
        text = "(missing)"
    return fit_lines(draw, text, font, width, 1)[0]


def _generated_layout(
    shown: Sequence[GeneratedImage], grid: _Grid, columns: int
) -> tuple[_Grid | _InputGrid, list[Any], int]:
    """How the generated images are drawn: ``(grid, its cells, caption width)``; the plain ``grid`` of
    result paths unless an image has inputs, then an :class:`_InputGrid` of ``columns // slots`` cells a row."""
    if not any(im.inputs for im in shown):
        return grid, [im.path for im in shown], grid.thumb
    slots = 1 + max(len(im.inputs) for im in shown)
    per_row = max(1, min(columns // slots, len(shown)))
    inputs = _InputGrid(thumb=grid.thumb, slots=slots, columns=per_row, line=grid.line, font=grid.font)
    return inputs, [[*im.inputs, ("result", im.path)] for im in shown], inputs.cell_width()


def _generated_caption(
    draw: ImageDraw.ImageDraw, im: GeneratedImage, font: Any, thumb: int, scores: Mapping[str, Mapping[str, Any]]
) -> _Caption:
    """A generated image's caption, ``thumb`` pixels wide: its prompt (at most ``_PROMPT_LINES``), seed,
    and scores if any."""
    lines = [(t, _TEXT) for t in fit_lines(draw, im.prompt or "(empty prompt)", font, thumb, _PROMPT_LINES)]
    seed = f"seed {im.seed}" if im.seed is not None else im.name
    lines.append((fit_lines(draw, seed, font, thumb, 1)[0], _TEXT))
    score = _score_line(scores.get(im.job_id))
    if score:
        lines.append((score, _MUTED))
    return lines


def _header_lines(
    group: str,
    references: int,
    images: Sequence[GeneratedImage],
    shown: int,
    summary: Mapping[str, Any] | None,
    font: Any,
    title_font: Any,
) -> list[_HeaderLine]:
    """The sheet's header: the group as title, the counts, the group's mean metrics when known."""
    hidden = len(images) - shown
    header = [(f"{group}", title_font, _TEXT)]
    counts = f"{references} reference image(s), {len(images)} generated image(s)"
    if note := inputs_note(images):
        counts += f", {note}"
    if hidden:
        counts += f" (first {shown} shown)"
    header.append((counts, font, _MUTED))
    if (s := _summary_line(summary)) is not None:
        header.append((s, font, _TEXT))
    return header


def _draw_header(draw: ImageDraw.ImageDraw, header: Sequence[_HeaderLine], width: int) -> int:
    """Draw the header lines (each cut to one line of the sheet's width); returns the y below it."""
    y = _MARGIN
    for text, f, colour in header:
        for piece in fit_lines(draw, text, f, width - 2 * _MARGIN, 1):
            _text(draw, (_MARGIN, y), piece, f, colour)
        y += _line_height(f)
    return y + _GAP


def inputs_note(images: Sequence[GeneratedImage]) -> str:
    """``"3 from input images (control, init, mask)"``, or ``""`` when no image has inputs."""
    made = [im for im in images if im.inputs]
    if not made:
        return ""
    kinds = {label.split()[0] for im in made for label, _ in im.inputs}
    return f"{len(made)} from input images ({', '.join(k for k in _INPUT_WHAT if k in kinds)})"


def contact_sheet(
    group: str,
    images: Sequence[GeneratedImage],
    *,
    scores: Mapping[str, Mapping[str, Any]] | None = None,
    summary: Mapping[str, Any] | None = None,
    thumb: int = DEFAULT_THUMB,
    columns: int = DEFAULT_COLUMNS,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> Image.Image:
    """The contact sheet of one group (see the module docstring)."""
    scores = scores or {}
    font, title_font = _font(_FONT_SIZE), _font(_TITLE_SIZE)
    line = _line_height(font)
    references = distinct(r for im in images for r in im.references)
    shown = list(images[:max_images])
    hidden = len(images) - len(shown)
    grid = _Grid(thumb=thumb, columns=max(1, min(columns, max(len(references), len(shown), 1))), line=line, font=font)
    generated, cells, caption_width = _generated_layout(shown, grid, columns)
    width = 2 * _MARGIN + max(grid.width(), generated.width())
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    # 1. Captions first: their line counts set the row heights.
    ref_captions = [[(t, _TEXT) for t in fit_lines(scratch, p.name, font, thumb, 1)] for p in references]
    gen_captions = [_generated_caption(scratch, im, font, caption_width, scores) for im in shown]
    header = _header_lines(group, len(references), images, len(shown), summary, font, title_font)
    header_h = sum(_line_height(f) for _, f, _ in header) + _GAP

    # 2. The sheet's size
    ref_lines = 1
    gen_lines = max((len(c) for c in gen_captions), default=0)
    label_h = line + 4
    height = (
        _MARGIN
        + header_h
        + label_h
        + max(grid.height(len(references), ref_lines), thumb // 4)
        + label_h
        + generated.height(len(shown), gen_lines)
        + (line if hidden else 0)
        + _MARGIN
    )
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    # 3. Header, references, generated images
    y = _draw_header(draw, header, width)
    _text(draw, (_MARGIN, y), "References", font, _MUTED)
    y += label_h
    if references:
        y = grid.draw(sheet, draw, references, ref_captions, ref_lines, y)
    else:
        _text(draw, (_MARGIN, y), "(none recorded)", font, _MUTED)
        y += thumb // 4
    _text(draw, (_MARGIN, y), "Generated", font, _MUTED)
    y += label_h
    y = generated.draw(sheet, draw, cells, gen_captions, gen_lines, y)
    if hidden:
        _text(draw, (_MARGIN, y), f"... and {hidden} more (raise --max-images to see them)", font, _MUTED)
    return sheet


def sheet_filename(group: str, taken: set[str]) -> str:
    """A safe, unique ``<group>.png`` file name (path separators and leading dots replaced)."""
    stem = re.sub(r"[\\/\x00-\x1f]", "_", group).lstrip(".") or "group"
    if stem.lower() == INDEX_NAME.rsplit(".", 1)[0]:
        stem = f"{stem}_"
    name, n = f"{stem}.png", 2
    while name.lower() in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name.lower())
    return name


# ----------------------------------------------------------------------------------------------
# index.html
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } .muted { color: #666; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .3em .7em; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.overall td { font-weight: bold; background: #f4f4f4; }
section { margin: 2em 0; } section img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    header, rows = table_rows(metrics)
    esc = html.escape
    head = "".join(f"<th{'' if i == 0 else ' class=num'}>{esc(h)}</th>" for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cls = ' class="overall"' if k == len(rows) - 1 else ""
        cells = "".join(f"<td{'' if i == 0 else ' class=num'}>{esc(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    models = metrics.get("models") or {}
    note = ", ".join(f"{esc(str(k))}: <code>{esc(str(v))}</code>" for k, v in models.items())
    extra = f'<p class="muted">Models: {note}.</p>' if note else ""
    if metrics.get("targets"):
        extra += f'<p class="muted">Targets: <code>{esc(str(metrics["targets"]))}</code>.</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{extra}"


def index_html(
    out_dir: Path,
    sheets: Mapping[str, str],
    groups: Mapping[str, Sequence[GeneratedImage]],
    metrics: Mapping[str, Any] | None,
    *,
    show_paths: bool = False,
) -> str:
    """The static index page: metrics table (when given), a group list, then every sheet. The output
    folder is named, not located, unless ``show_paths`` (reports get shared)."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        _INDEX_MARKER,
        f"<title>easyref report: {esc(Path(out_dir).resolve().name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>easyref report</h1>",
        f'<p class="muted">{sum(len(v) for v in groups.values())} image(s) in {len(groups)} group(s) from '
        f"<code>{esc(str(Path(out_dir).resolve()) if show_paths else Path(out_dir).resolve().name)}</code>; made {esc(time.strftime('%Y-%m-%d %H:%M'))} by easyref-cli "
        f"{esc(__version__)}.</p>",
        "<h2>Metrics</h2>",
    ]
    if metrics:
        parts.append(_metrics_html(metrics))
    else:
        parts.append('<p class="muted">No metrics yet: run <code>easyref eval OUT</code>, then this report again.</p>')
    parts.append("<h2>Groups</h2><ul>")
    for k, (group, filename) in enumerate(sheets.items()):
        parts.append(
            f'<li><a href="#g{k}">{esc(group)}</a> ({len(groups[group])} image(s)) — '
            f'<a href="{esc(quote(filename))}">{esc(filename)}</a></li>'
        )
    parts.append("</ul>")
    for k, (group, filename) in enumerate(sheets.items()):
        href = esc(quote(filename))
        note = inputs_note(groups[group])
        parts.append(
            f'<section id="g{k}"><h2>{esc(group)}</h2>'
            + (f'<p class="muted">{len(groups[group])} image(s), {esc(note)}.</p>' if note else "")
            + f'<a href="{href}"><img src="{href}" alt="contact sheet of {esc(group)}" loading="lazy"></a></section>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# The report run
# ----------------------------------------------------------------------------------------------


def is_report_file(path: Path) -> bool:
    """Whether ``path`` is a file ``easyref report`` wrote: a sheet with its marker chunk, or its index."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    if path.suffix.lower() == ".html":
        try:
            with path.open("rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError:
            return False
        return _INDEX_MARKER in head or all(part in head for part in _INDEX_LEGACY)
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and SHEET_MARKER in im.info  # written before the pixels: nothing decoded
    except (OSError, SyntaxError, ValueError):
        return False


def _may_write(path: Path, outputs: set[Path]) -> bool:
    """A new file, or one this report wrote before (never an image the manifest lists)."""
    if not path.exists() and not path.is_symlink():
        return True
    return path.resolve() not in outputs and is_report_file(path)


def _sheet_path(report_dir: Path, group: str, taken: set[str], outputs: set[Path]) -> Path:
    """Where ``group``'s sheet goes: ``<group>.png``, or the next free name when another file is there."""
    while True:
        path = report_dir / sheet_filename(group, taken)
        if _may_write(path, outputs):
            return path
        logger.warning(
            "report: %s was not written by easyref report (a generated image?): left as it is; the sheet of "
            "group %s goes to the next free name",
            path,
            group,
        )


def _check_index(index: Path, outputs: set[Path]) -> None:
    if not _may_write(index, outputs):
        raise UsageError(
            f"{index} was not written by easyref report and would be overwritten by the report's index page; "
            f"move it out of {index.parent} (or delete it) and run easyref report again"
        )


def build_report(
    out_dir: Path,
    *,
    thumb: int | None = None,
    columns: int | None = None,
    max_images: int | None = None,
    show_paths: bool = False,
) -> ReportResult:
    """Write ``OUT/report/<group>.png`` per group and ``OUT/report/index.html`` (no absolute path in
    either unless ``show_paths``).

    Raises:
        UsageError: no manifest, nothing finished, bad sizes.
        InputError: a listed PNG without an easyref record.
    """
    thumb = DEFAULT_THUMB if thumb is None else thumb
    columns = DEFAULT_COLUMNS if columns is None else columns
    max_images = DEFAULT_MAX_IMAGES if max_images is None else max_images
    for option, value, low in (("--thumb-size", thumb, 32), ("--columns", columns, 1), ("--max-images", max_images, 1)):
        if value < low:
            raise UsageError(f"{option} must be ≥ {low}, got {value}")
    out_dir = Path(out_dir)

    # 1. What to show
    folder = collect_images(out_dir)
    require_images(folder)
    groups = folder.groups()
    metrics = read_metrics(out_dir)
    scores = read_per_image(out_dir)

    # 2. One sheet per group, never over a file the report did not write
    report_dir = out_dir / REPORT_DIRNAME
    outputs = {im.path.resolve() for im in folder.images}
    index = report_dir / INDEX_NAME
    _check_index(index, outputs)
    taken: set[str] = {INDEX_NAME.lower()}
    names: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for group, images in groups.items():
        summary = (metrics or {}).get("groups", {}).get(group)
        sheet = contact_sheet(
            group, images, scores=scores, summary=summary, thumb=thumb, columns=columns, max_images=max_images
        )
        info = PngInfo()
        info.add_text(SHEET_MARKER, f"easyref-cli {__version__}")
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG", optimize=False, pnginfo=info)
        paths[group] = _sheet_path(report_dir, group, taken, outputs)
        names[group] = paths[group].name
        write_bytes_atomic(paths[group], buffer.getvalue())

    # 3. The index page
    write_text_atomic(index, index_html(out_dir, names, groups, metrics, show_paths=show_paths))
    return ReportResult(sheets=paths, index=index)
