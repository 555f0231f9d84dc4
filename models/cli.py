"""``acwi-models``: generate synthetic benchmarks, train and evaluate models.

Commands::

    acwi-models synth --out DIR --studies N --seed S [--sites 0,1,2,3] [--images-per-study 1]
                      [--size 256] [--modality DX|CR|CT] [--slices 16] [--enhanced]
    acwi-models train --preset default --out models/registry/default [--config FILE]
                      [--data DIR] [--epochs N] [--threads N] [--resume]
                      [--init-from MODEL --ewc-lambda X [--ewc-data OLD_DIR]]
    acwi-models evaluate --model models/registry/default --data DIR [--out REPORT_DIR]
                         [--compare MODEL2] [--costly-images 60]
    acwi-models export --model models/registry/default [--out DIR] [--opset N]
"""

from __future__ import annotations

import argparse
import json
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
    synth.add_argument(
        "--size", type=int, help="image matrix (default 256; 512 with --modality CT)"
    )
    synth.add_argument(
        "--modality",
        choices=["DX", "CR", "CT"],
        help="write every study in this modality (default: each site's own, DX or CR)",
    )
    synth.add_argument(
        "--slices", type=int, default=16, help="axial slices per CT series (--modality CT)"
    )
    synth.add_argument(
        "--enhanced",
        action="store_true",
        help="each CT series as one multi-frame Enhanced CT image (--modality CT)",
    )

    train = sub.add_parser("train", help="train and calibrate a model")
    train.add_argument("--preset", default="default")
    train.add_argument("--config", type=Path, help="TOML merged over the preset")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--data", type=Path, help="DICOM folder with labels.csv")
    train.add_argument("--epochs", type=int)
    train.add_argument("--threads", type=int)
    train.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    train.add_argument(
        "--init-from",
        type=Path,
        help="fine-tune this model (manifest, its folder, or a checkpoint.pt) instead",
    )
    train.add_argument("--ewc-lambda", type=float, help="EWC strength when fine-tuning")
    train.add_argument(
        "--ewc-data", type=Path, help="old task's DICOM folder for the Fisher, if not stored"
    )

    evaluate = sub.add_parser("evaluate", help="run the node's analyser over a benchmark")
    evaluate.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    evaluate.add_argument("--data", type=Path, required=True, help="DICOM folder + labels.csv")
    evaluate.add_argument("--mc-samples", type=int, default=20)
    evaluate.add_argument("--threads", type=int)
    evaluate.add_argument(
        "--out", type=Path, help="write metrics.json, report.md and PNG plots into this folder"
    )
    evaluate.add_argument(
        "--train-sites",
        type=_sites,
        help="sites the model was trained on (default: from the manifest); others count as OOD",
    )
    evaluate.add_argument(
        "--compare",
        type=Path,
        metavar="MODEL2",
        help="also evaluate this model on the same data; its metrics go under 'comparison'",
    )
    evaluate.add_argument(
        "--costly-images",
        type=int,
        default=60,
        help="lesion images for the heatmap stability and deletion metrics (default 60)",
    )

    export = sub.add_parser(
        "export", help="export the ONNX backbone and full model, check parity, record them"
    )
    export.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    export.add_argument("--out", type=Path, help="write ONNX, manifest and weights here instead")
    export.add_argument("--opset", type=int, default=18)

    monitor = sub.add_parser(
        "monitor-sites",
        help="what the node's model monitoring would say of each phantom site's studies"
        " after a baseline site's",
    )
    monitor.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    monitor.add_argument("--baseline-site", type=int, default=0)
    monitor.add_argument("--sites", type=_sites, help="default: every phantom site")
    monitor.add_argument("--studies", type=int, default=100, help="studies per site (default 100)")
    monitor.add_argument("--size", type=int, default=128, help="image matrix (default 128)")
    monitor.add_argument("--mc-samples", type=int, default=20)
    monitor.add_argument("--threads", type=int)
    monitor.add_argument("--json", type=Path, help="also write the readings here")
    return parser


def _monitor_sites(args: argparse.Namespace) -> int:
    from models.data.synth import SITES
    from models.model_io import load_analyser
    from models.monitoring_check import format_readings, monitor_sites

    known = range(len(SITES))
    if args.baseline_site not in known or any(s not in known for s in args.sites or []):
        print(f"monitor-sites failed: sites are 0 to {len(SITES) - 1}", file=sys.stderr)
        return 1
    if args.studies < 5:
        print("monitor-sites failed: --studies must be at least 5", file=sys.stderr)
        return 1
    analyser = load_analyser(args.model, mc_samples=args.mc_samples, threads=args.threads)
    readings = monitor_sites(
        analyser,
        baseline_site=args.baseline_site,
        sites=args.sites,
        studies=args.studies,
        size=args.size,
    )
    print(format_readings(readings, args.baseline_site))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": f"{analyser.manifest.name} {analyser.manifest.version}",
                    "baseline_site": args.baseline_site,
                    "studies": args.studies,
                    "sites": [r.as_json() for r in readings],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _synth(args: argparse.Namespace) -> int:
    from models.data.synth import write_dataset

    ct = args.modality == "CT"
    if ct and args.slices < 1:
        print("synth failed: --slices must be at least 1", file=sys.stderr)
        return 1
    try:
        csv_path = write_dataset(
            args.out,
            args.studies,
            args.seed,
            sites=args.sites,
            images_per_study=args.slices if ct else args.images_per_study,
            size=args.size or (512 if ct else 256),
            modality=args.modality,
            enhanced=args.enhanced,
        )
    except ValueError as exc:
        print(f"synth failed: {exc}", file=sys.stderr)
        return 1
    what = f"CT series of {args.slices} slices" if ct else "studies"
    if args.enhanced:
        what = f"CT images of {args.slices} frames"
    print(f"wrote {args.studies} {what} and {csv_path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from models.train import load_config, train

    config = load_config(args.preset, args.config)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.threads is not None:
        config.train.threads = args.threads
    if args.ewc_lambda is not None:
        config.continual.ewc_lambda = args.ewc_lambda
    try:
        result = train(
            config,
            args.out,
            data_dir=args.data,
            resume=args.resume,
            init_from=args.init_from,
            ewc_data=args.ewc_data,
        )
    except ValueError as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"validation accuracy {result.val.accuracy:.3f} (balanced "
        f"{result.val.balanced_accuracy:.3f}) in {result.seconds:.1f}s"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_model, summary_lines

    try:
        metrics = evaluate_model(
            args.model,
            args.data,
            args.out,
            mc_samples=args.mc_samples,
            threads=args.threads,
            train_sites=args.train_sites,
            compare=args.compare,
            costly_images=args.costly_images,
        )
    except ValueError as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        return 1
    for line in summary_lines(metrics):
        print(line)
    if args.out is not None:
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from models.export import ExportError, Parity, export

    def show(parity: Parity) -> None:
        print(f"parity check: ONNX Runtime vs PyTorch on {parity.images} synthetic images")
        for line in parity.lines():
            print(line)

    try:
        result = export(args.model, args.out, opset=args.opset, on_parity=show)
    except (ExportError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    if result.backbone_max_abs_diff is not None:
        print(f"backbone max |onnx - torch| {result.backbone_max_abs_diff:.3e}")
    print(
        f"exported the ONNX backbone ({result.backbone.path.name}) and the full model "
        f"({result.full.path.name}) and recorded them in {result.manifest_path}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``acwi-models``."""
    args = _parser().parse_args(argv)
    handlers = {
        "synth": _synth,
        "train": _train,
        "evaluate": _evaluate,
        "export": _export,
        "monitor-sites": _monitor_sites,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
