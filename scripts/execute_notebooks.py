"""Run notebooks top to bottom at full size (not under IN_TEST) and save their outputs, so they read as a tutorial.

Cells flagged with a skipped `tst_flags` flag (`#| cuda`, `#| slow`) are not run unless named with --flags, and cells
marked `#| eval: false` never, exactly as `nbdev_test` does. Run after editing a notebook:  python scripts/execute_notebooks.py nbs/03_wkv.ipynb [...]
"""
import argparse
import os
import sys
import time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell


def directives(source) -> str:
    "The cell's leading `#|` lines, e.g. '#| export\n#| eval: false' (nbdev skips a cell marked `eval: false`)."
    lines = []
    for line in source.splitlines():
        if not line.startswith("#|"): break
        lines.append(line)
    return "\n".join(lines)


def cell_flags(source):
    "The `#| flag` directives of a cell's leading comment lines."
    flags = set()
    for line in source.splitlines():
        if not line.startswith("#|"): break
        flags.update(line[2:].split())
    return flags


def execute(path, skip):
    nb = read_nb(path)
    shell = CaptureShell(path)
    for cell in nb.cells:
        if cell.cell_type == "code": cell.outputs, cell.execution_count = [], None
    cwd = os.getcwd()
    os.chdir(Path(path).parent)
    try:
        shell.run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type != "code" or bool(cell_flags(c.source) & skip)
                      or "eval: false" in directives(c.source))
    finally:
        os.chdir(cwd)
    write_nb(nb, path)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--flags", default="", help="space-separated flags to run anyway (e.g. cuda)")
    args = p.parse_args()
    skip = {"cuda", "slow"} - set(args.flags.split())
    os.environ.pop("IN_TEST", None)
    for path in args.notebooks:
        t0 = time.time()
        try: execute(path, skip)
        except Exception as e:
            print(f"FAILED {path}: {e}", file=sys.stderr); raise SystemExit(1)
        print(f"{path}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
