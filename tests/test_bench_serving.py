"""`dsaserve bench serving` against a live server: every metric in its JSON, token counts exact, and the
prefix-cache hit rate of each run (a repeat of the same prompts finds them cached)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsaserve.bench.serving import BenchConfig, client_processes, make_requests
from server_process import ServerProcess, free_port

pytestmark = pytest.mark.timeout(180)
METRICS = ["completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens", "request_throughput",
           "input_throughput", "output_throughput"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2e_latency") for stat in ("mean", "median", "p99")]


def test_bench_serving(tiny_ds: str, tmp_path: Path) -> None:
    with ServerProcess(tiny_ds, tmp_path / "server.log", page_size=4, max_total_tokens=4096) as server:
        out, again = tmp_path / "bench.json", tmp_path / "again.json"
        # the repeat from two client processes, with SGLang's names for the length flags
        sglang_names = ("--random-input-len", "--random-output-len", "--random-range-ratio")
        for path, clients, names in ((out, "1", ("--input-len", "--output-len", "--range-ratio")),
                                     (again, "2", sglang_names)):
            args = ["--num-clients", clients, "--base-url", f"{server.url}/v1", "--num-prompts", "24", names[0], "32",
                    names[1], "8", names[2], "0.5", "--max-concurrency", "8", "--request-rate", "100", "--seed", "3",
                    "--output-json", str(path)]
            if clients == "2":  # sampled, as deployments run (SGLang's flag)
                args += ["--extra-request-body", '{"temperature": 0.7, "top_p": 0.9}']
            run = subprocess.run([sys.executable, "-m", "dsaserve", "bench", "serving", *args], capture_output=True,
                                 text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-2000:]
        # the extra fields reach the server: one it refuses fails every request, with its reason
        refused = tmp_path / "refused.json"
        subprocess.run([sys.executable, "-m", "dsaserve", "bench", "serving", "--base-url", server.url, "--num-prompts",
                        "2", "--input-len", "8", "--output-len", "2", "--num-clients", "1", "--extra-request-body",
                        '{"temperature": -1}', "--output-json", str(refused)], capture_output=True, timeout=120)
    refusal = json.loads(refused.read_text())
    assert refusal["failed"] == 2 and "temperature must be >= 0" in refusal["errors"][0]
    metrics = json.loads(out.read_text())
    # random prompts share no prefix; the repeat finds every full page of each prompt cached
    repeat = json.loads(again.read_text())
    assert metrics["prefix_hit_rate"] < 0.05 < 0.5 < repeat["prefix_hit_rate"]
    assert repeat["config"]["num_clients"] == 2 and repeat["completed"] == 24 and repeat["failed"] == 0
    assert repeat["config"]["extra_request_body"] == {"temperature": 0.7, "top_p": 0.9}
    assert repeat["total_output_tokens"] == metrics["total_output_tokens"] and repeat["mean_itl_ms"] > 0
    assert repeat["total_input_tokens"] == metrics["total_input_tokens"]  # the same lengths by either name
    assert "Prefix cache hit rate" in run.stdout
    assert not [k for k in METRICS if k not in metrics]
    assert metrics["completed"] == 24 and metrics["failed"] == 0
    reqs = make_requests(BenchConfig(input_len=32, output_len=8, range_ratio=0.5, num_prompts=24, seed=3), 512)
    assert metrics["total_input_tokens"] == sum(len(p) for p, _ in reqs)
    assert metrics["total_output_tokens"] == sum(n for _, n in reqs)
    assert 0 < metrics["median_ttft_ms"] <= metrics["p99_ttft_ms"] and metrics["mean_itl_ms"] > 0
    assert metrics["output_throughput"] > 0 and metrics["request_throughput"] > 0
    for title in ("Request throughput", "Output token throughput", "Median TTFT", "P99 TPOT", "Mean ITL"):
        assert title in run.stdout


def test_extra_request_body_must_be_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    from dsaserve.cli import main
    for bad, says in (("[1]", "must be a JSON object"), ("{temperature: 1}", "not JSON")):
        with pytest.raises(SystemExit):
            main(["bench", "serving", "--extra-request-body", bad])
        assert says in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--request-rate", "0"], "--request-rate must be > 0 requests per second (inf: all at once), got 0.0"),
    (["--request-rate", "-2"], "--request-rate must be > 0 requests per second (inf: all at once), got -2.0"),
    (["--request-rate", "nan"], "--request-rate must be > 0 requests per second (inf: all at once), got nan"),
    (["--input-len", "0", "--output-len", "-3"], "--input-len must be >= 1, got 0; --output-len must be >= 1, got -3"),
    (["--range-ratio", "1.5"], "--range-ratio must be in [0, 1], got 1.5"),
])
def test_bad_flags_are_refused_before_connecting(flags: list[str], says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Each used to end in a traceback: from the connection (no server here), else from the arrivals or the
    prompt lengths. Exit code 2, like every flag check."""
    from dsaserve.cli import main
    assert main(["bench", "serving", "--base-url", f"http://127.0.0.1:{free_port()}", *flags]) == 2
    assert f"error: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--model", "m", "--vocab-size", "100"], ["--request-rate", "inf"]])
def test_no_server_is_one_line(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Whether or not the model and vocabulary need asking for (given: every request used to fail on its own);
    --request-rate inf is valid (all at once, the default)."""
    from dsaserve.cli import main
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "serving", "--base-url", url, "--num-prompts", "2", "--disable-tqdm", *flags]) == 1
    captured = capsys.readouterr()
    assert f"error: could not reach the server at {url}" in captured.err and "Traceback" not in captured.err
    assert "Serving Benchmark Result" not in captured.out


@pytest.mark.timeout(60)
def test_a_server_that_answers_nothing_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts connections and never answers: the probe gives up at its own timeout (it waited for
    the requests' 600 s)."""
    import socket

    from dsaserve.bench import serving
    from dsaserve.cli import main
    monkeypatch.setattr(serving, "PROBE_TIMEOUT_S", 1.0)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshakes: nobody reads
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert main(["bench", "serving", "--base-url", url, "--num-prompts", "2", "--disable-tqdm"]) == 1
    err = capsys.readouterr().err
    assert f"error: could not reach the server at {url}: ReadTimeout" in err and "Traceback" not in err, err


def test_a_server_that_refuses_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that answers /v1/models with an error (a wrong --api-key: 401) ends the benchmark with its status,
    before any request (each would fail the same way)."""
    import http.server
    import threading
    from dsaserve.cli import main

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        for flags in ([], ["--model", "m", "--vocab-size", "100"]):
            assert main(["bench", "serving", "--base-url", url, "--num-prompts", "2", "--disable-tqdm", *flags]) == 1
            err = capsys.readouterr().err
            assert f"error: the server at {url} answered GET /v1/models with 401" in err and "Traceback" not in err
    finally:
        server.shutdown()
        server.server_close()


def test_client_processes_never_exceed_the_streams() -> None:
    """Each client process runs at least one stream: more would raise the concurrency asked for."""
    assert client_processes(BenchConfig(num_prompts=24, max_concurrency=4, num_clients=8)) == 4
    assert client_processes(BenchConfig(num_prompts=3, max_concurrency=64, num_clients=8)) == 3
    assert client_processes(BenchConfig(num_prompts=640, max_concurrency=64, num_clients=2)) == 2
    assert client_processes(BenchConfig(num_prompts=640, max_concurrency=8)) == 1  # 16 streams per process

