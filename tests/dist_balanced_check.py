"""Stage 2 through the real trainer (`bigltr.train.main`) with a recorder around the cached-feature stream, for
tests/test_distributed.py::test_class_balanced_cached_features_are_one_global_sequence_on_two_ranks.

Under torchrun (2 gloo ranks): `python -m torch.distributed.run ... tests/dist_balanced_check.py OUTDIR key=value ...`
runs `main(key=value ...)` and writes OUTDIR/rank<R>.json: every draw the training loop received, per epoch and batch
(the sample's key, its view, label and the sum of its features), this rank's labels before the gather, and the
result of a resume check (a cache reloaded from this rank's disk entry and gathered again, as a restarted run does,
yields the same batches after the first k). The test runs the same recorder in-process for the 1-process reference.
"""
import json
import os
import sys
from pathlib import Path

import torch

from bigltr.data.balanced import ClassBalancedSampler
from bigltr.engine.feature_cache import FeatureCache


class Recorder:
    def __init__(self):
        self.epochs: dict[int, list] = {}
        self.local_labels = None
        self.resume: dict = {}
        self._dist = self._seed = None

    def install(self, setattr_):
        """Wrap FeatureCache.__iter__ and .gather through `setattr_(obj, name, value)` (monkeypatch.setattr in-process)."""
        rec, orig_iter, orig_gather = self, FeatureCache.__iter__, FeatureCache.gather

        def gather(cache, dist, *, seed):
            rec.local_labels = cache.labels.tolist()
            orig_gather(cache, dist, seed=seed)
            rec._dist, rec._seed = dist, seed

        def iterate(cache):
            if cache.sampler != "class_balanced":
                yield from orig_iter(cache)
                return
            if cache.epoch == 1 and rec._dist is not None and not rec.resume:
                rec.resume = rec._resume_check(cache, orig_iter, orig_gather)
            rows, views = cache.balanced_order()
            draws = rec.epochs[cache.epoch] = []
            b = cache.batch_size
            for i, (x, y, z) in enumerate(orig_iter(cache)):
                idx, v = rows[i * b:(i + 1) * b].tolist(), views[i * b:(i + 1) * b].tolist()
                draws.append([[cache.keys[r], vv, int(lab), float(f.double().sum())]
                              for r, vv, lab, f in zip(idx, v, y.tolist(), x)])
                yield x, y, z

        setattr_(FeatureCache, "gather", gather)
        setattr_(FeatureCache, "__iter__", iterate)

    def _resume_check(self, cache, orig_iter, orig_gather) -> dict:
        """What a restarted rank does: load its disk entry, gather every rank's rows, set the epoch, skip k batches;
        and the sampler's own resume (set_epoch with start) over the gathered labels in key order."""
        entry = next(p for p in Path(cache.directory).iterdir() if p.name.startswith("train-"))
        key = json.loads((entry / "meta.json").read_text())["key"]
        fresh = FeatureCache.load(entry, key, batch_size=cache.batch_size, seed=cache.seed)
        fresh.sampler = "class_balanced"
        orig_gather(fresh, self._dist, seed=self._seed)
        fresh.set_epoch(cache.epoch)
        k = 2
        a, b = list(orig_iter(cache))[k:], list(orig_iter(fresh))[k:]
        same = len(a) == len(b) > 0 and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                            for (x1, y1, _), (x2, y2, _) in zip(a, b))
        order = sorted(range(len(fresh.keys)), key=fresh.keys.__getitem__)
        s = ClassBalancedSampler(fresh.labels[order], seed=self._seed, rank=cache.rank,
                                 world_size=cache.world_size)
        s.set_epoch(1, start=k * cache.batch_size)
        tail = list(s)
        s.set_epoch(1)
        # Dist.all_gather_rows on its own: bf16, uneven row counts (rank 1 none), several rounds of a tiny budget
        d = self._dist
        mine = torch.arange(5 * 3 * (1 - d.rank), dtype=torch.bfloat16).view(-1, 3) + 100 * d.rank
        got = d.all_gather_rows(mine, budget_bytes=2 * 3 * 2 * d.world_size)  # 2 rows a round
        want = torch.arange(15, dtype=torch.bfloat16).view(5, 3)
        return {"reloaded_tail_equal": same, "batches_compared": len(a),
                "sampler_start_equal": tail == list(s)[k * cache.batch_size:] and len(tail) > 0,
                "all_gather_rows_bf16": torch.equal(got, want)}

    def report(self) -> dict:
        return {"epochs": {str(e): d for e, d in self.epochs.items()}, "local_labels": self.local_labels,
                "resume": self.resume}


def main(out: str, argv: list[str]) -> int:
    from bigltr.train import main as train

    rec = Recorder()
    rec.install(setattr)
    rc = train(argv)
    Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec.report()))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
