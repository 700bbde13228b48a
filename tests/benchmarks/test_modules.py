"""The benchmarks are modules of the ``benchmarks`` package, run as ``python -m benchmarks.X`` from
the repository root: no ``sys.path`` edits, no private helpers imported across scripts, and the
documented commands use the module form."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
MAINS = sorted(p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_no_sys_path_edits_or_private_cross_imports():
    assert {"bench_decode", "bench_verify", "tune", "kv_capacity", "report", "plot"} <= set(MAINS)
    for p in BENCH.glob("*.py"):
        text = p.read_text()
        assert "sys.path" not in text, p.name
        assert not re.search(r"from benchmarks\.\w+ import [^\n]*\b_\w", text), p.name


def test_every_script_runs_as_a_module():
    """``python -m benchmarks.<name> --help`` for every script, in one interpreter (runpy is what
    ``-m`` uses), from the repository root with nothing added to the import path."""
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = ['benchmarks.' + name, '--help']\n"
            "    try:\n"
            "        runpy.run_module('benchmarks.' + name, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (name, e.code)\n"
            "    print('OK', name, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    scripts = [m for m in MAINS if m != "plot"]      # plot takes file names, no --help
    proc = subprocess.run([sys.executable, "-c", code, *scripts], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^OK (\w+)$", proc.stdout, re.M) == scripts, proc.stdout[-2000:]


def test_documented_commands_use_the_module_form():
    for doc in (ROOT / "README.md", BENCH / "NOTES.md", BENCH / "gpu_session.sh"):
        text = doc.read_text()
        assert not re.search(r"python3? benchmarks/\w+\.py", text), doc.name
    session = (BENCH / "gpu_session.sh").read_text()
    assert len(re.findall(r"python3 -m benchmarks\.\w+", session)) >= 5


def test_svg_bar_chart_draws_every_value(tmp_path):
    """The serve benchmark's plot: a well-formed SVG with one bar and one label per value (none
    for a failed configuration's NaN), no plotting library needed."""
    import xml.etree.ElementTree as ET

    from benchmarks import common
    path = common.svg_bar_chart(tmp_path / "p.svg", "t <&>", [
        ("tokens/s", ["16", "64"], {"stock": [1.0, 2.0], "kvbuffer": [3.0, float("nan")]}),
        ("TPOT", ["16", "64"], {"stock": [4.5, 5.5], "kvbuffer": [6.0, 7.0]})])
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.get("width") not in ("100%", "10")]
    assert len(bars) == 7
    labels = {t.text for t in root.iter(f"{ns}text")}
    assert {"1", "2", "3", "4.5", "5.5", "6", "7", "t <&>", "stock", "kvbuffer"} <= labels
