"""A checkpoint's generation_config.json: its eos_token_id stops generation beside config.json's, and its sampling
fields are the defaults of OpenAI requests that leave them out (SGLang's --sampling-defaults model, the default;
openai keeps the API's own)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from dsaserve import LLM, SamplingParams
from dsaserve.config import ConfigError
from dsaserve.generation_config import GenerationConfig, read_generation_config
from dsaserve.server import protocol as p
from dsaserve.server.openai_api import OpenAIServing
from server_process import module_server

pytestmark = pytest.mark.timeout(300)
PROMPT = [5, 6, 7, 8]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def greedy(tiny_ds: str) -> list[int]:
    return LLM(tiny_ds, page_size=4, max_total_tokens=2048).generate([PROMPT], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def stop_at(greedy: list[int]) -> int:
    """The first greedy token after the first that the earlier ones do not hold: the checkpoint's extra EOS."""
    return next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])


@pytest.fixture(scope="module")
def model(tiny_ds: str, greedy: list[int], stop_at: int, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a generation_config.json that sets top_k 1 and an end-of-sequence id more."""
    folder = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(tiny_ds, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [1, greedy[stop_at]], "top_k": 1, "do_sample": True}))
    return str(folder)


@pytest.fixture(scope="module")
def client(model: str, tmp_path_factory: pytest.TempPathFactory):
    for server in module_server(model, tmp_path_factory, page_size=4, max_total_tokens=2048):
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_sampling_fields_left_out_take_the_checkpoints_and_its_eos_stops(client: openai.OpenAI, greedy: list[int],
                                                                         stop_at: int) -> None:
    def tokens(**fields: object) -> tuple[list[int], str]:
        r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, seed=7, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True, **fields})
        ids = [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]
        return ids, r.choices[0].finish_reason

    assert tokens(ignore_eos=True) == (greedy, "length")  # top_k 1 by default: the greedy tokens
    assert tokens(ignore_eos=True, top_k=-1)[0] != greedy  # (a sampled run of the same seed is not)
    assert tokens() == (greedy[:stop_at + 1], "stop")  # the file's second end-of-sequence id ends it


def _params(folder: Path, defaults: str, **fields: object) -> SamplingParams:
    fe = SimpleNamespace(args=SimpleNamespace(sampling_defaults=defaults), info={"model_path": str(folder)})
    body = p.CompletionRequest(prompt=[5], **fields)
    return OpenAIServing(fe, "m", None).params(body, 4, None, 0)  # type: ignore[arg-type]


def test_the_file_is_read_as_set_and_openai_defaults_ignore_it(tmp_path: Path) -> None:
    assert read_generation_config(tmp_path) == GenerationConfig()  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}))
    assert read_generation_config(tmp_path) == GenerationConfig((2,), (("temperature", 0.6), ("top_p", 0.95)))
    model = _params(tmp_path, "model")
    assert (model.temperature, model.top_p, model.top_k, model.min_p) == (0.6, 0.95, -1, 0.0)
    assert _params(tmp_path, "model", temperature=0.2, top_p=1.0).temperature == 0.2  # the request's own win
    openai_ = _params(tmp_path, "openai")
    assert (openai_.temperature, openai_.top_p) == (1.0, 1.0)


@pytest.mark.parametrize("content,words", [
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id must be a token id or a list of them"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_k": 20.5}, "top_k must be an integer, got 20.5"),
    ([1, 2], "must hold a JSON object, got list"),
])
def test_a_bad_file_is_named(tmp_path: Path, content: object, words: str) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=words):
        read_generation_config(tmp_path)
