"""The ``mdlib`` command.

    mdlib mini [DATA_ROOT]            write a synthetic mini-NSD in NSD's exact formats
    mdlib course [--preset mini|nsd]  run every lesson with papermill and summarise their numbers
    mdlib train-mini [OUT]            train the tiny models on mini-NSD's scenes (resumable)
    mdlib fetch --subject 1 --what minimal|full [--models] [--dry-run]
                                      the real NSD files (and models) the lessons need, resumable, verified
    mdlib reconstruct --subject 1 --stage 1|2 [--mode published|fast] [--images test|N..M] [--gather]
                                      a whole test set, one image at a time: sharded, resumable
    mdlib info                        show where mdlib reads and writes

README.md, "The `mdlib` command", lists them all; the pages of docs/ describe each in full: docs/data.md
(``mini``), docs/mini_world.md (``train-mini``), docs/fetch.md (``fetch``), docs/reconstruct.md
(``reconstruct``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from . import __version__, paths, presets


def _literal(text: str):
    """A papermill parameter value from the command line: a Python literal if it parses, else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cmd_mini(args) -> int:
    from .synth.write import write_mini_nsd

    root = paths.data_root(args.data_root, "mini")
    t0 = time.perf_counter()
    kwargs = {"subjects": tuple(args.subjects), "seed": args.seed, "progress": not args.quiet}
    for name in ("n_shared", "n_per_subject", "trials_per_session", "stim_size", "grid_scale"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    try:
        summary = write_mini_nsd(root, **kwargs)
    except (FileExistsError, ValueError) as err:   # other data in the folder; bad sizes
        print(f"mdlib mini: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    print(f"mini-NSD written to {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_course(args) -> int:
    from .course import CourseError, run_course

    params = {k: _literal(v) for k, v in (args.parameter or [])}
    try:
        run_course(preset=args.preset, data_root=args.data_root, out=args.out, parameters=params,
                   only=args.only, timeout=args.timeout, progress=not args.quiet)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_train_mini(args) -> int:
    import dataclasses

    from .train_mini import RecipeMismatch, TrainMiniConfig, train_mini

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainMiniConfig)
                 if getattr(args, f.name, None) is not None}
    if "unet_channels" in overrides:
        overrides["unet_channels"] = tuple(overrides["unet_channels"])
    out = args.out or paths.home() / "models" / "tiny-trained"
    try:
        config = TrainMiniConfig(**overrides)   # checks the layout options (e.g. a kind given twice)
    except ValueError as err:
        print(f"mdlib train-mini: {err}", file=sys.stderr)
        return 1
    if args.ship and config.layout_share > 0:   # refused before any training
        print("mdlib train-mini: --ship with --layout-share would replace the course's weights with models of "
              "another world (the course's mini-NSD has no layouts; docs/mini_world.md, \"Scene layouts\"). "
              "Train without --ship; bench_layout.py --models OUT measures such a folder.", file=sys.stderr)
        return 1
    try:
        record = train_mini(out, config, progress=not args.quiet)
    except RecipeMismatch as err:   # the work folder holds checkpoints of other scenes
        print(f"mdlib train-mini: {err}", file=sys.stderr)
        return 1
    print(json.dumps({k: record[k] for k in ("seconds", "final_loss", "vae_scaling_factor")}, indent=2))
    print(f"trained models written to {out}")
    if args.ship:
        from .train_mini import ship

        numbers = ship(out, progress=not args.quiet)
        print(json.dumps(numbers, indent=2))
        print("installed as the shipped weights (mdlib/weights/tiny-trained); commit them to share them")
    return 0


def _share(text: str) -> float:
    """``--layout-share``'s value: a number in [0, 1]."""
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"a share of the scenes, a number in [0, 1], not {text!r}")
    return share


def _rate(text: str) -> int:
    """``--max-rate``'s value: bytes per second (``500k``, ``20M``)."""
    from .fetch.remote import parse_rate

    try:
        return parse_rate(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a clear usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def cmd_fetch(args) -> int:
    from .fetch import FetchError, fetch_model_weights, fetch_nsd
    from .fetch.remote import _transient_errors as transient_errors
    from .fetch.remote import one_line, unreachable

    try:
        if args.what != "none":
            fetch_nsd(args.data_root, subjects=args.subject, what=args.what, endpoint_url=args.endpoint_url,
                      bucket=args.bucket, last_session=args.last_session, stimuli=args.stimuli,
                      coco=not args.no_coco, coco_source=args.coco_source, workers=args.workers,
                      retries=args.retries, dry_run=args.dry_run, verify=args.verify, progress=not args.quiet,
                      max_rate=args.max_rate, verify_sample=args.verify_sample, verify_seed=args.verify_seed)
        if args.models:
            fetch_model_weights(cache_dir=args.hf_cache, dry_run=args.dry_run)
        elif args.what == "none":
            print("nothing to fetch: --what none without --models")
    except (FetchError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except transient_errors() as err:   # a connection error that escaped the store's own handling
        print(f"error: {unreachable(args.endpoint_url or 'the S3 endpoint', err)}", file=sys.stderr)
        return 1
    except Exception as err:            # any other botocore error (an answer, or a request it refused)
        if not type(err).__module__.startswith("botocore"):
            raise
        print(f"error: an S3 request failed ({one_line(err)}); check --bucket and --endpoint-url, then run the "
              "same command again: finished files are kept and partial ones resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the complete files are in place, partial ones kept; run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def cmd_reconstruct(args) -> int:
    from .reconstruct import main as reconstruct_main

    from .reconstruct import BusyError

    try:
        return reconstruct_main(args)
    except (FileNotFoundError, ValueError, BusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def cmd_info(args) -> int:
    print(f"mdlib {__version__}")
    print(f"home ({paths.ENV_VAR}): {paths.home()}")
    for preset in presets.NAMES:
        print(f"data root for preset {preset!r}: {paths.data_root(None, preset)}")
    return 0


def cmd_eval_weights(args) -> int:
    """Download the evaluation networks' published weights (lesson 06's metrics on the real path)."""
    from mdlib import evalnets

    try:
        sources = evalnets.fetch_weights(cache_dir=args.hf_cache, progress=not args.quiet)
    except (RuntimeError, OSError) as err:   # WeightsNotFoundError is an OSError
        print(f"mdlib eval-weights: {err}", file=sys.stderr)
        return 1
    for key, source in sources.items():
        print(f"{key}: {source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdlib", description="MindDiffuser course support library")
    p.add_argument("--version", action="version", version=f"mdlib {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mini", help="write a synthetic mini-NSD in NSD's file formats")
    m.add_argument("data_root", nargs="?", default=None, help="where to write (default: $MDLIB_DATA/mini-nsd)")
    m.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 5, 7])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--n-shared", type=int, default=None, help="shared (test) images, as NSD's 1000")
    m.add_argument("--n-per-subject", type=int, default=None, help="images per subject, as NSD's 10000")
    m.add_argument("--trials-per-session", type=int, default=None, help="as NSD's 750")
    m.add_argument("--stim-size", type=int, default=None, help="stimulus size in pixels, as NSD's 425")
    m.add_argument("--grid-scale", type=float, default=None, help="volume grid relative to NSD's func1pt8mm")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_mini)

    c = sub.add_parser("course", help="run every lesson notebook with papermill")
    c.add_argument("--preset", choices=presets.NAMES, default="mini")
    c.add_argument("--data-root", default=None, help="dataset root (default: from the preset and $MDLIB_DATA)")
    c.add_argument("--out", default=None, help="folder for executed notebooks and results")
    c.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a papermill parameter for every lesson that declares it, e.g. -p SUBJECT 2")
    c.add_argument("--only", nargs="+", default=None, help="lessons whose file name starts with these, e.g. 01 02")
    c.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_course)

    t = sub.add_parser("train-mini", help="train the tiny models on mini-NSD's scenes (resumable)")
    t.add_argument("out", nargs="?", default=None, help="model folder (default: $MDLIB_DATA/models/tiny-trained)")
    t.add_argument("--seed", type=int, default=None)
    for name in ("n_scenes", "vae_steps", "clip_steps", "unet_steps", "vae_batch", "clip_batch", "unet_batch"):
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    t.add_argument("--unet-channels", dest="unet_channels", type=int, nargs="+", default=None,
                   help="the UNet's channels per resolution (default 32 64)")
    t.add_argument("--layout-share", dest="layout_share", type=_share, default=None, metavar="SHARE",
                   help="share of the training scenes given a large-scale layout, 0..1 (default 0: none; "
                        "docs/mini_world.md, \"Scene layouts\"); quality is measured on such scenes too")
    t.add_argument("--layout-kinds", dest="layout_kinds", nargs="+", choices=("horizon", "wall"), default=None,
                   help="the layouts' kinds (default: horizon wall)")
    t.add_argument("--ship", action="store_true",
                   help="then measure quality and install the result as mdlib's shipped weights (mdlib/weights)")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_train_mini)

    f = sub.add_parser("fetch", help="fetch the real NSD files and models the lessons need (resumable, verified)",
                       description="Fetch from s3://natural-scenes-dataset (anonymously; accept the NSD terms "
                                   "first) the files data_manifest/nsd.yaml lists, each subject's images out of "
                                   "the brick, and the COCO captions. Interrupted runs resume; a second run "
                                   "transfers nothing.")
    f.add_argument("--subject", type=int, nargs="+", default=[1], help="NSD subject(s), 1..8 (default: 1)")
    f.add_argument("--what", choices=("minimal", "full", "none"), default="minimal",
                   help="minimal: lessons 01-02 (betas of sessions 1-10); full: every lesson, every session; "
                        "none: no NSD files (with --models)")
    f.add_argument("--data-root", default=None, help="where to write (default: $MDLIB_DATA/nsd)")
    f.add_argument("--endpoint-url", default=None, help="another S3 server holding the bucket (default: AWS)")
    f.add_argument("--bucket", default=None, help="bucket name (default: the manifest's, natural-scenes-dataset)")
    f.add_argument("--last-session", type=int, default=None, help="fetch the betas of sessions 1..N")
    f.add_argument("--stimuli", choices=("subset", "brick", "none"), default="subset",
                   help="subset: each subject's images only (5.4 GB each, default); brick: all 73,000 (39.6 GB)")
    f.add_argument("--coco-source", default=None,
                   help="the COCO 2017 annotations zip: URL, s3://bucket/key or local path (default: COCO's site)")
    f.add_argument("--no-coco", action="store_true", help="do not fetch the COCO caption files")
    f.add_argument("--models", action="store_true",
                   help="also download the models of data_manifest/models.yaml into the Hugging Face cache")
    f.add_argument("--hf-cache", default=None, help="Hugging Face cache for --models (default: HF_HUB_CACHE)")
    f.add_argument("--workers", type=_count(1), default=8, help="parallel transfers (default: 8)")
    f.add_argument("--retries", type=_count(0), default=3, help="retries after a dropped connection (default: 3)")
    f.add_argument("--max-rate", type=_rate, default=None, metavar="BYTES_PER_S",
                   help="cap the download rate, all transfers together, e.g. 500k or 20M (SI units, bytes per "
                        "second; as curl's --limit-rate): for a link shared with others (default: no cap)")
    f.add_argument("--dry-run", action="store_true", help="list what would be fetched and its size; write nothing")
    f.add_argument("--verify", action="store_true",
                   help="re-hash present files instead of trusting the state, check each row of the subjects' "
                        "image files against its checksum and compare a sample of rows with the bucket's (with "
                        "--dry-run: report only)")
    f.add_argument("--verify-sample", type=_count(0), default=100, metavar="N",
                   help="--verify compares N random rows of each subject's image file, and its first and last, "
                        "with the bucket's (default: 100)")
    f.add_argument("--verify-seed", type=int, default=None, metavar="SEED",
                   help="the seed of --verify's sample (default: a fresh one, printed)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fetch)

    from .reconstruct import add_arguments as reconstruct_arguments

    r = sub.add_parser("reconstruct", help="reconstruct a subject's test images, sharded and resumable",
                       description="Reconstruct each test image into <out>/subjNN/<stage>/<nsdId>/ (image.png, "
                                   "outputs.npz, record.json), skipping finished images. Run it under torchrun, "
                                   "accelerate launch or a SLURM job array to share the images among processes; "
                                   "then --gather builds the results table and the metrics.")
    reconstruct_arguments(r)
    r.set_defaults(func=cmd_reconstruct)

    w = sub.add_parser("eval-weights", help="download the evaluation networks' pretrained weights (about 2.2 GB)",
                       description="AlexNet, Inception v3, EfficientNet-B1 (V1 and V2), SwAV ResNet-50 into torch "
                                   "hub's checkpoints/, CLIP ViT-L/14 into the Hugging Face cache. Afterwards the "
                                   "evaluation (weights='auto') finds them offline.")
    w.add_argument("--hf-cache", default=None, help="Hugging Face cache for CLIP (default: HF_HUB_CACHE)")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_eval_weights)

    i = sub.add_parser("info", help="show mdlib's folders")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
