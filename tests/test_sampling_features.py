"""Logit shaping beyond temperature and top-k / top-p: the repetition penalty (against transformers'
processor), OpenAI's logit_bias, min_tokens; their checks, and their effect through the engine (with and
without MTP). PD and DP attention run them in tests/test_disagg_engine.py and tests/test_parallel.py."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.request import Request, RequestError
from dsaserve.engine.thinking import ThinkingBudget, ends_inside_character
from dsaserve.engine.sampler import shape_logits

V = 64


def _req(params: SamplingParams, prompt: list[int], output: list[int], banned: tuple[int, ...] = ()) -> Request:
    return Request(rid="r", prompt_ids=prompt, params=params, max_new_tokens=16, arrival=0, seed=1,
                   output_ids=list(output), min_tokens_banned=banned)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    """Over the prompt, the output and a verify row's pending drafts, as transformers' processor rules."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 3
    prompt, output, pending = [3, 4, 4, 9, 60], [7, 3], [11, 9]
    got = shape_logits(logits, [_req(SamplingParams(repetition_penalty=penalty), prompt, output)], [pending])
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output + pending]), logits.clone())
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)


def test_logit_bias_and_min_tokens_shape_the_logits() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    biased = SamplingParams(logit_bias={"5": 2.5, "9": -100.0})
    assert biased.logit_bias == ((5, 2.5), (9, -100.0))
    early = SamplingParams(min_tokens=3)
    reqs = [_req(biased, [1], []), _req(early, [1], [8], banned=(2, 6))]
    raw = logits.clone()
    got = shape_logits(logits, reqs, [[], [4]])  # request 2: 1 output + 1 pending = 2 < 3
    want = logits.clone()
    want[0, 5] += 2.5
    want[0, 9] -= 100.0
    want[1, 2] = want[1, 6] = float("-inf")
    assert torch.equal(got, want) and torch.equal(logits, raw)  # the raw logits (logprobs) are left as they were
    assert torch.equal(shape_logits(logits[1:], reqs[1:], [[4, 4]]), logits[1:])  # 3 tokens: no longer masked
    only_ends = torch.full((1, V), float("-inf"))
    only_ends[0, 6] = 1.0  # a finished grammar allows only EOS: min_tokens must not leave no token at all
    assert torch.equal(shape_logits(only_ends, reqs[1:], [[]]), only_ends)
    assert SamplingParams(logit_bias={"5": 1.0, "05": 2.0}).logit_bias == ((5, 3.0),)  # one token: biases add
    both = _req(SamplingParams(logit_bias={"5": 2.5}, repetition_penalty=1.3), [5, 7], [])
    want = logits[:1].clone()
    want[0, 5] += 2.5  # bias first, then the penalty over the biased logit (the stages' order)
    for t in (5, 7):
        want[0, t] = want[0, t] / 1.3 if want[0, t] > 0 else want[0, t] * 1.3
    assert torch.equal(shape_logits(logits[:1], [both], [[]]), want) and torch.equal(logits, raw)


@pytest.mark.parametrize("params,words", [
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be in (0, 2]"),
    (SamplingParams(max_tokens=3, min_tokens=5), "min_tokens must be in [0, max_tokens]"),
    (SamplingParams(logit_bias={"3": 150.0}), "logit_bias maps token ids >= 0 to biases in [-100, 100]"),
    (SamplingParams(logit_bias={"-2": 1.0}), "logit_bias maps token ids >= 0"),
    (SamplingParams(ignore_eos="no"), "ignore_eos must be True or False, got 'no'"),  # ("no" counted as true)
    (SamplingParams(grammar='{"type": "object"}'), "grammar must be a GrammarSpec"),  # (it failed the whole batch)
])
def test_bad_values_are_named(params: SamplingParams, words: str) -> None:
    with pytest.raises(RequestError, match=words.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        params.validate()


def test_bad_logit_bias_is_named() -> None:
    """From the Python API too: a key that is no token id or a value that is no number is a RequestError naming
    it; an out-of-range bias names its token and the (summed) value."""
    with pytest.raises(RequestError, match="logit_bias keys must be token ids, got 'the'"):
        SamplingParams(logit_bias={"the": 1.0})
    with pytest.raises(RequestError, match="logit_bias values must be numbers, got 'x' for token 4"):
        SamplingParams(logit_bias={"4": "x"})
    with pytest.raises(RequestError, match="add up\\), got 5: 160.0"):
        SamplingParams(logit_bias={"5": 80.0, "05": 80.0}).validate()


@pytest.mark.parametrize("steps", [0, 2])
def test_through_the_engine(steps: int, tiny_ds: str) -> None:
    """A +100 bias makes greedy decoding repeat that token; a -100 bias bans the greedy choice; min_tokens
    holds a stop token back for that many tokens; the same with MTP; a biased id past the vocabulary is
    refused by name."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    llm = LLM(tiny_ds, max_total_tokens=2048, **spec)
    prompt = prompts_ids(1, [9], seed=5)[0]
    base = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    forced = next(t for t in range(5, 400) if t not in base)
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                              logit_bias={str(forced): 100.0}))[0].token_ids
    assert out == [forced] * 8
    banned = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                 logit_bias={str(base[0]): -100.0}))[0].token_ids
    assert base[0] not in banned and banned != base
    stops = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(base[0],)))[0]
    assert stops.token_ids == [base[0]] and stops.finish_reason.kind == "stop"
    hold = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(base[0],), min_tokens=4)
    held = llm.generate(prompt, hold)[0]
    assert len(held.token_ids) >= 4 and base[0] not in held.token_ids[:4]
    if steps:  # speculation keeps the tokens of plain decoding
        assert held.token_ids == LLM(tiny_ds, max_total_tokens=2048).generate(prompt, hold)[0].token_ids
    text = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].text
    early = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=(text[:2],))
    assert len(llm.generate(prompt, early)[0].token_ids) <= 2  # the stop string opens the text
    late = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=(text[:2],),
                                               min_tokens=4))[0]
    # a match inside the first min_tokens tokens does not count (vLLM's rule): the text keeps its opening
    assert len(late.token_ids) >= 4 and late.text.startswith(text[:2]) and len(late.text) > 2, late.text
    with pytest.raises(RequestError, match="token id 100000 is outside the vocabulary"):
        llm.engine.add_request("x", prompt, SamplingParams(logit_bias={"100000": 1.0}))
    for bad in (-1, 100000):  # a stop token that can never be sampled is a client's mistake: say so
        with pytest.raises(RequestError, match=f"stop_token_ids token id {bad} is outside the vocabulary"):
            llm.engine.add_request("x", prompt, SamplingParams(min_tokens=2, stop_token_ids=(7, bad)))
    llm.engine.add_request("held", prompt, SamplingParams(min_tokens=2, stop_token_ids=(7,)))
    assert 7 in llm.engine.requests["held"].min_tokens_banned
    llm.engine.abort("held")


@pytest.mark.parametrize("steps", [0, 2])
def test_a_thinking_budget_ends_the_reasoning_at_its_index(steps: int, tiny_ds: str) -> None:
    """At output index `tokens` the end token is the only one, greedy or sampled (under MTP a verify row counts
    the drafts before it: the tokens are those of plain decoding); the tokens before it are plain decoding's; an
    end token that came before lifts the budget; an end id past the vocabulary is refused by name."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    llm = LLM(tiny_ds, max_total_tokens=2048, **spec)
    prompt = prompts_ids(1, [9], seed=5)[0]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    base = llm.generate(prompt, greedy)[0].token_ids
    end = next(t for t in range(5, 400) if t not in base)
    for tokens in (0, 4):
        out = llm.generate(prompt, dataclasses.replace(greedy, thinking_budget=ThinkingBudget(tokens, end)))[0]
        assert out.token_ids[:tokens] == base[:tokens] and out.token_ids[tokens] == end and len(out.token_ids) == 10
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True,
                            thinking_budget=ThinkingBudget(6, end))
    drawn = llm.generate(prompt, seeded)[0].token_ids
    assert drawn[6] == end
    came = base[1]  # the end token at index 1: nothing is forced at index 4
    assert base[4] != came
    lifted = dataclasses.replace(greedy, thinking_budget=ThinkingBudget(4, came))
    assert llm.generate(prompt, lifted)[0].token_ids == base
    if steps:
        assert drawn == LLM(tiny_ds, max_total_tokens=2048).generate(prompt, seeded)[0].token_ids
    with pytest.raises(RequestError, match="thinking_budget's end token id 100000 is outside the vocabulary"):
        llm.engine.add_request("x", prompt, dataclasses.replace(greedy, thinking_budget=ThinkingBudget(2, 100000)))
    with pytest.raises(RequestError, match="thinking_budget must be a ThinkingBudget of tokens >= 0"):
        dataclasses.replace(greedy, thinking_budget=ThinkingBudget(-1, end)).validate()


def test_a_budget_in_a_verify_step_counts_the_drafts_before_its_row() -> None:
    """With drafts that are right (the embedded model's drafter on its repetitive reply), verify rows cross the budget's
    index: each reply equals plain decoding's, for an end token the reply never writes and for one it writes at
    index 3 (among a verify row's drafts it lifts the budget, as it does once committed)."""
    plain = LLM(max_total_tokens=2048)
    spec = LLM(max_total_tokens=2048, speculative_algorithm="NEXTN", speculative_num_steps=3)
    prompt = plain.tokenizer.encode('def read_file(path):\n    """')
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    base = plain.generate(prompt, greedy)[0].token_ids
    came = base[3]
    assert came not in base[:3]
    for end in (next(t for t in range(5, 400) if t not in base), came):
        for tokens in range(1, 10):
            budgeted = dataclasses.replace(greedy, thinking_budget=ThinkingBudget(tokens, end))
            want = plain.generate(prompt, budgeted)[0].token_ids
            assert spec.generate(prompt, budgeted)[0].token_ids == want, (end, tokens)
            assert (want == base) == (end == came and tokens >= 3)  # (at 3 the end token is its own)
    stats = spec.engine.stats()
    assert stats.spec_accepted_tokens > stats.spec_verify_steps // 2  # drafts were accepted: rows crossed the index


def test_a_budget_waits_for_a_character_to_end(tiny_ds: str) -> None:
    """Where the reply's bytes at the budget's index end inside a character (a byte-level token may hold part of
    one), </think> comes once it has ended: right there it broke the character, and a grammar's reasoning refused
    it (the request failed with a 400). Characters are UTF-8's: a lead byte opens 1-3 more."""
    assert [ends_inside_character(b) for b in (b"a", "中".encode()[:1], "中".encode()[:2], "中".encode(),
                                                   "😀".encode()[:3], b"a\x80", b"")] == \
        [False, True, True, False, True, False, False]
    llm = LLM(tiny_ds, max_total_tokens=2048)
    tok = llm.tokenizer
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def cut(ids: list[int]) -> bool:
        return ends_inside_character(b"".join(tok.token_bytes(t) for t in ids))
    for prompt in prompts_ids(8, [9] * 8, seed=11):
        base = llm.generate(prompt, greedy)[0].token_ids
        inside = [n for n in range(1, 16) if cut(base[:n])]
        if inside:
            break
    assert inside, "no greedy reply here ends inside a character"
    n, end = inside[0], next(t for t in range(5, 400) if t not in base)
    at = next(k for k in range(n, 24) if not cut(base[:k]))
    out = llm.generate(prompt, dataclasses.replace(greedy, thinking_budget=ThinkingBudget(n, end)))[0].token_ids
    assert at > n and out[:at] == base[:at] and out[at] == end


def test_min_tokens_never_breaks_a_grammar(tiny_ds: str) -> None:
    """min_tokens past the end of a JSON object: once the grammar allows only EOS, EOS is sampled anyway, and
    the output is the object the grammar describes."""
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"],
              "additionalProperties": False}
    grammar = checked_spec(json_grammar(schema), tiny_ds, (1,))
    llm = LLM(tiny_ds, max_total_tokens=2048)
    for temperature in (0.0, 0.9):
        out = llm.generate(prompts_ids(1, [6], seed=8)[0], SamplingParams(
            max_tokens=40, temperature=temperature, seed=2, min_tokens=40, grammar=grammar))[0]
        assert isinstance(json.loads(out.text)["n"], bool) and out.finish_reason.kind == "stop"


@pytest.mark.parametrize("steps", [0, 2])
def test_a_complete_grammar_ends_the_request_despite_ignore_eos(steps: int, tiny_ds: str) -> None:
    """ignore_eos with a grammar: once the grammar is complete it allows only EOS, and that EOS ends the request
    (SGLang's rule); it went on with EOS after EOS up to max_tokens (their text kept with special tokens shown,
    so no longer the JSON asked for). With and without MTP (a run of accepted drafts)."""
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"],
              "additionalProperties": False}
    grammar = checked_spec(json_grammar(schema), tiny_ds, (1,))
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    llm = LLM(tiny_ds, max_total_tokens=2048, **spec)
    for temperature, skip in ((0.0, True), (0.9, False)):
        out = llm.generate(prompts_ids(1, [6], seed=8)[0], SamplingParams(
            max_tokens=40, temperature=temperature, seed=2, ignore_eos=True, grammar=grammar,
            skip_special_tokens=skip))[0]
        assert out.finish_reason.kind == "stop" and out.token_ids.count(1) == 1 and out.token_ids[-1] == 1
        assert isinstance(json.loads(out.text)["n"], bool)


def test_a_stop_string_of_multibyte_characters_is_found(tiny_ds: str) -> None:
    """The tokens that spell a stop string can outnumber its characters (the tiny model's byte-level tokens spell
    an emoji in four): fed token by token, the output stops at the string, not past it. (The window searched was
    counted in characters and never held the whole string.)"""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    ids = tok.hf.encode("ab \U0001F600\U0001F600\U0001F600 cd and more text", add_special_tokens=False)
    stop = "\U0001F600\U0001F600\U0001F600"
    assert len(tok.hf.encode(stop, add_special_tokens=False)) > len(stop) + 8  # the case the old window missed
    req = _req(SamplingParams(max_tokens=100, stop=(stop,)), [5], [])
    for n, token in enumerate(ids, 1):
        req.output_ids.append(token)
        finish = stop_reason(req, token, tok, frozenset(), 4096)
        if finish is not None:
            break
    assert finish is not None and finish.kind == "stop" and finish.matched == stop
    assert req.stop_text == "ab " and tok.hf.decode(ids[:n]).endswith(stop)


def test_min_tokens_ending_inside_a_character_leaves_that_character_to_the_stop_check(tiny_ds: str) -> None:
    """min_tokens (vLLM's rule: a stop string counts where it ends after the text of the first min_tokens tokens)
    ending inside a character spelled in bytes: that character is not text yet, so a stop string it completes
    after min_tokens stops the output (vLLM's detokenizer holds partial characters back). The partial character
    counted as one character of the floor, and the emoji was passed over."""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    emoji = "\U0001F600"
    ids = tok.hf.encode(emoji * 2 + " x", add_special_tokens=False)
    assert len(tok.hf.encode(emoji, add_special_tokens=False)) == 4  # four byte tokens: min_tokens 3 ends inside
    req = _req(SamplingParams(max_tokens=100, stop=(emoji,), min_tokens=3), [5], [])
    for n, token in enumerate(ids, 1):
        req.output_ids.append(token)
        if (finish := stop_reason(req, token, tok, frozenset(), 4096)) is not None:
            break
    assert (n, finish.matched, req.stop_text) == (4, emoji, "")


def test_a_stop_string_split_by_special_tokens_is_found(tiny_ds: str) -> None:
    """Special tokens decode to nothing: a stop string with a run of them inside (longer than the window of tokens
    searched) still stops the output. The window counted every token and missed it."""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    special = sorted(tok.special_ids)[0]
    text = [tok.hf.encode(part, add_special_tokens=False) for part in ("xy", "z tail")]
    ids = text[0] + [special] * 30 + text[1]
    req = _req(SamplingParams(max_tokens=100, stop=("yz",)), [5], [])
    req.max_new_tokens = 100
    finish = None
    for token in ids:
        req.output_ids.append(token)
        finish = stop_reason(req, token, tok, frozenset(), 4096)
        if finish is not None:
            break
    assert finish is not None and finish.matched == "yz" and req.stop_text == "x", (finish, req.stop_text)


def test_stop_strings_match_the_text_the_client_sees(tiny_ds: str) -> None:
    """With skip_special_tokens false the text keeps special tokens: a stop string cuts that text (the engine
    cut the text without them, and the answer lost as many characters at its end) and may name one."""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    special = sorted(tok.special_ids)[0]
    mark = tok.decode([special], skip_special_tokens=False)
    ids = tok.hf.encode("Hello", add_special_tokens=False) + [special] + tok.hf.encode(" quick fox STOP tail",
                                                                                    add_special_tokens=False)
    for stop, shown in (("STOP", "Hello" + mark + " quick fox "), (mark, "Hello")):
        req = _req(SamplingParams(max_tokens=100, stop=(stop,), skip_special_tokens=False), [5], [])
        req.max_new_tokens = 100
        for token in ids:
            req.output_ids.append(token)
            if (finish := stop_reason(req, token, tok, frozenset(), 4096)) is not None:
                break
        assert (finish.matched, req.stop_text) == (stop, shown), (finish, req.stop_text)


def test_a_stop_tokens_text_is_left_out(tiny_ds: str) -> None:
    """A matched stop token that the text would show (a plain token in stop_token_ids, or EOS with
    skip_special_tokens false) is left out of the text unless include_stop_str, as vLLM and SGLang do (it stayed)."""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    ids = tok.hf.encode("Hello world", add_special_tokens=False)
    eos = sorted(tok.special_ids)[0]
    cases = [(SamplingParams(stop_token_ids=(ids[-1],)), ids, tok.decode(ids[:-1])),
             (SamplingParams(stop_token_ids=(ids[-1],), include_stop_str=True), ids, None),
             (SamplingParams(stop_token_ids=(eos,), skip_special_tokens=False), ids[:-1] + [eos],
              tok.decode(ids[:-1])),
             (SamplingParams(stop_token_ids=(eos,)), ids[:-1] + [eos], None)]  # (shows nothing: no cut needed)
    for params, output, text in cases:
        req = _req(dataclasses.replace(params, max_tokens=100), [5], output)
        finish = stop_reason(req, output[-1], tok, frozenset(), 4096)
        assert (finish.kind, req.stop_text) == ("stop", text), (params, req.stop_text)



def test_a_character_still_arriving_matches_no_stop_string(tiny_ds: str) -> None:
    """A stop string of U+FFFD matched the replacement that a multi-byte character decodes to while its bytes
    still arrive (the text never holds one)."""
    from dsaserve.engine.request import stop_reason
    from dsaserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_ds)
    ids = tok.hf.encode("\u65e5\u672c ok", add_special_tokens=False)
    assert tok.decode(ids[:1]).endswith("\ufffd")  # the first token holds part of a character
    req = _req(SamplingParams(max_tokens=100, stop=("\ufffd",)), [5], [])
    req.max_new_tokens = 100
    for token in ids:
        req.output_ids.append(token)
        assert stop_reason(req, token, tok, frozenset(), 4096) is None, req.output_ids
