"""`steerserve models fetch|build`: put a known model, or one derived from cached models, into the cache."""
from __future__ import annotations

import argparse
import logging
import sys

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="manage local models")
    models_cmd = models.add_subparsers(dest="models_command", required=True)
    fetch = models_cmd.add_parser("fetch", help="download, verify and convert a known model into the cache")
    fetch.add_argument("name", choices=["smollm2", "gemma3-270m"],
                       help="smollm2 (the default model) or gemma3-270m (a base model, for URIAL; Gemma Terms of Use)")
    build = models_cmd.add_parser("build", help="build a derived model into the cache (from cached models)")
    build.add_argument("name", choices=["smollm2-moe"],
                       help="smollm2-moe: SmolLM2 upcycled into a 4-expert Mixtral with one behaviour-carrying "
                            "expert, for expert steering and fTRI (about a minute on CPU)")


def run(args: argparse.Namespace) -> int:
    """Print the model's directory; 1 when fetching or building fails."""
    from steerserve.server.models import demo_moe
    from steerserve.server.models.store import KNOWN_MODELS, ModelFetchError, fetch, fetch_smollm2

    try:
        if args.models_command == "build":
            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            cache = Settings.load().cache
            print(demo_moe.build(cache, base=lambda: fetch_smollm2(cache)))
        else:
            print(fetch(KNOWN_MODELS[args.name], Settings.load().cache))
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
