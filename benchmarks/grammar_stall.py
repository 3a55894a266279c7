"""How long the step loop stalls when a request's grammar compiles. An engine (the embedded tiny model unless
--model-path) decodes one request; a second request then asks for a JSON schema of --properties properties (a
fresh one each round, so every round compiles). Reported per round: the longest step while the first request
decodes, the median step, and how long after its arrival the second request had its first token. Prints a
table and writes JSON:

    python benchmarks/grammar_stall.py --rounds 3 --output-json /tmp/stall.json

(Engine-level on purpose: through the server, a client also sees the frontend's own work on such a request, its
body and its grammar check, which this change does not touch.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dsaserve import LLM, SamplingParams
from dsaserve.chat.grammar import checked_spec, json_grammar
from dsaserve.model.checkpoint import default_model_path


def one_round(llm: LLM, path: str, properties: int, salt: int, tokens: int) -> dict:
    engine = llm.engine
    props = {f"p{salt}_{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1}}}x{i}"} for i in range(properties)}
    spec = checked_spec(json_grammar({"type": "object", "properties": props, "required": list(props)[:200]}),
                        path, (1,))
    engine.add_request("running", [5, 6, 7], SamplingParams(max_tokens=tokens, ignore_eos=True))
    for _ in range(10):  # decoding
        engine.step()
    engine.add_request("constrained", [5, 6, 7], SamplingParams(max_tokens=2, grammar=spec))
    added, first, steps = time.monotonic(), None, []
    while "running" in engine.requests:
        start = time.monotonic()
        outputs = engine.step()
        steps.append(time.monotonic() - start)
        if first is None and any(o.rid == "constrained" and o.new_token_ids for o in outputs):
            first = time.monotonic() - added
    engine.run_until_idle()
    return {"properties": properties, "longest_step_ms": 1e3 * max(steps),
            "median_step_ms": 1e3 * statistics.median(steps), "first_token_s": first, "steps": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--properties", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=400, help="the running request's length")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    path = args.model_path or str(default_model_path())
    llm = LLM(path, max_total_tokens=4096)
    rows = [one_round(llm, path, args.properties, salt, args.tokens) for salt in range(args.rounds)]
    print("round  properties  longest step (ms)  median step (ms)  constrained request's first token (s)")
    for i, r in enumerate(rows):
        first = f"{r['first_token_s']:.3f}" if r["first_token_s"] is not None else "after the run"
        print(f"{i:5d}  {r['properties']:10d}  {r['longest_step_ms']:17.1f}  {r['median_step_ms']:16.2f}  {first:>37}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
