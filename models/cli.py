"""``acwi-models``: generate synthetic benchmarks, train and evaluate models.

Commands::

    acwi-models synth --out DIR --studies N --seed S [--sites 0,1,2,3] [--images-per-study 1]
    acwi-models train --preset default --out models/registry/default [--config FILE]
                      [--data DIR] [--epochs N] [--threads N] [--resume]
    acwi-models evaluate --model models/registry/default --data DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _sites(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sites must be comma-separated integers: {text}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acwi-models", description="Generate synthetic benchmarks, train and evaluate models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic multi-site DICOM benchmark")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--studies", type=int, default=100)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sites", type=_sites, default=[0, 1, 2, 3])
    synth.add_argument("--images-per-study", type=int, default=1)
    synth.add_argument("--size", type=int, default=256)

    train = sub.add_parser("train", help="train and calibrate a model")
    train.add_argument("--preset", default="default")
    train.add_argument("--config", type=Path, help="TOML merged over the preset")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--data", type=Path, help="DICOM folder with labels.csv")
    train.add_argument("--epochs", type=int)
    train.add_argument("--threads", type=int)
    train.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")

    evaluate = sub.add_parser("evaluate", help="run the node's analyser over a benchmark")
    evaluate.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    evaluate.add_argument("--data", type=Path, required=True, help="DICOM folder + labels.csv")
    evaluate.add_argument("--mc-samples", type=int, default=20)
    evaluate.add_argument("--threads", type=int)
    return parser


def _synth(args: argparse.Namespace) -> int:
    from models.data.synth import write_dataset

    csv_path = write_dataset(
        args.out,
        args.studies,
        args.seed,
        sites=args.sites,
        images_per_study=args.images_per_study,
        size=args.size,
    )
    print(f"wrote {args.studies} studies and {csv_path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from models.train import load_config, train

    config = load_config(args.preset, args.config)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.threads is not None:
        config.train.threads = args.threads
    result = train(config, args.out, data_dir=args.data, resume=args.resume)
    print(
        f"validation accuracy {result.val.accuracy:.3f} (balanced "
        f"{result.val.balanced_accuracy:.3f}) in {result.seconds:.1f}s"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import pydicom

    from acwi_node.inference.analyser import Analyser, NothingToAnalyse
    from models.data.dicom_dataset import scan_folder

    analyser = Analyser.load(args.model, mc_samples=args.mc_samples, num_threads=args.threads)
    items = scan_folder(args.data, labels=analyser.labels)
    by_study: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_study.setdefault(item.study_instance_uid, []).append(i)
    correct = reviewed = total = 0
    per_site: dict[int, list[int]] = {}
    for indices in by_study.values():
        datasets = [pydicom.dcmread(items[i].path) for i in indices]
        try:
            result = analyser.analyse(datasets)
        except NothingToAnalyse as exc:
            print(f"skipped study: {exc}")
            continue
        truth = items[indices[0]].label
        hit = int(result.predicted_label == truth)
        correct += hit
        reviewed += int(result.needs_review)
        total += 1
        site = items[indices[0]].site
        per_site.setdefault(-1 if site is None else site, []).append(hit)
    if total == 0:
        print("no study could be analysed")
        return 1
    print(f"studies {total}: accuracy {correct / total:.3f}, review rate {reviewed / total:.3f}")
    for site, hits in sorted(per_site.items()):
        print(f"  site {site}: accuracy {float(np.mean(hits)):.3f} ({len(hits)} studies)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``acwi-models``."""
    args = _parser().parse_args(argv)
    handlers = {"synth": _synth, "train": _train, "evaluate": _evaluate}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
