"""The ``mdlib`` command.

    mdlib mini [DATA_ROOT]            write a synthetic mini-NSD in NSD's exact formats
    mdlib course [--preset mini|nsd]  run every lesson with papermill and summarise their numbers
    mdlib train-mini [OUT]            train the tiny models on mini-NSD's scenes (resumable)
    mdlib info                        show where mdlib reads and writes
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from . import __version__, paths


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
    summary = write_mini_nsd(root, **kwargs)
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

    from .train_mini import TrainMiniConfig, train_mini

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainMiniConfig)
                 if getattr(args, f.name, None) is not None}
    out = args.out or paths.home() / "models" / "tiny-trained"
    record = train_mini(out, TrainMiniConfig(**overrides), progress=not args.quiet)
    print(json.dumps({k: record[k] for k in ("seconds", "final_loss", "vae_scaling_factor")}, indent=2))
    print(f"trained models written to {out}")
    if args.ship:
        from .train_mini import ship

        numbers = ship(out, progress=not args.quiet)
        print(json.dumps(numbers, indent=2))
        print("installed as the shipped weights (mdlib/weights/tiny-trained); commit them to share them")
    return 0


def cmd_info(args) -> int:
    print(f"mdlib {__version__}")
    print(f"home ({paths.ENV_VAR}): {paths.home()}")
    for preset in paths.PRESETS:
        print(f"data root for preset {preset!r}: {paths.data_root(None, preset)}")
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
    c.add_argument("--preset", choices=paths.PRESETS, default="mini")
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
    t.add_argument("--ship", action="store_true",
                   help="then measure quality and install the result as mdlib's shipped weights (mdlib/weights)")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_train_mini)

    i = sub.add_parser("info", help="show mdlib's folders")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
