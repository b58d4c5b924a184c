"""The `steerserve` command: serve a model, fetch the embedded default."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

from .settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field (`max_model_len` -> `--max-model-len`); unset flags defer to env/YAML/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = typing.get_args(field.annotation) or (field.annotation,)
        if bool in kind:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=kind, type=type(kind[0]), default=None, help=field.description)
        else:
            convert = next((t for t in (int, float, Path) if t in kind), str)
            parser.add_argument(flag, dest=name, type=convert, default=None, help=field.description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steerserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    serve.add_argument("--config", type=Path, help="YAML file of settings (flags and STEERSERVE_* env win)")
    _add_settings_flags(serve)

    models = commands.add_parser("models", help="manage local models")
    models_cmd = models.add_subparsers(dest="models_command", required=True)
    fetch = models_cmd.add_parser("fetch", help="download, verify and convert a known model into the cache")
    fetch.add_argument("name", choices=["smollm2", "gemma3-270m"],
                       help="smollm2 (the default model) or gemma3-270m (a base model, for URIAL; Gemma Terms of Use)")
    build = models_cmd.add_parser("build", help="build a derived model into the cache (from cached models)")
    build.add_argument("name", choices=["smollm2-moe"],
                       help="smollm2-moe: SmolLM2 upcycled into a 4-expert Mixtral with one behaviour-carrying "
                            "expert, for expert steering and fTRI (about a minute on CPU)")

    keys = commands.add_parser("keys", help="manage API keys (only their sha256 is stored)")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_cmd.add_parser("add", help="create a key for a tenant; prints it once, stores only its hash")
    add.add_argument("--file", type=Path, required=True, help="key file (.yaml, .yml or .json); created 0600")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin"], required=True)
    add.add_argument("--name", help="label for the key (who or what uses it)")

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

    calibrate = commands.add_parser("calibrate", help="calibrate steering on a labelled task file")
    calibrate_cmd = calibrate.add_subparsers(dest="calibrate_command", required=True)
    sink = calibrate_cmd.add_parser("sink", help="ZeroTuning: head profiling and gamma search (docs/tools.md); "
                                                 "writes one steering profile per task")
    sink.add_argument("--model", default=None, help="HF checkpoint dir, or smollm2 (default)")
    sink.add_argument("--tasks", type=Path, help="task file (JSONL, see steering/tasks.py); default: the shipped one")
    sink.add_argument("--task", action="append", help="calibrate only this task (repeatable); default: all")
    sink.add_argument("--mode", choices=["supervised", "unsupervised"], default="supervised",
                      help="supervised: best accuracy; unsupervised: lowest answer entropy (labels unused)")
    sink.add_argument("--out-dir", type=Path, default=Path("."),
                      help="where <task>.<mode>.json (the profile) and <task>.<mode>.report.json go")
    sink.add_argument("--evaluate", action="store_true",
                      help="also score the held-out half with and without the profile (in the report)")
    sink.add_argument("--profile-name", help="store each profile in the server's profile store under this name "
                                             "(with -<task> appended when several tasks are calibrated)")
    sink.add_argument("--tenant", default="*", help="profile store scope: a tenant name, or * for global")
    sink.add_argument("--data-dir", type=Path, help="the server's --data-dir (default: its setting)")

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

    tenants = commands.add_parser("tenants", help="admin switches per tenant (stored with the profiles)")
    tenants_cmd = tenants.add_subparsers(dest="tenants_command", required=True)
    tset = tenants_cmd.add_parser("set", help="change a tenant's settings")
    tset.add_argument("tenant")
    tset.add_argument("--allow-conjugate", action=argparse.BooleanOptionalAction, default=None,
                      help="allow conjugate prompting (a known safety bypass) for this tenant")
    tenants_cmd.add_parser("list", help="tenants with settings")
    for sub in (tset, tenants_cmd.choices["list"]):
        sub.add_argument("--data-dir", type=Path, help="the server's --data-dir (default: its default)")

    prefixes = commands.add_parser("urial", help="URIAL prefixes (built-in, and registered from files)")
    prefixes_cmd = prefixes.add_subparsers(dest="urial_command", required=True)
    padd = prefixes_cmd.add_parser("add", help="register a prefix file by name (used verbatim)")
    padd.add_argument("name")
    padd.add_argument("file", type=Path)
    prm = prefixes_cmd.add_parser("remove", help="remove a registered prefix")
    prm.add_argument("name")
    plist = prefixes_cmd.add_parser("list", help="built-in and registered prefixes")
    for sub in (padd, prm, plist):
        sub.add_argument("--data-dir", type=Path, help="the server's --data-dir (default: its default)")

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

    args = parser.parse_args(argv)
    if args.command == "profile":
        return profile_sinks(args)
    if args.command == "calibrate":
        return calibrate_sink(args)
    if args.command == "ftri":
        from .ftri import run as run_ftri
        from .models import ModelFetchError, resolve_model

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
    if args.command == "serve":
        overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
        return serve_forever(Settings.load(args.config, **overrides))
    if args.command == "keys":
        from .http.auth import add_key

        try:
            print(add_key(args.file, args.tenant, args.role, name=args.name))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "adapters" and args.adapters_command == "train-iapt":
        return train_iapt_command(args)
    if args.command == "adapters":
        from .demo_adapters import DEMOS, IAPT_DEMOS, build_demo, build_iapt_demo
        from .models import ModelFetchError, resolve_model

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

    if args.command in ("tenants", "urial"):
        return _admin_command(args)
    if args.command == "models":
        from . import demo_moe
        from .models import KNOWN_MODELS, ModelFetchError, fetch, fetch_smollm2

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


def train_iapt_command(args: argparse.Namespace) -> int:
    from .iapt_train import DataError, train_iapt
    from .models import ModelFetchError, resolve_model

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


def profile_sinks(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from steerserve.steering import profile as P

    from .models import ModelFetchError, resolve_model

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


def calibrate_sink(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from steerserve.steering import calibrate as C
    from steerserve.steering import spec as S
    from steerserve.steering.tasks import SHIPPED, load_tasks

    from .calibration_engine import open_engine
    from .models import resolve_model
    from .profiles import GLOBAL, ProfileStore, validate_name

    try:
        settings = Settings.load()
        tasks = load_tasks(args.tasks or SHIPPED)
        names = args.task or list(tasks)
        unknown = [n for n in names if n not in tasks]
        if unknown:
            raise ValueError(f"no task {unknown[0]!r} in the task file (it has {list(tasks)})")
        if args.profile_name:
            for name in names:
                validate_name(_stored_name(args.profile_name, name, len(names)))
        model_path = resolve_model(args.model, settings.cache)
    except Exception as exc:  # noqa: BLE001 - any of these is a usage error: report it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    llm, facts = open_engine(str(model_path))
    scorer = C.Scorer(llm, facts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    store = ProfileStore((args.data_dir or settings.data_dir) / "profiles.sqlite3") if args.profile_name else None
    for name in names:
        task = tasks[name]
        configs = 1 + 2 * facts.num_heads + max(len(C.GRID_UP), len(C.GRID_DOWN))
        with tqdm(total=configs, desc=f"calibrate {name} ({args.mode})", unit="config") as bar:
            result = C.calibrate(scorer, task, args.mode, progress=lambda _: bar.update())
        profile = result.profile()
        S.compile_spec(S.merge([S.parse(profile, "profile")]), facts)  # valid for this model, or this raises
        report = result.to_json()
        if args.evaluate:
            report["heldout"] = {"baseline": C.evaluate(scorer, task, None).__dict__,
                                 "steered": C.evaluate(scorer, task, profile).__dict__}
        stem = args.out_dir / f"{name}.{args.mode}"
        Path(f"{stem}.json").write_text(json.dumps(profile, indent=1) + "\n")
        Path(f"{stem}.report.json").write_text(json.dumps(report, indent=1) + "\n")
        line = (f"{name}: gamma={result.gamma} on {result.head_type} heads {result.heads}; calibration "
                f"accuracy {result.baseline.accuracy:.3f} -> {result.best.accuracy:.3f}")
        if args.evaluate:
            line += (f"; held-out {report['heldout']['baseline']['accuracy']:.3f} -> "
                     f"{report['heldout']['steered']['accuracy']:.3f}")
        print(line + f"; wrote {stem}.json")
        if store is not None:
            stored = _stored_name(args.profile_name, name, len(names))
            store.put(GLOBAL if args.tenant == "*" else args.tenant, stored, profile)
            print(f"stored profile {stored!r} ({'global' if args.tenant == '*' else 'tenant ' + args.tenant}) "
                  f"in {store.path}")
    return 0


def _stored_name(base: str, task: str, count: int) -> str:
    return base if count == 1 else f"{base}-{task}"


def _admin_command(args: argparse.Namespace) -> int:
    """`tenants` and `urial`: the same stores the server reads, under its data dir."""
    import json

    data_dir = args.data_dir or Settings.load().data_dir
    try:
        if args.command == "tenants":
            from .tenants import TenantSettingsUpdate, TenantStore

            store = TenantStore(data_dir / "profiles.sqlite3")
            if args.tenants_command == "set":
                print(json.dumps({"tenant": args.tenant, **store.update(
                    args.tenant, TenantSettingsUpdate(allow_conjugate=args.allow_conjugate)).model_dump()}))
            else:
                print(json.dumps(store.list(), indent=1))
            return 0
        from .prompting import PrefixStore

        prefixes = PrefixStore(data_dir / "urial")
        if args.urial_command == "add":
            print(json.dumps(prefixes.put(args.name, args.file.read_text(encoding="utf-8"))))
        elif args.urial_command == "remove":
            if not prefixes.delete(args.name):
                print(f"error: no registered prefix named {args.name!r}", file=sys.stderr)
                return 1
        else:
            print(json.dumps(prefixes.list(), indent=1))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_forever(settings: Settings) -> int:
    # vLLM logs to stdout by default; a server's diagnostics belong on stderr, where a supervisor looks for why it
    # stopped (the engine's own traceback included). Set before vLLM is imported, inherited by its processes.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import uvicorn

    from .adapters import AdapterStore
    from .engine.async_engine import Engine
    from .http.app import create_app
    from .http.auth import KeyStore, check_bind
    from .models import ModelFetchError, resolve_model
    from .profiles import ProfileStore

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("steerserve")
    try:
        keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        check_bind(settings.host, keys)
        model_path = resolve_model(settings.model, settings.cache)
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if keys.is_open:
        log.warning("no API keys configured (--api-keys): open mode, every request is the 'default' tenant "
                    "with admin rights; listening on loopback only")
    profiles = ProfileStore(settings.data_dir / "profiles.sqlite3")
    adapters = AdapterStore(settings.data_dir / "adapters.sqlite3", settings.data_dir / "adapters")
    failed = []

    def stop_serving() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(lambda: Engine(settings, model_path), keys, profiles, on_engine_failure=stop_serving,
                     adapters=adapters, adapter_root=settings.adapter_root)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
