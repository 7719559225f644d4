"""index.html of a run report: one static page, no scripts, no network; images are PNG files
beside it. Every value that comes from a file goes through html.escape."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 2em 4em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; } .muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.3em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; max-height: 30em; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
"""


@dataclass
class Section:
    """One part of the page: an anchor id, a title and its HTML body."""

    id: str
    title: str
    body: list[str] = field(default_factory=list)

    def add(self, fragment: str) -> Section:
        self.body.append(fragment)
        return self


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.2f}"
    return str(value)


def image(src: str, alt: str) -> str:
    return f'<img src="{esc(src)}" alt="{esc(alt)}">'


def table(header: list[str], rows: list[list], numeric: bool = True) -> str:
    """A table; cells holding numbers are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if numeric and isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(items: dict) -> str:
    return table(["key", "value"], [[k, v] for k, v in items.items()])


def paragraph(text: str, cls: str = "") -> str:
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


def preformatted(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page."""
    nav = " ".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    parts = [f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>\n' + "\n".join(s.body) + "</section>"
             for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{STYLE}</style></head>\n<body><h1>{esc(title)}</h1><p class=\"muted\">{esc(subtitle)}</p>"
            f"<nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body></html>\n")
