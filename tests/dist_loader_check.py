"""Run under torchrun (2 processes, gloo) by tests/test_distributed.py: reads the train and eval splits of a shard
folder with ShardLoader on each rank, and rank 0 writes what every rank saw (keys, batch counts) as JSON."""
import json
import sys

import torch.distributed as dist

from bigltr.data.loader import ShardLoader
from bigltr.data.transforms import build_transform


def main(root: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tf = build_transform(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), train=False, aug="none")
    report = {}
    for split, train in (("train", True), ("val", False), ("test", False)):
        ld = ShardLoader(root, split, batch_size=8, transform=tf, train=train, num_workers=1, rank=rank,
                         world_size=world, shuffle_buffer=32)
        epochs = []
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            batches = list(ld)
            epochs.append({"len": len(ld), "batches": len(batches), "keys": [k for _, _, ks in batches for k in ks]})
        report[split] = epochs
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()  # both ranks are done with the group before either destroys it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
