"""`steerserve vectors list|put|get|delete|train`: a server's control vector store, and the trainer.

The store commands talk to a running server (`--url`, default $STEERSERVE_BASE_URL or http://127.0.0.1:8000;
`--api-key`, default $STEERSERVE_API_KEY) with the standard library only. `train` runs offline on a Hugging Face
checkpoint (server/training/vectors.py) and can `--register` its result with a server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"


def add_parser(commands: argparse._SubParsersAction) -> None:
    vectors = commands.add_parser("vectors", help="control vectors: a server's vector store, and the trainer")
    sub = vectors.add_subparsers(dest="vectors_command", required=True)
    vlist = sub.add_parser("list", help="your tenant's vectors and the global ones")
    put = sub.add_parser("put", help="register (or replace) a vector from a GGUF or safetensors file")
    put.add_argument("name")
    put.add_argument("file", type=Path)
    get = sub.add_parser("get", help="a vector's metadata, or its file with --format")
    get.add_argument("name")
    get.add_argument("--format", choices=("json", "gguf", "safetensors"), help="json: with its values; gguf, "
                     "safetensors: the file (to --out, else stdout)")
    get.add_argument("--out", type=Path, help="write the file here")
    delete = sub.add_parser("delete", help="delete a vector")
    delete.add_argument("name")
    train = sub.add_parser("train", help="train a vector from contrastive pairs (mean difference or PCA)")
    train.add_argument("--model", default="smollm2", help="a HF checkpoint dir, or smollm2 (default)")
    train.add_argument("--pairs", type=Path, required=True, help='JSONL of {"positive": str, "negative": str}, or '
                       'a JSON object {"template": "...{persona}...", "positive": [...], "negative": [...], '
                       '"suffixes": [...]}')
    train.add_argument("--method", choices=("mean", "pca", "pca-centred"), default="mean",
                       help="mean: mean difference (CAA); pca: first principal direction of the differences "
                       "(representation reading); pca-centred: repeng's pca_diff (centres them first)")
    train.add_argument("--layers", help="'all' (default: every layer the file can hold; GGUF cannot hold 0), a "
                       "range 8-20, or a list 8,9,10")
    train.add_argument("--out", type=Path, required=True, help="the vector file: .gguf or .safetensors")
    train.add_argument("--report", type=Path, help="the JSON report (default: --out with .json)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--register", metavar="URL", help="upload the vector to this server when done")
    train.add_argument("--name", help="the name to register it under (default: --out's stem)")
    for command in (vlist, put, get, delete, train):
        command.add_argument("--api-key", help="default: $STEERSERVE_API_KEY")
        if command is not vlist:
            command.add_argument("--scope", choices=("tenant", "global"), help="global: the admin-managed vectors")
        if command is not train:
            command.add_argument("--url", help=f"the server (default: $STEERSERVE_BASE_URL or {DEFAULT_URL})")


def run(args: argparse.Namespace) -> int:
    if args.vectors_command == "train":
        return train(args)
    url = (args.url or os.environ.get("STEERSERVE_BASE_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")
    try:
        if args.vectors_command == "list":
            return _print(_call(url, args, "GET", ""))
        if args.vectors_command == "put":
            return _print(_call(url, args, "PUT", args.name, args.file.read_bytes()))
        if args.vectors_command == "delete":
            return _print(_call(url, args, "DELETE", args.name))
        return get(url, args)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class ServerError(Exception):
    """The server answered with an error: its status and message."""


def _call(url: str, args: argparse.Namespace, method: str, name: str, body: bytes | None = None,
          fmt: str | None = None) -> bytes:
    path = "/v1/steering/vectors" + (f"/{urllib.parse.quote(name, safe='')}" if name else "")
    query = {k: v for k, v in (("scope", getattr(args, "scope", None)), ("format", fmt)) if v}
    request = urllib.request.Request(url + path + ("?" + urllib.parse.urlencode(query) if query else ""),
                                     data=body, method=method)
    key = args.api_key or os.environ.get("STEERSERVE_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ServerError(f"HTTP {exc.code}: {message}") from None


def _print(raw: bytes) -> int:
    print(json.dumps(json.loads(raw), indent=2))
    return 0


def get(url: str, args: argparse.Namespace) -> int:
    data = _call(url, args, "GET", args.name, fmt=args.format)
    if args.format in ("gguf", "safetensors"):
        if args.out:
            args.out.write_bytes(data)
            print(args.out)
        else:
            sys.stdout.buffer.write(data)
        return 0
    if args.out:
        args.out.write_bytes(data)
        return 0
    return _print(data)


def train(args: argparse.Namespace) -> int:
    """Train, write the vector and its report, optionally register it; 1 on bad data, options or model."""
    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.server.training.vectors import DataError, read_pairs, train_vector
    from steerserve.steering.vector_files import VectorFileError, write_vector_file

    gguf = args.out.suffix.lower() == ".gguf"
    if not gguf and args.out.suffix.lower() != ".safetensors":
        print("error: --out must end in .gguf or .safetensors", file=sys.stderr)
        return 1
    try:
        pairs = read_pairs(args.pairs)
        model_path = resolve_model(args.model, Settings.load().cache)
        result = train_vector(model_path, pairs, args.method, args.layers or None, allow_layer_zero=not gguf,
                              seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_vector_file(result.vector, args.out)
    except (DataError, ModelFetchError, VectorFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report_path = args.report or args.out.with_suffix(".json")
    report = {**result.report, "out": str(args.out)}
    if args.register:
        name = args.name or args.out.stem
        try:
            registered = json.loads(_call(args.register.rstrip("/").removesuffix("/v1"), args, "PUT", name,
                                          args.out.read_bytes()))
        except (ServerError, OSError) as exc:
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"error: the vector is in {args.out}, but registering it failed: {exc}", file=sys.stderr)
            return 1
        report["registered"] = {"url": args.register, **registered}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    seps = [v["separation"] for v in report["per_layer"].values()]
    print(f"{args.out}: {args.method} vector on {len(report['layers'])} layers from {report['pairs']} pairs in "
          f"{report['seconds']:.0f} s; training-pair separation {min(seps):.2f}..{max(seps):.2f}; report "
          f"{report_path}" + (f"; registered as '{report['registered']['name']}'" if args.register else ""))
    return 0
