"""The live server with MTP speculation on the embedded trained model (its MTP layer drafts well):
accept length in /generate, /get_server_info, /metrics and `dsaserve bench serving`; echo with prompt
log-probabilities (against transformers); cached prompt tokens in usage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers

from dsaserve.model.checkpoint import default_model_path
from server_process import module_server

pytestmark = pytest.mark.timeout(300)
STEPS = 2
PROMPT = "Return a string representation of the object. The"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(str(default_model_path()), tmp_path_factory, page_size=4, max_total_tokens=8192,
                             speculative_algorithm="NEXTN", speculative_num_steps=STEPS, served_model_name="m")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_accept_length_is_reported_everywhere(server, tmp_path: Path) -> None:
    r = httpx.post(f"{server.url}/generate", timeout=120, json={
        "text": PROMPT, "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}).json()
    meta = r["meta_info"]
    # One token from the prefill, then each verify step yields between 1 and S + 1 tokens.
    assert -(-23 // (STEPS + 1)) <= meta["spec_verify_ct"] <= 23
    states = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["internal_states"]
    assert states[0]["spec_verify_steps"] >= meta["spec_verify_ct"] and states[0]["avg_spec_accept_length"] > 1.2
    assert {"graph_shapes", "graph_captures", "graph_eager_misses", "kernel_compiles"} <= states[0].keys()
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'dsaserve_spec_accept_length{dp_rank="0"}' in metrics and "dsaserve_spec_draft_tokens" in metrics
    assert 'dsaserve_graph_captures{dp_rank="0"}' in metrics and 'dsaserve_kernel_compiles{dp_rank="0"}' in metrics
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "dsaserve", "bench", "serving", "--base-url", server.url,
                          "--num-prompts", "8", "--input-len", "16", "--output-len", "16", "--max-concurrency", "4",
                          "--output-json", str(out)], capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-2000:]
    bench = json.loads(out.read_text())
    assert "Accept length (MTP)" in run.stdout and bench["accept_length"] > 1.0
    # ITL per token, as SGLang counts it (a chunk of n verified tokens is n gaps): with every request 16 tokens
    # long, its mean is the mean TPOT but for each stream's tail after its last token; per chunk, it was about
    # accept-length times larger (the bound: half way)
    assert bench["mean_itl_ms"] < bench["mean_tpot_ms"] * (1 + bench["accept_length"]) / 2
    lines = httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines()
    itl_count, tokens, requests = (float(next(x.split()[-1] for x in lines if x.startswith(name + " "))) for name in (
        "dsaserve_inter_token_latency_seconds_count", "dsaserve_generation_tokens_total",
        'dsaserve_requests_total{finish_reason="length"}'))
    assert itl_count == tokens - requests  # the server's histogram too: every token but each request's first


def test_echo_returns_the_prompt_with_its_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(str(default_model_path()), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_path()))
    ids = tok.encode(PROMPT, add_special_tokens=True)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    prompt_lps = lp.token_logprobs[1:len(ids)]
    want = [float(expected[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(prompt_lps, want)) < 1e-3  # bf16 weights, fp32 compute on CPU
    assert len(lp.tokens) == len(ids) + 3 and all(v is not None for v in lp.token_logprobs[1:])
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_native_input_logprobs_and_cached_tokens(server, client: openai.OpenAI) -> None:
    prompt = PROMPT * 4
    first = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    # full pages up to the last prompt token; with MTP too (each page's next token is the prompt's own)
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 4 * 4
    assert again.choices[0].text == first.choices[0].text
    r = httpx.post(f"{server.url}/generate", timeout=120, json={
        "text": PROMPT, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0}}).json()
    inputs = r["meta_info"]["input_token_logprobs"]
    assert inputs[0][0] is None and len(inputs) == r["meta_info"]["prompt_tokens"]
    assert all(isinstance(lp, float) and lp <= 0 for lp, _, _ in inputs[1:])
