"""benchmarks/device_check.py: its table has a row per path asked for, each ok; a failing path is a FAILED row with
its reason that stops neither the others nor the table, and fails the exit code; a skipped one does not."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_table_has_a_row_per_path_and_each_is_ok():
    paths = ["float32", "int8", "edit", "train"]
    p = subprocess.run([sys.executable, str(BENCHMARKS / "device_check.py"), "--device", "cpu", "--no-timing",
                        "--only", ",".join(paths)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| path")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == paths, p.stdout
    assert all(r.split(" | ")[1] == "ok" for r in rows), p.stdout
    assert "first token vs float32" in rows[1] and "output 64x64" in rows[2] and "weights moved" in rows[3]
    assert "4 of 4 paths ok or skipped" in p.stdout


def test_a_failed_path_fails_the_exit_code_and_a_skipped_one_does_not(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    dc = importlib.import_module("device_check")

    def broken(self):
        raise RuntimeError("kernel missing\nsecond line")

    def absent(self):
        raise dc.Skip("no such hardware")

    monkeypatch.setattr(dc.Checks, "int8", broken)
    monkeypatch.setattr(dc.Checks, "fp8", absent)
    assert dc.main(["--device", "cpu", "--no-timing", "--only", "fp8,int8,float32"]) == 1
    out = capsys.readouterr().out
    assert "| fp8 | skipped: no such hardware |" in out
    assert "| int8 | FAILED |" in out and "RuntimeError: kernel missing |" in out
    assert "| float32 | ok |" in out  # after the failure
    assert "FAILED: int8" in out

    monkeypatch.setattr(dc.Checks, "int8", absent)
    assert dc.main(["--device", "cpu", "--no-timing", "--only", "int8,fp8"]) == 0
