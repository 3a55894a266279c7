"""Config parsing of the official fields, the sampler's filters, and the two CLI entry points."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsaserve.config import ModelConfig
from dsaserve.engine.request import (SEED_MAX, SEED_MIN, Request, RequestError, SamplingParams, choice_seed,
                                     logit_bias_pairs)
from dsaserve.engine.sampler import draw, filter_probs, row_uniform, sample

# Field values of the published DeepSeek-V3.2-Exp and GLM-5 config.json files (the math-relevant ones).
DEEPSEEK_V32 = dict(model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3, index_n_heads=64,
                    index_head_dim=128, index_topk=2048, rms_norm_eps=1e-6, max_position_embeddings=163840,
                    num_nextn_predict_layers=1, eos_token_id=1, bos_token_id=0, rope_theta=10000,
                    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"})


def test_deepseek_v32_fields() -> None:
    cfg = ModelConfig.from_dict(DEEPSEEK_V32)
    assert cfg.mlp_layer_types[:4] == ("dense", "dense", "dense", "sparse")
    assert cfg.indexer_types == ("full",) * 61 and not cfg.indexer_rope_interleave
    assert cfg.latent_dim == 576 and cfg.eos_token_ids == (1,)
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert cfg.rope.cos_sin_scale == 1.0


def test_glm_fields() -> None:
    raw = dict(DEEPSEEK_V32, model_type="glm_moe_dsa", eos_token_id=[154820, 154827], rope_scaling=None,
               rope_theta=1000000, index_topk_freq=3)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.indexer_rope_interleave and cfg.eos_token_ids == (154820, 154827)
    assert cfg.rope.kind == "default" and cfg.softmax_scale == pytest.approx(192 ** -0.5)
    assert cfg.indexer_types[:6] == ("full", "full", "shared", "shared", "full", "shared")


def _req(params: SamplingParams, outputs: list[int] | None = None) -> Request:
    return Request("r", [1], params, 8, 0, seed=3 if params.seed is None else params.seed, output_ids=outputs or [])


@pytest.mark.parametrize("eos", ["2", [1, True], [1, -3], {"id": 1}])
def test_an_eos_token_id_that_is_no_token_id_is_named(eos: object) -> None:
    """config.json's field, read as generation_config.json's (config.token_ids): int() took "2" and True as ids."""
    from dsaserve.config import ConfigError
    with pytest.raises(ConfigError, match="config.json: eos_token_id must be a token id or a list of them"):
        ModelConfig.from_dict(dict(DEEPSEEK_V32, eos_token_id=eos))
    assert ModelConfig.from_dict(dict(DEEPSEEK_V32, eos_token_id=[1, 2])).eos_token_ids == (1, 2)


def test_a_hub_repo_id_is_named_as_one(tmp_path: Path) -> None:
    """SGLang takes a Hugging Face repo id for --model-path; dsaserve reads a folder and says how to get one."""
    from dsaserve.config import ConfigError
    with pytest.raises(ConfigError, match="a Hugging Face repo id.*huggingface-cli download deepseek-ai/DeepSeek-V3.2"):
        ModelConfig.from_path("deepseek-ai/DeepSeek-V3.2")
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_path(tmp_path)  # a folder without one: not a repo id
    assert "repo id" not in str(err.value)


def test_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filter_probs(logits, [_req(SamplingParams(top_k=2))])[0, 2:] == 0).all()
    assert (filter_probs(logits, [_req(SamplingParams(top_p=0.7))])[0, 2:] == 0).all()
    kept = filter_probs(logits, [_req(SamplingParams(min_p=0.4))])[0]
    assert (kept[2:] == 0).all() and kept[1] > 0
    tokens, _ = sample(logits.repeat(50, 1), [_req(SamplingParams(top_p=0.7, seed=s)) for s in range(50)])
    assert set(tokens) == {0, 1}


def test_a_temperature_under_1e_5_is_greedy() -> None:
    """vLLM's rule: such a row is the argmax. It was sampled at the 1e-5 floor, and a near tie (logits 1e-5 apart)
    split between the two tokens over seeds."""
    logits = torch.tensor([[1.0, 1.00001, -3.0]]).repeat(200, 1)
    tokens, _ = sample(logits, [_req(SamplingParams(temperature=5e-7, seed=s)) for s in range(200)])
    assert set(tokens) == {1}
    assert SamplingParams(temperature=1e-5).greedy is False


def _chi_square_fit_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a chi-square goodness-of-fit test of `counts` against `probs` (zero-probability
    cells must be empty and are left out)."""
    expected = probs * counts.sum()
    cells = probs > 0
    stat = (((counts - expected) ** 2)[cells] / expected[cells]).sum()
    return torch.special.gammaincc(torch.tensor((int(cells.sum()) - 1) / 2.0), stat / 2).item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
                                    SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.0, min_p=0.3)])
def test_sampled_tokens_follow_the_distribution(params: SamplingParams, device: str) -> None:
    """6000 rows with distinct seeds, sampled in one batch, against the filtered distribution that
    filter_probs computes independently of the noise (on CUDA the rows go through the Triton sampler).
    Chi-square at 1e-3: with fixed seeds the outcome is deterministic; a correct sampler over random seeds
    fails it with probability 0.1%."""
    logits = torch.log(torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]))
    rows = 6000
    reqs = [_req(SamplingParams(**{**params.__dict__, "seed": s})) for s in range(rows)]
    tokens, _ = sample(logits.repeat(rows, 1).to(device), reqs)
    want = filter_probs(logits[None], reqs[:1])[0]
    counts = torch.bincount(torch.tensor(tokens), minlength=7).float()
    assert (counts[want == 0] == 0).all(), "a filtered-out token was sampled"
    assert _chi_square_fit_p(counts, want) > 1e-3, f"histogram {counts.tolist()} vs {want.tolist()}"


def test_draw_is_exact_at_the_boundaries() -> None:
    """Inverse CDF: u = 0 gives the first token of positive probability, u -> 1 the last; zero-probability
    tokens (masked or filtered) are never drawn, even where u x total rounds up to the total."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0]])
    assert draw(probs, [0.0, 0.0]).tolist() == [1, 0]
    assert draw(probs, [1 - 2 ** -53, 1 - 2 ** -53]).tolist() == [3, 3]
    assert draw(probs, [0.49, 0.51]).tolist() == [1, 2]
    assert row_uniform(1, 0) != row_uniform(1, 1) != row_uniform(2, 1)
    assert all(0.0 <= row_uniform(s, i) < 1.0 for s in range(50) for i in range(50))


def test_seeds_are_the_64_bit_range_and_n_wraps_within_it() -> None:
    """The sampler hashes seeds mod 2^64: a seed outside [-2^63, 2^63) would silently repeat another (it was taken),
    and the n choices' seeds s + i wrap inside the range to the value that draws the same tokens."""
    assert row_uniform(2 ** 64 + 5, 3) == row_uniform(5, 3)  # (why a wider seed is refused)
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 2 ** 64):
        with pytest.raises(RequestError, match=r"seed must be a signed 64-bit integer, in \[-9223372036854775808, "
                                               r"9223372036854775807\]"):
            SamplingParams(seed=seed).validate()
    assert choice_seed(SEED_MAX, 1) == SEED_MIN and choice_seed(-1, 2) == 1 and choice_seed(None, 3) is None
    assert row_uniform(choice_seed(SEED_MAX, 1), 7) == row_uniform(SEED_MAX + 1, 7)
    assert choice_seed(SEED_MAX + 1, 0) == SEED_MAX + 1  # (left for validate() to refuse, not wrapped in)


def test_logit_bias_keys_are_ids_or_plain_decimal_strings() -> None:
    """int() reads "1_0", " 7", "+7", non-ASCII digits, 2.9 and True as ids: each was a bias on some token."""
    assert logit_bias_pairs({"5": 1, "05": 2, 7: 1.5}) == ((5, 3.0), (7, 1.5)) == logit_bias_pairs([(5, 3), (7, 1.5)])
    for key in ("1_0", " 7", "7 ", "+7", "--1", "-", "", "\u0663", "0x1", 2.9, True, "9" * 5000):
        with pytest.raises(RequestError, match="logit_bias keys must be token ids, got .* plain decimal digits"):
            logit_bias_pairs({key: 1.0})
    with pytest.raises(RequestError, match="logit_bias maps token ids >= 0"):  # a negative id is read, then named
        SamplingParams(logit_bias={"-1": 1.0}).validate()


def test_penalties_change_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    assert sample(logits, [_req(SamplingParams(temperature=0))])[0] == [0]
    assert sample(logits, [_req(SamplingParams(temperature=0, presence_penalty=0.5), [0])])[0] == [1]
    assert sample(logits, [_req(SamplingParams(temperature=0, frequency_penalty=0.06), [0, 0])])[0] == [1]


def test_logprobs() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    _, lps = sample(logits, [_req(SamplingParams(temperature=0, logprobs=2))])
    chosen, top = lps[0]
    expected = torch.log_softmax(logits[0], -1)
    assert chosen == pytest.approx(expected[1].item()) and [t for t, _ in top] == [1, 2]


def test_cli_make_tiny_is_deterministic_and_generate_prints(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "dsaserve"]
    makers = [subprocess.Popen(run + ["make-tiny-model", str(tmp_path / name), "--arch", "glm_moe_dsa"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in ("a", "b")]
    assert [m.wait(120) for m in makers] == [0, 0]  # side by side: two processes, one seed
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards)
    out = subprocess.run(run + ["generate", "--model-path", str(tmp_path / "a"), "--prompt", "Hello world",
                                "--max-tokens", "6", "--max-total-tokens", "256"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[6 tokens, finish_reason=length]" in out.stderr or "finish_reason=stop" in out.stderr
    bad = subprocess.run(run + ["generate", "--model-path", str(tmp_path / "a"), "--prompt", "x",
                                "--max-tokens", "0", "--max-total-tokens", "256"],
                         capture_output=True, text=True, timeout=120)
    # named by its flag, before the model loads (its pool's log line never comes)
    assert bad.returncode == 2 and "error: --max-tokens must be > 0, got 0" in bad.stderr, bad.stderr
    assert "KV pool" not in bad.stderr, bad.stderr


def test_the_cli_makes_openmp_threads_wait_passively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before torch loads, for the process and the ranks it starts (two CPU servers on one machine spun on
    each other's cores: 16.5 s against 0.2 s for the same requests, docs/benchmarks.md); a value given wins."""
    from dsaserve.cli import main
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["make-tiny-model", str(tmp_path / "a")]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["make-tiny-model", str(tmp_path / "b")]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_train_tiny_threads_must_be_positive(threads: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsaserve.cli import main
    assert main(["train-tiny", str(tmp_path / "out"), "--preset", "test", "--threads", threads]) == 2
    assert f"error: --threads must be >= 1, got {threads}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_folder_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsaserve.cli import main
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["make-tiny-model", str(file)]) == 2
    assert f"error: {file} is a file: the checkpoint goes in a folder" in capsys.readouterr().err
    assert main(["make-tiny-model", str(file / "sub")]) == 2
    assert f"error: cannot make the checkpoint folder {file / 'sub'}: " in capsys.readouterr().err
    assert main(["train-tiny", str(file), "--preset", "test"]) == 2  # the same check, before any training
    assert f"error: {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "x"


def test_sglang_launch_line_flags() -> None:
    """SGLang's names for the same settings (--tp-size, --dp-size, --mem-fraction-static) and its
    --trust-remote-code parse (they stopped a copied launch line with exit code 2)."""
    import argparse

    from dsaserve.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", "--mem-fraction-static",
                            "0.8", "--trust-remote-code"])
    args = ServerArgs.from_cli(ns)
    assert (args.tp, args.dp, args.enable_dp_attention, args.mem_fraction) == (2, 2, True, 0.8)


def test_dp_attention_divides_running_requests_and_step_tokens_as_sglang() -> None:
    """Under DP attention --max-running-requests and --chunked-prefill-size are totals over the DP groups, each
    group taking its share (SGLang divides both by the DP size); left out, 256 requests per group. A total that
    leaves a group nothing is refused naming the flag."""
    from dsaserve.server_args import RUNNING_PER_GROUP, ServerArgs
    dp = ServerArgs(tp=4, dp=2, enable_dp_attention=True, max_running_requests=10, chunked_prefill_size=4096)
    assert (dp.dp_groups, dp.running_per_group, dp.tokens_per_group) == (2, 5, 2048)
    plain = ServerArgs(tp=4, max_running_requests=10, chunked_prefill_size=4096)
    assert (plain.dp_groups, plain.running_per_group, plain.tokens_per_group) == (1, 10, 4096)
    assert ServerArgs(tp=4, dp=4, enable_dp_attention=True).running_per_group == RUNNING_PER_GROUP == 256
    with pytest.raises(ValueError, match=r"--max-running-requests must be >= 1 per DP group \(4\), got 3"):
        ServerArgs(tp=4, dp=4, enable_dp_attention=True, max_running_requests=3)
    with pytest.raises(ValueError, match=r"--chunked-prefill-size must be >= 1 per DP group \(2\), got 1"):
        ServerArgs(tp=2, dp=2, enable_dp_attention=True, chunked_prefill_size=1)


def test_sglang_flags_with_another_meaning_here(capsys: pytest.CaptureFixture) -> None:
    """--disable-cuda-graph is --cuda-graph-max-bs 0 (and contradicts a graph size), --enable-metrics is accepted;
    SGLang flags dsaserve does not take each get a line naming what to use instead (exit 2, nothing started),
    and any other unknown flag still gets argparse's own error."""
    import argparse

    from dsaserve.cli import main
    from dsaserve.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert ServerArgs.from_cli(parser.parse_args(["--disable-cuda-graph", "--enable-metrics"])).cuda_graph_max_bs == 0
    # what dsaserve always does: accepted, the same arguments as without them
    always = ["--enable-cache-report", "--disable-custom-all-reduce", "--enable-dp-lm-head", "--trust-remote-code",
              "--enable-strict-thinking"]
    assert ServerArgs.from_cli(parser.parse_args(always)) == ServerArgs.from_cli(parser.parse_args([]))
    with pytest.raises(ValueError, match="-1 \\(SGLang: no chunked prefill\\) is not taken"):
        ServerArgs.from_cli(parser.parse_args(["--chunked-prefill-size", "-1"]))
    assert ServerArgs.from_cli(parser.parse_args([])).cuda_graph_max_bs is None
    assert ServerArgs.from_cli(parser.parse_args(["--random-seed", "7"])).seed == 7  # SGLang's names
    assert ServerArgs.from_cli(parser.parse_args(["--model", "some/dir"])).model_path == "some/dir"
    long_names = ServerArgs.from_cli(parser.parse_args(["--tensor-parallel-size", "4", "--data-parallel-size", "2",
                                                                 "--enable-dp-attention"]))
    assert (long_names.tp, long_names.dp) == (4, 2)
    for extra in (["--cuda-graph-max-bs", "8"], ["--cuda-graph-bs", "1", "2"]):
        with pytest.raises(ValueError, match="--disable-cuda-graph contradicts"):
            ServerArgs.from_cli(parser.parse_args(["--disable-cuda-graph", *extra]))
    assert main(["serve", "--tp", "8", "--ep", "8", "--moe-a2a-backend", "deepep", "--nsa-decode-backend=flashmla_kv",
                 "--dp", "8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --moe-a2a-backend is an SGLang flag that dsaserve does not take: dsaserve's expert "
                   "parallelism (--ep) combines the experts' outputs by the same all-reduce as tensor parallelism, "
                   "with no all-to-all backend; leave it out",
                   "error: --nsa-decode-backend is an SGLang flag that dsaserve does not take: dsaserve uses one "
                   "sparse-attention backend for prefill and decode: --attention-backend auto|triton|flashmla|torch"]
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--max-prefill-tokens", "16384", "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--max-prefill-tokens is an SGLang flag" in err and "--chunked-prefill-size" in err
    assert "unrecognized arguments: --max-prefill-tokens 16384 --no-such-flag" in err
    # SGLang's DeepSeek / GLM deployment lines: one line each, nothing started
    assert main(["serve", "--enable-two-batch-overlap", "--moe-dense-tp-size", "1", "--disable-shared-experts-fusion",
                 "--dsa-topk-backend", "sgl-kernel", "--enable-custom-logit-processor", "--decode-log-interval", "40",
                 "--tokenizer-worker-num", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" is an SGLang flag")[0] for line in err] == [
        "error: --enable-two-batch-overlap", "error: --moe-dense-tp-size", "error: --disable-shared-experts-fusion",
        "error: --dsa-topk-backend", "error: --enable-custom-logit-processor", "error: --decode-log-interval",
        "error: --tokenizer-worker-num"]
    with pytest.raises(SystemExit):  # not a server's command line: argparse's own words only
        main(["make-tiny-model", "out", "--quantization", "fp8"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --quantization fp8" in err and "SGLang" not in err


def test_bench_one_batch_sizes_are_checked_first(tiny_ds: str, capsys: pytest.CaptureFixture) -> None:
    from dsaserve.cli import main
    assert main(["bench", "one-batch", "--model-path", tiny_ds, "--batch-size", "0", "--output-len", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be >= 1, got 0" in err and "--output-len must be >= 1, got 0" in err
    # one DP group on this machine (--tp N runs N ranks: tests/test_dummy_load.py)
    assert main(["bench", "one-batch", "--model-path", tiny_ds, "--tp", "2", "--dp", "2", "--enable-dp-attention"]) == 2
    assert "bench one-batch runs one DP group on this machine: leave out --dp / --nnodes" in capsys.readouterr().err


def test_bench_one_batch(tiny_ds: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dsaserve bench one-batch` runs a static batch (here sampled: the flags reach every request) and writes its
    table; the decode step's byte count grows with the context by exactly what each row must read per layer
    (latent top-k rows, and all index keys once the indexer runs: past index_topk keys; they were counted below
    it too)."""
    import json

    from dsaserve.bench.one_batch import decode_step_bytes
    from dsaserve.cli import main
    from dsaserve.engine.engine import Engine
    from dsaserve.server_args import ServerArgs
    out = tmp_path / "one.json"
    asked = []  # the sampling flags reach every request
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, rid, ids, params, *rest, **kw: (
        asked.append((rid, params)), add_request(self, rid, ids, params, *rest, **kw))[1])
    # Chunks of 20 tokens: 3 prompts prefill over 3+ steps, the first ones decoding meanwhile (mixed steps);
    # the timed decode steps are still --output-len steps of the whole batch.
    assert main(["bench", "one-batch", "--model-path", tiny_ds, "--batch-size", "1", "3", "--input-len", "20",
                 "--output-len", "4", "--page-size", "4", "--chunked-prefill-size", "20",
                 "--temperature", "0.7", "--top-p", "0.9", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": -1}
    timed = [p for rid, p in asked if rid.startswith("b")]  # (the engine's start-up warm-up adds its own)
    assert len(timed) == 2 * (1 + 3) and all(p.temperature == 0.7 and p.top_p == 0.9 for p in timed)
    rows = report["rows"]
    assert [(r["batch"], r["input_len"], r["decode_steps"]) for r in rows] == [(1, 20, 4), (3, 20, 4)]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    cfg = ModelConfig.from_path(tiny_ds)
    engine = Engine(ServerArgs(model_path=tiny_ds, max_total_tokens=512), progress=False)
    elem = engine.runner.pools.latent(0).element_size()  # fp32 on CPU, bf16 on CUDA
    index_layers = cfg.indexer_types.count("full")
    def keys(n: int) -> int:  # the index keys a row reads: none while every key is selected anyway
        return n if n > cfg.index_topk else 0

    def grow(short: int, long: int) -> int:  # per row: top-k latent rows in every layer, the index keys read
        return cfg.num_hidden_layers * (min(long, cfg.index_topk) - min(short, cfg.index_topk)) \
            * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem \
            + index_layers * (keys(long) - keys(short)) * cfg.index_head_dim * elem
    assert cfg.index_topk == 16  # 4 -> 12 keys grow the latent rows read; 50 -> 100 only the index keys
    for short, long in ((4, 12), (50, 100)):
        assert decode_step_bytes(engine, 3, long) - decode_step_bytes(engine, 3, short) == 3 * grow(short, long)


def test_bench_one_batch_with_mtp(tmp_path: Path) -> None:
    """Under MTP a step commits up to S + 1 tokens per request: the batch's requests no longer end inside the
    decode window (it raised), and decode tok/s counts the tokens committed (the trained model's drafts are
    accepted), not one per request per step."""
    from dsaserve.bench.one_batch import run_one
    from dsaserve.engine.engine import Engine
    from dsaserve.model.checkpoint import default_model_path
    from dsaserve.server_args import ServerArgs
    engine = Engine(ServerArgs(model_path=str(default_model_path()), max_total_tokens=1024, page_size=4,
                               speculative_algorithm="NEXTN", speculative_num_steps=2), progress=False)
    row = run_one(engine, 2, 16, 6, None)
    assert row.decode_tok_s > 1.2 * 2 / (row.decode_step_ms / 1e3), row
    assert 1.2 < row.tokens_per_step <= 3 and row.decode_tok_s == pytest.approx(
        2 * row.tokens_per_step / (row.decode_step_ms / 1e3)), row  # the accept length, as the table prints it


def test_bench_runs_prefill_uncached(tiny_ds: str) -> None:
    """Every timed prefill is a real one: the same shape twice (the warm-up and the timed run of `--output-len 4`
    draw the same prompts) finds no cached prefix, though the engine caches prefixes (pages of 4 tokens)."""
    from dsaserve.bench.one_batch import run_one
    from dsaserve.engine.engine import Engine
    from dsaserve.server_args import ServerArgs
    engine = Engine(ServerArgs(model_path=tiny_ds, max_total_tokens=512, page_size=4), progress=False)
    assert engine.prefix_cache is not None
    rows = [run_one(engine, 2, 20, 4, None) for _ in range(2)]
    stats = engine.prefix_cache.stats
    assert stats.queried_tokens >= 2 * 2 * 20 and stats.hit_tokens == 0, stats
    assert all(r.prefill_tok_s > 0 for r in rows)


def test_attention_backend_flashmla_is_chosen_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto takes flashmla only over an FP8 cache where it can run (else triton on cuda, torch on cpu); asked
    for where it cannot run, flashmla says why."""
    from dsaserve.cache.kv_format import FP8
    from dsaserve.engine import model_runner
    from dsaserve.engine.model_runner import resolve_attention_backend, whole_pages
    from dsaserve.server_args import ServerArgs

    cfg = ModelConfig.from_dict(DEEPSEEK_V32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert "needs --device cuda and --dtype bfloat16" in model_runner.flashmla_blocker(cuda, cfg, torch.float32, FP8)
    for runs_here in (True, False):  # whether flash_mla imports and takes the model (this machine may lack both)
        monkeypatch.setattr(model_runner, "flashmla_blocker",
                            lambda *a, runs=runs_here: None if runs else "flash_mla is not importable")
        for kv in (torch.bfloat16, FP8):
            assert resolve_attention_backend("auto", cuda, cfg, torch.bfloat16, kv) == (
                "flashmla" if runs_here and kv == FP8 else "triton")
            assert resolve_attention_backend("triton", cuda, cfg, torch.bfloat16, kv) == "triton"
        if not runs_here:
            with pytest.raises(ValueError, match="flashmla cannot run here: flash_mla is not importable"):
                resolve_attention_backend("flashmla", cuda, cfg, torch.bfloat16, FP8)
    monkeypatch.undo()
    for kv in (torch.bfloat16, FP8):
        assert resolve_attention_backend("auto", cpu, cfg, torch.bfloat16, kv) == "torch"
    with pytest.raises(ValueError, match="flashmla cannot run here: it needs --device cuda and --dtype bfloat16"):
        resolve_attention_backend("flashmla", cpu, cfg, torch.bfloat16, FP8)
    # its FP8 kernel views the pool as pages of 64 slots: pools are cut to whole multiples of 64 slots
    assert [whole_pages(n, size, 64) for n, size in ((1217, 64), (100, 1), (101, 48), (30, 1))] == [1217, 64, 100, 0]
    with pytest.raises(ValueError, match="--attention-backend must be auto, torch, triton or flashmla"):
        ServerArgs(model_path="x", attention_backend="flashinfer")


def test_a_flash_mla_older_than_its_api_is_not_available() -> None:
    """V3.2's release of FlashMLA took the lengths in get_mla_metadata: it imported, `auto` chose it over an FP8
    cache, and the first step failed with a TypeError. The API is checked (modules built as the two versions lay
    theirs out; dsaserve.ops.flashmla imports Triton, which the CPU install lacks)."""
    pytest.importorskip("triton")
    import types

    from dsaserve.ops import flashmla

    def build(names: tuple[str, ...]) -> types.ModuleType:
        package, interface = types.ModuleType("flash_mla"), types.ModuleType("flash_mla.flash_mla_interface")
        for name in names:
            setattr(interface, name, object())
            setattr(package, name, getattr(interface, name))
        package.flash_mla_interface = interface  # type: ignore[attr-defined]
        return package

    common = ("get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd")
    assert flashmla.api_problem(build(common + ("FlashMLASchedMeta",))) is None
    assert "lacks FlashMLASchedMeta" in flashmla.api_problem(build(common))
    assert "lacks flash_mla_sparse_fwd" in flashmla.api_problem(build(("get_mla_metadata", "flash_mla_with_kvcache")))


@pytest.mark.parametrize("flags,says", [
    (dict(attention_backend="flashmla"), "--attention-backend flashmla cannot run here: it needs --device cuda"),
    (dict(moe_backend="triton"), "the triton backends need --device cuda"),
])
def test_backends_that_cannot_run_are_refused_before_the_weights_load(flags: dict, says: str, tiny_ds: str,
                                                                      tmp_path: Path) -> None:
    """A folder with config.json and no weights: the flag's refusal comes first (it used to wait for the load)."""
    from dsaserve.engine.model_runner import ModelRunner
    from dsaserve.server_args import ServerArgs
    (tmp_path / "config.json").write_bytes((Path(tiny_ds) / "config.json").read_bytes())
    with pytest.raises(ValueError, match=says):
        ModelRunner(ServerArgs(model_path=str(tmp_path), device="cpu", **flags), str(tmp_path), progress=False)


@pytest.mark.parametrize("flags,says", [
    (["--worker-urls", "http://127.0.0.1:1", "--port", "99999"], "--port must be a TCP port (1-65535), got '99999'"),
    (["--worker-urls", "notaurl"],
     "--worker-urls takes http(s)://host:port URLs (dsaserve servers speak HTTP), got 'notaurl'"),
    (["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "notaport", "--decode", "http://127.0.0.1:2"],
     "--prefill's bootstrap port must be a TCP port (1-65535), got 'notaport'"),
    (["--pd-disaggregation", "--worker-urls", "http://127.0.0.1:3", "--prefill", "http://127.0.0.1:1",
      "--decode", "http://127.0.0.1:2"], "--worker-urls is for plain servers"),
    (["--worker-urls", "http://127.0.0.1:1", "--request-timeout-secs", "-5"],
     "--request-timeout-secs must be a positive number, got '-5'"),
    # without --pd-disaggregation sglang-router dropped these silently: a router of no workers, every request 503
    (["--prefill", "http://127.0.0.1:1", "8998", "--decode", "http://127.0.0.1:2"],
     "--prefill and --decode need --pd-disaggregation (without it sglang-router ignores them)"),
])
def test_router_flags_that_would_fail_in_sglang_router(flags: list[str], says: str, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of these ended in a traceback from sglang-router (or a router with no workers): one line here."""
    pytest.importorskip("sglang_router")
    from dsaserve.cli import main

    def started(*args: object) -> None:  # (not this test process turned into a router)
        raise AssertionError("sglang-router was started")
    monkeypatch.setattr(os, "execv", started)
    assert main(["router", *flags]) == 2
    assert f"error: {says}" in capsys.readouterr().err


def test_the_router_listens_on_loopback_unless_told() -> None:
    from dsaserve.router_flags import notices, problems, with_loopback_defaults
    plain = ["--worker-urls", "http://127.0.0.1:1"]
    assert problems(plain) == [] and notices(plain) == []
    assert with_loopback_defaults(plain) == ["--host", "127.0.0.1", "--prometheus-host", "127.0.0.1", *plain]
    assert with_loopback_defaults(["--ho=0.0.0.0", *plain]) == ["--prometheus-host", "127.0.0.1", "--ho=0.0.0.0",
                                                                 *plain]  # (argparse's abbreviations too)
    valid = [["--pd-disaggregation", "--prefill", "http://[::1]:8000", "None", "--decode", "http://[::1]:8001"],
             ["--port=30000", "--worker-urls"], ["--port", " 8080", "--unknown-flag", "x"], ["--port"]]
    assert [problems(argv) for argv in valid] == [[]] * len(valid)  # (a bare --port: sglang-router's to say)
    assert notices(["--port", "1"]) == [
        "no --worker-urls: the router starts without workers (add servers through its /workers API)"]
    assert notices(["--service-discovery"]) == [] and notices(["--help"]) == [] == problems(["-h", "--port", "0"])
    assert notices(["--pd-disaggregation", "--decode", "http://127.0.0.1:2"]) == [
        "--pd-disaggregation without a --prefill or a --decode server: the router starts without it (add servers "
        "through its /workers API)"]
