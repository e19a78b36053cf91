"""vlweak's benchmark suite: every benchmark script in ``benchmarks/`` behind one entry point, one table.

Each suite runs as its own process (a clean timing environment), its output is kept under
``--out`` (default: a temporary folder) and its headline numbers are gathered into one markdown
table, each as a ratio to the baseline the script measures in the same run:

=============  ======================================================  =====================================
suite          measures                                                baseline
=============  ======================================================  =====================================
embeddings     ViT-B/32 image tower images/s (fp32, bf16, compiled);   fp32; the plain PIL + DataLoader loop
               JPEG files → embeddings end to end
chils          CHiLS inference time                                    zero-shot on the same images (ratio:
                                                                       time, lower is better)
zlap           transductive solve time                                 per-class reference solver
zlap_scaling   vlweak's ZLaP time at N, 2N, 4N images (C = 100,        the smallest N (ratio: time, so 2.00x
               1,000; benchmarks/zlap.py)                              per doubling is linear growth)
dualcoop       training images/s                                       plain fp32 loop
prompt_tuning  training samples/s with cached / reused features        re-encoding images every step
cdul           snippet scoring crops/s                                 per-crop Python loop
=============  ======================================================  =====================================

Examples::

    python benchmarks/run.py --quick                 # CPU, a few minutes
    python benchmarks/run.py                         # GPU when present (full sizes)
    python benchmarks/run.py --quick --only embeddings zlap
    python benchmarks/run.py --device cpu --device cuda   # both, when a GPU is present
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _num(text: str) -> float:
    return float(text.strip().rstrip("x"))


# ---------------------------------------------------------------- how to run each suite
def suite_args(name: str, quick: bool, device: str) -> list[str] | None:
    """Command-line arguments of ``benchmarks/<name>.py`` for a quick or a full run on ``device``."""
    gpu = device.startswith("cuda")
    table: dict[str, list[str]] = {
        "embeddings": ["--device", device] + (["--quick"] if quick else []),
        "chils": ["--device", device] + (["--quick"] if quick else []),
        "zlap": ["--device", device] + (["--quick"] if quick else []),
        "zlap_scaling": ["--device", device, "--skip-reference"]
        + (["--n", "5000", "10000", "20000", "--d", "128", "--classes", "100"] if quick  # one kNN engine (N >= 4,096)
           else ["--n", "250000", "500000", "1000000", "--classes", "100", "1000"] if gpu
           else ["--n", "12500", "25000", "50000", "--classes", "100", "1000"]),
        "dualcoop": ["--device", device] + (["--quick"] if quick else []),
        "cdul": ["--device", device]
        + (["--images", "8", "--grids", "3", "--repeats", "1", "--loop-images", "4"] if quick else []),
        "prompt_tuning": ["throughput", "--accelerator", "gpu" if gpu else "cpu"]
        + (["--n", "200", "--epochs", "1", "--random-weights"] if quick else ["--random-weights"]),
    }
    return table.get(name)


# ---------------------------------------------------------------- reading each suite's output
Row = dict


def parse_embeddings(out: str, json_file: Path) -> list[Row]:
    return json.loads(json_file.read_text()) if json_file.is_file() else []


def parse_chils(out: str, _: Path) -> list[Row]:
    rows = []
    for line in out.splitlines():
        m = re.match(r"^(end to end, batch \d+.*?|head only, .*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", line.strip())
        if m:
            rows.append({"measurement": f"CHiLS, {m.group(1)} (ms)", "value": _num(m.group(3)), "unit": "ms",
                         "ratio": _num(m.group(4)), "baseline": f"zero-shot {_num(m.group(2)):.2f} ms"})
    return rows


def parse_zlap(out: str, _: Path) -> list[Row]:
    rows, ours = [], None
    for line in out.splitlines():
        cells = line.split()
        if "vlweak" in cells and "multi-RHS" in cells:
            ours = (cells[0], float(cells[6]))
        elif "reference" in cells and ours is not None and line.rstrip().endswith("x"):
            c, total = ours
            ref = float(cells[6])
            rows.append({"measurement": f"ZLaP solve, C={c} (total s)", "value": total, "unit": "s",
                         "ratio": ref / total, "baseline": f"per-class reference {ref:.2f} s"})
    return rows


def parse_zlap_scaling(out: str, _: Path) -> list[Row]:
    """vlweak's total time per (N, C), as a ratio to the smallest N of the same C."""
    found: dict[int, list[tuple[int, float]]] = {}
    n = None
    for line in out.splitlines():
        m = re.search(r"\bN=(\d+)\b", line)
        if line.startswith("device=") and m:
            n = int(m.group(1))
        cells = line.split()
        if n is not None and "vlweak" in cells and "multi-RHS" in cells:
            found.setdefault(int(cells[0]), []).append((n, float(cells[6])))
    rows = []
    for c, points in found.items():
        n0, t0 = min(points)
        if t0 <= 0:  # below the printed resolution: no ratio to give
            continue
        for n, t in sorted(points):
            rows.append({"measurement": f"ZLaP time, N={n:,}, C={c} (total s)", "value": t, "unit": "s",
                         "ratio": t / t0, "baseline": f"N={n0:,}: {t0:.3f} s (time ratio)"})
    return rows


def parse_dualcoop(out: str, _: Path) -> list[Row]:
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[4].endswith("x") and cells[1].replace(".", "").isdigit():
            base = f"plain fp32 loop {cells[1]} img/s"
            rows.append({"measurement": f"DualCoOp training, {cells[0]} (img/s)", "value": _num(cells[3]),
                         "unit": "img/s", "ratio": _num(cells[4]), "baseline": base})
            rows.append({"measurement": f"DualCoOp training, {cells[0]}, later epochs, kept region features (img/s)",
                         "value": _num(cells[5]), "unit": "img/s", "ratio": _num(cells[6]), "baseline": base})
    return rows


def parse_prompt_tuning(out: str, _: Path) -> list[Row]:
    found = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[4].replace(".", "").isdigit() and cells[2].isdigit():
            found.append((cells[0], float(cells[4])))
    if not found:
        return []
    base_name, base = min(found, key=lambda r: r[1])  # re-encoding every step is the slowest
    return [{"measurement": f"prompt tuning training, {n} (samples/s)", "value": v, "unit": "samples/s",
             "ratio": v / base, "baseline": f"{base_name} {base:.0f} samples/s"} for n, v in found]


def parse_cdul(out: str, _: Path) -> list[Row]:
    rows, loop = [], {}
    parsed = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 5 and cells[4].endswith("x") and cells[3].replace(".", "").isdigit():
            parsed.append(cells)
            if "loop" in cells[1]:
                loop[cells[0]] = _num(cells[3])
    for grid, impl, _ms, cps, speed in parsed:
        if "loop" not in impl:
            rows.append({"measurement": f"CDUL snippets {grid}, {impl} (crops/s)", "value": _num(cps), "unit": "crops/s",
                         "ratio": _num(speed), "baseline": f"per-crop loop {loop.get(grid, float('nan')):.0f} crops/s"})
    return rows


#: the script of a suite that is not ``<suite>.py``
SCRIPTS = {"zlap_scaling": "zlap"}


def script(name: str) -> Path:
    return HERE / f"{SCRIPTS.get(name, name)}.py"


PARSERS: dict[str, Callable[[str, Path], list[Row]]] = {
    "embeddings": parse_embeddings,
    "chils": parse_chils,
    "zlap": parse_zlap,
    "zlap_scaling": parse_zlap_scaling,
    "dualcoop": parse_dualcoop,
    "prompt_tuning": parse_prompt_tuning,
    "cdul": parse_cdul,
}


def run_suite(name: str, quick: bool, device: str, out_dir: Path, timeout: int) -> tuple[list[Row], str, float]:
    args = suite_args(name, quick, device) or []
    json_file = out_dir / f"{name}-{device.replace(':', '')}.json"
    if name == "embeddings":
        args = [*args, "--json", str(json_file)]
    cmd = [sys.executable, str(script(name)), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        out, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired as err:
        out, status = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
    seconds = time.perf_counter() - t
    (out_dir / f"{name}-{device.replace(':', '')}.log").write_text(" ".join(cmd) + "\n\n" + out)
    rows = PARSERS[name](out, json_file) if status == "ok" else []
    for r in rows:
        r.setdefault("suite", name)
        r["device"] = device
    return rows, status, seconds


def _row(r: dict) -> str:
    """One measurement as a row of the printed table."""
    return (f"| {r['suite']} | {r['device']} | {r['measurement']} | {r['value']:.4g} {r.get('unit', '')} | "
            f"{r['ratio']:.2f}x | {r['baseline']} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: the whole suite in a few minutes on CPU")
    p.add_argument("--device", action="append", default=None,
                   help="cpu and/or cuda (repeatable; default: cuda when present, else cpu)")
    p.add_argument("--only", nargs="+", default=None, help=f"suites to run (default: all of {', '.join(PARSERS)})")
    p.add_argument("--out", default=None, help="folder for each suite's full output (default: a temporary folder)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per suite")
    args = p.parse_args(argv)

    import torch

    devices = args.device or (["cuda"] if torch.cuda.is_available() else ["cpu"])
    names = args.only or [n for n in PARSERS if script(n).is_file()]
    unknown = [n for n in names if n not in PARSERS]
    if unknown:
        raise SystemExit(f"unknown suites {unknown}; known: {', '.join(PARSERS)}")
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vlweak-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, status = [], []
    for device in devices:
        for name in names:
            if not script(name).is_file():
                status.append((name, device, "missing", 0.0))
                continue
            print(f"running {name} on {device} ...", file=sys.stderr, flush=True)
            got, st, sec = run_suite(name, args.quick, device, out_dir, args.timeout)
            if st == "ok" and not got:
                st = "ok (no numbers parsed: see log)"
            rows += got
            status.append((name, device, st, sec))
            for r in got:  # as each suite ends: a run stopped later still shows what it measured
                print(f"  {_row(r)}", file=sys.stderr, flush=True)

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"\nvlweak benchmarks, {when}, {'quick' if args.quick else 'full'}; CPU cores {os.cpu_count()}, GPU {gpu}")
    print(f"command: python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("ratio: speed-up over the baseline, except the CHiLS rows (time relative to zero-shot, lower is better) "
          "and the ZLaP scaling rows (time relative to the smallest N)\n")
    print("| suite | device | measurement | value | ratio | baseline (same run) |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for r in rows:
        print(_row(r))
    print("\n| suite | device | status | seconds |")
    print("| --- | --- | --- | ---: |")
    for name, device, st, sec in status:
        print(f"| {name} | {device} | {st} | {sec:.0f} |")
    print(f"\nfull outputs: {out_dir}")
    failed = [f"{name} ({device})" for name, device, st, _ in status if not st.startswith("ok")]
    if failed:
        raise SystemExit(f"failed suites: {', '.join(failed)} (logs in {out_dir})")


if __name__ == "__main__":
    main()
