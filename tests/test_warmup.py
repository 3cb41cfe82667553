"""The background warm-up across processes: one compile per cache directory, no orphans, a cache that heals,
numba without a writable cache, crossovers measured here (issue 19).

Cost: every test runs real processes with ``BATCHNORM_WARMUP_KERNELS=smoke`` (the float32 2-D training forward
only). The suite pays for one smoke compile (the module fixture, four processes sharing one empty cache), a
partial recompile (the healing test) and one uncached compile (no writable cache); the other tests copy the
fixture's cache. Every process is bounded by a timeout and killed if it overruns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from batchnorm.kernels import dispatch, warmup

pytestmark = [
    pytest.mark.skipif(not warmup.HAS_NUMBA, reason="numba is not installed"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)"),
]

PARENT = textwrap.dedent("""
    import json, os, sys, time, torch, batchnorm
    from batchnorm.kernels import dispatch, warmup
    layer, x = batchnorm.BatchNorm(16), torch.randn(8, 16)
    layer(x).sum().backward()
    first = dispatch.chosen(layer, x)
    before = dispatch.decision_state()
    ready = dispatch.wait_ready(float(sys.argv[1]))
    calibrated = warmup.wait_calibrated(float(sys.argv[2])) if len(sys.argv) > 2 else None
    ghost = batchnorm.GhostBatchNorm(16, virtual_batch_size=4)
    print(json.dumps({"first": first, "ready": ready, "calibrated": calibrated, "pid": os.getpid(),
                      "ghost": dispatch.chosen(ghost, x), "state_changed": dispatch.decision_state() != before,
                      "version": warmup.table_version(), "detail": warmup.warm_up_status(detail=True)}, default=str))
""")


def _env(cache: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHNORM_BACKEND", "NUMBA_CACHE_LOCATOR_CLASSES")}
    env.update(NUMBA_CACHE_DIR=cache, BATCHNORM_WARMUP="process", BATCHNORM_WARMUP_KERNELS="smoke",
               BATCHNORM_CALIBRATE="0", PYTHONWARNINGS="default")
    env.update(extra)
    return env


def _start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a warm-up process ran past {timeout} s; stderr: {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _warnings(err: str, needle: str) -> list[str]:
    """The RuntimeWarnings on ``err`` that contain ``needle`` (from the needle on, up to the first ' (')."""
    hits = [line.split("RuntimeWarning: batchnorm: ", 1)[1] for line in err.splitlines()
            if "RuntimeWarning: batchnorm: " in line and needle in line]
    return [h.split(" (", 1)[0] if h.startswith("removed") else h for h in hits]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _children_of(directory: str) -> list[int]:
    """Pids of warm-up children working on ``directory`` (read from their environment)."""
    needle = f"BATCHNORM_WARMUP_DIR={directory}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and _alive(int(entry)):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _gone_within(directory: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = _children_of(directory)
        if not left:
            return []
        time.sleep(0.2)
    return _children_of(directory)


def _numba_dir(root: str) -> str:
    (sub,) = [d for d in os.listdir(root) if d.startswith("numba_")]
    return os.path.join(root, sub)


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    """Four processes started together on one empty cache dir, plus one that exits after its first call."""
    root = str(tmp_path_factory.mktemp("shared-cache"))
    env = _env(root, BATCHNORM_WARMUP_PRIORITY="normal")  # SCHED_IDLE waits for idle CPU: see the kill -9 test
    leaver = subprocess.Popen([sys.executable, "-c", "import time, torch, batchnorm\n"
                               "batchnorm.BatchNorm(16)(torch.randn(8, 16)); time.sleep(1.0)"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [_start(env, "500") for _ in range(4)]
    results = [_finish(p) for p in procs]
    leaver.communicate(timeout=60)
    left = _gone_within(root, 5.0)
    return {"root": root, "results": results, "left": left, "dir": _numba_dir(root)}


def test_four_processes_share_one_compile_and_leave_no_process(smoke_cache):
    outs = [r for r, _ in smoke_cache["results"]]
    assert all(r["first"] == "native" for r in outs)  # the first call never waited for numba
    assert all(r["ready"] and r["detail"]["state"] == "ready" and r["ghost"] == "numba" for r in outs)
    compiles = [r["detail"]["compile"] for r in outs if "compile" in r["detail"]]
    compiled = [c for c in compiles if c["result"].startswith("compiled")]
    assert len(compiled) == 1, compiles  # the others' children found the cache complete, or no child started
    assert all(c["result"].startswith("complete already") for c in compiles if c not in compiled)
    spans = sorted((c["start"], c["end"]) for c in compiles)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans  # one at a time
    assert smoke_cache["left"] == []  # no warm-up process outlived its parent by 5 s
    with open(os.path.join(smoke_cache["dir"], warmup.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["kernels"] == "smoke" and manifest["files"]


def test_a_complete_cache_loads_without_a_process_and_adopts_measured_crossovers(smoke_cache, tmp_path):
    root = str(tmp_path / "cache")
    shutil.copytree(smoke_cache["root"], root)
    (out, _), = [_finish(_start(_env(root, BATCHNORM_CALIBRATE="1", BATCHNORM_WARMUP_PRIORITY="normal"), "300", "300"))]
    d = out["detail"]
    assert out["ready"] and "compile" not in d and d["reason"].startswith("loaded from the cache")
    assert out["calibrated"] and d["calibrate"]["result"] == "measured"
    assert d["crossovers"].startswith("measured on this machine") and out["version"] == 1
    assert out["state_changed"]  # a layer's cached choice is re-made once the measured table is in
    stored = json.load(open(os.path.join(_numba_dir(root), "batchnorm-crossovers.json")))
    (entry,) = stored.values()
    assert d["table"]["train,inner"] == entry["table"]["train,inner"]
    again, _ = _finish(_start(_env(root, BATCHNORM_CALIBRATE="1"), "300", "300"))
    assert "calibrate" not in again["detail"] and "compile" not in again["detail"]  # stored: no process at all
    assert again["detail"]["table"] == d["table"]


def test_truncated_cache_files_are_removed_recompiled_and_warned_about_once(smoke_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_WARMUP_KERNELS", "smoke")
    root = str(tmp_path / "cache")
    shutil.copytree(smoke_cache["root"], root)
    cache = _numba_dir(root)
    files = sorted(f for f in os.listdir(cache) if f.endswith((".nbc", ".nbi")))
    nbi = next(f for f in files if f.endswith(".nbi"))
    nbc = next(f for f in files if f.endswith(".nbc") and not f.startswith(nbi.rsplit(".nbi", 1)[0]))
    for name in (nbi, nbc):
        path = os.path.join(cache, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    out, err = _finish(_start(_env(root, BATCHNORM_WARMUP_PRIORITY="normal"), "500"))  # the priority: test above
    d = out["detail"]
    assert out["ready"] and d["state"] == "ready" and out["ghost"] == "numba"
    assert sorted(d["healed"]) == sorted([nbi, nbc]) and d["compile"]["result"].startswith("compiled")
    assert _warnings(err, "corrupt numba cache file") == [f"removed 2 corrupt numba cache file(s) in {cache}"]
    assert warmup.cache_complete(cache) == (True, "")


def test_a_signature_compiled_later_does_not_mark_the_cache_incomplete(smoke_cache, tmp_path, monkeypatch):
    """A process that compiles a signature the warm-up did not (float64 here) appends it to the kernel's
    index; the next process must still load the cache without a compile process."""
    monkeypatch.setenv("BATCHNORM_WARMUP_KERNELS", "smoke")
    root = str(tmp_path / "cache")
    shutil.copytree(smoke_cache["root"], root)
    cache = _numba_dir(root)
    before = warmup.cache_files(cache)
    code = ("import torch, batchnorm\n"
            "batchnorm.BatchNorm(16, backend='numba')(torch.randn(8, 16, dtype=torch.float64)).sum().backward()")
    subprocess.run([sys.executable, "-c", code], env=_env(root, BATCHNORM_WARMUP="off"), check=True, timeout=300,
                   capture_output=True)
    after = warmup.cache_files(cache)
    assert any(after.get(n, 0) > size for n, size in before.items() if n.endswith(".nbi"))  # an index grew
    assert warmup.cache_complete(cache) == (True, "")
    out, _ = _finish(_start(_env(root, BATCHNORM_WARMUP_PRIORITY="normal"), "300"))
    assert out["ready"] and "compile" not in out["detail"]
    assert out["detail"]["reason"].startswith("loaded from the cache")
    victim = next(n for n in after if n.endswith(".nbc"))  # a data file that changes is still a partial cache
    with open(os.path.join(cache, victim), "ab") as f:
        f.write(b"x")
    assert warmup.cache_complete(cache) == (False, f"cache file {victim} changed since it was compiled")


def test_without_a_writable_cache_numba_still_runs_with_one_warning(tmp_path):
    env = _env("/dev/null/no-cache-here", NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator")
    out, err = _finish(_start(env, "500"))
    d = out["detail"]
    assert out["ready"] and d["cache_dir"] is None and "uncached" in d["reason"]
    assert out["ghost"] == "numba"  # masked / ghost / renorm layers are not left on the composite path
    (warning,) = _warnings(err, "no writable place for its kernel cache")
    assert "Set NUMBA_CACHE_DIR" in warning


def test_the_compile_process_dies_with_its_parent_after_kill_9(tmp_path):
    root = str(tmp_path / "cache")
    code = textwrap.dedent("""
        import sys, time, torch, batchnorm
        from batchnorm.kernels import warmup
        batchnorm.BatchNorm(16)(torch.randn(8, 16))
        while not warmup.warm_up_status(detail=True)["child"]:
            time.sleep(0.05)
        print(warmup.warm_up_status(detail=True)["child"], flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], env=_env(root), stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        with open(f"/proc/{child}/environ", "rb") as f:  # one thread, no spinning OpenMP team
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env[b"NUMBA_NUM_THREADS"] == env[b"OMP_NUM_THREADS"] == b"1" and env[b"OMP_WAIT_POLICY"] == b"PASSIVE"
        deadline = time.monotonic() + 10.0  # the child lowers its own priority first thing
        while os.sched_getscheduler(child) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.sched_getscheduler(child) == os.SCHED_IDLE
        assert os.getpgid(child) == os.getpgid(parent.pid)  # Ctrl-C and a killed process group reach it
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 5.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the compile process outlived its killed parent by 5 s"
    finally:
        parent.kill()
        parent.wait(timeout=30)
        for pid in _children_of(root):
            os.kill(pid, signal.SIGKILL)


def test_adopting_a_table_changes_the_decision_state_and_the_choice(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "CROSSOVER_BYTES", dict(dispatch.CROSSOVER_BYTES))
    monkeypatch.setattr(warmup, "_info", dict(warmup._info))
    monkeypatch.setattr(warmup, "_table_version", warmup._table_version)
    from batchnorm import BatchNorm

    layer, x = BatchNorm(16), torch.randn(8, 16)  # 512 B: native under the built-in table
    if not dispatch.wait_ready(600):
        pytest.skip("numba is not usable in this process")
    before = dispatch.decision_state()
    assert dispatch.chosen(layer, x) == "native"
    warmup.adopt({("train", "inner"): 256}, "test table")
    assert dispatch.decision_state() != before
    assert dispatch.chosen(layer, x) == "numba"
    assert warmup.warm_up_status(detail=True)["crossovers"] == "test table"
    monkeypatch.setenv("BATCHNORM_BACKEND", "native")  # forcing still wins over any table
    assert dispatch.chosen(layer, x) == "native"


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# (label, environment changes, allocator() expected in a fresh process)
ALLOCATOR_CASES = [
    ("glibc", {}, "glibc"),
    ("glibc tunables", {"MALLOC_MMAP_THRESHOLD_": "4294967296"}, "glibc (MALLOC_MMAP_THRESHOLD_=4294967296)"),
    ("GLIBC_TUNABLES", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
     "glibc (GLIBC_TUNABLES=glibc.malloc.trim_threshold=1)"),
    ("jemalloc preloaded", {"LD_PRELOAD": JEMALLOC}, "jemalloc"),
]


@pytest.mark.parametrize("label, env, expected", ALLOCATOR_CASES, ids=[c[0] for c in ALLOCATOR_CASES])
def test_stored_crossovers_are_keyed_by_the_allocator(label, env, expected):
    """The allocator changes native's per-call cost (fresh zero-filled pages or reused heap), so a table measured
    with one malloc is not adopted under another: the key names it (read from the process's own mappings)."""
    if "LD_PRELOAD" in env and not os.path.exists(env["LD_PRELOAD"]):
        pytest.skip("libjemalloc2 is not installed here")
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    code = ("from batchnorm.kernels import calibrate; import sys; "
            "print(calibrate.allocator()); print(calibrate.key((1, 1)))")
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    alloc, key = out.stdout.splitlines()[-2:]
    assert alloc == expected
    assert key.endswith(f"| threads 1/1 | malloc {expected}")


def test_the_interpreter_exit_stops_the_warm_up_between_kernels_and_waits_for_the_one_in_progress(monkeypatch):
    """A script that ends while the warm-up thread runs numba's kernels must not tear the process down under it
    (that aborted with "terminate called without an active exception", status -6): ``_at_exit`` sets the stop flag,
    which the loader checks before each kernel, and waits for the kernel in progress."""
    pytest.importorskip("numba")
    from batchnorm.kernels.numba import backend as nb

    assert nb.warm_up("all", stop=lambda: True) is False  # stopped before its first kernel
    monkeypatch.setattr(warmup, "_exiting", threading.Event())
    monkeypatch.setattr(warmup, "_in_kernels", threading.Lock())
    warmup._in_kernels.acquire()  # a kernel in progress in the warm-up thread
    done: list[float] = []

    def finish_kernel():
        time.sleep(0.3)
        done.append(time.monotonic())
        warmup._in_kernels.release()

    threading.Thread(target=finish_kernel).start()
    warmup._at_exit()
    assert warmup._exiting.is_set() and done and time.monotonic() >= done[0]
    with pytest.raises(warmup._Exiting, match="exiting"):  # no kernel starts after the exit began
        warmup._load_here()
