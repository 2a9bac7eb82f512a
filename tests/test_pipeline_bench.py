"""What bench.pipeline stands on: the scripted engine's GPU curve and the CPU meter.

The benchmark itself runs real services for minutes (``python -m bench.pipeline``); these
checks are the parts a wrong figure would come from, in well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpu import CpuMeter, command, tree
from bench.pipeline import GPU_CURVE, _report
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
