"""`steerserve adapters build-demo|train-iapt`: adapters for the adapter pool."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    adapters = commands.add_parser("adapters", help="adapters for the adapter pool")
    adapters_cmd = adapters.add_subparsers(dest="adapters_command", required=True)
    demo = adapters_cmd.add_parser("build-demo", help="train small demo LoRA adapters for the default model "
                                                      "(about a minute each on CPU); prints their directories")
    demo.add_argument("--model", type=Path, help="base model directory (default: the embedded SmolLM2)")
    demo.add_argument("--out", type=Path, help="where to write them (default: <cache>/adapters)")
    demo.add_argument("--steps", type=int, default=20, help="training steps per adapter (batch of 8)")
    demo.add_argument("names", nargs="*", help="which demos (default: all; ahoy-iapt is the IAPT adapter for the "
                                               "ahoy task, a few minutes on CPU)")
    train = adapters_cmd.add_parser("train-iapt", help="train an IAPT adapter (instruction-aware soft prompts, "
                                                       "steering/iapt.py) on instruction/response pairs")
    train.add_argument("--model", required=True, help="base model: a HF checkpoint dir, or smollm2")
    train.add_argument("--data", type=Path, required=True,
                       help='JSONL, one {"instruction": str, "response": str} per line')
    train.add_argument("--out", type=Path, required=True, help="adapter directory to write (replaced atomically)")
    train.add_argument("--bottleneck", type=int, default=32, help="m: the generators' inner width")
    train.add_argument("--degrees", type=int, nargs=2, default=[5, 4], metavar=("P", "Q"),
                       help="degrees of the rational activation")
    train.add_argument("--shared", action="store_true", help="one pair of projections for all layers")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    return train_iapt_adapter(args) if args.adapters_command == "train-iapt" else build_demo_adapters(args)


def build_demo_adapters(args: argparse.Namespace) -> int:
    """Train the named demo adapters (default: all) and print their directories; 1 on an unknown name or model."""
    from steerserve.server.adapters.demos import DEMOS, IAPT_DEMOS, build_demo, build_iapt_demo
    from steerserve.server.models.store import ModelFetchError, resolve_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    known = [*DEMOS, *IAPT_DEMOS]
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        print(f"error: unknown demo {unknown[0]!r} (known: {', '.join(known)})", file=sys.stderr)
        return 1
    settings = Settings.load()
    try:
        model_path = resolve_model(str(args.model) if args.model else None, settings.cache)
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in args.names or known:
        out = args.out or settings.cache / "adapters"
        if name in IAPT_DEMOS:  # --steps is the LoRA demos' setting; the IAPT demo has its own recipe
            print(build_iapt_demo(model_path, out, name))
        else:
            print(build_demo(model_path, out, name, steps=args.steps))
    return 0


def train_iapt_adapter(args: argparse.Namespace) -> int:
    """Train one IAPT adapter into --out and print a one-line summary; 1 on bad data, model or paths."""
    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.server.training.iapt import DataError, train_iapt

    try:
        model_path = resolve_model(args.model, Settings.load().cache)
        result = train_iapt(model_path, args.data, args.out, bottleneck=args.bottleneck, degrees=tuple(args.degrees),
                            shared=args.shared, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed)
    except (DataError, ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    losses, last = result.losses, result.losses[-5:]
    print(f"{args.out}: {result.iapt.num_parameters():,} parameters, {len(losses)} steps in {result.seconds:.0f} s, "
          f"loss {losses[0]:.3f} -> {sum(last) / len(last):.3f} (mean of the last {len(last)} steps)")
    return 0
