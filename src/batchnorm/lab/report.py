"""Turn experiment sections into ``report.html`` (one self-contained file), ``report.md`` (+ PNGs) and ``results.json``.

``report.html`` embeds every figure as a base64 PNG and uses no script and no external resource,
so it opens anywhere (and renders in headless Chromium without console errors). ``report.md``
references ``fig-<section>-<i>.png`` files written next to it. ``results.json`` holds each
section's ``results`` dict (plain numbers), its tables, the run settings and the wall times.

Example::

    >>> from batchnorm.lab.report import write_report
    >>> paths = write_report(sections, Path("lab-report"), ctx=ctx, timings={"x": 1.0}, total_seconds=1.0)
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import Context, Section, Table

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d2430; line-height: 1.45; }
h1 { border-bottom: 2px solid #3465a4; padding-bottom: .3em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #ccd; padding-bottom: .2em; }
.question { font-size: 1.08em; font-style: italic; }
.answer { background: #eef5ea; border-left: 4px solid #4e9a06; padding: .6em 1em; }
.failed { background: #fbeaea; border-left: 4px solid #cc0000; padding: .6em 1em; }
.setup { color: #333; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #c8ccd4; padding: .25em .6em; text-align: right; }
th { background: #eef1f6; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { font-size: .9em; color: #444; }
nav ol { columns: 2; }
.meta { color: #555; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(value)


def _png(figure: Any) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    return obj if obj is None or isinstance(obj, str) else str(obj)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table_md(t: Table) -> str:
    esc = lambda s: _cell(s).replace("|", "\\|")  # noqa: E731
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines.append("| " + " | ".join(esc(h) for h in t.headers) + " |")
    lines.append("|" + "---|" * len(t.headers))
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def write_report(
    sections: list[Section],
    out: Path,
    *,
    ctx: Context,
    timings: dict[str, float] | None = None,
    total_seconds: float | None = None,
) -> list[Path]:
    """Write ``report.html``, ``report.md``, the figure PNGs and ``results.json`` into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = timings or {}
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = (
        f"seeds={ctx.seeds} (first seed {ctx.seed}), quick={ctx.quick}; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} threads; {when}"
    )
    wall = f"total wall time {total_seconds:.1f} s" if total_seconds is not None else ""

    html_parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>batchnorm lab report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchnorm lab</h1>",
        f"<p class='meta'>Every number below was measured in this run: {html.escape(settings)}; {html.escape(wall)}. "
        "Numbers are mean ± standard deviation over the seeds.</p>",
        "<nav><ol>" + "".join(f"<li><a href='#{html.escape(s.name)}'>{html.escape(s.title)}</a></li>" for s in sections)
        + "</ol></nav>",
    ]
    md_parts = [
        "# batchnorm lab",
        "",
        f"Every number below was measured in this run: {settings}; {wall}. Numbers are mean ± standard deviation "
        "over the seeds.",
        "",
    ]
    md_parts += [f"{i}. [{s.title}](#{s.name})" for i, s in enumerate(sections, 1)] + [""]
    results: dict[str, Any] = {
        "settings": {"seeds": ctx.seeds, "seed": ctx.seed, "quick": ctx.quick, "torch": torch.__version__,
                     "generated": when},
        "total_seconds": total_seconds,
        "timings": timings,
        "sections": {},
    }
    written: list[Path] = []
    for s in sections:
        failed = "error" in s.results
        secs = timings.get(s.name)
        html_parts.append(f"<section id='{html.escape(s.name)}'><h2>{html.escape(s.title)}</h2>")
        html_parts.append(f"<p class='question'><b>Question.</b> {html.escape(s.question)}</p>")
        html_parts.append(f"<div class='setup'><b>Setup.</b> {_paragraphs(s.setup)}</div>")
        md_parts += [f"<a id='{s.name}'></a>", f"## {s.title}", "", f"**Question.** {s.question}", "",
                     f"**Setup.** {s.setup}", ""]
        for t in s.tables:
            html_parts.append(_table_html(t))
            md_parts += [_table_md(t), ""]
        for i, f in enumerate(s.figures, 1):
            png = _png(f.figure)
            plt.close(f.figure)
            name = f"fig-{s.name}-{i}.png"
            (out / name).write_bytes(png)
            written.append(out / name)
            b64 = base64.b64encode(png).decode("ascii")
            html_parts.append(
                f"<figure><img alt='{html.escape(f.caption)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>Figure {i}. {html.escape(f.caption)}</figcaption></figure>"
            )
            md_parts += [f"![{f.caption}]({name})", "", f"*Figure {i}. {f.caption}*", ""]
        klass = "failed" if failed else "answer"
        html_parts.append(f"<div class='{klass}'><b>Answer.</b> {_paragraphs(s.answer)}</div>")
        md_parts += [f"**Answer.** {s.answer}", ""]
        for note in s.notes:
            html_parts.append(f"<pre>{html.escape(note)}</pre>" if failed else f"<p class='meta'>{html.escape(note)}</p>")
            md_parts += [("```\n" + note + "\n```") if failed else f"*{note}*", ""]
        if secs is not None:
            html_parts.append(f"<p class='meta'>Wall time: {secs:.1f} s.</p>")
            md_parts += [f"*Wall time: {secs:.1f} s.*", ""]
        html_parts.append("</section>")
        results["sections"][s.name] = {
            "title": s.title,
            "question": s.question,
            "answer": s.answer,
            "results": s.results,
            "tables": [{"caption": t.caption, "headers": t.headers, "rows": t.rows} for t in s.tables],
            "figures": [f.caption for f in s.figures],
            "seconds": secs,
        }
    html_parts.append("</body></html>")
    paths = [out / "report.html", out / "report.md", out / "results.json"]
    paths[0].write_text("\n".join(html_parts), encoding="utf-8")
    paths[1].write_text("\n".join(md_parts), encoding="utf-8")
    paths[2].write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False), encoding="utf-8")
    return paths + written
