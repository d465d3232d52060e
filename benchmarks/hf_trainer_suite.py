"""transformers' own Trainer tests, run as is and with ftrain's ``Trainer`` / ``TrainingArguments`` swapped in.

The measure of issue 14: the tests in transformers' ``tests/trainer/test_trainer*.py`` (they are not in the pip
package; keep a copy outside this repository, default ``/work/hf_tests/tests/trainer``) run twice, each in a fresh
pytest process, Hub offline (``HF_HUB_OFFLINE=1``):

- ``transformers``: as they are;
- ``ftrain``: with exactly two names replaced before any test module is imported: ``transformers.Trainer`` (and
  ``transformers.trainer.Trainer``) by ``ftrain.Trainer``, ``transformers.TrainingArguments`` (and
  ``transformers.training_args.TrainingArguments``) by ``ftrain.TrainingArguments``. Nothing else is touched, so
  ``Seq2SeqTrainer``, callbacks, ``TrainerState`` and the helpers stay transformers' own.

The score is: of the tests that pass with transformers, how many also pass with ftrain. The failures are grouped by
their first error line. Results (per-test outcome and first error line of both runs) go to
``benchmarks/results/hf_trainer_suite.json``; the transformers run is cached there, so ``--only ftrain`` reruns the
ftrain side alone against it.

This one file is both the driver (``python benchmarks/hf_trainer_suite.py``) and the pytest plugin the driver loads
into each run (``-p hf_trainer_suite``): the plugin records outcomes, swaps the classes for the ftrain run, gives
each test a time limit, and gives stale imports of the stored test files a name to import (see
``_REMOVED_TRANSFORMERS_NAMES``), identically in both runs.

Example:
    python benchmarks/hf_trainer_suite.py                       # both runs, all CPU test files (~15-30 min)
    python benchmarks/hf_trainer_suite.py --only ftrain         # rerun ftrain against the cached transformers run
    python benchmarks/hf_trainer_suite.py --only ftrain --files test_trainer_data.py -k iterable
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = Path("/work/hf_tests/tests/trainer")
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "hf_trainer_suite.json"
SIDES = ("transformers", "ftrain")

# Test files that need several processes or an accelerator (they skip on one CPU anyway); left out of both runs.
EXCLUDED_FILE_PREFIXES = (
    "test_trainer_distributed",
    "test_trainer_fsdp",
    "test_trainer_tpu",
    "test_trainer_context_parallel",
)

# Names the stored test files import at module level that transformers 5.25 no longer has. Without a stand-in the
# whole file fails to import in both runs; with one, only the tests that use the name fail (all are @slow here).
_REMOVED_TRANSFORMERS_NAMES = ("GlueDataset", "GlueDataTrainingArguments", "LineByLineTextDataset")

# Environment read by the plugin half of this file inside the pytest process.
ENV_SIDE = "HF_SUITE_SIDE"
ENV_OUT = "HF_SUITE_OUT"
ENV_TIMEOUT = "HF_SUITE_TIMEOUT"

# A stand-in for the `parameterized` package (transformers' test dependency, not installed here): `expand` turns one
# test method into one method per case, named `<test>_<index>[_<first argument>]` like the real package does.
_PARAMETERIZED_SHIM = '''"""Stand-in for `parameterized.expand`, written by benchmarks/hf_trainer_suite.py."""
import inspect


def _safe_name(value):
    return "".join(ch if ch.isalnum() else "_" for ch in str(value)).strip("_")


def _bind(template, case, name):
    def test(self):
        return template(self, *case)

    test.__name__ = name
    test.__qualname__ = template.__qualname__.rsplit(".", 1)[0] + "." + name
    test.__doc__ = template.__doc__
    test.__dict__.update({k: v for k, v in template.__dict__.items() if k != "__wrapped__"})
    return test


class parameterized:
    @staticmethod
    def expand(cases, name_func=None, **_ignored):
        def decorator(template):
            class_namespace = inspect.currentframe().f_back.f_locals
            for index, case in enumerate(cases):
                case = tuple(case) if isinstance(case, (tuple, list)) else (case,)
                suffix = f"_{index}"
                if case and isinstance(case[0], str):
                    suffix += "_" + _safe_name(case[0])
                name = template.__name__ + suffix
                class_namespace[name] = _bind(template, case, name)
            return None

        return decorator
'''


# ---------------------------------------------------------------------------------------------------------------
# Plugin half: runs inside each pytest process (loaded with `-p hf_trainer_suite`).
# ---------------------------------------------------------------------------------------------------------------

_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 2}
_OUTCOMES: dict[str, dict] = {}
_COLLECTION_ERRORS: dict[str, str] = {}


def settled_transformers():
    """``transformers`` as test modules will see it.

    Importing ``transformers.trainer`` the first time swaps the lazy ``transformers`` module in ``sys.modules`` for a
    new one (through ``transformers.models.auto``), so names set on the module object imported before are lost. The
    modules that trigger it are imported first, then the module is read from ``sys.modules``.
    """
    import importlib

    for name in ("transformers.trainer", "transformers.training_args", "transformers.models.auto"):
        importlib.import_module(name)
    return sys.modules["transformers"]


def install_ftrain_classes() -> None:
    """Replace ``Trainer`` and ``TrainingArguments`` in transformers' namespaces by ftrain's, and nothing else."""
    transformers = settled_transformers()
    import ftrain

    transformers.Trainer = ftrain.Trainer
    sys.modules["transformers.trainer"].Trainer = ftrain.Trainer
    transformers.TrainingArguments = ftrain.TrainingArguments
    sys.modules["transformers.training_args"].TrainingArguments = ftrain.TrainingArguments


def install_removed_name_stand_ins() -> None:
    """Give each name in ``_REMOVED_TRANSFORMERS_NAMES`` that transformers lacks a class that fails when used."""
    transformers = settled_transformers()
    for name in _REMOVED_TRANSFORMERS_NAMES:
        if name not in dir(transformers):
            message = f"transformers {transformers.__version__} has no {name}; the stored test file still uses it"

            def refuse(*args, _message=message, **kwargs):
                raise ImportError(_message)

            setattr(transformers, name, type(name, (), {"__init__": refuse}))


def pytest_configure(config) -> None:
    """Before collection: stand-ins for removed names (both runs), the class swap (the ftrain run)."""
    if os.environ.get(ENV_OUT) is None:
        return
    install_removed_name_stand_ins()
    if os.environ.get(ENV_SIDE) == "ftrain":
        install_ftrain_classes()


def pytest_collection_finish(session) -> None:
    """In the ftrain run, stop if a test module still holds transformers' own Trainer or TrainingArguments."""
    if os.environ.get(ENV_SIDE) != "ftrain":
        return
    import ftrain

    ours = {"Trainer": ftrain.Trainer, "TrainingArguments": ftrain.TrainingArguments}
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        for name, cls in ours.items():
            held = module.__dict__.get(name)
            if held is not None and held is not cls and held.__module__.startswith("transformers."):
                raise pytest.UsageError(f"{module.__name__}.{name} is {held.__module__}.{name}: the swap did not hold")


def first_error_line(longrepr) -> str:
    """The first line of what a failed (or skipped) report says went wrong: ``"AssertionError: 3 != 4"``."""
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return str(longrepr[-1]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    error_lines = [line[1:].strip() for line in str(longrepr).splitlines() if line.startswith("E ")]
    if crash is None and error_lines:
        return error_lines[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    # "AssertionError: Parameter containing:" says little alone: add lines until the message reads (3 at most).
    shown = lines[:1]
    for line in lines[1:3]:
        if sum(map(len, shown)) >= 60:
            break
        shown.append(line)
    return " | ".join(shown)[:300]


def pytest_runtest_logreport(report) -> None:
    """Fold the setup / call / teardown reports of a test into one outcome: error > failed > skipped > passed."""
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    else:
        outcome = "passed"
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "error": None, "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 3)
    if _RANK[outcome] > _RANK[entry["outcome"]]:
        entry["outcome"] = outcome
        entry["error"] = first_error_line(report.longrepr)


def pytest_collectreport(report) -> None:
    """Remember the modules that failed to import: their tests never ran."""
    if report.failed:
        _COLLECTION_ERRORS[report.nodeid] = first_error_line(report.longrepr)


def _raise_timeout(signum, frame):
    raise TimeoutError(f"test ran past its limit of {os.environ[ENV_TIMEOUT]} s (--timeout)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item) -> None:
    """Arm a SIGALRM limit for the test body (only when the driver asked for one and pytest-timeout is absent)."""
    seconds = int(os.environ.get(ENV_TIMEOUT) or 0)
    if seconds > 0:
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(seconds)


def pytest_runtest_teardown(item) -> None:
    if int(os.environ.get(ENV_TIMEOUT) or 0) > 0:
        signal.alarm(0)


def pytest_sessionfinish(session) -> None:
    """Write the outcomes where the driver reads them."""
    out = os.environ.get(ENV_OUT)
    if out is not None:
        Path(out).write_text(json.dumps({"tests": _OUTCOMES, "collection_errors": _COLLECTION_ERRORS}, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Driver half.
# ---------------------------------------------------------------------------------------------------------------


def select_files(tests_dir: Path, names: list[str] | None) -> list[Path]:
    """The test files to run: those named, else every ``test_trainer*.py`` that runs on one CPU.

    Raises:
        SystemExit: a named file does not exist, or none is found.
    """
    if names:
        files = [tests_dir / name for name in names]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise SystemExit(f"hf_trainer_suite: no such test file(s): {', '.join(missing)}")
        return files
    files = [
        path for path in sorted(tests_dir.glob("test_trainer*.py")) if not path.name.startswith(EXCLUDED_FILE_PREFIXES)
    ]
    if not files:
        raise SystemExit(
            f"hf_trainer_suite: no test_trainer*.py in {tests_dir}; copy transformers' tests/trainer there "
            "(with trainer_test_utils.py and __init__.py files) or pass --tests"
        )
    return files


def make_shim_dir() -> Path | None:
    """A folder holding the ``parameterized`` stand-in when the real package is not installed, else ``None``."""
    if importlib.util.find_spec("parameterized") is not None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="hf_suite_shims_"))
    (folder / "parameterized").mkdir()
    (folder / "parameterized" / "__init__.py").write_text(_PARAMETERIZED_SHIM)
    return folder


def build_pytest_command(files: list[Path], keyword: str | None, timeout: int) -> list[str]:
    """The pytest command line for one run (the same for both sides)."""
    command = [sys.executable, "-m", "pytest", "-p", "hf_trainer_suite", "-p", "no:cacheprovider", "-q", "-rN"]
    command += ["-W", "ignore::DeprecationWarning", "--tb=line"]
    if keyword:
        command += ["-k", keyword]
    if timeout and importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", str(timeout)]
    return command + [str(path) for path in files]


def run_side(side: str, files: list[Path], keyword: str | None, timeout: int, shim_dir: Path | None) -> dict:
    """Run the files once for ``side`` in a fresh pytest process and return its outcomes.

    Raises:
        SystemExit: pytest did not get as far as writing outcomes (a crash, or bad arguments).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"hf_suite_{side}_"))
    out = workdir / "outcomes.json"
    paths = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")] + ([str(shim_dir)] if shim_dir else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    env.update({ENV_SIDE: side, ENV_OUT: str(out)})
    if timeout and importlib.util.find_spec("pytest_timeout") is None:
        env[ENV_TIMEOUT] = str(timeout)
    command = build_pytest_command(files, keyword, timeout)
    print(f"[{side}] {' '.join(command)}", flush=True)
    start = time.time()
    log_path = workdir / "pytest.log"
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"[{side}] pytest exit {code} after {time.time() - start:.0f} s", flush=True)
    if not out.is_file():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"hf_trainer_suite: the {side} run wrote no outcomes (pytest exit {code}):\n{tail}")
    result = json.loads(out.read_text())
    if code in (0, 1, 5):  # tests passed / some failed / none selected: the log says nothing the outcomes don't
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"[{side}] pytest ended abnormally; its log is kept: {log_path}", flush=True)
    return result


def merge_into_cache(cached: dict | None, fresh: dict, files: list[Path], keyword: str | None) -> dict:
    """The cached run of one side, updated with a fresh run of some of its files.

    Without ``-k`` the fresh run replaces everything cached for its files; with ``-k`` only the tests it ran.
    """
    if cached is None:
        return fresh
    names = {path.name for path in files}

    def from_run_files(nodeid: str) -> bool:
        return nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in names

    tests = {k: v for k, v in cached["tests"].items() if keyword or not from_run_files(k)}
    errors = {k: v for k, v in cached["collection_errors"].items() if not from_run_files(k)}
    tests.update(fresh["tests"])
    errors.update(fresh["collection_errors"])
    return {"tests": tests, "collection_errors": errors}


def cause_of(message: str) -> str:
    """A grouping key for a first error line: numbers, addresses and temporary paths blanked, 140 characters."""
    message = re.sub(r"0x[0-9a-fA-F]+", "0x…", message)
    message = re.sub(r"/tmp/\S+", "/tmp/…", message)
    message = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", message)
    return message[:140]


def file_collection_error(nodeid: str, collection_errors: dict[str, str]) -> str | None:
    """The import error of the module holding ``nodeid``, if that module failed to import."""
    module = nodeid.split("::", 1)[0]
    for collected, message in collection_errors.items():
        if module.endswith(collected) or collected.endswith(module):
            return message
    return None


def compare(runs: dict) -> dict:
    """The score: tests that pass with transformers, and how each of them fared with ftrain."""
    reference, candidate = runs["transformers"], runs["ftrain"]
    baseline = sorted(k for k, v in reference["tests"].items() if v["outcome"] == "passed")
    regressions = []
    for nodeid in baseline:
        entry = candidate["tests"].get(nodeid)
        if entry is None:
            error = file_collection_error(nodeid, candidate["collection_errors"]) or "not run in the ftrain run"
            entry = {"outcome": "not collected", "error": error}
        if entry["outcome"] != "passed":
            regressions.append({"test": nodeid, "outcome": entry["outcome"], "error": entry["error"]})
    by_cause = defaultdict(list)
    for item in regressions:
        by_cause[cause_of(item["error"] or item["outcome"])].append(item["test"])
    gains = sorted(k for k, v in candidate["tests"].items() if v["outcome"] == "passed" and k not in set(baseline))
    passed = len(baseline) - len(regressions)
    return {
        "baseline_passed": len(baseline),
        "ftrain_passed_of_baseline": passed,
        "percent": round(100.0 * passed / len(baseline), 1) if baseline else None,
        "regressions": regressions,
        "by_cause": dict(sorted(by_cause.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
        "pass_with_ftrain_only": gains,
    }


def outcome_counts(run: dict) -> dict[str, int]:
    counts = defaultdict(int)
    for entry in run["tests"].values():
        counts[entry["outcome"]] += 1
    return dict(sorted(counts.items()))


def print_report(runs: dict, summary: dict) -> None:
    """The table: outcomes of both runs, the score, and the ftrain failures grouped by cause."""
    for side in SIDES:
        errors = runs[side]["collection_errors"]
        print(
            f"{side:>12}: {outcome_counts(runs[side])}"
            + (f", {len(errors)} module(s) failed to import" if errors else "")
        )
        for module, message in errors.items():
            print(f"{'':>14}import error {module}: {message}")
    print(
        f"\npassing with transformers: {summary['baseline_passed']}; of those passing with ftrain: "
        f"{summary['ftrain_passed_of_baseline']} ({summary['percent']}%)"
    )
    if summary["pass_with_ftrain_only"]:
        print(f"passing with ftrain only: {len(summary['pass_with_ftrain_only'])}")
    errors = {item["test"]: item for item in summary["regressions"]}
    print(f"\nfailing with ftrain ({len(errors)}), by cause:")
    for cause, tests in summary["by_cause"].items():
        print(f"\n[{len(tests)}] {cause}")
        for test in tests:
            item = errors[test]
            print(f"    {test}  ({item['outcome']}): {item['error']}")


def machine_description() -> dict:
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": version("torch"),
        "transformers": version("transformers"),
        "ftrain_commit": commit.strip() or None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, default=DEFAULT_TESTS, help="folder of transformers' tests/trainer")
    parser.add_argument("--files", nargs="+", help="test file names in --tests (default: all CPU test_trainer*.py)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, the same for both runs")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test, 0 for none (default 300)")
    parser.add_argument("--only", choices=SIDES, help="run one side; the other comes from the cached --json")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = select_files(args.tests.resolve(), args.files)
    cached = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": {}}
    runs = dict(cached.get("runs", {}))
    sides = [args.only] if args.only else list(SIDES)
    missing = [side for side in SIDES if side not in sides and side not in runs]
    if missing:
        raise SystemExit(f"hf_trainer_suite: no cached {missing[0]} run in {args.json}; run without --only first")
    shim_dir = make_shim_dir()
    try:
        for side in sides:
            fresh = run_side(side, files, args.keyword, args.timeout, shim_dir)
            runs[side] = merge_into_cache(runs.get(side), fresh, files, args.keyword)
    finally:
        if shim_dir is not None:
            shutil.rmtree(shim_dir, ignore_errors=True)
    summary = compare(runs)
    print_report(runs, summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    covered = sorted({*cached.get("meta", {}).get("files", []), *(p.name for p in files)})  # the merged runs' files
    meta = {**machine_description(), "tests_dir": str(args.tests), "files": covered, "k": args.keyword}
    args.json.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
