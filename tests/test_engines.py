"""The transformers adapter on the tiny model (CPU), and the hosted adapter against a real
OpenAI-compatible server: vLLM's own, serving the tiny model on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import TaskKind
from core.settings import Settings
from router.config import ModelSpec
from storage.tables import LedgerEntry
from tasks.contract import EngineRequest
from tasks.templates import OutputError, SamplingIn, parse_output, render
from tests.conftest import (
    MODELS_DIR,
    START_TIMEOUT_S,
    Process,
    free_port,
    service_env,
    start,
    stop,
    wait_for,
)
from weights.tokens import PromptMeter
from workers.engines import EngineError, create_engine
from workers.engines.hosted import HostedEngine
from workers.engines.transformers import TransformersEngine

SERVER_START_TIMEOUT_S = 900.0  # vLLM's server on 2 busy cores: about a minute, often more
SERVED_NAME = "tiny-remote"
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "maxLength": 8}},
    "required": ["colour"],
    "additionalProperties": False,
}


def chat(text: str, **params: object) -> EngineRequest:
    return EngineRequest.model_validate(
        {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **params}
    )


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from weights.tiny import ensure_tiny_model

    return ensure_tiny_model(MODELS_DIR)


@pytest.fixture(scope="module")
def local(tiny_path: Path) -> Iterator[TransformersEngine]:
    spec = ModelSpec(engine="transformers", options={"dtype": "float32", "device": "cpu"})
    engine = create_engine(spec, model_path=tiny_path)
    assert isinstance(engine, TransformersEngine)
    yield engine
    engine.close()


def test_left_padded_batch_matches_each_prompt_alone(local: TransformersEngine) -> None:
    requests = [
        chat("hi"),
        chat("a much longer prompt about red leather boots, size 42, with laces and a box"),
        EngineRequest(prompt="raw prompt", max_tokens=12),
    ]
    together = local.generate(requests)
    alone = [local.generate([r])[0] for r in requests]
    assert len({g.prompt_tokens for g in together}) == 3  # lengths differ: padding is used
    assert [g.texts for g in together] == [g.texts for g in alone]
    assert [g.completion_tokens for g in together] == [g.completion_tokens for g in alone]
    assert [g.prompt_tokens for g in together] == prompt_counts(requests)
    for g in together:
        assert 0 < g.completion_tokens <= 12
        assert g.finish_reason == ("length" if g.completion_tokens == 12 else "stop")
        assert g.ttft_s is not None and g.ttft_s > 0


def prompt_counts(requests: list[EngineRequest]) -> list[int]:
    return PromptMeter(_tiny()).count_many(requests)


def test_n_variants_greedy_and_seeded(local: TransformersEngine) -> None:
    greedy, sampled, again = local.generate(
        [chat("shoes", n=3), chat("hats", n=3, temperature=1.0, seed=7), chat("hats", n=3)]
    )
    assert len(set(greedy.texts)) == 1 and len(greedy.texts) == 3
    assert len(sampled.texts) == 3 and len(set(sampled.texts)) > 1
    repeat = local.generate([chat("hats", n=3, temperature=1.0, seed=7)])[0]
    assert repeat.texts == sampled.texts  # a seed makes a sampled answer reproducible
    assert again.texts != sampled.texts
    unseeded = [local.generate([chat("hats", n=2, temperature=1.0)])[0].texts for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # no seed: a fresh draw each call
    assert sampled.completion_tokens <= 3 * 12 and greedy.completion_tokens % 3 == 0


def test_stop_string_cuts_text_and_counts(local: TransformersEngine) -> None:
    full = local.generate([chat("boots", max_tokens=40, ignore_eos=True)])[0]
    assert full.completion_tokens == 40 and full.finish_reason == "length"
    text = full.texts[0]
    stop = next(m.group() for m in re.finditer(r"[a-z]{3}", text) if m.start() > 3)
    cut = local.generate([chat("boots", max_tokens=40, ignore_eos=True, stop=[stop])])[0]
    assert cut.texts == [text[: text.index(stop)]]
    assert cut.finish_reason == "stop"
    assert 0 < cut.completion_tokens < 40


def test_choices_are_scored_and_batches_mix(local: TransformersEngine) -> None:
    labels = ["outdoor", "kitchen", "office"]
    plain, picked, sampled = local.generate(
        [
            chat("hi"),
            chat("green jacket", choices=labels),
            chat("pan", choices=labels, n=4, temperature=1.0, seed=1),
        ]
    )
    assert plain.texts[0] not in labels
    assert picked.texts[0] in labels and picked.finish_reason == "stop"
    assert len(sampled.texts) == 4 and set(sampled.texts) <= set(labels)
    assert picked.completion_tokens > 0


def test_json_schema_is_not_enforced_but_output_is_checked(local: TransformersEngine) -> None:
    request = chat("jacket", json_schema=SCHEMA, max_tokens=24)
    generation = local.generate([request])[0]
    with pytest.raises(OutputError):  # the tiny model's free text is no JSON: a failed attempt
        parse_output(TaskKind.EXTRACT, request, generation.texts)


# --- hosted: vLLM's OpenAI-compatible server on loopback ---------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    api_key: str
    started_s: float

    def engine(self, *, max_concurrency: int = 8) -> HostedEngine:
        return HostedEngine(
            f"{self.url}/v1", SERVED_NAME, api_key=self.api_key, max_concurrency=max_concurrency
        )

    def finished_requests(self) -> float:
        metrics = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = r"^vllm:request_success_total\{[^}]*\} ([0-9.]+)$"
        return sum(float(v) for v in re.findall(pattern, metrics, re.M))


@pytest.fixture(scope="session")
def vllm_server(tiny_path: Path, log_dir: Path) -> Iterator[Server]:
    """`vllm.entrypoints.openai.api_server` on a free port, in-process engine (faster here)."""
    port, key = free_port(), uuid.uuid4().hex
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1")
    args = ["--model", str(tiny_path), "--served-model-name", SERVED_NAME, "--api-key", key]
    args += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0"]
    args += ["--max-model-len", "512", "--enforce-eager", "--distributed-executor-backend", "uni"]
    args += ["--structured-outputs-config", '{"backend": "guidance"}']
    log = log_dir / "vllm-server.log"
    began = time.monotonic()
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"vllm server exited:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            auth = {"Authorization": f"Bearer {key}"}
            return httpx.get(f"{url}/v1/models", headers=auth, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=SERVER_START_TIMEOUT_S, what="vllm's server to list models")
        started = time.monotonic() - began
        print(f"\nvllm server answered /v1/models after {started:.1f}s")
        yield Server(url, key, started)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hosted_chat_returns_text_and_usage(vllm_server: Server) -> None:
    engine = vllm_server.engine()
    try:
        plain, two, sampled = engine.generate(
            [
                chat("hi", ignore_eos=True),
                chat("hi", n=2, ignore_eos=True),
                chat("hi", n=2, ignore_eos=True, temperature=1.0, seed=3),
            ]
        )
    finally:
        engine.close()
    expected_prompt = prompt_counts([chat("hi")])[0]
    assert plain.prompt_tokens == two.prompt_tokens == expected_prompt
    assert plain.completion_tokens == 12 and plain.finish_reason == "length"
    # greedy n=2 is asked once and copied: the usage (what is billed) counts one answer
    assert two.texts == [plain.texts[0]] * 2 and two.completion_tokens == 12
    assert len(set(sampled.texts)) == 2 and sampled.completion_tokens == 24
    assert plain.texts[0]


def test_hosted_json_schema_and_choices_are_enforced(vllm_server: Server) -> None:
    labels = ["outdoor", "kitchen", "office"]
    texts = [f"product {i}: a green jacket" for i in range(4)]
    extract = [chat(t, json_schema=SCHEMA, max_tokens=48) for t in texts]
    classify = [chat(t, choices=labels) for t in texts]
    engine = vllm_server.engine(max_concurrency=4)
    try:
        generations = engine.generate([*extract, *classify])
    finally:
        engine.close()
    for request, generation in zip(extract, generations[:4], strict=True):
        value = parse_output(TaskKind.EXTRACT, request, generation.texts)
        assert list(Draft202012Validator(SCHEMA).iter_errors(value)) == []
    assert all(g.texts[0] in labels for g in generations[4:])


def test_hosted_failures_raise_engine_error(vllm_server: Server) -> None:
    nowhere = HostedEngine(f"http://127.0.0.1:{free_port()}/v1", SERVED_NAME, timeout_s=5)
    wrong_key = HostedEngine(f"{vllm_server.url}/v1", SERVED_NAME, api_key="wrong")
    try:
        with pytest.raises(EngineError, match="ConnectError"):
            nowhere.generate([chat("hi")])
        with pytest.raises(EngineError, match="HTTP 401"):
            wrong_key.generate([chat("hi")])
    finally:
        nowhere.close()
        wrong_key.close()


def test_hosted_split_does_not_pay_twice(vllm_server: Server) -> None:
    """The worker splits a failed batch; a call that succeeded is not sent again."""
    good, bad = chat("fine"), chat("too long", max_tokens=100_000)
    engine = vllm_server.engine()
    try:
        before = vllm_server.finished_requests()
        with pytest.raises(EngineError, match="HTTP 400"):
            engine.generate([good, bad])
        wait_for(lambda: vllm_server.finished_requests() == before + 1, timeout=60, what="1 run")
        again = engine.generate([good])[0]
        with pytest.raises(EngineError):
            engine.generate([bad])
    finally:
        engine.close()
    assert again.completion_tokens > 0
    assert vllm_server.finished_requests() == before + 1


# --- end to end: an `inferq worker` for a hosted model, through the API --------------------


def test_hosted_worker_end_to_end_priced_per_token(
    vllm_server: Server,
    settings: Settings,
    sessions: sessionmaker[Session],
    api_key: str,
    log_dir: Path,
    tmp_path: Path,
) -> None:
    price_in, price_out = 0.15, 0.6
    config = {
        "models": {
            "remote": {
                "engine": "openai",
                "path": "builtin:tiny",
                "base_url": f"{vllm_server.url}/v1",
                "api_key_env": "REMOTE_API_KEY",
                "price_per_million_input_tokens": price_in,
                "price_per_million_output_tokens": price_out,
                "price_per_gpu_hour": 99.0,  # ignored: hosted models are priced per token
                "options": {"model": SERVED_NAME, "timeout_s": 120},
            }
        },
        "routes": [{"task": "*", "model": "remote"}],
    }
    config_path = tmp_path / "hosted.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = service_env(settings) | {"INFERQ_CONFIG": str(config_path)}
    env["REMOTE_API_KEY"] = vllm_server.api_key
    port = free_port()
    worker = start("worker-remote", ["worker", "--model", "remote"], env, log_dir)
    api = start("api-remote", ["api", "--port", str(port)], env, log_dir)
    try:
        _wait_ready(worker, api, port)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as client:
            _check_served(client, sessions, price_in, price_out)
    finally:
        stop(api)
        stop(worker)


def _wait_ready(worker: Process, api: Process, port: int) -> None:
    def ready() -> bool:
        for process in (worker, api):
            if process.proc.poll() is not None:
                pytest.fail(f"{process.name} exited:\n{process.tail()}")
        if "ready." not in worker.log.read_text(errors="replace"):
            return False
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=START_TIMEOUT_S, what="the hosted worker and its API")


def _check_served(
    client: httpx.Client, sessions: sessionmaker[Session], price_in: float, price_out: float
) -> None:
    payload = {"messages": [{"role": "user", "content": "Name a colour."}]}
    params = {"max_tokens": 8, "ignore_eos": True}
    ids = [
        _submit(client, {"task": "chat", "input": payload, "params": params}),
        _submit(client, {"task": "extract", "input": {"text": "green coat", "schema": SCHEMA}}),
    ]
    answers = [_result(client, i) for i in ids]
    assert [a["status"] for a in answers] == ["succeeded", "succeeded"], answers
    assert answers[0]["model"] == "remote" and isinstance(answers[0]["output"], str)
    assert list(Draft202012Validator(SCHEMA).iter_errors(answers[1]["output"])) == []
    with sessions() as session:
        entry = session.scalars(
            select(LedgerEntry).where(LedgerEntry.request_id == uuid.UUID(ids[0]))
        ).one()
    rendered = render(TaskKind.CHAT, payload, SamplingIn.model_validate(params))
    prompt_tokens = PromptMeter(_tiny()).count(rendered)  # the server counts as we do
    assert entry.engine == "openai" and entry.outcome == "succeeded"
    assert (entry.prompt_tokens, entry.completion_tokens) == (prompt_tokens, 8)
    assert entry.gpu_seconds == 0.0
    assert entry.cost == pytest.approx((prompt_tokens * price_in + 8 * price_out) / 1e6)


def _tiny() -> Path:
    from weights.tiny import ensure_tiny_model

    return ensure_tiny_model(MODELS_DIR)


def _submit(client: httpx.Client, body: dict[str, object]) -> str:
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _result(client: httpx.Client, request_id: str) -> dict[str, object]:
    for _ in range(20):
        body = client.get(f"/v1/requests/{request_id}", params={"wait": 30}).json()
        if body["status"] in ("succeeded", "failed", "expired", "cancelled"):
            return dict(body)
    raise AssertionError(f"request {request_id} never finished: {body}")


def test_gpu_bench_runs_without_vllm() -> None:
    """bench/gpu_transformers.py goes to GPU machines with no vLLM: it must never import it."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['bench', '--batch-sizes', '1', '2', '--prompt-tokens', '8',"
        " '--new-tokens', '3', '--repeats', '1', '--device', 'cpu']\n"
        "runpy.run_module('bench.gpu_transformers', run_name='__main__')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'vllm'], 'vllm imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["requests_per_s"] > 0 for r in report["rows"])
