"""Prefix caching: repeated prefixes reuse their pages; outputs are exactly those without the cache (page
sizes 1 and 64, speculation on), eviction under pressure loses nothing, aborts release shared pages."""
from __future__ import annotations

import pytest

from conftest import prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.cache.pages import PageAllocator
from dsaserve.cache.prefix import ROOT, PrefixCache

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BASE = prompts_ids(3, [70, 9, 40], seed=61)


def test_radix_tree_shares_counts_and_evicts() -> None:
    alloc = PageAllocator(20)
    cache = PrefixCache(alloc, page_size=4)
    pages = alloc.alloc(3)  # a request that cached 11 tokens: two full pages and a partial one
    tokens = list(range(100, 111))
    cache.insert(tokens, pages)
    alloc.free(pages)  # the request ends: the partial page is free, the full ones stay cached
    assert alloc.num_free == 17 and cache.num_pages == 2 and cache.reclaimable() == 2
    hit = cache.match(tokens[:8] + [1, 2, 3], limit=10)
    assert hit == pages[:2] and alloc.refcount(pages[0]) == 2 and cache.reclaimable() == 0
    assert cache.match(tokens[:4] + [7] * 7, limit=10) == pages[:1]  # diverges in the second page
    alloc.free(pages[:1])
    assert cache.evict(5) == 0  # both pages are in use by the first match
    alloc.free(hit)
    assert cache.evict(5) == 2 and alloc.num_free == 19 and cache.num_pages == 0
    drop = PrefixCache(alloc, page_size=4, mtp=True)  # MTP: the last page only where the next token is known equal
    more = alloc.alloc(2)
    drop.insert(tokens[:8], more)
    assert drop.match(tokens, limit=10) == more[:1]
    known = PrefixCache(alloc, page_size=4, mtp=True)
    fresh = alloc.alloc(2)
    known.insert(tokens[:9], fresh, written=8)  # the writer's token after its cache: tokens[8]
    assert known.match(tokens, limit=10) == fresh
    assert known.match(tokens[:8] + [1, 2, 3], limit=10) == fresh[:1]  # another next token: one page less


def _multi_turn(llm: LLM) -> list[list[int]]:
    """Turn 2 repeats turn 1's prompt and answer: its prefix is cached after turn 1."""
    first = [o.token_ids for o in llm.generate(BASE, GREEDY)]
    second = [p + a + [7, 8, 9] for p, a in zip(BASE, first)]
    return first + [o.token_ids for o in llm.generate(second + BASE, GREEDY)]


@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("steps", [0, 3])
def test_cached_outputs_equal_uncached(page_size: int, steps: int, kv: str, tiny_ds: str) -> None:
    """Also over the FP8 cache: shared pages hold the e4m3 rows turn 1 wrote (by decode steps too), which
    must be the rows a fresh prefill writes."""
    spec = dict(speculative_algorithm="NEXTN", speculative_num_steps=steps) if steps else {}
    common = dict(page_size=page_size, max_total_tokens=4096, chunked_prefill_size=16, kv_cache_dtype=kv, **spec)
    expected = _multi_turn(LLM(tiny_ds, disable_radix_cache=True, **common))
    llm = LLM(tiny_ds, **common)
    assert _multi_turn(llm) == expected
    stats = llm.engine.stats()
    # Turn 1 cached its prompt and all but its last answer token (never fed back); a match leaves at
    # least the last prompt token to compute, in full pages. With MTP as many: each page records the token
    # that followed it (the last one's is that answer token), which these prompts repeat.
    cached = [len(p) + 12 - 1 for p in BASE]
    usable = [min(c, len(p) + 12 + 3 - 1) for c, p in zip(cached, BASE)]  # turn 2
    usable += [min(c, len(p) - 1) for c, p in zip(cached, BASE)]  # the repeated prompts
    expected_hits = sum(n // page_size * page_size for n in usable)
    assert stats.prefix_hit_tokens == expected_hits
    assert stats.free_pages == stats.total_pages and stats.running == 0


def test_eviction_under_pressure_keeps_outputs(tiny_ds: str) -> None:
    prompts = prompts_ids(8, [30, 22, 31, 12, 28, 25, 19, 17], seed=62)
    expected = [o.token_ids for o in LLM(tiny_ds, page_size=4, max_total_tokens=4096,
                                         disable_radix_cache=True).generate(prompts + prompts, GREEDY)]
    tight = LLM(tiny_ds, page_size=4, max_total_tokens=2 * (31 + 12) + 8)
    outs = [o.token_ids for o in tight.generate(prompts, GREEDY)]
    outs += [o.token_ids for o in tight.generate(prompts, GREEDY)]
    assert outs == expected
    cache = tight.engine.prefix_cache
    assert cache.stats.evicted_pages > 0 and cache.stats.hit_tokens > 0
    stats = tight.engine.stats()
    assert stats.free_pages == stats.total_pages


def _run_bounded(llm: LLM, steps: int = 400) -> dict[str, list[int]]:
    engine, tokens = llm.engine, {}
    for _ in range(steps):
        if not engine.has_work():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.rid, []).extend(out.new_token_ids)
    raise AssertionError(f"requests still unfinished after {steps} steps: {list(engine.requests)}")


@pytest.mark.parametrize("retracted", [False, True])
def test_a_cached_prefix_that_nearly_fills_the_pool_still_admits(retracted: bool, tiny_ds: str) -> None:
    """Pages of 64 tokens, a pool of 3: a request whose cached prefix holds 2 of them still runs (admission held a
    whole page for its first decode beyond its prompt's pages, none was left, and it waited forever), also when
    the prefix is its own, cached by a retraction. Outputs equal the run without the cache."""
    long, short = prompts_ids(2, [140, 5], seed=63)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def run(llm: LLM) -> dict[str, list[int]]:
        if retracted:  # B's decode pages squeeze A out once A has prefilled: A is retracted, then readmitted
            llm.engine.add_request("B", short, SamplingParams(max_tokens=59, temperature=0.0, ignore_eos=True))
            llm.engine.step()
            llm.engine.add_request("A", long[:120], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
        else:
            llm.generate([long[:130]], greedy)  # caches two full pages of the next prompt
            llm.engine.add_request("A", long, greedy)
        tokens = _run_bounded(llm)
        stats = llm.engine.stats()
        assert stats.free_pages == stats.total_pages and stats.running == stats.waiting == 0
        return tokens

    common = dict(page_size=64, max_total_tokens=192)
    cached = LLM(tiny_ds, **common)
    assert run(cached) == run(LLM(tiny_ds, disable_radix_cache=True, **common))
    assert cached.engine.stats().prefix_hit_tokens > 0
    assert cached.engine.scheduler.num_retractions == (1 if retracted else 0)


def test_hit_statistics_count_each_admission_once(tiny_ds: str) -> None:
    """A request that waits for room tries admission every step (matching, then giving its prefix back): the
    statistics count it once, when it is admitted (they counted every try: 880 queried tokens for these 80)."""
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=64, chunked_prefill_size=64)
    first, second = prompts_ids(2, [40, 40], seed=64)
    llm.generate([second[:20]], GREEDY)  # caches a prefix of the second prompt
    engine = llm.engine
    engine.reset_counters()
    engine.add_request("a", first, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.add_request("b", second, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))  # waits
    _run_bounded(llm)
    stats = engine.prefix_cache.stats
    assert stats.queried_tokens == 80 and stats.hit_tokens <= 20, stats


def test_a_retracted_request_keeps_its_prompts_cached_tokens(tiny_ds: str) -> None:
    """Re-admitted after a retraction, a request matches the cache over its prompt and output; what it reports
    as cached prompt tokens (usage's cached_tokens) stays that of its first admission (a 6-token prompt reported
    16 cached tokens). The hit statistics count the re-admission's reuse: computing it was saved."""
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=64, skip_server_warmup=True)
    engine = llm.engine
    engine.reset_counters()
    prompts = prompts_ids(3, [6, 6, 6], seed=1)
    for i, (ids, n) in enumerate(zip(prompts, [12, 40, 40])):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    final = [o for o in engine.run_until_idle() if o.finished]
    assert engine.scheduler.num_retractions > 0 and len(final) == 3
    assert all(o.cached_tokens <= o.prompt_tokens for o in final), [(o.rid, o.cached_tokens) for o in final]


def test_mtp_drafts_after_a_page_another_request_continued_differently(tiny_ds: str) -> None:
    """With MTP a page's last entry depends on the token after it. r1 caches page A followed by C, r2 caches A
    followed by B: r3 (A + B + ...) must not reuse r1's A (its last entry was made for C's first token) but reuses
    r2's A and B: 8 tokens (r2's pages used to hang under r1's A, where no match reached them: 0), and its
    drafts, not only its tokens, equal a run without the cache."""
    a, c1, b, d = list(range(10, 14)), list(range(20, 28)), list(range(30, 34)), list(range(40, 45))
    runs = [("r1", a + c1), ("r2", a + b + [50, 51, 52, 53, 54]), ("r3", a + b + [50, 51] + d)]

    def drafts(llm: LLM, requests: list[tuple[str, list[int]]]) -> tuple[list[list[int]], list[int], int]:
        seen: dict[str, list[list[int]]] = {}
        llm.engine.draft_override = lambda req, ids: seen.setdefault(req.rid, []).append(list(ids)) or ids
        tokens: list[int] = []
        for rid, prompt in requests:
            before = llm.engine.stats().prefix_hit_tokens
            llm.engine.add_request(rid, prompt, GREEDY)
            tokens = [t for out in llm.engine.run_until_idle() if out.rid == rid for t in out.new_token_ids]
        return seen["r3"], tokens, llm.engine.stats().prefix_hit_tokens - before

    common = dict(page_size=4, max_total_tokens=4096, speculative_algorithm="NEXTN", speculative_num_steps=2)
    cached, alone = drafts(LLM(tiny_ds, **common), runs), drafts(LLM(tiny_ds, **common), runs[2:])
    assert cached[:2] == alone[:2] and (cached[2], alone[2]) == (8, 0)


def test_mtp_reuses_every_turn_and_drafts_as_without_the_cache(tiny_ds: str) -> None:
    """Three turns, each repeating the last one's prompt and answer. Turn 1's cache ends on a page boundary
    (25 + 11 tokens), so its last page's next token is its answer's last token, known only as the token after
    the cache: recorded, turn 2 reuses all 9 pages (not 8), and turn 3 walks on through that page into turn 2's
    (it used to stop there for good: an unknown next token). Turn 3's drafts, not only its tokens, equal a run
    without the cache (the pages' MTP entries are the ones a fresh prefill writes)."""
    common = dict(page_size=4, max_total_tokens=4096, speculative_algorithm="NEXTN", speculative_num_steps=2)
    plain = LLM(tiny_ds, disable_radix_cache=True, **common)
    prompts = [BASE[0][:25]]
    for _ in range(2):
        answer = plain.generate([prompts[-1]], GREEDY)[0].token_ids
        prompts.append(prompts[-1] + answer + [7, 8, 9])

    def run(llm: LLM, turns: list[list[int]]) -> tuple[list[int], list[list[int]], list[int]]:
        seen: dict[str, list[list[int]]] = {}
        llm.engine.draft_override = lambda req, ids: seen.setdefault(req.rid, []).append(list(ids)) or ids
        hits, tokens = [], []
        for i, prompt in enumerate(turns):
            before = llm.engine.stats().prefix_hit_tokens
            llm.engine.add_request(f"t{i}", prompt, GREEDY)
            tokens = [t for out in llm.engine.run_until_idle() if out.rid == f"t{i}" for t in out.new_token_ids]
            hits.append(llm.engine.stats().prefix_hit_tokens - before)
        return hits, seen[f"t{len(turns) - 1}"], tokens

    hits, drafts, tokens = run(LLM(tiny_ds, **common), prompts)
    assert hits == [0, 36, 48]  # turn 2: 25 + 11 cached; turn 3: turn 2's 40 + 11, in whole pages
    assert (drafts, tokens) == run(plain, prompts[2:])[1:]


@pytest.mark.parametrize("page_size", [4, 1])
def test_a_stop_inside_an_accepted_run_caches_only_full_pages_of_its_tokens(tiny_ds: str, page_size: int) -> None:
    """Drafts that are the true continuation are all accepted (3 tokens at S = 2) and the request stops at the
    second token (max_tokens 2): its cache holds prompt + 3 positions but it has prompt + 2 tokens. The tree must
    take only full pages of its tokens (it took a short page, or at page size 1 an empty one: never matched,
    holding a page until evicted), and of those only pages whose next token is known."""
    common = dict(page_size=page_size, max_total_tokens=4096, speculative_algorithm="NEXTN", speculative_num_steps=2)
    prompt = BASE[0][:25]
    answer = LLM(tiny_ds, disable_radix_cache=True, **common).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    llm = LLM(tiny_ds, **common)
    llm.engine.draft_override = lambda req, ids: (answer[len(req.output_ids):] + list(ids))[:len(ids)]
    llm.engine.add_request("a", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert [t for out in llm.engine.run_until_idle() for t in out.new_token_ids] == answer[:2]
    assert llm.engine.stats().spec_accepted_tokens == 2  # the stop came inside an accepted run
    cache = llm.engine.prefix_cache
    assert all(len(cache._tokens[n]) == page_size for n in range(1, len(cache._tokens)) if cache._used[n] > 0)
    # full pages of its tokens whose next token is known (the last one's is not: no MTP match could use it)
    assert cache.num_pages == (len(prompt) + 2 - 1) // page_size


def test_abort_of_a_request_holding_shared_pages(tiny_ds: str) -> None:
    llm = LLM(tiny_ds, page_size=4, max_total_tokens=4096)
    expected = llm.generate([BASE[0]], GREEDY)[0].token_ids  # caches BASE[0]'s pages
    engine = llm.engine
    engine.add_request("a", BASE[0], GREEDY)
    engine.add_request("b", BASE[0], GREEDY)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    for out in engine.step() + engine.step():
        tokens[out.rid] += out.new_token_ids
    shared = engine.requests["a"].pages[0]
    assert shared == engine.requests["b"].pages[0] and engine.allocator.refcount(shared) == 3
    engine.abort("a")
    for out in engine.run_until_idle():
        tokens[out.rid] += out.new_token_ids
    assert tokens["b"] == expected and engine.allocator.refcount(shared) == 1
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages


def test_deep_tree_at_page_size_one() -> None:
    """Page size 1 makes the tree as deep as the sequence: counting and evicting must not recurse."""
    alloc = PageAllocator(6000)
    cache = PrefixCache(alloc, page_size=1)
    pages = alloc.alloc(5000)
    cache.insert(list(range(5000)), pages)
    hit = cache.match(list(range(3000)) + [7], limit=3000)
    alloc.free(pages)
    assert cache.reclaimable() == 2000  # the first 3000 pages are in use by the match
    alloc.free(hit)
    assert cache.reclaimable() == 5000 and cache.evict(5000) == 5000 and alloc.num_free == 5999


def _tree(cache: PrefixCache) -> dict[int, tuple[int | None, int, int]]:
    """page -> (parent page or None, children, last use), by walking the tree from the root."""
    children: dict[int, list[int]] = {}
    for (parent, *_), node in cache._child.items():
        children.setdefault(parent, []).append(node)
    out, todo = {}, [(n, None) for n in children.get(ROOT, [])]
    while todo:
        node, parent = todo.pop()
        out[cache._page[node]] = (parent, len(children.get(node, [])), cache._used[node])
        todo += [(c, cache._page[node]) for c in children.get(node, [])]
    return out


def _brute_reclaimable(tree: dict[int, tuple[int | None, int, int]], alloc: PageAllocator) -> int:
    """Pages in subtrees where every page has refcount 1 (no request holds it), by walking the tree."""
    busy = {p for p in tree if alloc.refcount(p) > 1}
    for page in list(busy):
        while (page := tree[page][0]) is not None:
            busy.add(page)
    return len(tree) - len(busy)


def _brute_evicted(tree: dict[int, tuple[int | None, int, int]], alloc: PageAllocator, want: int) -> set[int]:
    """The pages LRU leaf-first eviction frees: repeatedly the least recently used leaf no request holds."""
    children = {p: c for p, (_, c, _) in tree.items()}
    gone: set[int] = set()
    while len(gone) < want:
        leaves = [(tree[p][2], p) for p in tree if p not in gone and not children[p] and alloc.refcount(p) == 1]
        if not leaves:
            break
        _, page = min(leaves)
        gone.add(page)
        if tree[page][0] is not None:
            children[tree[page][0]] -= 1
    return gone


def test_incremental_reclaim_and_eviction_equal_a_tree_walk() -> None:
    """The allocator's count of cached-only pages and the heap of leaves (nothing walks the tree per step)
    against a walk of the whole tree, over random requests that share prefixes, finish, and evictions."""
    import random
    rng = random.Random(5)
    alloc = PageAllocator(400)
    cache = PrefixCache(alloc, page_size=2)
    bases = [[rng.randrange(3) for _ in range(40)] for _ in range(4)]
    running: list[tuple[list[int], list[int]]] = []
    walks, walk = [0], cache._current_leaves

    def counted_walk() -> list:
        walks[0] += 1
        return walk()

    cache._current_leaves = counted_walk  # type: ignore[method-assign]
    for step in range(600):
        op = rng.random()
        if op < 0.45 and len(running) < 6:  # a request arrives: its cached prefix, then pages of its own
            tokens = rng.choice(bases)[:rng.randrange(2, 40)] + [rng.randrange(3) for _ in range(rng.randrange(6))]
            pages = cache.match(tokens, limit=len(tokens) - 1)
            need = -(-len(tokens) // 2) - len(pages)
            if need > alloc.num_free:
                cache.evict(need - alloc.num_free)
            if need > alloc.num_free:
                alloc.free(pages)
                continue
            running.append((tokens, pages + alloc.alloc(need)))
        elif op < 0.85 and running:  # a request ends: its full pages stay cached
            tokens, pages = running.pop(rng.randrange(len(running)))
            cache.insert(tokens, pages)
            alloc.free(pages)
        else:
            tree = _tree(cache)
            want = rng.randrange(1, 12)
            expected = _brute_evicted(tree, alloc, want)
            assert cache.evict(want) == len(expected), step
            assert set(tree) - set(_tree(cache)) == expected, step
        tree = _tree(cache)
        assert cache.reclaimable() == _brute_reclaimable(tree, alloc) and cache.num_pages == len(tree), step
    assert cache.stats.evicted_pages > 50 and len(cache._leaves) <= 2 * cache.num_pages + 64
    assert walks[0] < 20  # the heap's rebuilds at most (each eviction and count used to walk it: hundreds)


def test_cached_pages_add_no_objects_for_the_garbage_collector() -> None:
    """A full pool caches a node per page (per token at page size 1): the tree must not hand the cyclic
    collector an object per node, or every full collection walks them all (a pause inside a step)."""
    import gc
    alloc = PageAllocator(9000)
    cache = PrefixCache(alloc, page_size=1)
    prompts = [[(i * 7 + j * 13) % 5000 for j in range(2000)] for i in range(4)]
    pages = [alloc.alloc(2000) for _ in prompts]
    gc.collect()
    before = len(gc.get_objects())
    for tokens, held in zip(prompts, pages):
        cache.insert(tokens, held)
    gc.collect()
    assert cache.num_pages == 8000 and len(gc.get_objects()) - before < 50
