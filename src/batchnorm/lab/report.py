"""Turn experiment sections into ``report.html`` (one self-contained file), ``report.md`` (+ PNGs) and ``results.json``.

A finished :class:`~batchnorm.lab.core.Section` is first *rendered* (:func:`render`): its figures become
PNG bytes and everything else plain data, so a rendered section can travel between processes, be
stored in ``results.json`` and be reused by ``batchnorm lab --resume``. :func:`write_report` writes
the whole report from the rendered sections finished so far; the lab calls it after every section,
so the files on disk are always a valid (possibly partial) report. Files are replaced atomically.

``report.html`` embeds every figure as a base64 PNG and uses no script and no external resource,
so it opens anywhere (and renders in headless Chromium without console errors). ``report.md``
references ``fig-<section>-<i>.png`` files written next to it. ``results.json`` holds each
section's ``results`` dict (plain numbers), its texts and tables, the run settings and the wall times.

The report opens with "findings at a glance": the five seed questions (:data:`SEED_QUESTIONS`), put as
yes/no questions (seed 003 split into its parts), each answered by the ``finding`` of the section that
answers it, linked to it.

Format of a finding (what a learner reads first). Every ``Section.finding`` is built with
:func:`glance_answer` and reads ``"<Verdict>. <one sentence with the deciding number>"``:

* the verdict is one of :data:`VERDICTS` — ``Yes``, ``No``, ``Partly``, ``Not at this budget`` — and answers the
  question listed for the section in :data:`SEED_QUESTIONS`; it is decided from the run's numbers
  (comparisons through :func:`batchnorm.lab.stats.compare`; "Not at this budget" when the deciding
  comparison is not resolved, e.g. in a one-seed ``--quick`` run);
* one sentence follows (semicolons allowed) that gives the deciding number with its 95 % interval;
* the report adds the link to the section; the finding itself carries no link and no lead-in.

A new experiment that answers a seed question adds ``(seed id, yes/no question, [its section name])`` to
:data:`SEED_QUESTIONS` (several entries may share a seed id) and returns
``Section(..., finding=glance_answer(verdict, sentence))``. :func:`split_verdict` reads a finding back
(the HTML and Markdown writers set the verdict in bold; tests pin the format with it).

Example::

    >>> glance_answer("No", "noisy BN ended level with BN (89.0 % vs 89.0 %)")
    'No. Noisy BN ended level with BN (89.0 % vs 89.0 %).'
    >>> split_verdict("Not at this budget. One seed resolves nothing.")
    ('Not at this budget', 'One seed resolves nothing.')

Writing a report::

    >>> from batchnorm.lab.report import render, write_report
    >>> done = {s.name: render(s, seconds=1.0, settings={}) for s in sections}
    >>> paths = write_report(done, Path("lab-report"), ctx=ctx, order=[s.name for s in sections])
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import Context, Section, Table

#: (seed file, the question as a yes/no question, the sections whose findings answer it); seed 003 asks four
#: things at once (is ICS why BN works; are small batches, test-time estimates, overhead real drawbacks), so it
#: is listed once per part
SEED_QUESTIONS: list[tuple[str, str, list[str]]] = [
    ("000", "Is a BatchNorm layer at the input equivalent to standardizing the inputs?",
     ["input-bn-vs-standardization"]),
    ("001", "Could γx + β alone do BN's job, since γ and β can learn any scale and shift?",
     ["why-normalize-before-affine"]),
    ("002", "Does BN make each layer's inputs Gaussian?", ["is-it-gaussian"]),
    ("003", "Does BN help by smoothing the loss landscape rather than by removing internal covariate shift "
            "(Santurkar et al.)?", ["internal-covariate-shift"]),
    ("003", "Do small batches hurt BN?", ["batch-size"]),
    ("003", "Are BN's test-time estimates (running averages) worse than the population statistics?",
     ["test-time-statistics"]),
    ("003", "Does BN cost noticeable time?", ["overhead"]),
    ("003", "Does re-estimating BN's statistics on unlabeled data help when the test data shift from the training "
            "data?",
     ["test-data-shift"]),
    ("004", "Are a hidden layer's BN statistics computed per feature, over every other axis of the tensor it "
            "receives?", ["hidden-layer-statistics"]),
]

#: the verdict words a finding opens with, in the order a reader weighs them
VERDICTS = ("Yes", "No", "Partly", "Not at this budget")


def glance_answer(verdict: str, sentence: str) -> str:
    """A finding for the report's first page: ``"<verdict>. <sentence>"`` (see the module docstring).

    ``verdict`` must be one of :data:`VERDICTS`; ``sentence`` is one sentence with the deciding number (a
    lowercase ASCII first letter is capitalized, a final period added if missing, runs of spaces collapsed).
    Example: ``glance_answer("Yes", "at batch 2 BN's error is 62 %") == "Yes. At batch 2 BN's error is 62 %."``
    """
    if verdict not in VERDICTS:
        raise ValueError(f"glance_answer expected a verdict from {VERDICTS}, got {verdict!r}. Put the nuance in the "
                         "sentence and choose 'Partly' or 'Not at this budget' if neither Yes nor No holds.")
    text = " ".join(str(sentence).split())
    if not text:
        raise ValueError("glance_answer expected a sentence with the deciding number after the verdict, got an empty "
                         "one.")
    if text[-1] not in ".!?":
        text += "."
    if text[0].isascii() and text[0].islower():  # "noisy BN ..." → "Noisy BN ..."; "γx + β ..." stays as it is
        text = text[0].upper() + text[1:]
    return f"{verdict}. {text}"


def split_verdict(finding: str) -> tuple[str | None, str]:
    """``(verdict, rest)`` of a finding written by :func:`glance_answer`; ``(None, finding)`` if it has no verdict.

    Example: ``split_verdict("Partly. Slower to train, not after fold.") == ("Partly", "Slower to train, not after fold.")``.
    """
    for verdict in sorted(VERDICTS, key=len, reverse=True):
        if finding.startswith(verdict + ". "):
            return verdict, finding[len(verdict) + 2:]
    return None, finding


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d2430; line-height: 1.45; }
h1 { border-bottom: 2px solid #3465a4; padding-bottom: .3em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #ccd; padding-bottom: .2em; }
.question { font-size: 1.08em; font-style: italic; }
.answer { background: #eef5ea; border-left: 4px solid #4e9a06; padding: .6em 1em; }
.failed { background: #fbeaea; border-left: 4px solid #cc0000; padding: .6em 1em; }
.banner { background: #fff4d6; border-left: 4px solid #c4a000; padding: .6em 1em; font-weight: 600; }
.glance { background: #f2f5fa; border: 1px solid #c8d2e4; padding: .4em 1.2em; }
.glance dt { font-weight: 600; margin-top: .6em; }
.glance dd { margin-left: 1.2em; }
.setup { color: #333; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #c8ccd4; padding: .25em .6em; text-align: right; }
th { background: #eef1f6; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { font-size: .9em; color: #444; }
nav ul { columns: 2; list-style: none; padding-left: 0; }
.meta { color: #555; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""

QUICK_BANNER = (
    "Smoke test (--quick): one seed and small budgets. These numbers show that the code runs end to end; they are "
    "not evidence, and no comparison in this report is resolved. Run `batchnorm lab` for the answers."
)


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


def render(section: Section, *, seconds: float | None, settings: dict[str, Any]) -> dict[str, Any]:
    """A finished section as plain data: texts, tables as dicts, figures as ``{"caption", "file", "png"}``.

    ``settings`` (seeds, seed, quick, code version) is stored with it so ``--resume`` can tell whether the
    section can be reused. The matplotlib figures are closed. Shape: n/a (a dict).
    Example: ``render(section, seconds=2.5, settings={"seeds": 3})["figures"][0]["file"] == "fig-<name>-1.png"``.
    """
    figures = []
    for i, f in enumerate(section.figures, 1):
        figures.append({"caption": f.caption, "file": f"fig-{section.name}-{i}.png", "png": _png(f.figure)})
    return {
        "name": section.name,
        "title": section.title,
        "question": section.question,
        "setup": section.setup,
        "answer": section.answer,
        "finding": section.finding,
        "tables": [{"caption": t.caption, "headers": list(t.headers), "rows": _jsonable(t.rows)} for t in section.tables],
        "figures": figures,
        "results": _jsonable(section.results),
        "notes": list(section.notes),
        "seconds": seconds,
        "settings": dict(settings),
        "failed": "error" in section.results,
    }


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


def _write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` atomically (a Ctrl-C or crash never leaves a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def glance(done: dict[str, dict[str, Any]], order: Sequence[str]) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """``[(seed id, question, [(section name, section title, finding text)])]`` for the sections in ``order``.

    A section that has not finished yet (or failed) contributes a sentence saying so. A section that no entry of
    :data:`SEED_QUESTIONS` lists is still shown, after them, under its own question (seed id ``""``).
    """
    listed = {n for _, _, names in SEED_QUESTIONS for n in names}
    extra = [(("", done[n]["question"] if n in done else n, [n])) for n in order if n not in listed]
    out = []
    for seed, question, names in SEED_QUESTIONS + extra:
        items = []
        for name in names:
            if name not in order:
                continue
            sec = done.get(name)
            if sec is None:
                items.append((name, name, "Not run yet (the run was interrupted or is still going)."))
            elif sec["failed"]:
                items.append((name, sec["title"], "The experiment failed; see its section."))
            else:
                items.append((name, sec["title"], sec["finding"] or "(see the section's answer)"))
        if items:
            out.append((seed, question, items))
    return out


def write_report(
    done: dict[str, dict[str, Any]],
    out: Path,
    *,
    ctx: Context,
    order: Sequence[str],
    total_seconds: float | None = None,
    partial: bool = False,
) -> list[Path]:
    """Write ``report.html``, ``report.md``, the figure PNGs and ``results.json`` into ``out``; returns their paths.

    ``done`` maps section names to :func:`render` output; ``order`` is every section the run was asked for
    (those not in ``done`` are listed as missing). ``partial`` marks a report written mid-run or after an
    interruption.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = (
        f"seeds={ctx.seeds} (first seed {ctx.seed}), quick={ctx.quick}; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {when}"
    )
    wall = f"total wall time {total_seconds:.1f} s" if total_seconds is not None else ""
    sections = [done[n] for n in order if n in done]
    missing = [n for n in order if n not in done]
    status = ""
    if missing:
        status = (f"Partial report: {len(sections)} of {len(order)} sections finished; not yet run: "
                  f"{', '.join(missing)}. Run the same command with --resume to add them.")

    html_parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>batchnorm lab report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchnorm lab</h1>",
    ]
    md_parts = ["# batchnorm lab", ""]
    if ctx.quick:
        html_parts.append(f"<p class='banner'>{html.escape(QUICK_BANNER)}</p>")
        md_parts += [f"> **{QUICK_BANNER}**", ""]
    if status:
        html_parts.append(f"<p class='banner'>{html.escape(status)}</p>")
        md_parts += [f"> **{status}**", ""]
    html_parts.append(
        f"<p class='meta'>Every number below was measured in this run: {html.escape(settings)}"
        f"{'; ' + html.escape(wall) if wall else ''}. Numbers are mean ± standard deviation over the seeds unless a "
        "line says it shows a 95 % interval; a difference is called resolved only when the 95 % interval of the "
        "per-seed differences excludes zero (batchnorm.lab.stats).</p>")
    md_parts += [f"Every number below was measured in this run: {settings}{'; ' + wall if wall else ''}. Numbers are "
                 "mean ± standard deviation over the seeds unless a line says it shows a 95 % interval; a difference "
                 "is called resolved only when the 95 % interval of the per-seed differences excludes zero "
                 "(batchnorm.lab.stats).", ""]

    # findings at a glance
    html_parts.append("<h2 id='glance'>Findings at a glance</h2><dl class='glance'>")
    md_parts += ["## Findings at a glance", ""]
    for seed, question, items in glance(done, order):
        html_parts.append(f"<dt>{html.escape(question)}"
                          + (f" <span class='meta'>(seeds/{seed})</span>" if seed else "") + "</dt>")
        md_parts.append(f"**{question}**" + (f" *(seeds/{seed})*" if seed else ""))
        md_parts.append("")
        for name, title, text in items:
            verdict, rest = split_verdict(text)
            lead_html = f"<b>{html.escape(verdict)}.</b> " if verdict else ""
            lead_md = f"**{verdict}.** " if verdict else ""
            html_parts.append(f"<dd>{lead_html}{html.escape(rest)} <a href='#{html.escape(name)}'>→ "
                              f"{html.escape(title)}</a></dd>")
            md_parts.append(f"- {lead_md}{rest} [→ {title}](#{name})")
        md_parts.append("")
    html_parts.append("</dl>")

    # table of contents: the titles carry their own numbers, so the list adds none
    html_parts.append("<nav><ul>" + "".join(
        f"<li><a href='#{html.escape(s['name'])}'>{html.escape(s['title'])}</a></li>" for s in sections) + "</ul></nav>")
    md_parts += [f"- [{s['title']}](#{s['name']})" for s in sections] + [""]

    results: dict[str, Any] = {
        "settings": {"seeds": ctx.seeds, "seed": ctx.seed, "quick": ctx.quick, "torch": torch.__version__,
                     "generated": when},
        "complete": not missing,
        "missing": missing,
        "total_seconds": total_seconds,
        "timings": {s["name"]: s["seconds"] for s in sections},
        "cpu_seconds": {s["name"]: s.get("cpu_seconds") for s in sections},
        "sections": {},
    }
    written: list[Path] = []
    for s in sections:
        failed = s["failed"]
        name = s["name"]
        html_parts.append(f"<section id='{html.escape(name)}'><h2>{html.escape(s['title'])}</h2>")
        html_parts.append(f"<p class='question'><b>Question.</b> {html.escape(s['question'])}</p>")
        html_parts.append(f"<div class='setup'><b>Setup.</b> {_paragraphs(s['setup'])}</div>")
        md_parts += [f"<a id='{name}'></a>", f"## {s['title']}", "", f"**Question.** {s['question']}", "",
                     f"**Setup.** {s['setup']}", ""]
        for t in s["tables"]:
            table = Table(t["headers"], t["rows"], t["caption"])
            html_parts.append(_table_html(table))
            md_parts += [_table_md(table), ""]
        for i, f in enumerate(s["figures"], 1):
            png = f["png"]
            path = out / f["file"]
            if not path.exists() or path.read_bytes() != png:
                _write(path, png)
            written.append(path)
            b64 = base64.b64encode(png).decode("ascii")
            html_parts.append(
                f"<figure><img alt='{html.escape(f['caption'])}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>Figure {i}. {html.escape(f['caption'])}</figcaption></figure>"
            )
            md_parts += [f"![{f['caption']}]({f['file']})", "", f"*Figure {i}. {f['caption']}*", ""]
        klass = "failed" if failed else "answer"
        html_parts.append(f"<div class='{klass}'><b>Answer.</b> {_paragraphs(s['answer'])}</div>")
        md_parts += [f"**Answer.** {s['answer']}", ""]
        for note in s["notes"]:
            html_parts.append(f"<pre>{html.escape(note)}</pre>" if failed else f"<p class='meta'>{html.escape(note)}</p>")
            md_parts += [("```\n" + note + "\n```") if failed else f"*{note}*", ""]
        if s["seconds"] is not None:
            cpu = f" (CPU time {s['cpu_seconds']:.1f} s)" if s.get("cpu_seconds") is not None else ""
            html_parts.append(f"<p class='meta'>Wall time: {s['seconds']:.1f} s{cpu}.</p>")
            md_parts += [f"*Wall time: {s['seconds']:.1f} s{cpu}.*", ""]
        html_parts.append("</section>")
        results["sections"][name] = {k: v for k, v in s.items() if k != "figures"} | {
            "figures": [{"caption": f["caption"], "file": f["file"]} for f in s["figures"]]}
    html_parts.append("</body></html>")
    paths = [out / "report.html", out / "report.md", out / "results.json"]
    _write(paths[0], "\n".join(html_parts))
    _write(paths[1], "\n".join(md_parts))
    _write(paths[2], json.dumps(_jsonable(results), indent=1, allow_nan=False))
    return paths + written


def load_rendered(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read back ``results.json`` and the figure PNGs of an earlier run: ``(top-level dict, {name: rendered})``.

    Sections whose PNG files are missing are left out. Returns empty dicts when there is no readable report.
    """
    path = Path(out) / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    done: dict[str, dict[str, Any]] = {}
    for name, sec in (data.get("sections") or {}).items():
        try:
            figures = [{"caption": f["caption"], "file": f["file"], "png": (Path(out) / f["file"]).read_bytes()}
                       for f in sec.get("figures", [])]
            done[name] = dict(sec) | {"figures": figures}
        except (OSError, KeyError, TypeError):
            continue
    return data, done
