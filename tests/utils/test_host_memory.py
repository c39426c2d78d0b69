"""Freed CPU memory stays in the process: the next large allocation reuses it without page faults."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conchshell.utils import host_memory

ROOT = Path(__file__).resolve().parents[2]
# Allocates and touches a 256 MiB tensor, frees it, then touches a 128 MiB one; prints
# whether the first block came from the heap (not its own mmap), the minor page faults of
# the second allocation and whether the setting was applied.
PROBE = """
import json, resource, torch
from conchshell.utils.host_memory import keep_freed_memory
applied = keep_freed_memory()
def heap_range():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = line.split()[0].split("-")
            return int(start, 16), int(end, 16)
    return 0, 0
big = torch.empty(64 * 1024 * 1024, dtype=torch.float32)
big.fill_(1.0)
low, high = heap_range()
in_heap = low <= big.data_ptr() < high
del big
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
smaller = torch.empty(32 * 1024 * 1024, dtype=torch.float32)
smaller.fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "in_heap": in_heap, "faults": faults}))
"""
SMALLER_PAGES = 128 * 1024 * 1024 // 4096


def run_probe(opt_out: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT_VARIABLE}
    if opt_out is not None:
        env[host_memory.OPT_OUT_VARIABLE] = opt_out
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="not glibc")
def test_reallocation_reuses_freed_memory_without_page_faults():
    kept = run_probe(None)
    assert kept["applied"] is True and kept["in_heap"] is True
    assert kept["faults"] < SMALLER_PAGES // 20
    # The control: the system default maps the block on its own, unmaps it on free and
    # faults every page of the next one in again.
    default = run_probe("1")
    assert default["applied"] is False and default["in_heap"] is False
    assert default["faults"] > SMALLER_PAGES // 2


def test_opt_out_variable_values():
    assert run_probe("0")["applied"] is (host_memory._glibc() is not None)


def test_release_free_memory_hands_back_kept_pages():
    probe = (
        "import json, torch\n"
        "from conchshell.utils.host_memory import keep_freed_memory, release_free_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "keep_freed_memory()\n"
        "block = torch.ones(64 * 1024 * 1024)\n"
        "del block\n"
        "kept = rss()\n"
        "released = release_free_memory()\n"
        "print(json.dumps({'released': released, 'drop': kept - rss()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if host_memory._glibc() is None:
        assert result["released"] is False
    else:
        assert result["released"] is True and result["drop"] > 200 * 1024 * 1024


def _load(path: Path, monkeypatch):
    name = f"entry_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _Stop(Exception):
    pass


def test_every_entry_point_keeps_freed_memory(tmp_path, monkeypatch):
    """Each command line turns the setting on before its work; each run here then fails
    fast on a bad argument."""
    calls = []

    def record():
        calls.append(True)
        return True

    monkeypatch.setattr(host_memory, "keep_freed_memory", record)  # train.py imports it late
    tiny = str(ROOT / "configs" / "tiny.yaml")
    missing = str(tmp_path / "missing")
    runs = {
        "train.py": ["--config", tiny, "--out", str(tmp_path / "run"), "train.max_steps=0", "train.device=cpu"],
        "inference.py": ["--img_path", missing + ".jpg", "--out", str(tmp_path / "out.wav")],
        "scripts/evaluate.py": ["--generated", missing, "--reference", missing, "--out", str(tmp_path / "eval")],
        "scripts/extract_features.py": ["--config", tiny, "--out", str(tmp_path / "cache"), "--batch-size", "0"],
    }
    for script, argv in runs.items():
        module = _load(ROOT / script, monkeypatch)
        if hasattr(module, "keep_freed_memory"):
            monkeypatch.setattr(module, "keep_freed_memory", record)
        before = len(calls)
        assert module.main(argv) != 0, script
        assert len(calls) == before + 1, f"{script} did not keep freed memory"
    benchmark = _load(ROOT / "scripts" / "benchmark.py", monkeypatch)
    monkeypatch.setattr(benchmark, "keep_freed_memory", record)
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda *args: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        benchmark.main(["--levels", "", "--train-levels", ""])
    assert len(calls) == len(runs) + 1
