"""How fast and how clearly `layerkit` refuses what a user got wrong: issue 13's and 14's cases,
each run as a user runs it (a fresh `layerkit` process in an empty folder), with its exit code,
wall time, the first line of its error and whether it left anything on disk.

    python benchmarks/bench_user_errors.py [--markdown]

Figures: docs/benchmarks.md (the goal: every case under 2 s, exit 2, one sentence, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    "sample sampler.steps=-5",
    "sample sampler.steps=0",
    "sample sampler.steps=ten",
    "sample sampler.steps=3000",
    "train trainer.max_steps=-3",
    "train train.batch_size=0",
    "train optim.lr=-1",
    "sample output_dir=.",
    "sample output_dir=/proc/x",
    "sample fps=0",
    "sample rgba_format=avi",
    "sample sampler.height=100000 sampler.width=100000",
    "sample sampler.height=4096 sampler.width=4096",
    "sample +inputs.blend=x.mp4",
    "sample +inputs.blended=/nope.mp4",
    "sample +inputs.blended=/nope/folder",
    "sample +experiment=toy_layeranimate +inputs.demo=/nope/folder",
    "sample +experiment=toy_transparent +inputs.image=/nope.png",
    "sample +experiment=no_such_experiment",
    "sample sampler.stepz=5",
]


def run(case: str, root: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=root))
    argv = case.split()
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append("output_dir=out")
    start = time.perf_counter()
    code = "import sys; from layerkit.cli import main; sys.exit(main(sys.argv[1:]))"  # what the script runs
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "LAYERKIT_THREADS": "1"}, timeout=600)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"case": f"layerkit {case}", "exit": proc.returncode, "seconds": round(seconds, 2),
            "message": lines[-1] if lines else "", "lines": len(lines),
            "left_on_disk": sorted(p.name for p in work.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a table for the docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(case, Path(tmp)) for case in CASES]
    if args.markdown:
        print("| command | exit | seconds | message | left on disk |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['case']}` | {r['exit']} | {r['seconds']:.2f} | {r['message'][:110]} | "
                  f"{', '.join(r['left_on_disk']) or 'nothing'} |")
    else:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
