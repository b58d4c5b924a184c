"""`steerserve ftri`: rank MoE experts by how their routing separates a behaviour class (fTRI)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    ftri = commands.add_parser("ftri", help="rank MoE experts by how their routing separates a behaviour class "
                                            "(fTRI); writes a ranked list, a heatmap and a steering profile")
    ftri.add_argument("--model", required=True, help="a local HF MoE checkpoint directory, or smollm2-moe")
    ftri.add_argument("--sets", type=Path, nargs="+", required=True,
                      help='JSONL prompt sets, one {"prompt": ..., "label"?: ...} per line; label: the file stem')
    ftri.add_argument("--target", required=True, help="the class whose experts to find")
    ftri.add_argument("--classify", nargs="*", default=[], metavar="CLASS=REGEX",
                      help="with one set: classes from the greedy responses, the first matching regex wins")
    ftri.add_argument("--generated-tokens", type=int, default=0,
                      help="also count routing over the first N-1 generated tokens (default: prompt tokens only)")
    ftri.add_argument("--max-tokens", type=int, default=32, help="response length for --classify")
    ftri.add_argument("--top-k", type=int, default=10, help="experts switched off in the written profile")
    ftri.add_argument("--no-chat", action="store_true", help="send prompts raw, without the chat template")
    ftri.add_argument("--out", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    """Write ftri.json, ftri.png and profile.json under --out and print the top experts; 1 when no model."""
    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.server.tools.ftri import run as run_ftri

    try:
        model_path = resolve_model(str(args.model), Settings.load().cache)
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = run_ftri(model_path, args.sets, args.target, args.out, classify_rules=args.classify,
                      generated_tokens=args.generated_tokens, max_tokens=args.max_tokens, top_k=args.top_k,
                      chat=not args.no_chat)
    for r in report["ranked"][:args.top_k]:
        print(f"{r['expert']:>8s}  score {r['score']:+.4f}  target {r['freq_target']:.3f}  rest {r['freq_rest']:.3f}")
    print(f"wrote {args.out}/ftri.json, ftri.png, profile.json")
    return 0
