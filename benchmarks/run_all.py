"""Run every benchmark, each in a fresh subprocess, and summarize them in one table of ratios against their goals.

Benchmarks (names for ``--only``):
  step_time          ftrain's step (eager, compiled, compiled + donated) against hand-written PyTorch loops: ms/step
  memory             the same variants' peak memory (benchmarks/step_time.py --measure memory)
  checkpoint         CheckpointManager save / restore against torch.save, and the time an async save blocks
  data_resume        time to the first batch when resuming at step k, against a DataLoader that skips k batches
  trainer_overhead   ftrain.Trainer against its own raw loop and against transformers.Trainer
  distributed_memory FSDP per-rank memory (skipped with a note while benchmarks/distributed_memory.py is missing)
  optimizer          one optimizer update per alias, update_and_apply against its torch.optim fused/foreach one
  cold_start         the first compiled step in a fresh process (empty / warm compile cache) against transformers'

Every row is ``ratio = measured / baseline`` with the goal it is held to (``<= 0.95``: at most 0.95x the baseline).
Writes ``<out-dir>/summary.json`` (the rows, the machine, each benchmark's status), ``<out-dir>/summary.png`` (the
ratios as bars, goals as ticks), each benchmark's own JSON and its log under ``<out-dir>/raw/``.

Usage:
    python benchmarks/run_all.py                             # everything, full settings (see benchmarks/README.md)
    python benchmarks/run_all.py --quick                     # smoke run; writes under benchmarks/results/quick/
    python benchmarks/run_all.py --quick --only checkpoint,data_resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import machine_info  # noqa: E402

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_GOAL_IN_TEXT = re.compile(r"goal\s*((?:<=|>=|<|>)\s*[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
STEP_VARIANTS = {
    "d": "ftrain eager",
    "e": "ftrain compiled",
    "f": "ftrain compiled + donated",
    "g": "ftrain eager + donated",
    "h": "ftrain compiled grads + eager fused optimizer",
    "i": "ftrain compiled grads + eager fused optimizer + donated",
}


# --- goals -------------------------------------------------------------------------------------------------------


def parse_goal(text: str) -> tuple[str, float]:
    """Split a goal such as ``"<= 0.95"`` into its comparison and bound.

    Args:
        text: ``<op> <number>`` with ``op`` one of ``<=``, ``<``, ``>=``, ``>``.

    Returns:
        ``(op, bound)``.

    Raises:
        ValueError: ``text`` is not of that form.

    Example:
        >>> parse_goal("<= 0.95"), parse_goal(">=1.3")
        (('<=', 0.95), ('>=', 1.3))
    """
    m = _GOAL.match(text)
    if m is None:
        raise ValueError(f"goal {text!r} is not '<op> <number>' with op one of <=, <, >=, > (e.g. '<= 0.95')")
    return m.group(1), float(m.group(2))


def goal_in(label: str) -> str | None:
    """The goal written into a label, as trainer_overhead.py names its ratios (``"b/a time, goal <= 1.03"``).

    Example:
        >>> goal_in("b/c samples/s (eager), goal >= 1.3"), goal_in("b/a time")
        ('>= 1.3', None)
    """
    m = _GOAL_IN_TEXT.search(label)
    if m is None:
        return None
    op, bound = parse_goal(m.group(1))
    return f"{op} {bound:g}"


def goal_met(ratio: float, goal: str | None) -> bool | None:
    """Whether ``ratio`` meets ``goal``; ``None`` when the row has no goal.

    Example:
        >>> goal_met(0.91, "<= 0.95"), goal_met(1.2, ">= 1.3"), goal_met(2.0, None)
        (True, False, None)
    """
    if goal is None:
        return None
    op, bound = parse_goal(goal)
    return {"<=": ratio <= bound, "<": ratio < bound, ">=": ratio >= bound, ">": ratio > bound}[op]


def row(benchmark: str, variant: str, measured: float, baseline: float, unit: str, goal: str | None = None) -> dict:
    """One line of the summary: ``ratio = measured / baseline``, checked against ``goal``.

    Raises:
        ValueError: ``baseline`` is zero or not finite (the ratio would mean nothing).

    Example:
        >>> r = row("memory", "(f)", 540.0, 600.0, "MB", "<= 1.10")
        >>> round(r["ratio"], 6), r["met"]
        (0.9, True)
    """
    if not (math.isfinite(baseline) and baseline != 0 and math.isfinite(measured)):
        raise ValueError(f"{benchmark} / {variant}: cannot take the ratio of {measured} to {baseline}")
    ratio = measured / baseline
    return dict(benchmark=benchmark, variant=variant, measured=measured, baseline=baseline, unit=unit,
                ratio=ratio, goal=goal, met=goal_met(ratio, goal))  # fmt: skip


# --- reading each benchmark's JSON ----------------------------------------------------------------------------------


def rows_step_time(payload: dict) -> list[dict]:
    """ms/step of (d)-(f), (h), (i) against the best hand-written loop (a)-(c), goal (e), (f), (i) <= 0.95 (the
    Trainer's compiled step is (i)); and of the eager steps
    (d), (g) against the best eager hand loop (b) eager + AdamW(fused), goal (g) <= 1.00."""
    size = payload.get("time_size", "3.5M")
    ms = {r["variant"]: r["ms_per_step"] for r in payload["rows"] if r["size"] == size and "ms_per_step" in r}
    best = min(ms[v] for v in "abc" if v in ms)
    rows = [
        row(
            "step_time",
            f"({v}) {name} vs best of (a)-(c), {size} GPT",
            ms[v],
            best,
            "ms",
            "<= 0.95" if v in "efi" else None,
        )  # fmt: skip
        for v, name in STEP_VARIANTS.items()
        if v in ms and v in "defhi"
    ]
    eager = [v for v in "dg" if v in ms and "b" in ms]
    for v in eager:
        variant = f"({v}) {STEP_VARIANTS[v]} vs (b) eager + AdamW(fused), {size} GPT"
        rows.append(row("step_time", variant, ms[v], ms["b"], "ms", "<= 1.00" if v == "g" else None))
    return rows


def rows_memory(payload: dict) -> list[dict]:
    """Peak memory of (d)-(i) against the in-place eager foreach loop (a); goal (f), (g), (i) <= 1.10."""
    size = payload.get("mem_size", "25M")
    mb = {r["variant"]: r["peak_mb"] for r in payload["rows"] if r["size"] == size and "peak_mb" in r}
    return [
        row(
            "memory",
            f"({v}) {name} vs (a) in-place eager loop, {size} GPT",
            mb[v],
            mb["a"],
            "MB",
            "<= 1.10" if v in "fgi" else None,
        )  # fmt: skip
        for v, name in STEP_VARIANTS.items()
        if v in mb
    ]


def rows_checkpoint(payload: dict) -> list[dict]:
    """ftrain's safetensors save / verified restore against torch.save + fsync / torch.load(mmap=False) of the same
    tensors (goals <= 1.1 / <= 1.3); async blocked time against a sync save."""
    out = []
    goal = f"< {payload.get('async_goal', 0.10):g}"
    save_goal, restore_goal = f"<= {payload.get('save_goal', 1.1):g}", f"<= {payload.get('restore_goal', 1.3):g}"
    for size in dict.fromkeys(r["size"] for r in payload["rows"]):
        by = {r["method"]: r for r in payload["rows"] if r["size"] == size}
        ours, ref = by["ftrain safetensors"], by["torch.save"]
        gb = f"{size} ({ours['mb'] / 1e3:.2g} GB)"
        variant = f"{gb} save (integrity, fsync) vs torch.save + fsync"
        out.append(row("checkpoint", variant, ours["save_s"], ref["save_s"], "s", save_goal))
        variant = f"{gb} verified restore vs torch.load(mmap=False)"
        out.append(row("checkpoint", variant, ours["restore_s"], ref["restore_s"], "s", restore_goal))
    for a in payload["async"]:
        variant = f"{a['size']} async save blocked (later saves) vs sync save"
        out.append(row("checkpoint", variant, a["async_blocked_later_s"], a["sync_save_s"], "s", goal))
    return out


def rows_data_resume(payload: dict) -> list[dict]:
    """First batch at the largest k against a DataLoader's two ways to skip; the worst case against the target."""
    last = max(payload["rows"], key=lambda r: r["step"])
    k = f"{last['step']:,}"
    worst = max(r["ftrain_s"] for r in payload["rows"]) * 1e3
    return [
        row("data_resume", f"step {k}: iter_from(k) vs DataLoader sampler skip", last["ftrain_s"] * 1e3,
            last["sampler_skip_s"] * 1e3, "ms"),
        row("data_resume", f"step {k}: iter_from(k) vs DataLoader load+drop (extrapolated)", last["ftrain_s"] * 1e3,
            last["loader_drop_s"] * 1e3, "ms"),
        row("data_resume", "worst first batch (k = 0, 10^3, 10^6) vs the target", worst, payload["target_ms"], "ms",
            "< 1"),
    ]  # fmt: skip


def _ratio_operands(label: str, by: dict[str, dict]) -> tuple[str, str, str, str] | None:
    """Numerator and denominator variants, row field and unit of a trainer_overhead ratio named like
    ``"b/a time (compiled)"`` or ``"b+compile/c samples/s"``; ``None`` for a name of another form."""
    m = re.match(r"\s*([\w+]+)/([\w+]+)\s+(time|samples/s)\s*(?:\((eager|compiled)\))?", label)
    if m is None:
        return None
    num, den, metric, mode = m.groups()
    if mode == "compiled":
        num, den = (v if v.endswith("+compile") else v + "+compile" for v in (num, den))
    if num not in by or den not in by:
        return None
    return (num, den, "median_s", "s") if metric == "time" else (num, den, "samples_per_s", "samples/s")


def rows_trainer_overhead(payload: dict) -> list[dict]:
    """Each entry of the script's ``ratios``; measured and baseline looked up in its rows and checked against it."""
    by = {r["variant"]: r for r in payload.get("rows", [])}
    out = []
    for key, value in payload["ratios"].items():
        label, goal = key.split(", goal")[0], goal_in(key)
        found = _ratio_operands(label, by)
        if found is not None:
            num, den, field, unit = found
            measured, baseline = by[num][field], by[den][field]
            if math.isclose(measured / baseline, value, rel_tol=1e-9):
                variant = f"{label}: {by[num].get('label', num)} vs {by[den].get('label', den)}"
                out.append(row("trainer_overhead", variant, measured, baseline, unit, goal))
                continue
        # A ratio named in a way this reader does not know: keep the script's number, without its operands.
        out.append(row("trainer_overhead", label, value, 1.0, "x", goal))
    return out


def rows_optimizer(payload: dict) -> list[dict]:
    """ms per update of each alias against its torch.optim counterpart: ``update_and_apply(donate=True)`` held to the
    script's goal; the undonated call and the old ``tx.update`` + ``apply_updates`` as context rows."""
    goal = payload.get("settings", {}).get("goal", "<= 1.2")
    out = []
    for r in payload["rows"]:
        base = f"{r['alias']}: %s vs {r['baseline_label']}"
        out.append(row("optimizer", base % "update_and_apply(donate=True)", r["donated"], r["baseline"], "ms", goal))
        out.append(row("optimizer", base % "update_and_apply (pure)", r["pure"], r["baseline"], "ms"))
        out.append(row("optimizer", base % "tx.update + apply_updates", r["generic"], r["baseline"], "ms"))
    return out


SHARD_SLACK = 1.01  # 1/N per rank, plus 1% for what is not sharded (step counts) and padding of uneven shards


def rows_distributed_memory(payload: dict) -> list[dict]:
    """Per-rank bytes against one process's under each sharded layout; goal 1/N (1% slack) for what the layout
    shards: the optimizer state under ZeRO-1/2, parameters and optimizer state under FSDP. Plain DP is left out (it
    shards nothing)."""
    if "ratios" in payload:
        return rows_generic("distributed_memory")(payload)
    single = payload["single_process"]
    out = []
    for name, layout in payload["layouts"].items():
        kind, world = name.split("@")
        goal = f"<= {SHARD_SLACK / int(world):.4g}"
        kinds = {"zero1": ("opt_state",), "zero2": ("opt_state",), "fsdp": ("params", "opt_state")}.get(kind, ())
        for what in kinds:
            variant = f"{kind} on {world} ranks: {what} bytes per rank vs 1 process"
            out.append(row("distributed_memory", variant, float(layout[what]), float(single[what]), "B", goal))
    return out


def rows_generic(benchmark: str) -> Callable[[dict], list[dict]]:
    """A reader for a script that writes ``"ratios": {name: ratio or {measured, baseline, unit, goal}}``."""

    def read(payload: dict) -> list[dict]:
        out = []
        for key, value in payload["ratios"].items():
            if isinstance(value, dict):
                goal = value.get("goal") or goal_in(key)
                out.append(row(benchmark, key.split(", goal")[0], value["measured"], value["baseline"],
                               value.get("unit", ""), goal))  # fmt: skip
            else:
                out.append(row(benchmark, key.split(", goal")[0], float(value), 1.0, "x", goal_in(key)))
        return out

    return read


# --- running -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """One benchmark: its script and arguments, and how to read the script's JSON into summary rows.

    ``args`` go to every run, ``full_args`` only to a full run; a quick run adds ``--quick`` where the script has
    that option and ``quick_fallback`` where it does not.
    """

    name: str
    script: str
    read: Callable[[dict], list[dict]]
    args: tuple[str, ...] = ()
    full_args: tuple[str, ...] = ()
    quick_fallback: tuple[str, ...] = ()


BENCHES = {
    b.name: b
    for b in (
        Bench("step_time", "step_time.py", rows_step_time, args=("--measure", "time")),
        Bench("memory", "step_time.py", rows_memory, args=("--measure", "memory")),
        Bench("checkpoint", "checkpoint.py", rows_checkpoint),
        Bench("data_resume", "data_resume.py", rows_data_resume),
        Bench(
            "trainer_overhead",
            "trainer_overhead.py",
            rows_trainer_overhead,
            full_args=("--compile",),
            quick_fallback=("--rounds", "1", "--warmup", "2", "--steps", "4"),
        ),
        Bench("distributed_memory", "distributed_memory.py", rows_distributed_memory, quick_fallback=("--nproc", "2")),
        Bench("optimizer", "optimizer.py", rows_optimizer),
        Bench("cold_start", "cold_start.py", rows_generic("cold_start")),
    )
}

# Runs a script whose results path is the module constant RESULTS (no --json flag): load it, point RESULTS into a
# folder of its own (the script may derive a name from it, e.g. for --quick), run its main() with the given
# arguments, and move the one JSON file it wrote to where run_all reads it.
_SHIM = """
import importlib.util, sys
from pathlib import Path
script, out, *argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
spec = importlib.util.spec_from_file_location("_bench_" + Path(script).stem, script)
mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if not hasattr(mod, "RESULTS"):
    raise SystemExit(f"{script} has neither a --json option nor a RESULTS path to redirect; add --json PATH")
private = Path(out).with_suffix(".d")
private.mkdir(parents=True, exist_ok=True)
mod.RESULTS = private / Path(mod.RESULTS).name
sys.argv = [script, *argv]
mod.main()
written = sorted(private.glob("*.json"))
if len(written) != 1:
    raise SystemExit(f"{script} wrote {[w.name for w in written]} into {private}; expected one JSON file")
written[0].replace(out)
private.rmdir()
"""


def command(bench: Bench, json_path: Path, quick: bool) -> list[str]:
    """The command line that runs ``bench`` in a fresh interpreter and leaves its JSON at ``json_path``.

    A script that knows ``--json`` / ``--quick`` gets them; one that does not is run through a shim that redirects
    its ``RESULTS`` path, with the quick arguments of its ``Bench``.
    """
    script = HERE / bench.script
    text = script.read_text()
    if not quick:
        args = [*bench.args, *bench.full_args]
    else:
        args = [*bench.args, *(("--quick",) if '"--quick"' in text else bench.quick_fallback)]
    if '"--json"' in text:
        return [sys.executable, str(script), *args, "--json", str(json_path)]
    return [sys.executable, "-c", _SHIM, str(script), str(json_path), *args]


def run_one(bench: Bench, out_dir: Path, quick: bool, timeout: float) -> tuple[dict, list[dict]]:
    """Run ``bench`` in a subprocess; its status (ok / skipped / failed, seconds, files) and its summary rows."""
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    json_path, log_path = raw / f"{bench.name}.json", raw / f"{bench.name}.log"
    if not (HERE / bench.script).exists():
        return {"status": "skipped", "note": f"benchmarks/{bench.script} does not exist yet"}, []
    json_path.unlink(missing_ok=True)
    cmd = command(bench, json_path, quick)
    status: dict[str, Any] = {"command": " ".join(cmd[:2] + ["<shim>"] + cmd[3:] if cmd[1] == "-c" else cmd)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # A session of its own, so that a timeout also ends what the script started (memory workers, compilers).
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
            failed = f"exit status {code}" if code else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            failed = f"timed out after {timeout:.0f} s (--timeout to allow more)"
    status.update(seconds=time.perf_counter() - t0, log=str(log_path))
    if failed is None and not json_path.exists():
        failed = f"finished but wrote no {json_path}"
    rows: list[dict] = []
    if failed is None:
        try:
            rows = bench.read(json.loads(json_path.read_text()))
        except (KeyError, ValueError, TypeError) as e:
            failed = f"could not read {json_path}: {type(e).__name__}: {e}"
    if failed:
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        return {**status, "status": "failed", "note": failed, "log_tail": tail}, []
    return {**status, "status": "ok", "json": str(json_path)}, rows


# --- reporting -----------------------------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    return f"{value:.4g} {unit}".strip()


def table(rows: list[dict]) -> str:
    """The summary as one fixed-width table: benchmark, variant, measured, baseline, ratio, goal, met?."""
    head = ("benchmark", "variant", "measured", "baseline", "ratio", "goal", "met?")
    cells = [head] + [
        (
            r["benchmark"],
            r["variant"],
            _fmt(r["measured"], r["unit"]),
            _fmt(r["baseline"], r["unit"]),
            f"{r['ratio']:.3g}",
            r["goal"] or "-",
            {True: "yes", False: "NO", None: "-"}[r["met"]],
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of the ratios (log scale), green where the goal is met, red where not, grey without a goal;
    each goal is a black tick across its bar, the dashed line is ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.6))
    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r["ratio"] for r in rows], color=[colors[r["met"]] for r in rows], height=0.6)
    for y, r in zip(ys, rows):
        if r["goal"]:
            bound = parse_goal(r["goal"])[1]
            ax.plot([bound, bound], [y - 0.4, y + 0.4], color="black", linewidth=2.5)
        goal = f" (goal {r['goal']})" if r["goal"] else ""
        ax.annotate(f" {r['ratio']:.3g}{goal}", (r["ratio"], y), va="center", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    # Room on both sides of every ratio and goal, so that a bar of ratio 0.5 does not start at the axis edge.
    values = [r["ratio"] for r in rows] + [parse_goal(r["goal"])[1] for r in rows if r["goal"]] + [1.0]
    ax.set_xlim(min(values) / 3, max(values) * 3)
    ax.set_yticks(ys, [f"{r['benchmark']}: {r['variant']}"[:80] for r in rows], fontsize=8)
    ax.set_xlabel("ratio = measured / baseline (log scale); black tick: goal")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run of every benchmark (numbers are not meaningful)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHES)}")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where to write (default benchmarks/results, or benchmarks/results/quick with --quick)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 7200, quick 1800)")
    args = p.parse_args(argv)  # fmt: skip
    names = list(BENCHES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        p.error(f"--only {args.only!r}: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    args.names = names
    args.out_dir = args.out_dir or HERE / "results" / ("quick" if args.quick else "")
    args.timeout = args.timeout or (1800.0 if args.quick else 7200.0)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks one after another; print the table; write summary.json and summary.png.

    Returns:
        0 when every selected benchmark ran (goals missed or not), 1 when one failed.
    """
    args = parse_args(argv)
    statuses, rows = {}, []
    for name in args.names:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        statuses[name], bench_rows = run_one(BENCHES[name], args.out_dir, args.quick, args.timeout)
        rows += bench_rows
        s = statuses[name]
        took = f" in {s['seconds']:.0f} s" if "seconds" in s else ""
        print(f"[run_all] {name}: {s['status']}{took} {s.get('note', '')}", file=sys.stderr, flush=True)
        if s["status"] == "failed":
            print(s["log_tail"], file=sys.stderr)
    machine = machine_info()
    mode = "quick (smoke run; numbers not meaningful)" if args.quick else "full"
    print(f"\n{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {machine['date']}; {mode}")  # fmt: skip
    print(table(rows))
    met = [r["met"] for r in rows if r["met"] is not None]
    print(f"goals met: {sum(met)} of {len(met)}")
    for name, s in statuses.items():
        if s["status"] != "ok":
            print(f"{name}: {s['status']}: {s['note']}")
    summary = dict(mode="quick" if args.quick else "full", argv=sys.argv[1:] if argv is None else argv,
                   machine=machine, benchmarks=statuses, rows=rows, goals_met=sum(met),
                   goals_total=len(met))  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if rows:
        title = f"ftrain benchmarks ({summary['mode']}): {machine['cpu']}, {machine['cores']} cores, {machine['date']}"
        chart(rows, args.out_dir / "summary.png", title)
    print(f"wrote {args.out_dir / 'summary.json'}" + (f" and {args.out_dir / 'summary.png'}" if rows else ""))
    return 1 if any(s["status"] == "failed" for s in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
