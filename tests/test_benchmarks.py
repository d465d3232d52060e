"""The benchmark harness: benchmarks/run_all.py runs scripts in subprocesses, reads their JSON, and summarizes ratios
against goals. A quick run of a subset end to end, and the readers and goal checks against numbers made here."""

import importlib.util
import json
import math
import operator
import struct
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("benchmarks_run_all", BENCH_DIR / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _check_row_arithmetic(r: dict) -> None:
    """ratio == measured / baseline, and ``met`` agrees with the goal evaluated here with ``operator``.

    Every number compared in this file is the same float operation on the same floats (JSON round-trips a float
    exactly), so the comparisons are exact; none is a measurement compared with another."""
    for key in ("measured", "baseline", "ratio"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
    assert r["ratio"] == r["measured"] / r["baseline"], r  # run_all.row computes this very division
    if r["goal"] is None:
        assert r["met"] is None
    else:
        op, bound = r["goal"].split()
        assert r["met"] is OPS[op](r["ratio"], float(bound)), r


def test_quick_run_of_checkpoint_and_data_resume_writes_summary_and_chart(tmp_path):
    cmd = [sys.executable, str(BENCH_DIR / "run_all.py"), "--quick", "--only", "checkpoint,data_resume"]
    proc = subprocess.run([*cmd, "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())

    machine = summary["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["transformers"] == metadata.version("transformers")
    assert machine["cores"] >= 1 and machine["cpu"]
    datetime.fromisoformat(machine["date"])
    assert summary["mode"] == "quick"
    assert {k: v["status"] for k, v in summary["benchmarks"].items()} == {"checkpoint": "ok", "data_resume": "ok"}

    rows = summary["rows"]
    assert {r["benchmark"] for r in rows} == {"checkpoint", "data_resume"}
    for r in rows:
        _check_row_arithmetic(r)
    goals = {r["variant"]: r["goal"] for r in rows if r["goal"]}
    assert goals == {
        "4M (0.05 GB) save (integrity, fsync) vs torch.save + fsync": "<= 1.1",
        "4M (0.05 GB) verified restore vs torch.load(mmap=False)": "<= 1.3",
        "4M async save blocked (later saves) vs sync save": "< 0.1",
        "worst first batch (k = 0, 10^3, 10^6) vs the target": "< 1",
    }
    assert summary["goals_total"] == 4 and summary["goals_met"] == sum(r["met"] for r in rows if r["goal"])

    # The rows carry the numbers the scripts wrote, not numbers made up on the way.
    ckpt = json.loads((tmp_path / "raw" / "checkpoint.json").read_text())
    saves = {r["method"]: r["save_s"] for r in ckpt["rows"]}
    save_row = next(r for r in rows if r["variant"] == "4M (0.05 GB) save (integrity, fsync) vs torch.save + fsync")
    assert (save_row["measured"], save_row["baseline"]) == (saves["ftrain safetensors"], saves["torch.save"])
    resume = json.loads((tmp_path / "raw" / "data_resume.json").read_text())
    target_row = next(r for r in rows if r["goal"] == "< 1")
    assert target_row["baseline"] == 50.0
    assert target_row["measured"] == max(r["ftrain_s"] for r in resume["rows"]) * 1e3  # the same product

    # One table line per row, and a PNG with a real image in it.
    assert sum(line.startswith(("checkpoint ", "data_resume ")) for line in proc.stdout.splitlines()) == len(rows)
    png = (tmp_path / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 500 and height > 100 + 30 * len(rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("<= 0.95", ("<=", 0.95)), (">=1.3", (">=", 1.3)), ("< 0.1", ("<", 0.1)), ("> 2e3", (">", 2000.0))],
)
def test_parse_goal(run_all, text, expected):
    assert run_all.parse_goal(text) == expected


@pytest.mark.parametrize("bad", ["0.95", "=< 1", "<= x", ""])
def test_parse_goal_rejects_a_malformed_goal(run_all, bad):
    with pytest.raises(ValueError, match="is not '<op> <number>'"):
        run_all.parse_goal(bad)


def _overhead_payload() -> dict:
    """A trainer_overhead.py JSON with made-up times; its ratios computed here as that script computes them."""
    rows = [
        {"variant": "a", "label": "raw ftrain loop", "median_s": 10.0},
        {"variant": "b", "label": "ftrain.Trainer", "median_s": 10.2},
        {"variant": "c", "label": "transformers.Trainer", "median_s": 15.0},
        {"variant": "a+compile", "label": "raw ftrain loop + torch_compile", "median_s": 8.0},
        {"variant": "b+compile", "label": "ftrain.Trainer + torch_compile", "median_s": 8.5},
        {"variant": "c+compile", "label": "transformers.Trainer + torch_compile", "median_s": 12.0},
    ]
    for r in rows:
        r["samples_per_s"] = 480 / r["median_s"]
    return {
        "rows": rows,
        "ratios": {
            "b/a time (eager), goal <= 1.03": 10.2 / 10.0,
            "b/c samples/s (eager), goal >= 1.3": (480 / 10.2) / (480 / 15.0),
            "b/a time (compiled), goal <= 1.03": 8.5 / 8.0,
            "b/c samples/s (compiled), goal >= 1.5": (480 / 8.5) / (480 / 12.0),
            "something new, goal > 2": 2.5,
        },
    }


def test_trainer_overhead_ratios_are_split_into_measured_baseline_and_goal(run_all):
    rows = run_all.rows_trainer_overhead(_overhead_payload())
    got = [(r["measured"], r["baseline"], r["unit"], r["goal"], r["met"]) for r in rows]
    assert got == [
        (10.2, 10.0, "s", "<= 1.03", True),
        (480 / 10.2, 480 / 15.0, "samples/s", ">= 1.3", True),  # the payload's own samples_per_s, passed through
        (8.5, 8.0, "s", "<= 1.03", False),  # the compiled pair, not the eager one
        (480 / 8.5, 480 / 12.0, "samples/s", ">= 1.5", False),  # against transformers compiled
        (2.5, 1.0, "x", "> 2", True),  # a name this reader does not parse keeps the script's ratio
    ]
    assert (
        rows[2]["variant"] == "b/a time (compiled): ftrain.Trainer + torch_compile vs raw ftrain loop + torch_compile"
    )
    for r in rows:
        _check_row_arithmetic(r)


def test_step_time_and_memory_rows_use_the_best_hand_loop_and_the_eager_loop(run_all):
    ms = {"a": 210.0, "b": 200.0, "c": 196.0, "d": 230.0, "e": 185.0, "f": 192.0, "g": 198.0, "h": 190.0, "i": 180.0}
    mb = {"a": 600.0, "b": 601.0, "c": 570.0, "d": 970.0, "e": 680.0, "f": 690.0, "g": 612.0, "h": 1100.0, "i": 630.0}
    payload = {
        "time_size": "3.5M",
        "mem_size": "25M",
        "rows": [{"variant": v, "size": "3.5M", "ms_per_step": t} for v, t in ms.items()]
        + [{"variant": v, "size": "25M", "peak_mb": m} for v, m in mb.items()],
    }
    times = run_all.rows_step_time(payload)
    assert [(r["measured"], r["baseline"], r["goal"], r["met"]) for r in times] == [
        (230.0, 196.0, None, None),  # (d)-(f) against the best of (a)-(c), here (c)
        (185.0, 196.0, "<= 0.95", True),  # 0.94
        (192.0, 196.0, "<= 0.95", False),  # 0.98
        (190.0, 196.0, None, None),  # (h): context for (i)
        (180.0, 196.0, "<= 0.95", True),  # (i) 0.92: the Trainer's compiled step
        (230.0, 200.0, None, None),  # the eager steps against (b), the best eager hand loop
        (198.0, 200.0, "<= 1.00", True),  # 0.99
    ]
    memory = run_all.rows_memory(payload)
    assert [(r["measured"], r["baseline"], r["goal"], r["met"]) for r in memory] == [
        (970.0, 600.0, None, None),
        (680.0, 600.0, None, None),
        (690.0, 600.0, "<= 1.10", False),  # 1.15
        (612.0, 600.0, "<= 1.10", True),  # 1.02
        (1100.0, 600.0, None, None),
        (630.0, 600.0, "<= 1.10", True),  # 1.05
    ]


def test_a_script_without_json_option_is_run_through_the_shim_with_its_quick_arguments(run_all, tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(
        "import json, sys\nfrom pathlib import Path\n"
        "RESULTS = Path('/nonexistent/never-written.json')\n"
        "def main():\n"
        "    out = RESULTS.with_name('fake_quick.json')  # a name of its own, as trainer_overhead.py --quick does\n"
        "    out.write_text(json.dumps({'argv': sys.argv[1:], 'ratios': {'x/y time, goal <= 2': 1.5}}))\n"
    )
    bench = run_all.Bench("fake", str(script), run_all.rows_generic("fake"), quick_fallback=("--steps", "3"))
    status, rows = run_all.run_one(bench, tmp_path / "out", quick=True, timeout=60)
    assert status["status"] == "ok", status
    assert json.loads(Path(status["json"]).read_text())["argv"] == ["--steps", "3"]
    assert [(r["variant"], r["ratio"], r["goal"], r["met"]) for r in rows] == [("x/y time", 1.5, "<= 2", True)]


def test_distributed_memory_rows_hold_what_each_layout_shards_to_1_over_n(run_all):
    one = {"params": 4000, "opt_state": 8004}
    payload = {
        "single_process": one,
        "layouts": {
            "dp@2": {"params": 4000, "opt_state": 8004},
            "zero1@2": {"params": 4000, "opt_state": 4004},
            "fsdp@4": {"params": 1000, "opt_state": 2200},  # optimizer state 10% over 1/4: misses the goal
        },
    }
    rows = run_all.rows_distributed_memory(payload)
    assert [(r["variant"].split(":")[0], r["measured"], r["baseline"], r["goal"], r["met"]) for r in rows] == [
        ("zero1 on 2 ranks", 4004.0, 8004.0, "<= 0.505", True),
        ("fsdp on 4 ranks", 1000.0, 4000.0, "<= 0.2525", True),
        ("fsdp on 4 ranks", 2200.0, 8004.0, "<= 0.2525", False),
    ]


def test_a_failing_script_is_reported_with_its_log_and_a_missing_one_is_skipped(run_all, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text('import sys\nprint("ran out of disk", file=sys.stderr)\nsys.exit(3)\n# "--json"\n')
    bench = run_all.Bench("broken", str(script), run_all.rows_generic("broken"))
    status, rows = run_all.run_one(bench, tmp_path, quick=False, timeout=60)
    assert (status["status"], status["note"], rows) == ("failed", "exit status 3", [])
    assert "ran out of disk" in status["log_tail"]
    missing = run_all.Bench("gone", str(tmp_path / "gone.py"), run_all.rows_generic("gone"))
    status, rows = run_all.run_one(missing, tmp_path, quick=True, timeout=60)
    assert status["status"] == "skipped" and "does not exist" in status["note"] and rows == []


def test_a_timeout_ends_the_script_and_what_it_started(run_all, tmp_path):
    script = tmp_path / "hangs.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)  # '--json'\n"
    )
    bench = run_all.Bench("hangs", str(script), run_all.rows_generic("hangs"))
    status, _ = run_all.run_one(bench, tmp_path, quick=False, timeout=5)
    assert status["status"] == "failed" and status["note"].startswith("timed out after 5 s")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _proc_state(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child), "the script's child outlived it"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_only_rejects_an_unknown_benchmark_and_names_the_known_ones(run_all, capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.parse_args(["--only", "step_time,stepp_time"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "['stepp_time']" in err and "step_time, memory, checkpoint, data_resume, trainer_overhead" in err


def test_optimizer_rows_hold_the_donated_update_to_the_goal_and_keep_the_others_as_context(run_all):
    payload = {
        "settings": {"goal": "<= 1.2"},
        "rows": [{"alias": "adamw", "baseline_label": "AdamW(fused)", "baseline": 3.0, "donated": 3.3, "pure": 7.5,
                  "generic": 27.0}],
    }  # fmt: skip
    rows = run_all.rows_optimizer(payload)
    for r in rows:
        _check_row_arithmetic(r)
    by = {r["variant"].split(": ")[1].split(" vs ")[0]: r for r in rows}
    assert set(by) == {"update_and_apply(donate=True)", "update_and_apply (pure)", "tx.update + apply_updates"}
    donated = by["update_and_apply(donate=True)"]
    assert (donated["measured"], donated["goal"], donated["met"]) == (3.3, "<= 1.2", True)
    assert by["update_and_apply (pure)"]["goal"] is None and by["tx.update + apply_updates"]["goal"] is None
    assert all(r["baseline"] == 3.0 and r["unit"] == "ms" for r in rows)
