"""Convert image datasets into bigltr's WebDataset shards (``<split>-NNNNNN.tar`` + ``_info.json``).

Subcommands (one per source format; the readers live in ``bigltr.data.sources``, the split rules in
``bigltr.data.longtail``, the one conversion path in ``bigltr.data.convert``):

  imagefolder  ROOT/{train,val,test}/<class>/<image> trees (val/ and test/ optional)
  list         OLTR-style text lists "relative/path label" (ImageNet-LT, Places-LT) under an image root
  inat         iNaturalist 2018/2019/2021 COCO-style JSON (iNat's val set becomes the test split)
  cifar        CIFAR-10 / CIFAR-100 python pickles -> CIFAR-LT (LDAM-DRW or official weight-balancing subset)
  idx          MNIST / Fashion-MNIST idx files -> long-tailed train (LDAM-DRW profile; --class-order-seed: which
               class gets which count), balanced val held out from the official training set, and the official
               test set; --pairs: 100 classes of item pairs side by side (CIFAR-100-LT's profile)
  verify       check an existing shard folder: every shard present, sizes/sha256 as recorded, sample counts
               and labels as _info.json says (exit 1 and one line per problem otherwise)

Every image is decoded once during conversion: a file that exists but does not decode is skipped and listed
in OUT/conversion_report.json (the conversion fails if more than --max-skip-fraction of a split is skipped);
a missing file, a malformed list line or an out-of-range label is an error naming the file and line.
``bigltr-make-shards`` (console script) and ``python tools/make_shards.py`` run :func:`main`; see docs/data.md
for the shard format and full examples (e.g. ``bigltr-make-shards idx --src DIR --out data/fmnist_lt``).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

from bigltr.errors import EXIT_BAD_INPUT

from . import cifar, idx, imagefolder, inat, oltr_list

FORMAT_HELP = {
    "png": "image encoding inside the shards (default png, lossless)",
    "keep": "image encoding inside the shards: keep (default) stores each original JPEG/PNG/WebP file's bytes "
            "unchanged after checking that it decodes (other formats become PNG; with --resize or "
            "--jpeg-quality, JPEGs are re-encoded as JPEG and others as PNG); png or jpg re-encode every image",
}
VAL_HELP = ("without {}: at most K validation images per class, held out of the decodable training images (see "
            "--val-max-fraction, --val-min-count); 0 = no val split")


def add_output_args(p: argparse.ArgumentParser, formats: tuple = ("png", "jpg"), default_format: str = "png"):
    """Options every subcommand shares: output folder, shard size, image format."""
    p.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    p.add_argument("--name", default=None, help="dataset name stored in _info.json (default: basename of --out)")
    from ..writer import AUTO, parse_maxcount

    def maxcount(text: str):
        try:
            return parse_maxcount(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--maxcount", type=maxcount, default=AUTO, metavar="N|auto",
                   help="at most N samples per shard, filled in order, the last shard holding the rest (webdataset's "
                        "maxcount); default auto: 500-1000 per shard, balanced, a power-of-two multiple of them (of 8 "
                        "from 8000 samples up) so that 1, 2, 4, 8 ranks read whole shards (docs/data.md, 'Shard "
                        "size')")
    p.add_argument("--maxsize", type=float, default=None,
                   help="optional max bytes per shard: a new shard starts once one holds this much (e.g. 1e9)")
    p.add_argument("--format", dest="image_format", choices=formats, default=default_format,
                   help=FORMAT_HELP[default_format])
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_convert_args(p: argparse.ArgumentParser, *, val_help: str, val_default_text: str = "5", keep: bool = True,
                     holdout: bool = True):
    """Options of the converters that decode images in parallel (imagefolder, list, inat, cifar), then the output
    options (``keep``: image files whose bytes may be stored as they are; ``holdout``: the options of the
    validation hold-out out of train, bigltr.data.holdout.HoldoutPolicy)."""
    p.add_argument("--val-per-class", type=int, default=None, help=f"{val_help} (default {val_default_text})")
    if holdout:
        from ..holdout import HOLDOUT_DEFAULTS

        p.add_argument("--val-max-fraction", type=float, default=None, metavar="F",
                       help=f"hold out at most floor(F * n_c) images of a class of n_c (default "
                            f"{HOLDOUT_DEFAULTS['max_fraction']:g}, at most 0.5)")
        p.add_argument("--val-min-count", type=int, default=None, metavar="M",
                       help=f"hold nothing out of a class with fewer than M decodable training images (default "
                            f"{HOLDOUT_DEFAULTS['min_count']}): the tail keeps all its images")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the validation hold-out and of the training split's shard order (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that read, check and encode images (default: all cores); the output does "
                        "not depend on it")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="shrink every image so that its shorter side is S pixels, keeping the aspect ratio "
                        "(smaller images are left as they are); forces a re-encode")
    p.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="JPEG quality of re-encoded JPEGs (default 95); giving it re-encodes JPEG originals")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of a split's images cannot be decoded (default 0.01); "
                        "skipped images are listed in OUT/conversion_report.json")
    add_output_args(p, *((("keep", "png", "jpg"), "keep") if keep else (("png", "jpg"), "png")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="FORMAT", required=True)

    def add(name, module):
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(source=module)
        return p

    p = add("idx", idx)
    p.add_argument("--src", required=True, help="folder holding the four idx files")
    p.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist",
                   help="names the classes (default fashion-mnist)")
    p.add_argument("--classes", default=None, help="comma-separated class names (overrides --dataset)")
    p.add_argument("--imbalance", type=float, default=100.0,
                   help="imbalance factor n_max / n_min of the exponential profile (default 100; 1 = balanced)")
    p.add_argument("--n-max", type=int, default=None,
                   help="training images of the largest class (default 5000; 500 with --pairs)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="balanced validation images per class, held out first (default 200; 20 with --pairs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out, long-tail and shard order (default 0)")
    p.add_argument("--class-order-seed", type=int, default=None, metavar="S",
                   help="give the profile's counts to the classes in the order of numpy default_rng(S).permutation(C) "
                        "(default: label order, class 0 gets n_max); the labels stay the dataset's")
    p.add_argument("--pairs", action="store_true",
                   help="C*C classes of ordered pairs of items side by side (class = C*left + right; 28x56 for "
                        "Fashion-MNIST), CIFAR-100-LT's profile by default; val and test balanced, each pair from "
                        "one split only")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="--pairs: test pairs per class, from the official test items only (default 100)")
    add_output_args(p)

    p = add("imagefolder", imagefolder)
    p.add_argument("--src", required=True, help="folder holding train/ and optionally val/ and test/")
    add_convert_args(p, val_help=VAL_HELP.format("val/"))

    p = add("list", oltr_list)
    p.add_argument("--src", required=True,
                   help="image root the list paths are relative to (a leading '/' in a list path is ignored)")
    p.add_argument("--train-list", required=True, help="training list (e.g. ImageNet_LT_train.txt)")
    p.add_argument("--val-list", default=None, help="validation list (e.g. ImageNet_LT_val.txt)")
    p.add_argument("--test-list", default=None, help="test list (e.g. ImageNet_LT_test.txt)")
    p.add_argument("--classes-file", default=None, help="class names, one per line (line i names label i)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: max train label + 1)")
    add_convert_args(p, val_help=VAL_HELP.format("--val-list"))

    p = add("inat", inat)
    p.add_argument("--src", required=True, help="image root the JSON file_name paths are relative to")
    p.add_argument("--train-json", required=True, help="training JSON (e.g. train2018.json)")
    p.add_argument("--val-json", default=None, help="official validation JSON (e.g. val2018.json): the test split, "
                                                    "or the val split when --test-json is given")
    p.add_argument("--test-json", default=None, help="a labelled test JSON (optional; iNat's own test sets are "
                                                     "unlabelled)")
    add_convert_args(p, val_help=VAL_HELP.format("--test-json"))

    p = add("cifar", cifar)
    p.add_argument("--src", required=True, help="folder holding the CIFAR python files")
    p.add_argument("--imbalance", type=float, default=100.0, help="imbalance factor n_max / n_min (default 100)")
    p.add_argument("--n-max", type=int, default=None, help="training images of class 0 (default 5000 CIFAR-10, "
                                                           "500 CIFAR-100)")
    p.add_argument("--convention", choices=("ldam", "official"), default="ldam",
                   help="which images form the long-tailed subset (default ldam)")
    p.add_argument("--ldam-seed", type=int, default=0, help="numpy seed of the ldam convention (default 0)")
    add_convert_args(p, val_help="validation images per class, from the training images the long-tailed subset "
                                 "leaves unused; 0 = no val split", val_default_text="20 CIFAR-100, 200 CIFAR-10",
                     keep=False, holdout=False)

    p = sub.add_parser("verify", help="check a shard folder against its _info.json",
                       description="Check every shard listed in DIR/_info.json: present, byte size and sha256 as "
                                   "recorded, and exactly shard_lengths[i] samples with a label in range. Prints "
                                   "one line per problem and a summary; exit status 0 when clean, 1 otherwise.")
    p.add_argument("dir", metavar="DIR", help="folder holding _info.json and the shards")
    p.add_argument("--split", action="append", default=None, help="check only this split (repeatable)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow on large data)")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Read the source of ``args.command`` and convert it (:func:`bigltr.data.convert.convert`)."""
    from ..convert import convert
    from ..decode import EncodeOptions

    params = inspect.signature(args.source.load).parameters  # load()'s keywords are named like the options
    data = args.source.load(**{k: getattr(args, k) for k in params})
    tail = ({"image_format": args.image_format, "maxcount": args.maxcount} if data.idx_info_layout
            else {"maxcount": args.maxcount, "maxsize": args.maxsize})
    opts = EncodeOptions(args.image_format, getattr(args, "resize", None), getattr(args, "jpeg_quality", None))
    return convert(args.out, name=args.name or os.path.basename(os.path.normpath(args.out)), classes=data.classes,
                   splits=data.splits, source={**data.source, **tail}, opts=opts,
                   workers=getattr(args, "workers", 1), max_skip_fraction=getattr(args, "max_skip_fraction", 0.01),
                   maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite, progress=args.progress,
                   extra=data.extra, record_encode=not data.idx_info_layout, expected_class_counts=data.expected_counts,
                   report_extra=_report_extra(data.source), holdout=data.holdout)


def _report_extra(source: dict) -> dict | None:
    """What conversion_report.json adds for a source with a class order (idx --class-order-seed, idx --pairs): the
    profile, the order used and the resulting per-class training counts."""
    lt = source.get("longtail") or {}
    return {"longtail": lt} if "class_order" in lt else None


def print_summary(info: dict, seconds: float) -> None:
    """Per-class counts of every split, then totals."""
    classes, splits = info["classes"], info["splits"]
    per_split = {
        s: [sum(h[c] for h in e.get("class_hist", [])) for c in range(len(classes))] for s, e in splits.items()
    }
    shown = list(range(len(classes)))
    if len(classes) > 40:  # iNat has 8,142 classes: head and tail only
        shown = shown[:10] + [-1] + shown[-10:]
    width = min(30, max(8, max(len(classes[c]) for c in shown if c >= 0)))
    print(f"\n{info['name']}: {len(classes)} classes")
    print(f"{'class':>{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for c in shown:
        print(f"{'...':>{width}}" if c < 0 else
              f"{classes[c][:width]:>{width}}  " + "  ".join(f"{per_split[s][c]:>7d}" for s in splits))
    print(f"{'total':>{width}}  " + "  ".join(f"{splits[s]['num_samples']:>7d}" for s in splits))
    print("shards: " + ", ".join(f"{s} {len(e['filenames'])}" for s, e in splits.items())
          + f"; written in {seconds:.1f} s")


def holdout_line(held: dict) -> str:
    """One line on the validation hold-out (``source.holdout`` of _info.json)."""
    n, pool = held["images"], held["decodable_train_images"]
    return (f"val held out of train: {n} image(s) from {held['classes']} of {held['num_classes']} classes "
            f"({100.0 * n / max(pool, 1):.1f}% of {pool} decodable training images; at most {held['per_class']} and "
            f"{held['max_fraction']:g} of a class, none from the {held['classes_under_min_count']} class(es) under "
            f"{held['min_count']} images); train + val (+ skipped files) = the official training set; groups "
            f"from official_train_counts")


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the ``_info.json`` dict written. User errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    if args.command == "verify":  # checks, writes nothing: exit status 0 (clean) or 1 (problems)
        from ..verify import verify_dataset

        report = verify_dataset(args.dir, args.split, decode=args.decode, report=print)
        print(report.summary())
        raise SystemExit(0 if report.ok else 1)
    t0 = time.perf_counter()
    try:
        info = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        msg = f"make_shards.py {args.command}: error: {e}"
        print(msg, file=sys.stderr)
        stop = SystemExit(msg)  # str(stop) is the message (pytest.raises(match=...)); exit status 2 (bad input)
        stop.code = EXIT_BAD_INPUT
        raise stop from e
    print_summary(info, time.perf_counter() - t0)
    held = info["source"].get("holdout")
    if held is not None:
        print(holdout_line(held))
    elif "official_train_counts" in info and "val" not in info["splits"]:
        print("val: none (--val-per-class 0); train = the whole official training set")
    skipped = info["source"].get("skipped")
    if skipped is not None:
        n = sum(skipped.values())
        print(f"skipped {n} undecodable image(s)" + (f" ({skipped})" if n else "")
              + f"; report: {os.path.join(args.out, 'conversion_report.json')}")
    print(f"wrote {os.path.join(args.out, '_info.json')}")
    return info


def console_main() -> int:
    """The ``bigltr-make-shards`` console script (its exit status: 0, or SystemExit's)."""
    main()
    return 0
