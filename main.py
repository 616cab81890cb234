"""MedSAM for MONAI Label: the project's entry point (it only wires commands to the modules).

    python main.py eval DATASTORE --out DIR [--mode 2d|3d|3d-keys] [--jitter PX] [--model NAME]
        [--loose PCT ...] [--clicks N] [--mode 3d-keys --add-boxes N [--next worst|gap]]
    python main.py bench --json FILE [--no-http | --http-only]
    python main.py serve [--studies PATH_OR_URL | --orthanc [--orthanc-port 8042]] [--host 127.0.0.1] [--port 8000]
    [torchrun --nproc_per_node N] python main.py train DATASTORE --out DIR [--publish FILE] [options]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SAMPLE_STUDIES = ROOT / "sample-datasets" / "totalseg"


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="medsam-lite", help="medsam-lite (default) or medsam-vit-b")
    parser.add_argument("--checkpoint", help="weights file (required for medsam-vit-b, or MEDSAM_CHECKPOINT)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.next != "worst" and args.add_boxes is None:
        sys.exit("--next chooses where --add-boxes puts each box: use it with --add-boxes")
    if args.add_boxes is not None:
        from medsam_engine.evaluate_interactive import evaluate_key_boxes

        if args.mode != "3d-keys" or args.loose or args.clicks or args.jitter:
            sys.exit("--add-boxes adds tight key-slice boxes: use it with --mode 3d-keys, without --loose, "
                     "--clicks or --jitter")
        evaluate_key_boxes(args.datastore, args.out, keys=args.keys, add_boxes=args.add_boxes, model=args.model,
                           checkpoint=args.checkpoint, device=args.device, zoom=not args.no_zoom,
                           prior=not args.no_prior, limit=args.limit, images=args.images, every=args.every,
                           next_slice=args.next)
        return
    if args.loose or args.clicks:
        from medsam_engine.evaluate_interactive import evaluate_interactive

        if args.mode != "2d":
            sys.exit("--loose and --clicks evaluate 2d boxes: use --mode 2d")
        evaluate_interactive(args.datastore, args.out, loose=args.loose or [0.0], clicks=args.clicks,
                             refine=args.refine, model=args.model, checkpoint=args.checkpoint, device=args.device,
                             zoom=not args.no_zoom, prior=not args.no_prior, limit=args.limit, every=args.every,
                             images=args.images)
        return
    from medsam_engine.evaluate import evaluate

    evaluate(args.datastore, args.out, mode=args.mode, jitter=args.jitter, model=args.model,
             checkpoint=args.checkpoint, device=args.device, zoom=not args.no_zoom, prior=not args.no_prior,
             limit=args.limit, keys=args.keys, bone_boxes=not args.no_bone_boxes,
             rounded_keys=not args.linear_keys)


def cmd_bench(args: argparse.Namespace) -> None:
    if not args.http_only:
        from medsam_engine.bench import run_bench

        run_bench(args.json, datastore=args.datastore, model=args.model, checkpoint=args.checkpoint,
                  device=args.device, repeats=args.repeats)
    if not args.no_http:
        from medsam_http.bench import run_http_bench

        run_http_bench(args.json, datastore=args.datastore, model=args.model, checkpoint=args.checkpoint,
                       device=args.device, repeats=args.repeats)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> None:
    from medsam_http.server import serve_command

    conf = list(args.conf or [])
    if not _is_loopback(args.host):  # opening the bind address is the user asking for other hosts
        conf.insert(0, ("allow_remote", "true"))
    if args.orthanc:
        from medsam_http.orthanc import OrthancError
        from medsam_http.stack import serve_with_orthanc

        try:
            sys.exit(serve_with_orthanc(args.host, args.port, dict(conf), args.orthanc_port))
        except OrthancError as exc:
            sys.exit(f"error: {exc}")
    os.execv(sys.executable, serve_command(args.studies, args.host, args.port, conf))


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from medsam_engine.training import TrainConfig, train_datastore

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(output_dir=args.out, publish_path=args.publish, model=args.model, checkpoint=args.checkpoint,
                      device=args.device, max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, jitter=args.jitter, loose_boxes=args.loose_boxes,
                      val_split=args.val_split,
                      max_train_slices=args.max_train_slices, max_val_slices=args.max_val_slices,
                      early_stop_patience=args.patience, precision=args.precision, publish_mode=args.publish_mode,
                      num_workers=args.workers, seed=args.seed, replay=args.replay,
                      distill=args.distill)
    stats = train_datastore(args.datastore, cfg, organs=args.organ or (), val_images=args.val_image or ())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{stats['status']}: epochs {stats['epoch']}, validation Dice {stats['baseline_val_dice']:.4f} -> "
              f"best {stats['best_metric']:.4f}; published {(stats['published'] or {}).get('version')}; "
              f"stats {cfg.stats_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MedSAM served as a MONAI Label app")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="DSC/NSD of box-prompted MedSAM vs the filled box on a datastore")
    p.add_argument("datastore", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("2d", "3d", "3d-keys"), default="2d",
                   help="2d: a box per object and slice; 3d: one 3D box per object; 3d-keys: tight boxes on key slices")
    p.add_argument("--keys", type=int, default=3, help="key slices per object in 3d-keys (the ends and the middle for 3)")
    p.add_argument("--jitter", type=float, default=0.0, help="move box edges by up to PX pixels (seeded)")
    p.add_argument("--no-zoom", action="store_true", help="disable crop-and-zoom for small boxes")
    p.add_argument("--no-prior", action="store_true", help="disable the small-box prior (inscribed ellipse)")
    p.add_argument("--no-bone-boxes", action="store_true",
                   help="3d: propagate boxes in the bone window too, instead of the bone's own box per slice")
    p.add_argument("--linear-keys", action="store_true",
                   help="3d-keys: interpolate boxes between key slices linearly, not as a rounded object's sections")
    p.add_argument("--limit", type=int, help="evaluate at most this many images")
    p.add_argument("--loose", type=float, nargs="+", metavar="PCT",
                   help="2d: move each box edge outwards by 0..PCT %% of the box side (seeded); several levels "
                        "are evaluated side by side, e.g. --loose 0 10 25")
    p.add_argument("--clicks", type=int, default=0, metavar="N",
                   help="2d: up to N simulated corrective clicks after the box (DSC per click, NoC@85/@90)")
    p.add_argument("--refine", nargs="+", choices=("rules", "points"), default=["rules"],
                   help="click refinement(s) compared by --clicks (rules: box prompts only; points: SAM point prompts)")
    p.add_argument("--add-boxes", type=int, metavar="N",
                   help="3d-keys: after the --keys boxes, up to N more tight key-slice boxes, each where --next says "
                        "(volume DSC after each box, boxes to reach 0.85 / 0.90)")
    p.add_argument("--next", choices=("worst", "gap"), default="worst",
                   help="--add-boxes: box the worst slice (by the truth, an oracle) or the middle of the largest "
                        "gap between boxed slices (what an annotator can do)")
    p.add_argument("--every", type=int, default=1,
                   help="--loose/--clicks/--add-boxes: only every n-th object (quick runs)")
    p.add_argument("--images", nargs="+", help="--loose/--clicks/--add-boxes: only these image ids")
    _model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="engine latency, then HTTP latency through a real server")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--datastore", type=Path, default=SAMPLE_STUDIES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-http", action="store_true", help="skip the HTTP round trips through a real server")
    p.add_argument("--http-only", action="store_true", help="only the HTTP round trips (http_* figures)")
    _model_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="start the MONAI Label server with the medsam app")
    p.add_argument("--studies", default=str(SAMPLE_STUDIES))
    p.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1 unless you open it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app config, e.g. model medsam-vit-b")
    p.add_argument("--orthanc", action="store_true", help="also start Orthanc with the sample DICOM series and serve them")
    p.add_argument("--orthanc-port", type=int, default=8042, help="Orthanc's HTTP port with --orthanc")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="fine-tune on a datastore's final labels (runs under torchrun for DDP)")
    p.add_argument("datastore", type=Path)
    p.add_argument("--out", type=Path, required=True, help="run directory: stats, curves, last checkpoint")
    p.add_argument("--publish", type=Path, help="served weights file to update when validation Dice improves")
    p.add_argument("--publish-mode", choices=("improved", "best", "never"), default="improved")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--jitter", type=float, default=5.0, help="box edges moved outwards by 0..PX model pixels (the paper: 0-20 at 1024 px)")
    p.add_argument("--loose-boxes", type=float, default=0.0,
                   help="share of draws prompted with the boxes one-box 3D propagation gives a slice")
    p.add_argument("--val-split", type=float, default=0.2, help="share of slices held back for validation")
    p.add_argument("--val-image", action="append", help="hold this image back for validation instead")
    p.add_argument("--organ", action="append", help="train on this label name only (labels.json)")
    p.add_argument("--replay", type=float, default=2.0,
                   help="with --organ: objects of the other labels (not anchors) replayed per training slice (0: none)")
    p.add_argument("--distill", type=float, default=50.0,
                   help="with --organ: weight of distillation towards the served model's masks on the other labels' "
                        "objects of the training slices (0: off)")
    p.add_argument("--max-train-slices", type=int, default=0)
    p.add_argument("--max-val-slices", type=int, default=0)
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without gain (0: off)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="GPU autocast")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)
    p.set_defaults(func=cmd_train)

    args = parser.parse_args(argv)
    from medsam_engine.errors import EngineInputError, ModelLoadError

    try:
        args.func(args)
    except (EngineInputError, ModelLoadError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
