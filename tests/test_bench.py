"""``batchnorm bench``: the sweep, model, fixed-cost and ``--shape`` rows build and run (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from batchnorm import bench
from batchnorm.kernels import calibrate as _cal
from batchnorm.kernels import dispatch

# ------------------------------------------------------------------ the sweep covers what issue 11 asks for


def test_sweep_spans_the_sizes_ranks_and_layouts_the_issue_asks_for():
    sweep = bench.SWEEP
    assert len(sweep) >= 30
    assert len({c.name for c in sweep}) == len(sweep), "row names must be unique (they key the results)"
    sizes = [c.nbytes for c in sweep]
    assert min(sizes) <= 1024 and max(sizes) >= 200 * 10**6
    assert {len(c.shape) for c in sweep} == {2, 3, 4, 5}
    assert {len(c.shape) for c in sweep if c.layout == "cl"} == {4, 5}
    assert any(c.layout == "last" for c in sweep)
    for name in ("train (64, 64, 56, 56)", "train (64, 64, 56, 56) cl", "train (32, 256, 28, 28)"):
        assert name in {c.name for c in sweep} and bench.TARGETS[name] == 0.5


def _tiny(case: bench.Case) -> bench.Case:
    """The same rank and layout at toy size (features kept distinct from the other dims)."""
    shape = [min(d, 3) for d in case.shape]
    shape[case.axis] = 5
    shape[0] = 4
    return bench.Case(tuple(shape), case.layout, case.activation)


@pytest.mark.parametrize("case", sorted({_tiny(c) for c in bench.SWEEP}, key=lambda c: c.name), ids=lambda c: c.name)
def test_every_sweep_kind_builds_and_runs_both_contenders(case):
    row = bench.train_row(case)
    assert set(row.fns) == {"ours", "torch"}
    for fn in row.fns.values():
        fn()
    if case.layout == "cl":
        assert not row.x.is_contiguous() and row.x.is_contiguous(
            memory_format=torch.channels_last if row.x.dim() == 4 else torch.channels_last_3d)
    assert row.backend() in dispatch.available() or row.backend() == "?"


@pytest.mark.parametrize("case", [bench.Case((4, 3, 5), "last"), bench.Case((4, 5, 3, 3), "cl"), bench.Case((6, 5))],
                         ids=lambda c: c.name)
def test_both_contenders_compute_the_same_input_gradient(case):
    """Else the timing would compare different work (torch gets axis=-1 input through a transpose)."""
    row = bench.train_row(case)
    grads = []
    for name in ("ours", "torch"):
        row.fns[name]()
        grads.append(row.x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ models and fixed cost


@pytest.mark.parametrize("name", list(bench.MODELS))
def test_model_rows_build_and_take_a_training_step_at_toy_size(name):
    try:
        row = bench.model_row(name, small=True)
    except bench._Skip as why:  # pragma: no cover - only without batchnorm.zoo
        pytest.skip(str(why))
    from batchnorm.layers import BatchNorm

    ours_layers = [m for m in row.layer.modules() if isinstance(m, BatchNorm)]
    assert ours_layers, "the converted model must hold our layers"
    params = [p.detach().clone() for p in row.layer.parameters()]
    for fn in row.fns.values():
        fn()
    moved = [not torch.equal(a, b.detach()) for a, b in zip(params, row.layer.parameters())]
    assert any(moved), "the optimizer step must change our model's parameters"
    summary = row.backend()
    counts = [int(n) for n in re.findall(r" x(\d+)", summary)]
    assert sum(counts) == len(ours_layers), summary


def test_fixed_cost_row_has_every_backend_and_auto():
    row = bench.fixed_cost_row((8, 16))
    assert set(row.fns) == {"torch", "auto", *dispatch.available()}
    for fn in row.fns.values():
        fn()
    assert row.backend() in dispatch.available()  # what "auto" chose for the tiny batch


def test_side_by_side_adds_rounds_for_cheap_rows_up_to_its_cap():
    s = bench.side_by_side({"a": lambda: None, "b": lambda: None}, repeats=3, min_time=10.0)
    assert len(s["a"]) == len(s["b"]) == 200


def test_side_by_side_rotates_and_returns_one_sample_per_round():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    s = bench.side_by_side(fns, repeats=3, warmup=0, budget=0.0, min_time=0)
    assert {k: len(v) for k, v in s.items()} == {"a": 3, "b": 3, "c": 3}
    timed = order[3:]  # the first three calls measure one call each to size the rounds
    assert timed == list("abcbcacab")


# ------------------------------------------------------------------ --shape rows


@pytest.mark.parametrize(
    "spec,name",
    [("8,4,5", "train (8, 4, 5)"), ("4,3,6,6:cl", "train (4, 3, 6, 6) cl"), ("6,5,3:last:relu", "train (6, 5, 3) axis=-1 +relu"),
     ("2,3,2,2,2:cl", "train (2, 3, 2, 2, 2) cl")],
)
def test_shape_spec_builds_one_runnable_side_by_side_row(spec, name):
    rows = bench._custom_row(spec)
    assert list(rows) == [name]
    row = rows[name]()
    assert set(row.fns) == {"ours", "torch"}
    for fn in row.fns.values():
        fn()  # one training step of each contender runs


@pytest.mark.parametrize(
    "spec,match",
    [("3,x", "--shape expects integers like 16,32,64,64"), ("8", "need at least 2 dims"),
     ("2,3,4:cl", "flags from :cl \\(4-D or 5-D only\\)"), ("2,3:fast", "got \\['fast'\\]"),
     ("2,3,4,4:cl:last", ":last \\(not with :cl\\)")],
)
def test_bad_shape_spec_says_what_is_expected(spec, match):
    with pytest.raises(SystemExit, match=match):
        bench._custom_row(spec)


def test_main_with_shape_prints_only_that_row_and_writes_json(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--shape", "8,4,5", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train (8, 4, 5)" in text and "train (64, 64, 56, 56)" not in text and "first call" not in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["train (8, 4, 5)"]
    assert rows[0]["bytes"] == 4 * 8 * 4 * 5 and math.isclose(rows[0]["ratio"], rows[0]["ours_ms"] / rows[0]["torch_ms"])


def test_main_sweep_rows_filter_runs_the_chosen_sweep_rows(capsys):
    assert bench.main(["--sweep", "--rows", "(8, 16);(2, 4, 4, 4, 4)", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "train (8, 16) " in text and "train (2, 4, 4, 4, 4)" in text and "model" not in text


# ------------------------------------------------------------------ --help


def test_help_is_plain_words_and_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    assert ":class:" not in text and "``" not in text and ":func:" not in text
    parser = bench._parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    for opt in ("--sweep", "--models", "--fixed", "--calibrate", "--quick", "--shape", "--rows", "--backend"):
        assert opt in text


# ------------------------------------------------------------------ --calibrate


@pytest.mark.parametrize(
    "native,numba,expected",
    [([1, 1, 1, 1], [2, 2, 0.5, 0.5], 4), ([1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], 1), ([1, 1, 1, 1], [2, 2, 2, 2], None),
     ([1, 1, 1, 1, 1], [2, 0.5, 2, 0.5, 0.5], 4), ([1, 1, 1, 1, 1], [2, 2, 0.5, 0.5, 2], None),
     ([1, 1, 1, 1], [0.97, 0.98, 0.96, 0.97], None), ([1, 1, 1, 1], [2, 0.93, 0.85, 0.85], 4)],
    ids=["clean", "always numba", "never numba", "one noisy point smoothed", "native wins at the top",
         "a tie stays on native", "numba must win by the margin"],
)
def test_crossover_rule(native, numba, expected):
    sizes = [1 << k for k in range(len(native))]
    assert bench.crossover(sizes, native, numba) == expected


def test_others_busy_is_the_share_of_the_machine_used_by_other_processes():
    assert _cal.others_busy((10.0, 1.0), (13.0, 2.0), 2.0, 2) == 0.5
    assert _cal.others_busy((10.0, 1.0), (11.0, 2.0), 2.0, 2) == 0.0  # all of it ours
    assert _cal.others_busy(None, (11.0, 2.0), 2.0, 2) == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_a_busy_neighbour_is_seen_by_the_calibration():
    """What decides whether a measured table is stored (``others_busy > BUSY``): one spinning process."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.3)
        before, t0 = _cal.cpu_snapshot(), time.monotonic()
        time.sleep(1.0)
        busy = _cal.others_busy(before, _cal.cpu_snapshot(), time.monotonic() - t0)
    finally:
        spin.kill()
        spin.wait(timeout=10)
    assert busy > _cal.BUSY * min(1.0, 2 / (os.cpu_count() or 1))  # one of the machine's CPUs was taken


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
@pytest.mark.skipif((os.cpu_count() or 1) > 4, reason="one spinning process is under BUSY of a machine this large")
def test_the_calibration_measures_nothing_on_a_busy_machine():
    """The background calibration runs at normal priority, so it must start only on an idle machine: with a
    neighbour spinning, :func:`calibrate.measure` stops before its first ladder and returns no table."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.3)
        res = _cal.measure(repeats=1, sizes=(1 << 12,), keys=[("train", "inner")], idle_probe=1.0)
    finally:
        spin.kill()
        spin.wait(timeout=10)
    assert res["table"] == {} and res["ladder"] == []
    assert res["stopped"] == "the machine was busy before the train,inner ladder" and res["others_busy"] > _cal.BUSY


@pytest.mark.parametrize("lay", ["inner", "cl", "outer", "short"])
@pytest.mark.parametrize("nbytes", [1 << 12, 1 << 16, 1 << 20])
def test_calibration_shapes_have_the_size_and_layout_class_they_stand_for(lay, nbytes):
    x, axis = _cal.calibration_input(lay, nbytes)
    assert (tuple(x.shape), axis) == bench.calibration_shape(lay, nbytes)
    assert 4 * x.numel() == nbytes
    assert dispatch.layout(x, axis) == lay


@pytest.mark.parametrize("make,axis,want", [
    (lambda: torch.zeros(8, 4), 1, "inner"),
    (lambda: torch.zeros(8, 4, 3, 3).to(memory_format=torch.channels_last), 1, "cl"),
    (lambda: torch.zeros(2, 4, 3, 3, 3).to(memory_format=torch.channels_last_3d), 1, "cl"),
    (lambda: torch.zeros(8, 5, 4).transpose(1, 2), 1, "cl"),  # channels-last 1-D: (N, L, C) seen as (N, C, L)
    (lambda: torch.zeros(8, 3, 3, 4), -1, "inner"),  # axis=-1: the (N*H*W, C) view native runs
    (lambda: torch.zeros(8, 4, 3, 3), 1, "short"),  # NCHW rows of 9 values
    (lambda: torch.zeros(8, 4, 31), 1, "short"),
    (lambda: torch.zeros(8, 4, 32), 1, "outer"),  # rows of dispatch.SHORT_ROWS values
    (lambda: torch.zeros(8, 4, 8, 8), 1, "outer"),
    (lambda: torch.zeros(2, 4, 5, 5), 1, "short"),
    (lambda: torch.zeros(2, 4, 6, 6), 1, "outer"),
    (lambda: torch.zeros(1, 4, 1, 1), 1, "inner"),  # one value per feature: any layout is "innermost"
])
def test_layout_classes_of_the_cost_table(make, axis, want):
    assert dispatch.layout(make(), axis) == want


def test_calibrate_prints_a_table_with_every_key_of_the_dispatch_table(capsys, tmp_path):
    if "numba" not in dispatch.available():
        pytest.skip("numba is not installed")
    out = tmp_path / "cal.json"
    res = bench.calibrate(repeats=1, out=str(out), sizes=(1 << 12, 1 << 14))
    text = capsys.readouterr().out
    block = text[text.index("CROSSOVER_BYTES"):]
    block = block[: block.index("}") + 1]
    namespace: dict = {}
    exec(block, namespace)  # the printed table is valid Python, pasteable over the old one
    table = namespace["CROSSOVER_BYTES"]
    assert set(table) == set(dispatch.CROSSOVER_BYTES)
    assert all(isinstance(v, int) and v > 0 for v in table.values())
    assert json.loads(out.read_text())["table"] == res["table"]
    assert len(res["ladder"]) == 2 * len(dispatch.CROSSOVER_BYTES)


def test_markdown_of_a_saved_run_has_one_line_per_row_and_says_missed(capsys, tmp_path):
    out = tmp_path / "run.json"
    assert bench.main(["--sweep", "--rows", "(8, 16);(32, 64)", "--repeats", "1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    saved["rows"][0].update(ratio=2.0, met=False)  # pretend the first row missed its target
    out.write_text(json.dumps(saved))
    capsys.readouterr()
    assert bench.main(["--markdown", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(saved["rows"])
    assert "| (8, 16) | 512 B |" in lines[2] and "**missed**" in lines[2] and "2.00" in lines[2]
    assert all(r["backend"] in lines[2 + i] for i, r in enumerate(saved["rows"]))


def test_the_calibration_measures_both_allocator_states_and_takes_numba_only_where_neither_is_slower():
    """In a process of its own (heap reuse is permanent there): a two-pass measure under glibc's defaults has a
    second ladder with ``"malloc": "heap reuse"``, and its table is what :func:`calibrate.crossover` gives for the
    two passes together; under another allocator (tunables set) there is one pass."""
    if "numba" not in dispatch.available():
        pytest.skip("numba is not installed")
    code = textwrap.dedent("""
        import json
        from batchnorm.kernels import calibrate, dispatch
        assert dispatch.wait_ready(600)
        sizes = (1 << 14, 1 << 16, 1 << 18)
        res = calibrate.measure(1, sizes, [("train", "inner")], idle_probe=0, point_s=0, busy_limit=1.0,
                                reuse_pass=True)
        rows = [r for r in res["ladder"] if r.get("malloc") == "heap reuse"]
        first = [r for r in res["ladder"] if "malloc" not in r]
        want = calibrate.crossover(list(sizes), [r["native_ms"] for r in first], [r["numba_ms"] for r in first],
                                   reuse=([r["native_ms"] for r in rows], [r["numba_ms"] for r in rows]) if rows
                                   else None, reuse_below=calibrate.GLIBC_MMAP_MAX)
        print(json.dumps({"passes": res["passes"], "reuse_rows": len(rows), "first_rows": len(first),
                          "table": res["table"][("train", "inner")], "want": want or calibrate.NEVER,
                          "alloc": calibrate.allocator()}))
    """)
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES",
                                                                                          "LD_PRELOAD"))}
    for extra, passes in (({}, 2), ({"MALLOC_TOP_PAD_": "131072"}, 1)):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["passes"] == passes, res
        assert res["first_rows"] == 3 and res["reuse_rows"] == (3 if passes == 2 else 0), res
        assert res["table"] == res["want"], res
