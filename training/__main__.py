"""``python -m training --config training/configs/bundled.toml``: train, evaluate, export, write the card."""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from training.errors import TrainingError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="run config (TOML), e.g. training/configs/bundled.toml")
    p.add_argument("--out-dir", help="artefact folder (overrides out_dir)")
    p.add_argument("--lung1", type=Path, help="lung1_image.nrrd (default: $AINODE_CACHE or ~/.cache/ainode)")
    p.add_argument("--arch", choices=("seed", "default"), help="overrides model.arch")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.context=0 (VALUE in TOML syntax)")
    p.add_argument("--no-install", action="store_true", help="do not copy the model to export.install_to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "tf2onnx", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from training.config import load_config
    from training.train import run

    overrides: dict[str, Any] = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if args.arch:
        overrides["model.arch"] = args.arch
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    if args.no_install:
        overrides["export.install_to"] = ""
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    try:
        cfg = load_config(args.config, overrides)
        logging.getLogger(__name__).debug("effective config: %s", cfg.as_dict())
        result = run(cfg, lung1=args.lung1)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    study = result.metrics["study"]
    print(f"done in {result.seconds:.0f} s; test studies: AUC {study['roc_auc']:.3f}, accuracy {study['accuracy']:.3f}, "
          f"F1 {study['f1']:.3f} at threshold {result.metrics['threshold']:.3f}; "
          f"ONNX vs TF max |diff| {result.metrics['parity']['max_abs_diff']:.2g}")
    if "detection" in result.metrics:
        d = result.metrics["detection"]
        print(f"test detection: FROC {d['sensitivity_at_fp_per_scan']} CPM {d['cpm']:.3f}; localisation error "
              f"median {d['localisation_error_mm']['median']:.1f} mm")
    if "lung1" in result.evaluation:
        e = result.evaluation["lung1"]
        print(f"lung1: top slice {e['top_slice']} ({'inside' if e['top_slice_in_nodule'] else 'outside'} "
              f"nodule slices {e['nodule_slices']}), study score {e['study_score']:.3f}, end slices "
              f"{e['end_slice_scores']}")
        f = e.get("top_finding")
        if f and f.get("found"):
            print(f"lung1 top finding: slice {f['slice']} row {f['row']} column {f['column']} p {f['probability']:.3f}"
                  + (f", inside the label: {f['inside_label']}, {f['distance_to_label_centroid_mm']} mm from its "
                     "centroid" if "inside_label" in f else ""))
    print(f"artefacts in {result.out_dir}:")
    for path in (result.onnx_path, result.card_path, result.metrics_path, *result.plots):
        print(f"  {path}")
    if result.installed:
        print(f"installed: {result.installed} (+ card)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
