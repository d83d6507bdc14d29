"""`vlprune calibrate`: search a method's hyperparameters for a budget, and write them for --config."""

from __future__ import annotations

import argparse

from vlprune import pruners
from vlprune.api import check_before_loading, load
from vlprune.cli.options import _budget, _positive, add_device_options, add_model_option
from vlprune.engine import POSITION_MODES
from vlprune.errors import VlpruneError


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="search a method's hyperparameters for a budget (visual-information-flow calibration)"
    )
    calibrate.add_argument("--method", default="vflowopt", help="method to calibrate (default vflowopt)")
    add_model_option(calibrate, default_model, f"built-in name, folder or HF id ({default_model})")
    calibrate.add_argument("--keep", type=_budget, required=True, help="budget: a count, or a fraction in (0, 1)")
    calibrate.add_argument("--data", default="shapes", help="unlabelled samples: shapes, easy-vqa or jsonl:PATH")
    calibrate.add_argument("--split", default="validation", help="split of --data (default validation)")
    calibrate.add_argument("--samples", type=_positive, default=30, help="samples to compare on (default 30)")
    calibrate.add_argument("--trials", type=_positive, default=50, help="search iterations (default 50)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--batch-size", type=_positive, default=8)
    calibrate.add_argument("--positions", choices=POSITION_MODES, default=None, help="default: the method's")
    add_device_options(calibrate)
    calibrate.add_argument("--out", required=True, help="JSON file to write (for --config)")


def execute(args: argparse.Namespace) -> int:
    from vlprune.eval.calibrate import SEARCH_SPACES, calibrate, write_config
    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.files import check_writable_file

    # Everything that can fail is checked before the model loads and the search runs.
    if args.method not in SEARCH_SPACES:
        raise VlpruneError(
            f"no calibration search space for {args.method!r}; methods with one: {', '.join(SEARCH_SPACES)}"
        )
    check_writable_file(args.out, "--out")
    check_before_loading(
        args.model, [pruners.create(args.method, keep=args.keep)], device=args.device, positions=args.positions
    )
    samples = load_dataset(args.data, split=args.split, limit=args.samples)
    pipeline = load(args.model, device=args.device, dtype=args.dtype, positions=args.positions)
    config = calibrate(
        pipeline, args.method, args.keep, samples, trials=args.trials, seed=args.seed, batch_size=args.batch_size
    )
    config.update(model=str(args.model), data=args.data, split=args.split, positions=args.positions)
    path = write_config(config, args.out)
    print(f"best mean cosine {config['score']:.4f} over {len(samples)} samples; wrote {path}")
    return 0
