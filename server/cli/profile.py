"""`steerserve profile sinks`: attention statistics of a model per (layer, head); flags sink and dormant heads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    profile = commands.add_parser("profile", help="attention statistics of the served model")
    profile_cmd = profile.add_subparsers(dest="profile_command", required=True)
    sinks = profile_cmd.add_parser("sinks", help="per (layer, head) key-0 mass, row and column entropy; flags "
                                                 "sink and dormant heads (docs/tools.md); writes JSON + PNG")
    sinks.add_argument("--model", default=None, help="HF checkpoint dir, or smollm2 (default)")
    sinks.add_argument("--texts", type=Path, help="a task file (.jsonl: its rendered prompts) or a text file (one "
                                                  "text per line); default: the shipped classification tasks")
    sinks.add_argument("--limit", type=int, help="profile at most this many texts")
    sinks.add_argument("--out", type=Path, default=Path("sinks.json"), help="JSON output (the PNG goes beside it)")
    sinks.add_argument("--row-threshold", type=float, help="sink head: row entropy R below this (default 0.3)")
    sinks.add_argument("--col-threshold", type=float, help="sink head: column entropy C above this (default 0.9)")
    sinks.add_argument("--mass-threshold", type=float, help="dormant head: key-0 mass above this (default 0.8)")


def run(args: argparse.Namespace) -> int:
    """Write the profile (JSON, and a PNG beside it); 1 when the model or the texts cannot be read."""
    from tqdm import tqdm

    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.steering import profile as P

    try:
        model_path = resolve_model(args.model, Settings.load().cache)
        model, tokenizer = P.load_model(model_path)
        sequences = P.read_texts(args.texts, tokenizer)[: args.limit]
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    thresholds = {k: v for k, v in (("row_threshold", args.row_threshold), ("col_threshold", args.col_threshold),
                                    ("mass_threshold", args.mass_threshold)) if v is not None}
    result = P.profile_sinks(model, sequences, model_path.name, lambda xs: tqdm(xs, desc="profiling", unit="text"),
                             **thresholds)
    P.write(result, args.out, args.out.with_suffix(".png"))
    print(f"{len(result.sink_heads())} sink heads, {len(result.dormant_heads())} dormant heads of "
          f"{result.num_layers * result.num_heads}; wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0
