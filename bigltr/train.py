"""Entry point: `python -m bigltr.train recipe=NAME key=value ...` or `accelerate launch bigltr/train.py ...`."""
from __future__ import annotations

import errno
import logging
import os
import sys
import traceback

try:  # also as a script (accelerate launch bigltr/train.py): the installed package (`pip install -e .`, make)
    from bigltr.config import ConfigError, batch_plan, build_config
    from bigltr.errors import EXIT_BAD_INPUT, fail
except ModuleNotFoundError as e:
    if e.name != "bigltr":
        raise
    print(f"bigltr: the package is not installed in this Python ({sys.executable}): run `make` or "
          f"`pip install -e .` in the checkout", file=sys.stderr)
    sys.exit(2)

# Exit codes (docs/distributed.md "Failure behaviour"): 0 done; 1 an unexpected error (traceback); 2 bad input
# (config, data, run directory in use); 3 the loss became non-finite; 4 a checkpoint could not be written or read;
# 75 stopped on request (preemption), resume with resume=auto.
EXIT_DIVERGED, EXIT_CHECKPOINT = 3, 4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from bigltr.cli import train_help  # every config key, from the dataclasses (no torch import)

        print(train_help())
        return 0
    try:
        cfg = build_config(argv)  # validated before torch or data are touched
    except ConfigError as e:
        return fail("bigltr", f"config error: {e}")
    from bigltr.checkpoint import CheckpointError  # heavy imports only after the config is known to be good
    from bigltr.data.errors import DataError
    from bigltr.distributed import Dist, DistError, launched_world_size
    from bigltr.engine.stop import EXIT_PREEMPTED, Preempted, TrainingDiverged
    from bigltr.engine.lock import RunLocked
    from bigltr.engine.run import run

    try:
        d = cfg.dist
        # the global batch split for this launch (a config error before any process group is joined)
        accum = batch_plan(cfg.stage1, launched_world_size(), "stage1").accum_steps
        dist = Dist.setup(d.backend, cfg.device, d.world_size, d.timeout_s, zero_stage=d.zero_stage,
                          zero3_persistence_threshold=d.zero3_persistence_threshold, amp=cfg.stage1.amp,
                          accum_steps=accum)
    except ConfigError as e:
        return fail("bigltr", f"config error: {e}")
    except DistError as e:
        return fail("bigltr", f"launch error: {e}")
    # rank 0 logs; the other ranks only warnings and errors
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, force=True,
                        format="%(asctime)s %(message)s" if not dist.distributed else
                        f"%(asctime)s [rank {dist.rank}] %(message)s", datefmt="%H:%M:%S")
    code = 1
    try:
        run(cfg, dist)
        code = 0
    except Preempted as e:
        code = fail("bigltr", f"preempted ({e}); resume with the same command and resume=auto", EXIT_PREEMPTED)
    except RunLocked as e:
        code = fail("bigltr", str(e), EXIT_BAD_INPUT)
    except ConfigError as e:  # found once the data or a checkpoint is read (model name, checkpoint mismatch)
        code = fail("bigltr", f"config error: {e}", EXIT_BAD_INPUT)
    except DataError as e:
        code = fail("bigltr", f"data error: {e}", EXIT_BAD_INPUT)
    except FileNotFoundError as e:
        code = fail("bigltr", str(e), EXIT_BAD_INPUT)
    except CheckpointError as e:
        code = fail("bigltr", f"checkpoint error: {e}", EXIT_CHECKPOINT)
    except TrainingDiverged as e:
        code = fail("bigltr", f"training diverged: {e}", EXIT_DIVERGED)
    except OSError as e:  # results, logs, plots: a full disk is said in one line, like a checkpoint's
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        code = fail("bigltr", f"no space left writing {e.filename or cfg.out}", EXIT_CHECKPOINT)
    except BaseException:
        if not dist.distributed:
            raise
        traceback.print_exc()
        code = 1
    finally:
        if code not in (0, EXIT_PREEMPTED) and dist.distributed:
            # Another rank may still be inside a collective: tearing the process group down now can abort this
            # process (SIGABRT, "terminate called without an active exception") and hide the message and code.
            # Leave at once with the code; the launcher stops the other ranks.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
