"""Entry point: `python -m bigltr.train recipe=NAME key=value ...` or `accelerate launch bigltr/train.py ...`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch bigltr/train.py): make `bigltr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigltr.config import ConfigError, build_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nKeys: see recipes/*.yaml and bigltr/config.py")
        return 0
    try:
        cfg = build_config(argv)  # validated before torch or data are touched
    except ConfigError as e:
        print(f"bigltr: config error: {e}", file=sys.stderr)
        return 2
    from bigltr.distributed import Dist, DistError  # heavy imports only after the config is known to be good
    from bigltr.engine.resume import EXIT_PREEMPTED, Preempted
    from bigltr.engine.run import run

    try:
        d = cfg.dist
        dist = Dist.setup(d.backend, cfg.device, d.world_size, d.timeout_s, zero_stage=d.zero_stage,
                          zero3_persistence_threshold=d.zero3_persistence_threshold, amp=cfg.stage1.amp,
                          accum_steps=cfg.stage1.accum_steps)
    except DistError as e:
        print(f"bigltr: launch error: {e}", file=sys.stderr)
        return 2
    # rank 0 logs; the other ranks only warnings and errors
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, force=True,
                        format="%(asctime)s %(message)s" if not dist.distributed else
                        f"%(asctime)s [rank {dist.rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        run(cfg, dist)
    except FileNotFoundError as e:
        print(f"bigltr: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # found once the data or a checkpoint is read (model name, checkpoint mismatch)
        print(f"bigltr: config error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"bigltr: preempted ({e}); resume with the same command and resume=auto", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
