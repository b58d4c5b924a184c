"""`steerserve calibrate sink`: ZeroTuning on a labelled task file; one steering profile per task."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Write <task>.<mode>.json and .report.json per task (and store the profiles with --profile-name);
    1 on a usage error (unknown task, bad profile name, no model), reported before the engine starts."""
    import json

    from tqdm import tqdm

    from steerserve.server.models.store import resolve_model
    from steerserve.server.stores.profiles import GLOBAL, ProfileStore, validate_name
    from steerserve.server.tools.calibration_engine import open_engine
    from steerserve.steering import calibrate as C
    from steerserve.steering import spec as S
    from steerserve.steering.tasks import SHIPPED, load_tasks

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
    store = ProfileStore(settings.database_url or (args.data_dir or settings.data_dir) / "profiles.sqlite3") \
        if args.profile_name else None
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
    """The profile store name for `task`: `base` itself when only one task is calibrated."""
    return base if count == 1 else f"{base}-{task}"
