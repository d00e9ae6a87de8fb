"""How a reader following one run through the engine moves between files (docs/architecture.md, "one epoch, one
owner"): runs a tiny stage=all job and lists, in the order the run first calls them, the bigltr.engine functions that
see the run's config (an argument that is a config section, or carries one: RunContext, StageLoop, ...); "stops" are the file changes along that list, "returns" the entries into a file already left.

    python tools/trace_run.py data.root=<shards> [key=value ...]      (e.g. the tests' tiny shards)

Only the first call of each function counts, from `bigltr.engine.run.run` on and again from each stage's entry (a
loop's second epoch is not a new stop), so the numbers measure the
layout of the code, not the length of the run.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ENGINE = os.sep + os.path.join("bigltr", "engine") + os.sep


def _holds_config(local_vars: dict) -> bool:
    """Whether a function sees the run's config: an argument that is a config section (a bigltr.config dataclass)
    or that carries one (`.cfg`, `.ctx.cfg`: RunContext, StageLoop, Evaluator, ...)."""
    def is_config(v):
        return type(v).__module__.startswith("bigltr.config")

    for v in local_vars.values():
        if is_config(v) or is_config(getattr(v, "cfg", None)) or is_config(getattr(getattr(v, "ctx", None), "cfg",
                                                                                        None)):
            return True
    return False


def main(argv: list[str]) -> int:
    from bigltr.train import main as train

    seen, order, started = set(), [], []

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if ENGINE not in code.co_filename or code.co_name.startswith("<"):
            return
        if code.co_name == "run" and code.co_filename.endswith("run.py"):
            started.append(True)
        if code.co_name in ("run_stage1", "run_stage2"):  # each stage's trip counts: its first calls again
            seen.clear()
        if started and code not in seen and _holds_config(frame.f_locals):
            seen.add(code)
            order.append((Path(code.co_filename).name, code.co_name))

    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        try:
            rc = train(["recipe=tiny_test", "stage=all", "stage1.epochs=2", "stage2.epochs=2", "log.plots=false",
                        f"out={out}/run", *argv])
        finally:
            sys.setprofile(None)
    files = [f for f, _ in order]
    stops = [f for i, f in enumerate(files) if i == 0 or f != files[i - 1]]
    left, returns = set(), 0
    for i, f in enumerate(stops):
        if f in left:
            returns += 1
        if i + 1 < len(stops):
            left.add(f)
    per_file = {f: stops.count(f) for f in dict.fromkeys(stops)}
    if os.environ.get("TRACE_VERBOSE"):
        for f, name in order:
            print(f"  {f}:{name}")
    print(" -> ".join(stops))
    print(f"exit status {rc}")
    print(f"{len(order)} engine functions in {len(per_file)} files; {len(stops)} stops, {returns} returns to a file "
          f"already left; entries per file: " + ", ".join(f"{f} {n}" for f, n in per_file.items()))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
