"""``batchnorm bench``: the ``--shape`` rows a user adds (structure and errors only; no timing is asserted)."""

from __future__ import annotations

import pytest

from batchnorm import bench


@pytest.mark.parametrize(
    "spec,name",
    [("8,4,5", "train (8, 4, 5)"), ("4,3,6,6:cl", "train (4, 3, 6, 6) cl"), ("6,5,3:last:relu", "train (6, 5, 3) last relu")],
)
def test_shape_spec_builds_one_runnable_side_by_side_row(spec, name):
    rows = bench._custom_row(spec)
    assert list(rows) == [name]
    fns = rows[name]()
    assert set(fns) == {"ours", "torch"}
    for fn in fns.values():
        fn()  # one training step of each contender runs


@pytest.mark.parametrize(
    "spec,match",
    [("3,x", "--shape expects integers like 16,32,64,64"), ("8", "need at least 2 dims"),
     ("2,3,4:cl", "flags from :cl \\(4-D only\\)"), ("2,3:fast", "got \\['fast'\\]")],
)
def test_bad_shape_spec_says_what_is_expected(spec, match):
    with pytest.raises(SystemExit, match=match):
        bench._custom_row(spec)


def test_main_with_shape_prints_only_that_row(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--shape", "8,4,5", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train (8, 4, 5)" in text and "train (64,64,56,56)" not in text and "first call" not in text
    assert out.exists()
