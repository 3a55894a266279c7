"""Bad input: a clear error naming the problem, nothing leaks, and the engine serves the next request."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsaserve import LLM, SamplingParams
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.engine.request import RequestError
from dsaserve.model.checkpoint import CheckpointError
from dsaserve.tiny import make_tiny_model

OK = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_ds: str) -> LLM:
    return LLM(tiny_ds, page_size=4, max_total_tokens=1024, context_length=128)


@pytest.mark.parametrize("prompt,params,message", [
    ([], OK, "prompt is empty"),
    ("", OK, "prompt is empty"),
    ([7] * 200, OK, "200 tokens but this model's maximum context length is 128 tokens"),
    ([7] * 100, SamplingParams(max_tokens=40), "max_tokens (40) + the prompt (100 tokens) = 140 tokens, but this model's maximum context length is 128"),
    ([7, 8], SamplingParams(max_tokens=0), "max_tokens must be > 0"),
    ([7, 8], SamplingParams(max_tokens=-3), "max_tokens must be > 0"),
    ([7, 8], SamplingParams(top_p=0.0), "top_p"),
    ([7, 8], SamplingParams(temperature=-1.0), "temperature"),
    ([7, 99999], OK, "the prompt has token id 99999, outside the vocabulary"),
    ([7, 8], SamplingParams(max_tokens=2.5), "max_tokens must be an integer or None, got 2.5"),
    ([7, 8], SamplingParams(temperature="0.5"), "temperature must be a number, got '0.5'"),
    ([7, 8], SamplingParams(top_k=True), "top_k must be an integer, got True"),
])
def test_bad_request_is_rejected_and_engine_keeps_serving(llm: LLM, prompt, params, message: str) -> None:
    with pytest.raises(RequestError) as err:
        llm.generate([prompt], params)
    assert message in str(err.value)
    stats = llm.engine.stats()
    assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0
    assert len(llm.generate([[5, 6, 7]], OK)[0].token_ids) == 4


@pytest.mark.parametrize("prompts,params,error,message", [
    (["a", "b", "c"], [OK, OK], ValueError, "2 SamplingParams for 3 prompts"),
    ("a", {"max_tokens": 2}, TypeError, "params must be SamplingParams (or a list of them), got dict"),
    (None, OK, TypeError, "prompts must be a string, token ids, or a list of either, got NoneType"),
    (b"hello", OK, TypeError, "got bytes (bytes are not prompts)"),
    (["a", [1, 2.5]], OK, TypeError, "a prompt must be a string or a sequence of token ids (ints), got list"),
])
def test_the_python_api_names_what_it_was_given(llm: LLM, prompts, params, error: type, message: str) -> None:
    """(A params list of the wrong length used to drop prompts silently; the others were bare Python errors.)"""
    with pytest.raises(error, match=re.escape(message)):
        llm.generate(prompts, params)
    assert len(llm.generate([[5, 6, 7]], OK)[0].token_ids) == 4


def test_the_python_api_returns_prompt_logprobs_and_takes_none_lists(llm: LLM, tiny_ds: str) -> None:
    c = llm.generate("hello there", SamplingParams(max_tokens=1, prompt_logprobs=1, stop=None, stop_token_ids=None))[0]
    assert c.prompt_logprobs is not None and len(c.prompt_logprobs) == c.prompt_tokens - 1
    assert all(len(top) == 1 for _, top in c.prompt_logprobs)
    assert llm.generate("hello", OK)[0].prompt_logprobs is None
    with pytest.raises(ValueError, match="disaggregation_mode must be 'null'"):
        LLM(tiny_ds, disaggregation_mode="prefill")


def test_pool_too_small_for_one_request(tiny_ds: str) -> None:
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=16)
    with pytest.raises(RequestError, match="more cache than the whole KV pool holds"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=10))
    assert len(llm.generate([[5] * 4], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_a_refusal_counts_the_slots_mtp_drafts_write_ahead(tiny_ds: str) -> None:
    """With S = 3 a request holds 2S - 1 = 5 slots past its last token: a 39-token prompt and one new token (40 of a
    44-token pool) do not fit, and the message adds them up (it named 40 tokens against 44). Served beside it,
    a prompt that fits with them runs."""
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=44, speculative_algorithm="NEXTN", speculative_num_steps=3)
    for max_tokens, what in ((1, r"max_tokens \(1\) \+ the prompt \(39 tokens\)"),
                             (None, r"the prompt \(39 tokens\) \+ one new token")):
        with pytest.raises(RequestError, match=what + r" \+ the 5 slots MTP drafts write past them need more cache "
                                                      r"than the whole KV pool holds \(44 tokens\)"):
            llm.generate([[5] * 39], SamplingParams(max_tokens=max_tokens))
    assert len(llm.generate([[5] * 38], SamplingParams(max_tokens=1))[0].token_ids) == 1


def test_a_pool_of_one_page_is_refused_at_start(tiny_ds: str) -> None:
    """Admission holds a page for the first decode beside the first chunk's: one page can start nothing, so the
    engine does not start (a server said ready, then refused every request); the pool's flag is checked before
    the weights load."""
    with pytest.raises(ValueError, match=r"--max-total-tokens 4 holds 1 page\(s\) of 4 tokens \(--page-size\), and "
                                         r"a request needs 2 free to start: give at least 8"):
        LLM(tiny_ds, page_size=4, max_total_tokens=4)


def test_wrong_model_type(tmp_path: Path, tiny_ds: str) -> None:
    shutil.copytree(tiny_ds, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        LLM(str(tmp_path / "m"))


def test_a_config_without_layers_is_refused(tmp_path: Path) -> None:
    raw = json.loads((make_tiny_model(tmp_path / "m") / "config.json").read_text())
    with pytest.raises(ConfigError, match="has num_hidden_layers=0: a model needs at least 1"):
        ModelConfig.from_dict({**raw, "num_hidden_layers": 0})
    with pytest.raises(ValueError, match="--layers must be >= 1, got 0"):
        make_tiny_model(tmp_path / "none", layers=0)
    assert not (tmp_path / "none").exists()


def test_missing_config_field() -> None:
    raw = json.loads(json.dumps({"model_type": "deepseek_v32", "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="missing required field"):
        ModelConfig.from_dict(raw)


def _rewrite_tensor(path: Path, name: str, replacement=None) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    if replacement is None:
        del tensors[name]
    else:
        tensors[name] = replacement
    save_file(tensors, str(shard))


def test_missing_tensor_is_named(tmp_path: Path, tiny_ds: str) -> None:
    shutil.copytree(tiny_ds, tmp_path / "m")
    _rewrite_tensor(tmp_path / "m", "model.layers.2.mlp.experts.5.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        LLM(str(tmp_path / "m"))


def test_a_tensor_in_two_shards_is_the_one_the_index_names(tmp_path: Path, tiny_ds: str) -> None:
    """A stale all-zero copy of a tensor in another shard silently replaced it (the last shard read won, whatever
    the index said); the index's shard holds it now, and without an index the duplicate is refused, both files
    named. An index whose weight_map is no mapping is named too (it was an AttributeError)."""
    from dsaserve.model.checkpoint import Checkpoint
    shutil.copytree(tiny_ds, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    holder = index["weight_map"][name]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != holder)
    original = load_file(tmp_path / "m" / holder)[name]
    stale = load_file(tmp_path / "m" / other)
    save_file({**stale, name: torch.zeros_like(original)}, str(tmp_path / "m" / other))
    assert Checkpoint(tmp_path / "m").tensors[name].file.name == holder
    weight = LLM(str(tmp_path / "m"), max_total_tokens=256).engine.runner.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(weight.data, original.to(weight.dtype))
    (tmp_path / "m" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} is in both {holder} and {other}|"
                                              rf"tensor {re.escape(name)} is in both {other} and {holder}"):
        Checkpoint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [holder, other]}))
    with pytest.raises(CheckpointError, match="its weight_map must map tensor names to shard file names"):
        Checkpoint(tmp_path / "m")


def test_wrong_shape_is_named(tmp_path: Path, tiny_ds: str) -> None:
    import torch
    shutil.copytree(tiny_ds, tmp_path / "m")
    _rewrite_tensor(tmp_path / "m", "model.layers.1.self_attn.indexer.wk.weight", torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"self_attn\.indexer\.wk\.weight has shape \[3, 3\], expected"):
        LLM(str(tmp_path / "m"))


def test_stop_rules(llm: LLM) -> None:
    base = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,),
                                                      ignore_eos=True))[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason.kind == "stop" and out.finish_reason.matched == stop_id
    text = llm.tokenizer.decode(base.token_ids)
    start = next(i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isprintable() and
                 text[i:i + 2].strip() == text[i:i + 2] and "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    out = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=12, temperature=0.0, stop=stop, ignore_eos=True))[0]
    assert out.finish_reason.matched == stop and stop not in out.text and text.startswith(out.text)


def test_failed_batch_ends_its_requests_and_engine_goes_on(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llm.engine.runner
    real = runner.target
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step of the batch fails
            raise RuntimeError("simulated device fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "target", flaky)
    outs = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [o.finish_reason.kind for o in outs] == ["error", "error"]
    assert "simulated device fault" in outs[0].finish_reason.message and len(outs[0].token_ids) == 1
    stats = llm.engine.stats()
    assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0
    assert len(llm.generate([[5, 6, 7]], OK)[0].token_ids) == 4


def test_max_tokens_omitted_fits_the_pool(tiny_ds: str) -> None:
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=64)  # the pool is far below the context length
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason.kind == "length" and len(out.token_ids) == 64 - 3
    # A prompt the pool cannot hold with one new token is refused by name (it was queued and never ended)
    with pytest.raises(RequestError, match=r"the prompt \(100 tokens\) \+ one new token need more cache"):
        llm.engine.add_request("long", list(range(5, 105)), SamplingParams(max_tokens=None))
    assert "long" not in llm.engine.requests and llm.engine.stats().waiting == 0


def test_a_broken_tokenizer_is_named_before_the_weights_load(tmp_path: Path, tiny_ds: str) -> None:
    """A corrupt tokenizer.json fails at once with the folder in the message (transformers' own error named
    neither, and came after every weight had loaded), as a checkpoint error: the server's ranks report those as
    one line and exit 2 (a plain ValueError was a rank's traceback and exit 1)."""
    from dsaserve.server.worker import SETTING_ERRORS
    shutil.copytree(tiny_ds, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{not json")
    with pytest.raises(SETTING_ERRORS, match=f"cannot load the tokenizer in {tmp_path / 'm'}"):
        LLM(str(tmp_path / "m"))


def test_the_offline_engine_checks_what_serve_checks(tmp_path: Path) -> None:
    """LLM runs serve's checks before loading (as bench one-batch now does): a --context-length past the model's
    was taken, and served prompts past max_position_embeddings."""
    with pytest.raises(ValueError, match="--context-length 100000 is longer than the model's"):
        LLM(None, context_length=100000)


def test_a_pool_larger_than_memory_is_named(tiny_ds: str) -> None:
    """An explicit --max-total-tokens past the free memory names both sizes (the allocator's error came instead)."""
    with pytest.raises(ValueError, match=r"--max-total-tokens 10000000000000 needs [0-9.]+ GiB of KV cache"):
        LLM(tiny_ds, max_total_tokens=10**13)
