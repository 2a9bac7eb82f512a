"""What bench.pipeline stands on: the scripted engine's GPU curve, the CPU meter and the
profile's folding of samples.

The benchmark itself runs real services for minutes (``python -m bench.pipeline``); these
checks are the parts a wrong figure would come from, in well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpu import CpuMeter, command, tree
from bench.pipeline import GPU_CURVE, _report, _why
from bench.profile import fold
from router.config import ModelSpec
from tasks.contract import EngineRequest
from workers.engines import create_engine
from workers.engines.scripted import ScriptedEngine, curve_seconds


def test_curve_interpolates_between_measured_points() -> None:
    curve = [(1, 1.0), (64, 1.125), (256, 1.533)]
    assert curve_seconds(curve, 1) == 1.0
    assert curve_seconds(curve, 64) == 1.125
    assert curve_seconds(curve, 160) == pytest.approx(1.125 + 0.408 / 2)
    # Past the last point a bigger batch takes proportionally longer (more GPU passes).
    assert curve_seconds(curve, 512) == pytest.approx(2 * 1.533)
    assert curve_seconds([], 64) == 0.0


def test_scripted_engine_reads_a_step_curve_from_its_options() -> None:
    spec = ModelSpec(
        engine="scripted",
        path="builtin:tiny",
        max_batch_size=64,
        options={"step_curve": [[64, 1.125], [1, 1.0]]},
    )
    engine = create_engine(spec, model_path=spec.path)  # type: ignore[arg-type]
    assert isinstance(engine, ScriptedEngine)
    assert engine.step_curve == [(1, 1.0), (64, 1.125)]
    # GPU_CURVE goes up with the batch: bigger batches never take less time.
    seconds = [s for _b, s in GPU_CURVE]
    assert seconds == sorted(seconds)


def test_scripted_engine_sleeps_the_curve_for_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("workers.engines.scripted.time.sleep", slept.append)
    engine = ScriptedEngine(step_curve=[(1, 0.5), (4, 0.8)])
    request = EngineRequest(prompt="hello there", max_tokens=4, ignore_eos=True)
    answers = engine.generate([request] * 4)
    assert slept == [0.8]
    assert [a.completion_tokens for a in answers] == [4] * 4


def test_cpu_meter_charges_a_child_to_its_tree() -> None:
    # The child burns 0.3 s of CPU, says so, and stays alive until told to go.
    burn = (
        "import sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()"
    )
    meter = CpuMeter({"bench": tree(os.getpid()), "nobody": command("no such command")})
    meter.start()
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        used = meter.stop()
    finally:
        child.communicate("")
    assert used["bench"] >= 0.25  # ticks of 10 ms, sampled
    assert used["nobody"] == 0.0
    assert used["machine"] >= 0.25


def test_ratio_to_linear_is_taken_within_each_round() -> None:
    rounds = {
        1: [{"rps": 50.0}, {"rps": 100.0}],
        2: [{"rps": 90.0}, {"rps": 200.0}],
    }
    report = _report(rounds, simulate=True)
    assert report["ratio_to_linear"] == {1: 1.0, 2: 0.95}
    assert report["bends_at"] is None


def test_the_bend_is_explained_by_the_runs_own_figures() -> None:
    run = {"rps": 700.0, "s": 11.7, "admitted_s": 6.3, "machine_busy_cores": 1.45}
    run |= {"worker_share_max": 1.12, "cpu_ms_total": 1.7, "cpu_ms_api": 0.4}
    admission, cpu, tail = _why(run, cores=2)
    assert admission.startswith("admission: the last line was admitted 6.3 s into a 11.7 s run")
    assert cpu.startswith("CPU: the machine was 1.45 of its 2 cores busy, the pipeline 1.19")
    assert tail.startswith("tail: the busiest worker ran 1.12 times an even share")
    quiet = run | {"admitted_s": 1.0, "machine_busy_cores": 0.5, "worker_share_max": 1.0}
    assert _why(quiet, cores=2) == [
        "not admission, CPU or the tail: compare the processes' CPU figures"
    ]
    rounds = {1: [{"rps": 50.0} | quiet], 16: [{**run, "rps": 600.0}]}
    report = _report(rounds, simulate=True)
    assert (report["bends_at"], len(report["why"])) == (16, 3)  # type: ignore[arg-type]


def test_profile_folds_samples_into_our_functions_shares() -> None:
    collapsed = "\n".join(
        [
            # A thread's loop, under it the admission check, under that a library call.
            "_bootstrap (threading.py:1) ;run (api/admission.py:10);check_lines (api/jobs.py:5)"
            ";loads (json/__init__.py:3) 30",
            "_bootstrap (threading.py:1) ;run (api/admission.py:10);publish (tasks/app.py:7) 10",
            "recurse (api/jobs.py:9);recurse (api/jobs.py:9) 5",
            "_bootstrap (threading.py:1) ;run (api/admission.py:10) 4",
            "_bootstrap (threading.py:1) ;wait (threading.py:3) 1",
            "not a stack line",
        ]
    )
    shares = fold(collapsed, possible=100, top=8)
    assert shares["gil"] == 0.5  # 50 samples of 100 possible held the GIL
    assert shares["api.jobs.check_lines"] == 0.3  # with the library's json.loads it calls
    assert shares["tasks.app.publish"] == 0.1
    assert shares["api.jobs.recurse"] == 0.05
    assert shares["api.admission.run"] == 0.04  # its own code only
    assert shares["(not ours)"] == 0.01
    assert not any(name.startswith(("json", "threading")) for name in shares)
    assert list(shares)[1:3] == ["api.jobs.check_lines", "tasks.app.publish"]  # largest first
    assert len(fold(collapsed, possible=100, top=2)) == 3
