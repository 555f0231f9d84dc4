"""``acwi-models``: generate synthetic benchmarks, train and evaluate models.

Commands::

    acwi-models synth --out DIR --studies N --seed S [--sites 0,1,2,3] [--images-per-study 1]
                      [--size 256] [--modality DX|CR|CT] [--slices 16] [--enhanced]
    acwi-models train --preset default --out models/registry/default [--config FILE]
                      [--data DIR] [--epochs N] [--threads N] [--resume] [--overwrite]
                      [--init-from MODEL --ewc-lambda X [--ewc-data OLD_DIR]]
    acwi-models evaluate --model models/registry/default --data DIR [--out REPORT_DIR]
                         [--compare MODEL2] [--costly-images 60] [--region-fraction 0.5]
    acwi-models export --model models/registry/default [--out DIR] [--opset N]

Exit status: 0 done; 2 the command line is wrong (argparse: an unknown option, a number out of
range, an unknown preset or synthetic site); 1 the command ran and failed, in one line on
stderr (``<command> failed: ...``: a file or folder missing or unreadable, a configuration that
does not parse or has unknown keys, a checkpoint or weights that do not fit the architecture, an
export that does not check out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

#: The training presets (``models/train.py`` reads ``presets/<name>.toml`` from here).
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _sites(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sites must be comma-separated integers: {text}") from exc


def _synth_sites(text: str) -> list[int]:
    """``--sites`` of ``synth``: the phantom sites, 0 to ``len(SITES) - 1``."""
    from models.data.synth import SITES

    sites = _sites(text)
    if not sites:
        raise argparse.ArgumentTypeError("give at least one site")
    unknown = [s for s in sites if not 0 <= s < len(SITES)]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown site {unknown[0]}: sites are 0 to {len(SITES) - 1}"
        )
    return sites


def _site(text: str) -> int:
    """``--baseline-site``: one phantom site, 0 to ``len(SITES) - 1``."""
    sites = _synth_sites(text)
    if len(sites) != 1:
        raise argparse.ArgumentTypeError(f"give one site, not {text!r}")
    return sites[0]


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """``--region-fraction``: more than 0, at most 1 (as ``worker.sr_region_fraction``)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {text}")
    return value


def _image_size(text: str) -> int:
    """``--size`` of ``synth``: :data:`~models.data.synth.MIN_SIZE` to ``MAX_SIZE`` pixels."""
    from models.data.synth import MAX_SIZE, MIN_SIZE

    value = _at_least(MIN_SIZE)(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SIZE}, not {value}")
    return value


def _preset(text: str) -> str:
    """``--preset``: the name of a ``presets/*.toml`` file."""
    available = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    if text not in available:
        raise argparse.ArgumentTypeError(
            f"unknown preset {text!r}; available: {', '.join(available)}"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acwi-models", description="Generate synthetic benchmarks, train and evaluate models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic multi-site DICOM benchmark")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--studies", type=_at_least(1), default=100)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sites", type=_synth_sites, default=[0, 1, 2, 3])
    synth.add_argument("--images-per-study", type=_at_least(1), default=1)
    synth.add_argument(
        "--size",
        type=_image_size,
        help="image matrix, 64 to 4096 (default 256; 512 with --modality CT)",
    )
    synth.add_argument(
        "--modality",
        choices=["DX", "CR", "CT"],
        help="write every study in this modality (default: each site's own, DX or CR)",
    )
    synth.add_argument(
        "--slices",
        type=_at_least(1),
        default=16,
        help="axial slices per CT series (--modality CT)",
    )
    synth.add_argument(
        "--enhanced",
        action="store_true",
        help="each CT series as one multi-frame Enhanced CT image (--modality CT)",
    )

    train = sub.add_parser("train", help="train and calibrate a model")
    train.add_argument("--preset", type=_preset, default="default")
    train.add_argument("--config", type=Path, help="TOML merged over the preset")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--data", type=Path, help="DICOM folder with labels.csv")
    train.add_argument("--epochs", type=int)
    train.add_argument("--threads", type=int)
    train.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model --out already holds (kept until the new one is complete)",
    )
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
    evaluate.add_argument("--mc-samples", type=_at_least(2), default=20)
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
    evaluate.add_argument(
        "--region-fraction",
        type=_fraction,
        help="the deployment's worker.sr_region_fraction (or the model's route's"
        " results.sr_region_fraction), for the SR's AI region box against the lesion boxes"
        " (default: the node's, 0.5)",
    )

    export = sub.add_parser(
        "export", help="export the ONNX backbone and full model, check parity, record them"
    )
    export.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    export.add_argument("--out", type=Path, help="write ONNX, manifest and weights here instead")
    export.add_argument("--opset", type=_at_least(1), default=18)

    monitor = sub.add_parser(
        "monitor-sites",
        help="what the node's model monitoring would say of each phantom site's studies"
        " after a baseline site's",
    )
    monitor.add_argument("--model", type=Path, required=True, help="manifest or its folder")
    monitor.add_argument("--baseline-site", type=_site, default=0)
    monitor.add_argument("--sites", type=_synth_sites, help="default: every phantom site")
    monitor.add_argument(
        "--studies", type=_at_least(5), default=100, help="studies per site (default 100)"
    )
    monitor.add_argument("--size", type=_image_size, default=128, help="image matrix (default 128)")
    monitor.add_argument("--mc-samples", type=_at_least(2), default=20)
    monitor.add_argument("--threads", type=_at_least(1))
    monitor.add_argument("--json", type=Path, help="also write the readings here")
    return parser


def _monitor_sites(args: argparse.Namespace) -> int:
    from models.model_io import load_analyser
    from models.monitoring_check import format_readings, monitor_sites

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
    if args.out.exists() and not args.out.is_dir():
        print(f"synth failed: --out {args.out} exists and is not a folder", file=sys.stderr)
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
    except OSError as exc:
        print(f"synth failed: {_os_error(exc)}", file=sys.stderr)
        return 1
    what = f"CT series of {args.slices} slices" if ct else "studies"
    if args.enhanced:
        what = f"CT images of {args.slices} frames"
    print(f"wrote {args.studies} {what} and {csv_path}")
    return 0


def _os_error(exc: OSError) -> str:
    """``path: reason`` for a file-system error (its own text when it names no file)."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _state_dict_mismatch(exc: RuntimeError) -> tuple[int, int, int] | None:
    """Missing, unexpected and reshaped key counts of a ``load_state_dict`` error, else None."""
    text = str(exc)
    if not text.startswith("Error(s) in loading state_dict"):
        return None
    missing = unexpected = reshaped = 0
    for part in text.split("\n\t")[1:]:
        keys = len(re.findall(r'"[^"]*"', part))
        if part.startswith("Missing key(s)"):
            missing += keys
        elif part.startswith("Unexpected key(s)"):
            unexpected += keys
        elif part.startswith("size mismatch for"):
            reshaped += 1
    return missing, unexpected, reshaped


def _data_problem(flag: str, folder: Path | None) -> str | None:
    """Why ``folder`` (a labelled DICOM folder given as ``flag``) cannot be read, else None."""
    if folder is None:
        return None
    if not folder.is_dir():
        return f"{flag} {folder} is not a folder"
    if not (folder / "labels.csv").is_file():
        return f"{flag} {folder} has no labels.csv"
    return None


def _train(args: argparse.Namespace) -> int:
    from models.train import CHECKPOINT_NAME, load_config, train

    problem = _data_problem("--data", args.data) or _data_problem("--ewc-data", args.ewc_data)
    if problem is None and args.init_from is not None and not args.init_from.exists():
        problem = f"--init-from {args.init_from} does not exist"
    if problem is None and args.out.exists() and not args.out.is_dir():
        problem = f"--out {args.out} exists and is not a folder"
    if problem is not None:
        print(f"training failed: {problem}", file=sys.stderr)
        return 1
    made_out = not args.out.exists()
    try:
        config = load_config(args.preset, args.config)
        if args.epochs is not None:
            config.train.epochs = args.epochs
        if args.threads is not None:
            config.train.threads = args.threads
        if args.ewc_lambda is not None:
            config.continual.ewc_lambda = args.ewc_lambda
        result = train(
            config,
            args.out,
            data_dir=args.data,
            resume=args.resume,
            init_from=args.init_from,
            ewc_data=args.ewc_data,
            overwrite=args.overwrite,
        )
    except Exception as exc:
        message = _training_error(exc, args, CHECKPOINT_NAME)
        if message is None:
            raise
        print(f"training failed: {message}", file=sys.stderr)
        if made_out and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()  # made for this run, and nothing was written into it
        return 1
    print(
        f"validation accuracy {result.val.accuracy:.3f} (balanced "
        f"{result.val.balanced_accuracy:.3f}) in {result.seconds:.1f}s"
    )
    return 0


def _training_error(exc: Exception, args: argparse.Namespace, checkpoint_name: str) -> str | None:
    """One line for an error of the user's inputs (None: a bug, shown as a traceback)."""
    if type(exc).__name__ == "TOMLDecodeError":  # tomllib's, or the tomli backport's
        where = args.config if args.config is not None else f"preset {args.preset}"
        return f"{where} is not valid TOML: {exc}"
    if isinstance(exc, ValueError):  # configuration, data, manifests (ManifestError)
        return str(exc)
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, pickle.UnpicklingError | EOFError):
        return f"a checkpoint or weights file cannot be read: {exc or type(exc).__name__}"
    if isinstance(exc, RuntimeError):
        counts = _state_dict_mismatch(exc)
        if counts is None:
            return None
        checkpoint = args.out / checkpoint_name
        source = checkpoint if args.resume and checkpoint.is_file() else args.init_from
        missing, unexpected, reshaped = counts
        shape = f", {reshaped} of another shape" if reshaped else ""
        what = f"checkpoint {source}" if source is not None else "the weights"
        return (
            f"{what} does not fit the architecture: {missing} missing,"
            f" {unexpected} unexpected keys{shape}"
        )
    return None


def _evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import SR_REGION_FRACTION, evaluate_model, summary_lines

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
            region_fraction=(
                SR_REGION_FRACTION if args.region_fraction is None else args.region_fraction
            ),
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
        with _exit_on_sigterm():
            result = export(args.model, args.out, opset=args.opset, on_parity=show)
    except (ExportError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"export failed: {_os_error(exc)}", file=sys.stderr)
        return 1
    if result.backbone_max_abs_diff is not None:
        print(f"backbone max |onnx - torch| {result.backbone_max_abs_diff:.3e}")
    print(
        f"exported the ONNX backbone ({result.backbone.path.name}) and the full model "
        f"({result.full.path.name}) and recorded them in {result.manifest_path}"
    )
    return 0


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`SystemExit` (143) in the block, so its clean-up runs.

    The default action ends the process at once, leaving an export's temporary files behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
