"""Centralized training on pooled site data (the upper-bound baseline); writes the best checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from client_agent.commands.options import json_object, label_map_arg, size_arg, yes_no


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from client_agent.data import AUGMENTATIONS, NORMALIZE_MODES
    from client_agent.training import OPTIMIZERS
    from model import ARCHITECTURES, DEFAULT_ARCHITECTURE

    parser.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                        help="training data folder; repeat to pool several (--data a --data b)")
    parser.add_argument("--val-data", type=Path, action="append", metavar="DIR",
                        help="validation folder(s); default: --val-fraction of the pooled cases")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (best validation Dice)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=DEFAULT_ARCHITECTURE)
    parser.add_argument("--options-json", type=json_object, metavar="JSON",
                        help="build_model options, e.g. '{\"channels\": [8, 16, 32, 64]}'")
    parser.add_argument("--img-size", type=int, nargs="+", default=[64], metavar="N",
                        help="training grid: one int or three (default 64)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="adam (default) or sgd")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum in [0, 1) (default 0)")
    parser.add_argument("--lambda-dice", type=float, default=0.5, help="Dice weight in the Dice+CE loss (default 0.5)")
    parser.add_argument("--amp", type=yes_no, default=True, metavar="yes/no", help="bf16 autocast on CUDA (default yes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-map", type=label_map_arg, metavar="PRESET|JSON",
                        help="label preset (brats_regions, msd_brain_tumour, lits, acdc) or JSON {raw: class}")
    parser.add_argument("--num-classes", type=int,
                        help="classes incl. background (default: preset's, else from the labels)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--augment", type=yes_no, default=True, metavar="yes/no", help="default yes")
    parser.add_argument("--augmentation", choices=AUGMENTATIONS, default="standard",
                        help="recipe: standard (rotations, scaling, flips, small intensity changes; default), "
                             "synthseg (every draw a new contrast from the labels, bias field, gamma, noise, "
                             "left-right flips only: for models that must hold on other scanners and contrasts), "
                             "contrast (only that new contrast, on half of the draws, no geometry) or none")
    parser.add_argument("--normalize", choices=NORMALIZE_MODES, default="nonzero",
                        help="z-score over nonzero voxels (MR) or the whole volume (CT)")
    parser.add_argument("--spacing-mm", type=float, default=0.0, metavar="MM",
                        help="resample every case to this isotropic voxel spacing, then crop/pad to --img-size "
                             "around the foreground (recorded in the checkpoint; fedseg segment then resamples "
                             "scans to it); 0 (default): resize whole volumes to --img-size")
    parser.add_argument("--patch-size", type=int, nargs="+", metavar="N",
                        help="train on random windows of this size (one int or three, at most --img-size, a "
                             "multiple of the network's downsampling) and predict by sliding them over the volume, "
                             "as nnU-Net does; steps cost about in proportion to the window's voxels (recorded in "
                             "the checkpoint). Default: whole volumes")
    parser.add_argument("--cache-dir", type=Path, help="keep preprocessed volumes here (default: in memory)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")


def run(args: argparse.Namespace) -> int:
    from client_agent.centralized import TrainSettings, train_centralized

    settings = TrainSettings(
        data_dirs=tuple(args.data), val_dirs=tuple(args.val_data or ()), out=args.out, architecture=args.architecture,
        options=args.options_json or {}, img_size=size_arg("--img-size", args.img_size),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda_dice=args.lambda_dice, amp=args.amp,
        optimizer=args.optimizer, momentum=args.momentum,
        device=args.device, seed=args.seed, label_map=args.label_map, num_classes=args.num_classes,
        val_fraction=args.val_fraction, augment=args.augment, augmentation=args.augmentation, normalize=args.normalize, spacing_mm=args.spacing_mm,
        patch_size=size_arg("--patch-size", args.patch_size) if args.patch_size else (), cache_dir=args.cache_dir,
        num_workers=args.num_workers,
    )
    summary = train_centralized(settings, on_epoch=lambda r: print(r.line(), flush=True))
    print(
        f"best epoch {summary.best_epoch}: validation Dice {summary.best_dice:.4f}; checkpoint {summary.checkpoint} "
        f"({summary.train_cases} training, {summary.val_cases} validation cases, {len(summary.skipped)} skipped; "
        f"{summary.seconds:.0f}s)"
    )
    return 0
