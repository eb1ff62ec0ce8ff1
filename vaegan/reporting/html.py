"""report.html: one page a person opens from disk, rendering whatever a report folder holds.

`write_html_report(folder)` reads what `vaegan eval` and `vaegan probe` leave in their output folder and knows
nothing else about them:

- `results.md` becomes the page's top: its tables (the first one, one row per model, gets `id="results"`),
  lists and notes, in a small Markdown subset (headings, tables, lists, paragraphs, code, links, images);
- every image file at the top of the folder is a figure, and every subfolder with a few images a gallery
  (`samples/`), captioned by file name: a plot another part of vaegan adds appears without a change here;
- `sheets/` holds the comparison sheets; where a sheet has a folder of panels (`sheets/NAME/0-original.png`,
  `1-LABEL.png`, `1-LABEL.error.png`, ... numbered in column order), the page shows them side by side,
  zoomed and panned together (mouse wheel, drag; double-click resets), with a switch to the error maps;
- `summary.json` is rendered in full under "Details", nested keys as nested lists, lists of records as tables,
  long lists of numbers shortened, so keys added later show up without a change here.

The page is self-contained: its style and script are inline, images are referenced by relative paths inside the
folder, nothing is fetched from a network, and no server is needed.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from vaegan.utils.files import read_json, write_file_atomically

REPORT_NAME = "report.html"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg")
# A subfolder with more images than this is data (an image set), not a gallery.
MAX_GALLERY_IMAGES = 48
SHEETS = "sheets"
# Captions for figures vaegan writes; any other file is captioned by its name.
CAPTIONS = {
    "per_image": "Per-image metrics of every model, in data order; the worst images are labelled",
    "curves": "Validation loss of the probe over training, and per timestep at the end",
    "samples": "Samples of each probe, decoded by its VAE",
}
PANEL = re.compile(r"(\d+)-(.+?)(\.error)?$")  # "1-demo.error" -> column 1, label "demo", error map


def write_html_report(folder: str | Path) -> Path:
    """Render the report folder into `folder/report.html` (written atomically); returns its path."""
    folder = Path(folder)
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    markdown = (folder / "results.md").read_text() if (folder / "results.md").is_file() else ""
    title_match = re.search(r"^# (.+)$", markdown, flags=re.M)
    title = title_match[1].strip() if title_match else folder.name
    body = [
        f"<header><h1>{html.escape(title)}</h1><p class='where'>{html.escape(str(folder.resolve()))}</p></header>",
        render_markdown(re.sub(r"^# .+\n", "", markdown, count=1, flags=re.M)),
        figures_section(folder),
        sheets_section(folder, summary),
        *(gallery_section(folder, sub) for sub in sorted(folder.iterdir()) if sub.is_dir() and sub.name != SHEETS),
        details_section(summary),
        files_section(folder),
    ]
    page = PAGE.format(title=html.escape(title), style=STYLE, body="\n".join(part for part in body if part),
                       script=SCRIPT)
    path = folder / REPORT_NAME
    write_file_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path


# ---- results.md ----


def render_markdown(text: str) -> str:
    """The Markdown subset vaegan's results.md uses, as HTML; the first table gets id="results"."""
    out: list[str] = []
    lines = text.splitlines()
    tables = 0
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("|"):
            block = []
            while index < len(lines) and lines[index].startswith("|"):
                block.append(lines[index])
                index += 1
            out.append(render_table(block, "results" if tables == 0 else None))
            tables += 1
            continue
        if line.startswith("```"):
            code = []
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                code.append(lines[index])
                index += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
        elif match := re.match(r"(#{1,6}) (.*)", line):
            level = min(6, len(match[1]) + 1)  # the page's title is the h1
            out.append(f"<h{level}>{inline(match[2])}</h{level}>")
        elif line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(f"<li>{inline(lines[index][2:])}</li>")
                index += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            paragraph = []
            while index < len(lines) and lines[index].strip() and not re.match(r"[|#`]|- ", lines[index]):
                paragraph.append(lines[index])
                index += 1
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            continue
        index += 1
    return "<section class='results'>" + "\n".join(out) + "</section>" if out else ""


def render_table(lines: list[str], table_id: str | None) -> str:
    """A Markdown table; each body row carries its first cell (the model) as data-model."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = rows[0], rows[1:]
    aligns = []
    if body and all(re.fullmatch(r":?-{3,}:?", cell) for cell in body[0]):
        aligns = ["right" if cell.endswith(":") else "left" for cell in body[0]]
        body = body[1:]

    def cell(tag: str, value: str, column: int) -> str:
        align = f" style='text-align:{aligns[column]}'" if column < len(aligns) else ""
        return f"<{tag}{align}>{inline(value)}</{tag}>"

    head = "<tr>" + "".join(cell("th", value, i) for i, value in enumerate(header)) + "</tr>"
    body_rows = "".join(
        f"<tr data-model='{html.escape(row[0], quote=True)}'>"
        + "".join(cell("td", value, i) for i, value in enumerate(row)) + "</tr>"
        for row in body
    )
    identity = f" id='{table_id}'" if table_id else ""
    return f"<div class='table'><table{identity}><thead>{head}</thead><tbody>{body_rows}</tbody></table></div>"


def inline(text: str) -> str:
    """Escape, then `code`, **bold**, ![alt](image) and [text](link)."""
    escaped = html.escape(text, quote=True)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r"<img class='inline' alt='\1' src='\2'>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", escaped)


# ---- figures, galleries, sheets ----


def images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def caption(path: Path) -> str:
    return CAPTIONS.get(path.stem) or re.sub(r"[_-]+", " ", path.stem)


def figure(folder: Path, path: Path, text: str) -> str:
    source = html.escape(path.relative_to(folder).as_posix(), quote=True)
    return (f"<figure><a href='{source}'><img src='{source}' alt='{html.escape(text, quote=True)}'></a>"
            f"<figcaption>{html.escape(text)}</figcaption></figure>")


def figures_section(folder: Path) -> str:
    images = images_in(folder)
    if not images:
        return ""
    return ("<section><h2>Figures</h2><div class='figures'>"
            + "".join(figure(folder, path, caption(path)) for path in images) + "</div></section>")


def gallery_section(folder: Path, sub: Path) -> str:
    """A subfolder's images side by side, unless it holds so many that it is data rather than figures."""
    images = images_in(sub)
    if not images or len(images) > MAX_GALLERY_IMAGES:
        return ""
    return (f"<section><h2>{html.escape(CAPTIONS.get(sub.name, sub.name))}</h2><div class='gallery'>"
            + "".join(figure(folder, path, path.stem) for path in images) + "</div></section>")


def sheets_section(folder: Path, summary: dict) -> str:
    """Zoomable side-by-side panels where a sheet has them, and every composite sheet."""
    sheets = folder / SHEETS
    if not sheets.is_dir():
        return ""
    reasons = {entry.get("index"): entry for entry in summary.get("sheets", []) if isinstance(entry, dict)}
    blocks = []
    for panel_folder in sorted(path for path in sheets.iterdir() if path.is_dir()):
        number = re.match(r"\d+", panel_folder.name)
        entry = reasons.get(int(number[0])) if number else None
        blocks.append(comparison(folder, panel_folder, entry))
    composites = images_in(sheets)
    parts = ["<section><h2>Comparison sheets</h2>"]
    if blocks:
        parts.append("<p class='hint'>Mouse wheel zooms, dragging pans, double-click resets; all panels of an "
                     "image move together. Tick <em>error maps</em> to see |original − reconstruction|.</p>")
        parts += blocks
    if composites:
        parts.append("<h3>Sheets</h3><div class='gallery'>"
                     + "".join(figure(folder, path, path.stem) for path in composites) + "</div>")
    return "".join(parts) + "</section>"


def comparison(folder: Path, panel_folder: Path, entry: dict | None) -> str:
    """One image: original | each model, reconstructions over error maps, zoomed together."""
    columns: dict[int, dict[str, Any]] = {}
    for path in images_in(panel_folder):
        match = PANEL.fullmatch(path.stem)
        if match:
            column = columns.setdefault(int(match[1]), {"label": match[2]})
            column["error" if match[3] else "image"] = path.relative_to(folder).as_posix()
    name = entry.get("image", panel_folder.name) if entry else panel_folder.name
    selected = f" <span class='tag'>{html.escape(str(entry['selected']))}</span>" if entry and "selected" in entry \
        else ""
    panels = []
    for number in sorted(columns):
        column = columns[number]
        if "image" not in column:
            continue
        layers = f"<img class='recon' src='{html.escape(column['image'], quote=True)}' alt='' draggable='false'>"
        if "error" in column:
            layers += (f"<img class='error' src='{html.escape(column['error'], quote=True)}' alt='' "
                       "draggable='false'>")
        panels.append(f"<figure class='panel'><div class='viewport'><div class='layer'>{layers}</div></div>"
                      f"<figcaption>{html.escape(column['label'])}</figcaption></figure>")
    return (f"<div class='compare'><div class='compare-head'><strong>{html.escape(str(name))}</strong>{selected}"
            "<label><input type='checkbox' class='error-toggle'> error maps</label>"
            "<button type='button' class='reset'>reset zoom</button></div>"
            f"<div class='panels'>{''.join(panels)}</div></div>")


# ---- summary.json ----


def details_section(summary: dict) -> str:
    if not summary:
        return ""
    parts = ["<section><h2>Details</h2><p class='hint'>Everything in summary.json.</p>"]
    for key, value in summary.items():
        if key == "models" and isinstance(value, list):
            for model in value:
                name = model.get("name", "model") if isinstance(model, dict) else "model"
                parts.append(f"<details class='model'><summary>model: {html.escape(str(name))}</summary>"
                             f"{render_value(model)}</details>")
            continue
        parts.append(f"<details open><summary>{html.escape(str(key))}</summary>{render_value(value)}</details>")
    return "".join(parts) + "</section>"


def render_value(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as definition lists, lists of records as tables, long number lists cut."""
    if isinstance(value, dict):
        items = "".join(f"<dt>{html.escape(str(key))}</dt><dd>{render_value(item, depth + 1)}</dd>"
                        for key, item in value.items())
        return f"<dl>{items}</dl>"
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value) and _flat_records(value):
            return records_table(value)
        if all(isinstance(item, str) for item in value) and any(len(item) > 40 for item in value):
            return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in value) + "</ul>"
        if all(not isinstance(item, (dict, list)) for item in value):
            shown = ", ".join(scalar(item) for item in value[:8])
            more = f", … ({len(value)} values)" if len(value) > 8 else ""
            return f"<span class='list'>[{shown}{more}]</span>"
        return "<ol>" + "".join(f"<li>{render_value(item, depth + 1)}</li>" for item in value) + "</ol>"
    return scalar(value)


def _flat_records(records: list[dict]) -> bool:
    return all(not isinstance(item, (dict, list)) for record in records for item in record.values())


def records_table(records: list[dict]) -> str:
    keys = list(dict.fromkeys(key for record in records for key in record))
    head = "".join(f"<th>{html.escape(str(key))}</th>" for key in keys)
    rows = "".join("<tr>" + "".join(f"<td>{scalar(record.get(key))}</td>" for key in keys) + "</tr>"
                   for record in records)
    table = f"<table class='records'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f"<div class='table'>{table}</div>"


def scalar(value: Any) -> str:
    if value is None:
        return "<span class='na'>n/a</span>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bool, int)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def files_section(folder: Path) -> str:
    """Links to the data files beside the report (tables, JSON), for those who want the numbers."""
    files = sorted(path for path in folder.iterdir()
                   if path.is_file() and path.suffix in (".csv", ".json", ".md", ".jsonl"))
    if not files:
        return ""
    links = "".join(f"<li><a href='{html.escape(path.name, quote=True)}'>{html.escape(path.name)}</a></li>"
                    for path in files)
    return f"<section><h2>Files</h2><ul class='files'>{links}</ul></section>"


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; }
header { border-bottom: 1px solid #ddd; margin-bottom: 16px; }
h1 { font-size: 24px; margin: 20px 0 4px; } h2 { font-size: 19px; margin-top: 32px; } h3 { font-size: 15px; }
.where, .hint { color: #666; font-size: 12px; }
code { font: 12px ui-monospace, monospace; background: #f2f2f4; padding: 1px 4px; border-radius: 3px; }
pre { background: #f2f2f4; padding: 8px; overflow-x: auto; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 12px; }
th, td { border-bottom: 1px solid #e3e3e6; padding: 4px 10px; white-space: nowrap; }
th { background: #f7f7f9; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafb; }
#results { font-size: 15px; } #results td:first-child { font-weight: 600; }
.figures figure, .gallery figure { display: inline-block; vertical-align: top; margin: 0 16px 16px 0; }
.figures img { max-width: 100%; max-height: 520px; border: 1px solid #e3e3e6; }
.gallery img { max-width: 420px; border: 1px solid #e3e3e6; image-rendering: pixelated; }
figcaption { font-size: 12px; color: #444; margin-top: 2px; }
.compare { border: 1px solid #e3e3e6; border-radius: 6px; padding: 8px; margin: 12px 0; }
.compare-head { display: flex; gap: 14px; align-items: center; margin-bottom: 6px; }
.tag { background: #eef; color: #335; border-radius: 3px; padding: 0 6px; font-size: 12px; }
.panels { display: flex; gap: 8px; flex-wrap: wrap; }
.panel { margin: 0; }
.viewport { width: 300px; height: 300px; overflow: hidden; position: relative; background: #111;
            cursor: grab; touch-action: none; }
.viewport:active { cursor: grabbing; }
.layer { transform-origin: 0 0; width: 300px; height: 300px; position: absolute; left: 0; top: 0; }
.layer img { width: 300px; height: 300px; image-rendering: pixelated; position: absolute; left: 0; top: 0;
             user-select: none; }
.layer img.error { visibility: hidden; }
.compare.errors .layer img.error { visibility: visible; }
dl { margin: 0 0 0 12px; display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { font-weight: 600; color: #333; } dd { margin: 0; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
.na { color: #999; } .list { font-family: ui-monospace, monospace; font-size: 12px; }
"""

# Zoom and pan: every panel of one comparison shares one transform, so the same pixels stay side by side.
SCRIPT = """
document.querySelectorAll('.compare').forEach(function (block) {
  var view = {scale: 1, x: 0, y: 0};
  var layers = block.querySelectorAll('.layer');
  function apply() {
    layers.forEach(function (layer) {
      layer.style.transform = 'translate(' + view.x + 'px,' + view.y + 'px) scale(' + view.scale + ')';
    });
  }
  function reset() { view = {scale: 1, x: 0, y: 0}; apply(); }
  block.querySelectorAll('.viewport').forEach(function (port) {
    port.addEventListener('wheel', function (event) {
      event.preventDefault();
      var box = port.getBoundingClientRect();
      var px = event.clientX - box.left, py = event.clientY - box.top;
      var factor = event.deltaY < 0 ? 1.25 : 0.8;
      var scale = Math.min(64, Math.max(1, view.scale * factor));
      view.x = px - (px - view.x) * scale / view.scale;
      view.y = py - (py - view.y) * scale / view.scale;
      view.scale = scale;
      if (scale === 1) { view.x = 0; view.y = 0; }
      apply();
    }, {passive: false});
    var drag = null;
    port.addEventListener('pointerdown', function (event) {
      drag = {x: event.clientX - view.x, y: event.clientY - view.y};
      port.setPointerCapture(event.pointerId);
    });
    port.addEventListener('pointermove', function (event) {
      if (!drag) { return; }
      view.x = event.clientX - drag.x; view.y = event.clientY - drag.y; apply();
    });
    port.addEventListener('pointerup', function () { drag = null; });
    port.addEventListener('dblclick', reset);
  });
  block.querySelector('.reset').addEventListener('click', reset);
  block.querySelector('.error-toggle').addEventListener('change', function (event) {
    block.classList.toggle('errors', event.target.checked);
  });
});
"""
