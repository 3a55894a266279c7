"""MTP speculative decoding on one device: greedy tokens equal the non-speculative run and the
transformers oracle; the MTP drafts equal an independent reference of the MTP layer; acceptance,
rejection sampling, stop rules, retraction and aborts with speculation on."""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import ARCHS, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.engine.layout import IN_FLIGHT
from dsaserve.engine.request import Request
from dsaserve.engine.tokenizer import Tokenizer

PROMPTS = prompts_ids(4, [5, 40, 17, 3], seed=51)  # below and above index_topk (16)
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
ORACLES = {"deepseek_v32": transformers.DeepseekV32ForCausalLM, "glm_moe_dsa": transformers.GlmMoeDsaForCausalLM}


def spec(steps: int, **kw: object) -> dict[str, object]:
    return dict(speculative_algorithm="NEXTN", speculative_num_steps=steps, **kw)


def plain(model: str, prompts: list[list[int]], params: SamplingParams, **kw: object) -> list[list[int]]:
    return [o.token_ids for o in LLM(model, max_total_tokens=4096, **kw).generate(prompts, params)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("page_size", [1, 64])
def test_spec_greedy_equals_plain_and_oracle(arch: str, page_size: int, tiny_models: dict[str, str]) -> None:
    model = tiny_models[arch]
    expected = plain(model, PROMPTS, GREEDY, page_size=page_size)
    oracle = ORACLES[arch].from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    for ids, out in zip(PROMPTS[:2], expected[:2]):
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert out == ref
    for steps in (1, 2, 3):  # chunked prefill of 7: the MTP layer prefills every chunk of the prompt
        llm = LLM(model, page_size=page_size, chunked_prefill_size=7, max_total_tokens=4096, **spec(steps))
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected, f"S={steps}"
        stats = llm.engine.stats()
        assert stats.free_pages == stats.total_pages and stats.spec_verify_steps > 0


# -- the MTP layer against an independent reference ----------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class ReferenceMTP:
    """The checkpoint's MTP layer run by transformers: its decoder layer as layer 0 of a one-layer model
    whose final norm is shared_head.norm and whose lm_head is shared_head.head; the input embedding
    eh_proj([enorm(embed(t)); hnorm(h)]) computed here from the checkpoint tensors."""

    def __init__(self, model: str, arch: str, tmp: Path):
        config = json.loads((Path(model) / "config.json").read_text())
        L, eps = config["num_hidden_layers"], config["rms_norm_eps"]
        tensors: dict[str, torch.Tensor] = {}
        for f in Path(model).glob("*.safetensors"):
            tensors |= load_file(f)
        mtp = {k[len(f"model.layers.{L}."):]: v for k, v in tensors.items() if k.startswith(f"model.layers.{L}.")}
        self.enorm, self.hnorm, self.eh, self.eps = mtp.pop("enorm.weight"), mtp.pop("hnorm.weight"), \
            mtp.pop("eh_proj.weight"), eps
        self.embed = mtp.pop("embed_tokens.weight", tensors["model.embed_tokens.weight"])
        one = {f"model.layers.0.{k}": v for k, v in mtp.items() if not k.startswith("shared_head.")}
        one |= {"model.norm.weight": mtp["shared_head.norm.weight"], "lm_head.weight": mtp["shared_head.head.weight"],
                "model.embed_tokens.weight": self.embed}
        (tmp / "mtp").mkdir()
        save_file(one, str(tmp / "mtp" / "model.safetensors"))
        config |= dict(num_hidden_layers=1, num_nextn_predict_layers=0, first_k_dense_replace=0,
                       mlp_layer_types=["sparse"], indexer_types=["full"])
        (tmp / "mtp" / "config.json").write_text(json.dumps(config))
        self.layer = ORACLES[arch].from_pretrained(str(tmp / "mtp"), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        self.main = ORACLES[arch].from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()

    @torch.no_grad()
    def drafts(self, tokens: list[int], steps: int, share_topk: bool = False) -> list[int]:
        """Drafts after `tokens` (the last one not yet cached): the MTP row at the last cached position
        reads the target's final hidden state, then each chained step reads the previous MTP output.
        share_topk: each chained step's last row attends the keys the first step's indexer chose for its last
        row (index_share_for_mtp_iteration)."""
        h = self.main.model(torch.tensor([tokens[:-1]])).last_hidden_state[0]
        nxt, out = list(tokens[1:]), []
        indexer = self.layer.model.layers[0].self_attn.indexer
        chosen = self._first_choice(indexer) if share_topk else None
        try:
            for _ in range(steps):
                e = _rms(self.embed[torch.tensor(nxt)], self.enorm, self.eps)
                x = torch.cat([e, _rms(h, self.hnorm, self.eps)], -1) @ self.eh.T
                res = self.layer(inputs_embeds=x[None], output_hidden_states=True)
                out.append(int(res.logits[0, -1].argmax()))
                h = torch.cat([h, res.hidden_states[-1][0, -1:]])  # the MTP output after shared_head.norm
                nxt.append(out[-1])
        finally:
            if chosen is not None:
                del indexer.forward
        return out

    @staticmethod
    def _first_choice(indexer: torch.nn.Module) -> list[torch.Tensor]:
        """Makes `indexer` keep its first call's choice for the last row [w0] and give it to the last row of every
        later call (padded by repeating its first key, which adds none; w0 <= the later width)."""
        chosen: list[torch.Tensor] = []
        compute = indexer.forward

        def forward(*args: object, **kw: object) -> torch.Tensor:
            topk = compute(*args, **kw)  # [1, S, w]
            if not chosen:
                chosen.append(topk[0, -1].clone())
                return topk
            first = chosen[0]
            topk = topk.clone()
            topk[0, -1] = torch.cat([first, first[:1].expand(topk.shape[-1] - first.numel())])
            return topk

        indexer.forward = forward
        return chosen


def test_mtp_layer_shares_the_targets_embedding_and_head(tiny_ds: str) -> None:
    """One vocabulary-sized embedding and one head per rank: the MTP layer reads the target's (the
    checkpoint's copies under the MTP layer are not loaded); the drafts above prove they are the right ones."""
    model = LLM(tiny_ds, speculative_algorithm="NEXTN", speculative_num_steps=1).engine.runner.model
    names = [n for n, _ in model.named_parameters()]
    assert model.mtp is not None and "mtp.shared_head.norm.weight" in names
    assert [n for n in names if "embed_tokens" in n or n.endswith("head.weight")] == ["embed_tokens.weight",
                                                                                      "lm_head.weight"]


def _drafts_seen(model: str, steps: int, **kw: object) -> list[tuple[list[int], list[int]]]:
    """(tokens so far, the MTP's drafts) at every step of PROMPTS[:2], in a run whose verify steps are given each
    request's greedy continuation (every draft accepted) and in one given tokens that are never it (none)."""
    prompts = PROMPTS[:2]
    continuation = plain(model, prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    seen: list[tuple[list[int], list[int]]] = []
    for accept_all in (True, False):
        llm = LLM(model, page_size=4, chunked_prefill_size=16, max_total_tokens=4096, **spec(steps), **kw)
        conts = {f"r{i}": c for i, c in enumerate(continuation)}

        def override(req: Request, drafts: list[int], accept_all: bool = accept_all) -> list[int]:
            seen.append((req.prompt_ids + req.output_ids, list(drafts)))
            cont, n = conts[req.rid], len(req.output_ids)
            return cont[n:n + steps] if accept_all else [(t + 1) % 512 for t in cont[n:n + steps]]

        llm.engine.draft_override = override
        before = len(seen)
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
        llm.engine.run_until_idle()
        assert len(seen) - before >= 4
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_mtp_drafts_match_reference(arch: str, tiny_models: dict[str, str], tmp_path: Path) -> None:
    """Every step's drafts (after a prefill, and after verify steps that accepted all or none) equal the
    reference MTP run over the whole sequence: the MTP caches stay consistent across steps."""
    model, steps = tiny_models[arch], 3
    ref = ReferenceMTP(model, arch, tmp_path)
    for tokens, drafts in _drafts_seen(model, steps):
        assert drafts == ref.drafts(tokens, steps), f"after {len(tokens)} tokens"


def test_shared_mtp_top_k_drafts_match_reference(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """GLM-5.2's index_share_for_mtp_iteration: the chained draft steps attend the keys the MTP layer's indexer
    chose for the first draft's row, as the reference forced to that choice gives, on graph buffers (CPU: static
    layouts run eagerly) and with the 40-token prompt selecting 16 of its keys. The reference without the sharing
    gives other drafts at some steps (the test sees the feature), and the greedy tokens stay the plain run's."""
    model, steps = tiny_models["glm_moe_dsa"], 3
    ref = ReferenceMTP(model, "glm_moe_dsa", tmp_path)
    shared = dict(json_model_override_args=json.dumps({"index_share_for_mtp_iteration": True}), cuda_graph_max_bs=4)
    differs = 0
    for tokens, drafts in _drafts_seen(model, steps, **shared):
        assert drafts == ref.drafts(tokens, steps, share_topk=True), f"after {len(tokens)} tokens"
        differs += drafts != ref.drafts(tokens, steps)
    assert differs > 0
    llm = LLM(model, page_size=4, chunked_prefill_size=7, max_total_tokens=4096, **spec(steps), **shared)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == plain(model, PROMPTS, GREEDY, page_size=4)


# -- acceptance ------------------------------------------------------------------------------------

def _with_drafter(model: str, steps: int, reference: list[list[int]], wrong: tuple[int, ...] = (),
                  **kw: object) -> LLM:
    """An engine whose drafts are each request's known continuation, except drafts at the indices in
    `wrong`, which never match it (0: the first draft, so nothing is accepted)."""
    llm = LLM(model, max_total_tokens=4096, **spec(steps), **kw)
    conts = {f"llm-{i}": ref for i, ref in enumerate(reference)}

    def override(req: Request, drafts: list[int]) -> list[int]:
        cont, n = conts[req.rid], len(req.output_ids)
        known = (cont[n:n + steps] + drafts)[:steps]  # past the continuation's end: the MTP's own drafts
        return [(t + 1) % 512 if i in wrong else t for i, t in enumerate(known)]

    llm.engine.draft_override = override
    return llm


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_always_and_never_accepting_drafters(steps: int, tiny_ds: str) -> None:
    reference = plain(tiny_ds, PROMPTS, SamplingParams(max_tokens=24 + steps, temperature=0.0, ignore_eos=True),
                      page_size=1)
    for wrong, accept_length in (((), steps + 1), ((0,), 1.0)):
        llm = _with_drafter(tiny_ds, steps, reference, wrong, page_size=1)
        out = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert out == [r[:20] for r in reference]
        assert llm.engine.stats().avg_spec_accept_length == accept_length


def test_stop_rules_inside_an_accepted_run(tiny_ds: str) -> None:
    """With every draft accepted, a step yields S + 1 = 4 tokens: token 0 comes from the prefill, tokens
    1-4 from the first verify step. A stop token, a stop string and max_tokens at token 2 end there."""
    prompt = PROMPTS[2:3]
    reference = plain(tiny_ds, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ref = reference[0]
    tok = Tokenizer(tiny_ds)
    piece = tok.decode(ref[2:3])
    assert ref[2] not in ref[:2] and piece.strip() and piece not in tok.decode(ref[:2]), "pick another prompt"
    for params in (SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=(ref[2],)),
                   SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(piece,)),
                   SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)):
        llm = _with_drafter(tiny_ds, 3, reference)
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == ref[:3], params
        assert llm.engine.stats().spec_accepted_tokens == 3  # the whole first run was accepted, then cut
        assert out.finish_reason.kind == ("length" if params.max_tokens == 3 else "stop")


# -- sampling --------------------------------------------------------------------------------------

def test_seeded_sampling_equals_non_speculative(tiny_ds: str) -> None:
    """Each verify row samples with the noise of the non-speculative step at the same output index, so
    a seeded request gives the same tokens with and without speculation. Drafts: the request's own
    seeded continuation with its second draft corrupted, so every verify step accepts exactly one
    draft and rejects the next (penalties count the accepted drafts)."""
    prompts = PROMPTS * 3
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True,
                             frequency_penalty=0.3 * (s % 2)) for s in range(len(prompts))]
    longer = [dataclasses.replace(p, max_tokens=16) for p in params]
    continuation = plain(tiny_ds, prompts, longer, page_size=4)
    llm = _with_drafter(tiny_ds, 3, continuation, (1,), page_size=4)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [c[:12] for c in continuation]
    assert llm.engine.stats().avg_spec_accept_length == 2.0


def _chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value of a two-sample chi-square test of homogeneity (Wilson-Hilferty approximation)."""
    cats = sorted(set(a) | set(b))
    na, nb = len(a), len(b)
    stat = 0.0
    for c in cats:
        oa, ob = a.count(c), b.count(c)
        ea, eb = (oa + ob) * na / (na + nb), (oa + ob) * nb / (na + nb)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    k = len(cats) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_rejection_sampling_matches_target_distribution(tiny_ds: str) -> None:
    """Over a small vocabulary (top_k 3), the second sampled token's histogram with speculation on
    (drafts: the greedy continuation, so about half are accepted) matches speculation off with other
    seeds. Two-sample chi-square at significance 1e-3: a correct sampler fails with probability 0.1%
    over seed choices; the seeds are fixed, so the outcome is deterministic."""
    n = 300
    prompt = PROMPTS[2]
    off = [SamplingParams(max_tokens=2, temperature=1.0, top_k=3, seed=10_000 + s, ignore_eos=True) for s in range(n)]
    on = [SamplingParams(max_tokens=2, temperature=1.0, top_k=3, seed=s, ignore_eos=True) for s in range(n)]
    greedy = plain(tiny_ds, [prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    base = [t[1] for t in plain(tiny_ds, [prompt] * n, off, page_size=4)]
    llm = _with_drafter(tiny_ds, 2, [greedy] * n, page_size=4)
    specd = [o.token_ids[1] for o in llm.generate([prompt] * n, on)]
    assert 1.0 < llm.engine.stats().avg_spec_accept_length  # the accept path was taken
    assert _chi_square_p(base, specd) > 1e-3


# -- memory pressure and aborts --------------------------------------------------------------------

def test_retraction_with_spec(tiny_ds: str) -> None:
    prompts = prompts_ids(8, [20, 5, 31, 12, 8, 25, 3, 17], seed=6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = plain(tiny_ds, prompts, params, page_size=4)
    tight = LLM(tiny_ds, page_size=4, max_total_tokens=2 * (31 + 16 + 6) + 8, **spec(3))
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    stats = tight.engine.stats()
    assert stats.num_retractions > 0 and stats.free_pages == stats.total_pages


def test_abort_between_steps_frees_pages(tiny_ds: str) -> None:
    """A request aborted after a verify step (its drafts made, not yet verified) frees every page and
    leaves the others' tokens unchanged."""
    expected = plain(tiny_ds, PROMPTS, GREEDY, page_size=1)
    llm = LLM(tiny_ds, page_size=1, max_total_tokens=4096, **spec(3))
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    for _ in range(3):
        for out in engine.step():
            tokens[out.rid] += out.new_token_ids
    assert engine.requests["r1"].draft_ids and engine.requests["r1"].spec_verify_ct > 0
    assert engine.abort("r1")
    for out in engine.run_until_idle():
        tokens[out.rid] += out.new_token_ids
    assert [tokens[f"r{i}"] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert len(tokens["r1"]) < 20
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0


def test_verify_steps_launch_before_the_host_reads_the_drafts(tiny_ds: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The host schedules and lays out a verify step while the device drafts: at every verify launch the
    drafts of the step before are still on the device (their requests hold IN_FLIGHT), the ids the launch
    gathers there are the drafts the host reads after it, and the tokens are the plain run's."""
    from dsaserve.engine import engine as engine_module
    expected = plain(tiny_ds, PROMPTS, GREEDY)
    llm = LLM(tiny_ds, max_total_tokens=4096, **spec(3))
    engine, launches, gathered = llm.engine, [], []
    target, fill, gather = engine.runner.target, engine._fill_drafts, engine_module.input_ids

    def spy_target(ids: torch.Tensor, layout: object, *args: object, **kw: object) -> object:
        launches.append({tuple(r.draft_ids) for r in engine.requests.values() if r.draft_ids})
        return target(ids, layout, *args, **kw)

    def spy_gather(plan: object, *args: object) -> torch.Tensor:
        out = gather(plan, *args)
        gathered.append((plan, out.tolist()))
        return out

    def spy_fill(*args: object) -> None:  # the gathered verify rows are the drafts the host reads now
        pending = engine._drafts is not None
        fill(*args)
        if not pending:
            return
        plan, ids = gathered[-1]
        row = 0
        for rid, q, drafts in zip(plan.rids, plan.q_lens, plan.num_drafts):
            if drafts and rid in engine.requests:
                checked.append(ids[row + 1:row + q] == engine.requests[rid].draft_ids)
            row += q

    checked: list[bool] = []
    engine.runner.target = spy_target
    monkeypatch.setattr(engine_module, "input_ids", spy_gather)
    monkeypatch.setattr(engine, "_fill_drafts", spy_fill)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert launches[0] == set() and len(launches) > 3  # the prompts' step, then verify steps
    assert all(drafts == {(IN_FLIGHT,) * 3} for drafts in launches[1:])
    assert len(checked) > 10 and all(checked)


def test_spec_flags_are_checked(tiny_ds: str, tmp_path: Path) -> None:
    from dsaserve.server_args import ServerArgs
    from dsaserve.tiny import make_tiny_model
    for bad, flag in ((dict(speculative_eagle_topk=2), "--speculative-eagle-topk"),
                      (dict(speculative_num_draft_tokens=3), "--speculative-num-draft-tokens"),
                      (dict(speculative_algorithm="MEDUSA"), "--speculative-algorithm")):
        with pytest.raises(ValueError, match=flag):
            ServerArgs(**{"speculative_algorithm": "NEXTN", **bad})
    with pytest.raises(ValueError, match="--speculative-algorithm"):
        ServerArgs(speculative_num_steps=2)
    assert ServerArgs(speculative_algorithm="EAGLE").spec_steps == 3
    no_mtp = make_tiny_model(tmp_path / "nomtp", "deepseek_v32", num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        LLM(str(no_mtp), **spec(2))


def test_structured_output_with_spec(tiny_ds: str) -> None:
    """A grammar masks every verify row as if the drafts before it were already output, and advances
    only by the tokens kept: speculation gives the non-speculative constrained tokens, which parse."""
    from dsaserve.chat.grammar import checked_spec, json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "boolean"}, "w": {"enum": ["ab", "cd"]}},
              "required": ["n", "w"], "additionalProperties": False}
    grammar = checked_spec(json_grammar(schema), tiny_ds, (1,))
    params = [SamplingParams(max_tokens=24, temperature=t, seed=7, grammar=grammar) for t in (0.0, 0.9)]
    expected = plain(tiny_ds, PROMPTS[:2], params)
    reference = plain(tiny_ds, PROMPTS[:2], [dataclasses.replace(p, max_tokens=40) for p in params])
    for wrong in ((), (1,)):
        llm = _with_drafter(tiny_ds, 3, reference, wrong)
        outs = llm.generate(PROMPTS[:2], params)
        assert [o.token_ids for o in outs] == expected
        assert llm.engine.stats().avg_spec_accept_length > (3.0 if not wrong else 1.5)
        for o in outs:
            value = json.loads(o.text)
            assert isinstance(value["n"], bool) and value["w"] in ("ab", "cd") and o.finish_reason.kind == "stop"


def test_a_grammar_that_cannot_roll_back_fails_no_other_request(tiny_ds: str) -> None:
    """A client's Lark with a max_tokens lexeme, its drafts letters it allows: masking the verify rows raised
    (llguidance refuses to roll such a grammar back) and failed every request of the step, another client's
    too. Now the other request gets its tokens and the grammar's request ends."""
    from dsaserve.chat.grammar import GrammarSpec, ebnf_grammar
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=2048, **spec(2))
    engine = llm.engine
    letters = engine.tokenizer.hf.encode("bc", add_special_tokens=False)
    engine.draft_override = lambda req, ids: letters if req.rid == "g" else ids
    grammar = GrammarSpec(ebnf_grammar("start: foo\nfoo[max_tokens=2]: /[a-z]+/"), tiny_ds, (1,))
    a, b = prompts_ids(2, [9, 11], seed=3)
    other = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("other", a, other)
    engine.add_request("g", b, SamplingParams(max_tokens=8, temperature=0.0, grammar=grammar))
    outputs = engine.run_until_idle()
    finals = {o.rid: o.finish for o in outputs if o.finished}
    assert finals["other"].kind == "length" and "g" in finals, finals
    assert [t for o in outputs if o.rid == "other" for t in o.new_token_ids] == plain(tiny_ds, [a], other)[0]
    assert engine.stats().free_pages == engine.stats().total_pages


def test_accepted_drafts_count_each_chains_leading_matches() -> None:
    """Acceptance on the device: per chain, the leading rows whose sample equals the draft the next row verified
    (at most n - 1), against the rule written as a loop; a chain of one row (a prompt's last chunk) accepts none,
    and a request whose drafts were lost matches none."""
    from dsaserve.engine.acceptance import accepted_drafts
    rng = random.Random(3)
    for _ in range(50):
        chains, tokens = [], []
        for i in range(rng.randint(1, 6)):
            n = rng.choice([1, 2, 4])
            req = Request(f"r{i}", [1], GREEDY, 8, 0, seed=i)
            req.draft_ids = [rng.randint(0, 2) for _ in range(n - 1)] if rng.random() > 0.1 else []
            chains.append((req, n))
            tokens += [rng.randint(0, 2) for _ in range(n)]
        want, row = [], 0
        for req, n in chains:
            k = 0
            while k < n - 1 and k < len(req.draft_ids) and tokens[row + k] == req.draft_ids[k]:
                k += 1
            want.append(k)
            row += n
        assert accepted_drafts(torch.tensor(tokens), chains).tolist() == want


def test_draft_steps_launch_before_the_host_reads_the_tokens(tiny_ds: str) -> None:
    """Acceptance is decided on the device: every step launches its MTP pass and its draft steps before the host
    reads the step's sampled tokens (which it used to read first, leaving the device idle while it decided),
    and the tokens are the plain run's."""
    from dsaserve.engine.acceptance import Verdict
    expected = plain(tiny_ds, PROMPTS, GREEDY)
    llm = LLM(tiny_ds, max_total_tokens=4096, **spec(3))
    events: list[str] = []
    draft, read = llm.engine.runner.draft, Verdict.read

    def spy_draft(*args: object, **kw: object) -> object:
        events.append("draft")
        return draft(*args, **kw)

    def spy_read(self: Verdict) -> dict:
        events.append("read")
        return read(self)

    llm.engine.runner.draft = spy_draft
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Verdict, "read", spy_read)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    steps = "".join("d" if e == "draft" else "r" for e in events).split("r")
    assert len(steps) > 5 and steps[-1] == "" and set(steps[:-1]) == {"ddd"}, steps


@pytest.mark.gpu
def test_an_mtp_steps_launch_path_never_waits_for_the_device() -> None:
    """Sampling with a penalty and logprobs, acceptance, the MTP input, its logit rows and both draft layouts of a
    mixed step (verify rows, a prompt chunk that is not its last, a last chunk), and the dummy input of a failed
    or idle leader, are enqueued without a host sync; the verdict then reads the tokens."""
    from dsaserve.engine.acceptance import launch_accept
    from dsaserve.engine.layout import BatchLayout, StepMode, StepPlan
    from dsaserve.engine.sampler import upload
    from dsaserve.spec.drafter import _padded, draft_input, draft_plan, mtp_rows
    dev, page = torch.device("cuda"), 4
    sampled = SamplingParams(max_tokens=50, temperature=0.8, top_p=0.9, ignore_eos=True, logprobs=2,
                             repetition_penalty=1.1)
    requests = {rid: Request(rid, list(range(n)), p, 50, i, seed=i)
                for i, (rid, n, p) in enumerate([("a", 9, GREEDY), ("b", 9, sampled), ("c", 30, GREEDY),
                                                 ("e", 13, sampled)])}
    for rid in "ab":
        requests[rid].output_ids, requests[rid].draft_ids = [7, 8], [1, 2, 3]
    pages = tuple(tuple(range(1 + 50 * b, 1 + 50 * b + -(-n // page))) for b, n in enumerate([16, 16, 20, 15]))
    plan = StepPlan(StepMode.MIXED, ("a", "b", "c", "e"), pages, (10, 10, 8, 5), (4, 4, 10, 8), (4, 4, 0, 1),
                    (True, True, False, True), (), (3, 3, 0, 0))
    logits = torch.randn(9, 1000, device=dev)

    def launch() -> object:
        verdict = launch_accept(requests, plan, 4, logits)
        shift = draft_input(requests, plan, 4, verdict, dev)[plan.num_tokens:].to(torch.int32)
        upload(mtp_rows(plan), torch.int32, dev) + shift
        for step in (1, 2):
            layout = BatchLayout.build(draft_plan(plan, step), page, dev)
            layout.shifted(_padded(shift, layout.batch_size))
        draft_input(requests, plan, 0, None, dev)
        return verdict

    launch()  # (kernels compiled, pinned blocks cached)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verdict = launch()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(verdict.read()) == {"a", "b", "e"}
