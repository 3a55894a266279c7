"""FP8 e4m3 checkpoints (weight_scale_inv blocks): the weights stay FP8 in the model, equal the oracle on
an independently dequantized copy, and every rank loads exactly its slice of weights and scale blocks."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import ARCHS, prompts_ids
from dsaserve import LLM, SamplingParams
from dsaserve.model.dsa import DSAModel
from dsaserve.model.checkpoint import CheckpointError
from dsaserve.model.loader import build_model, fused_sources
from dsaserve.ops.fp8 import FP8, BlockFP8, act_quant, dequantize, linear, quantize_weight
from dsaserve.parallel.groups import Parallel, ParallelConfig
from dsaserve.parallel.launch import Job, OfflineRequest, run_jobs
from dsaserve.server_args import ServerArgs
from dsaserve.tiny import make_tiny_model
from test_bad_input import _rewrite_tensor
from test_oracle import LOGIT_TOL, ORACLES
from test_parallel import GREEDY, PROMPTS, single_device

CPU = torch.device("cpu")
SMALL_BLOCK = dict(fp8_block=8, moe_intermediate_size=64)  # every TP split up to 8 falls on whole blocks


def _dequantize_checkpoint(src: Path, dst: Path, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Independent dequantization: expand every scale over its block with explicit loops. Tensors for
    which `keep(name)` holds stay FP8 (with their scales and the quantization config)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    block = config["quantization_config"]["weight_block_size"]
    shards = {f.name: load_file(f) for f in src.glob("*.safetensors")}
    scales = {n[: -len("_scale_inv")]: t for s in shards.values() for n, t in s.items() if n.endswith("_scale_inv")}
    kept = False
    weight_map = {}
    for name, tensors in shards.items():
        out = {}
        for n, t in tensors.items():
            if n.endswith("_scale_inv") and not keep(n[: -len("_scale_inv")]):
                continue
            if t.dtype == torch.float8_e4m3fn and keep(n):
                kept = True
            elif t.dtype == torch.float8_e4m3fn:
                w = t.float()
                s = scales[n]
                for i in range(s.shape[0]):
                    for j in range(s.shape[1]):
                        w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= s[i, j]
                t = w
            out[n] = t
            weight_map[n] = name
        save_file(out, str(dst / name))
    if not kept:
        config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (FP8 checkpoint with 128x128 blocks, its dequantized copy)."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for arch in ARCHS:
        fp8 = make_tiny_model(root / arch, arch, fp8=True)
        _dequantize_checkpoint(fp8, root / f"{arch}-deq")
        out[arch] = (fp8, root / f"{arch}-deq")
    return out


@pytest.fixture(scope="module")
def small_block_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (FP8 checkpoint with 8x8 blocks, its dequantized copy): TP splits on whole blocks."""
    root = tmp_path_factory.mktemp("fp8-small")
    out = {}
    for arch in ARCHS:
        fp8 = make_tiny_model(root / arch, arch, fp8=True, **SMALL_BLOCK)
        _dequantize_checkpoint(fp8, root / f"{arch}-deq")
        out[arch] = (fp8, root / f"{arch}-deq")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_modules_match_oracle(arch: str, fp8_models: dict[str, tuple[Path, Path]]) -> None:
    fp8, deq = fp8_models[arch]
    llm = LLM(str(fp8), page_size=4, max_total_tokens=2048)
    model = llm.engine.runner.model
    moe_layer = next(layer for layer in model.layers if hasattr(layer.mlp, "experts"))
    assert model.layers[0].self_attn.q_b_proj.weight.dtype == FP8 and moe_layer.mlp.experts.w13.dtype == FP8
    assert model.layers[0].mlp.down_proj.weight.dtype == FP8
    oracle = ORACLES[arch].from_pretrained(str(deq), dtype=torch.float32, attn_implementation="eager").eval()
    transformers.logging.set_verbosity_error()
    prompts = prompts_ids(3, [4, 19, 45], seed=5)  # below and above index_topk
    for i, ids in enumerate(prompts):
        llm.engine.add_request(f"p{i}", ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                            prompt_logprobs=1))
    outs = list(llm.engine.run_until_idle())
    scored = {o.rid: o.prompt_logprobs for o in outs if o.prompt_logprobs is not None}
    tokens = {f"p{i}": [t for o in outs if o.rid == f"p{i}" for t in o.new_token_ids] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            expected = torch.log_softmax(oracle(torch.tensor([ids])).logits[0, :-1], dim=-1)
            ref = oracle.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
        chosen = torch.tensor([lp for lp, _ in scored[f"p{i}"]])  # every prompt token after the first
        diff = (chosen - expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max().item()
        assert diff < LOGIT_TOL, f"{arch} len={len(ids)}: prompt log-prob diff {diff:.2e} >= {LOGIT_TOL}"
        assert tokens[f"p{i}"] == ref, f"{arch}: prompt of {len(ids)} tokens diverged from the oracle"


# Which dim of each checkpoint tensor splits over which group (docs/architecture.md, "Parallelism").
SPLITS = [("q_b_proj.weight", 0, "attn"), ("kv_b_proj.weight", 0, "attn"), ("o_proj.weight", 1, "attn"),
          ("embed_tokens.weight", 0, "attn"), ("lm_head.weight", 0, "attn"), ("shared_head.head.weight", 0, "attn"),
          ("gate_proj.weight", 0, "world"), ("up_proj.weight", 0, "world"), ("down_proj.weight", 1, "world")]


def _expected_slice(name: str, full: torch.Tensor, cfg: ParallelConfig, experts: int) -> torch.Tensor | None:
    """This rank's part of checkpoint tensor `name` (None: another rank's routed expert). Routed experts (of
    `experts`) are divided among cfg.ep groups of consecutive ranks, each expert split over its group's ranks."""
    expert = re.search(r"\.mlp\.experts\.(\d+)\.", name)
    for suffix, dim, group in SPLITS:
        if name.endswith(suffix):
            if expert is not None:
                ranks = cfg.tp // cfg.ep  # the ranks of one expert group
                if int(expert.group(1)) // (experts // cfg.ep) != cfg.rank // ranks:
                    return None
                parts, index = ranks, cfg.rank % ranks
            else:
                parts, index = (cfg.attn_tp, cfg.attn_rank) if group == "attn" else (cfg.tp, cfg.rank)
            return full.chunk(parts, dim=dim)[index]
    return full


def _rank_tensor(model: DSAModel, name: str) -> torch.Tensor:
    """The rank's copy of checkpoint tensor `name`, dequantized if it is FP8 in the model."""
    n = model.cfg.num_hidden_layers
    shared = {f"model.layers.{n}.embed_tokens.weight": "model.embed_tokens.weight",
              f"model.layers.{n}.shared_head.head.weight": "lm_head.weight"}
    name = shared.get(name, name)  # the MTP layer reads the target's embedding and head (equal in the checkpoint)
    key = name if name == "lm_head.weight" else name[len("model."):].replace(f"layers.{n}.", "mtp.")
    parts = key.split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():  # a routed expert
        i, par = parts.index("experts"), model.par.cfg
        first = (par.rank // (par.tp // par.ep)) * (model.cfg.n_routed_experts // par.ep)  # this rank's first (--ep)
        parts[i + 1] = str(int(parts[i + 1]) - first)
    if "shared_experts" in parts:  # stacked after the routed experts (MoE.fuse_shared_expert), unless --ep
        i = parts.index("shared_experts")
        slot = model.get_submodule(".".join(parts[:i] + ["experts"])).shared_slot
        if slot is not None:
            parts = parts[:i] + ["experts", str(slot)] + parts[i + 1:]
            key = ".".join(parts)
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        i = parts.index("experts")
        experts, e, proj = model.get_submodule(".".join(parts[:i + 1])), int(parts[i + 1]), parts[i + 2]
        w13, w2 = (w.dequantize() for w in experts.fp8) if experts.block is not None else (experts.w13, experts.w2)
        inter, start = experts.inter, (experts.padded_inter if proj == "up_proj" else 0)
        return w2[e, :, :inter] if proj == "down_proj" else w13[e, start:start + inter]
    fused = fused_sources(model).get(key)
    if fused is not None:  # rows of a fused module (q_a + wk + kv_a, gate + up)
        _, module, start, rows = fused
        full = module.fp8.dequantize() if module.block is not None else module.weight.float()
        return full[start:start + rows]
    module = model.get_submodule(".".join(parts[:-1]))
    if getattr(module, "block", None) is not None:
        return module.fp8.dequantize()
    return getattr(module, parts[-1]).float()


@pytest.mark.parametrize("tp,dp,ep", [(2, 1, 1), (4, 1, 1), (8, 1, 1), (4, 2, 1), (2, 1, 2), (4, 1, 2), (8, 8, 8)])
@pytest.mark.parametrize("arch", ARCHS)
def test_rank_slices_equal_dequantized_slices(arch: str, tp: int, dp: int, ep: int,
                                              small_block_models: dict[str, tuple[Path, Path]]) -> None:
    """Every rank's weights are its slices of the dequantized checkpoint; with --ep a rank holds its group's
    routed experts (whole at --ep --tp) and no other's."""
    fp8, deq = small_block_models[arch]
    full = {n: t for f in deq.glob("*.safetensors") for n, t in load_file(f).items()}
    held: dict[str, int] = {}
    for rank in range(tp):
        cfg = ParallelConfig(tp, dp, rank, ep)
        model = build_model(fp8, CPU, torch.float32, Parallel.without_groups(cfg), progress=False)
        assert model.layers[0].self_attn.o_proj.weight.dtype == FP8
        experts = model.cfg.n_routed_experts
        moe = next(layer.mlp.experts for layer in model.layers if hasattr(layer.mlp, "experts"))
        assert moe.num_experts == experts // ep
        for name, tensor in full.items():
            want = _expected_slice(name, tensor.float(), cfg, experts)
            if want is None:
                continue
            held[name] = held.get(name, 0) + 1
            got = _rank_tensor(model, name)
            assert torch.equal(got, want), f"tp={tp} dp={dp} ep={ep} rank={rank}: {name} differs from its slice"
    assert set(held) == set(full) and all(n == tp // ep for n in
                                          (held[k] for k in full if re.search(r"\.mlp\.experts\.\d+\.", k)))


def test_split_inside_a_block_is_refused(fp8_models: dict[str, tuple[Path, Path]]) -> None:
    fp8, _ = fp8_models["deepseek_v32"]  # 128x128 blocks; the tiny MLPs split in halves of 64 rows
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.\d+\.\S+\.weight: this rank's (rows|columns) "
                                              r"\[\d+, \d+\) of \d+ split a 128x128 FP8 scale block"):
        build_model(fp8, CPU, torch.float32, Parallel.without_groups(ParallelConfig(2, 1, 1)), progress=False)


def test_split_inside_a_block_of_a_dequantized_weight_is_exact(tmp_path: Path,
                                                               fp8_models: dict[str, tuple[Path, Path]]) -> None:
    """kv_b_proj (read as a matrix, dequantized at load) splits into 64-row halves of 128-row blocks."""
    fp8, deq = fp8_models["deepseek_v32"]
    _dequantize_checkpoint(fp8, tmp_path / "mixed", keep=lambda name: "kv_b_proj" in name)
    full = {n: t for f in deq.glob("*.safetensors") for n, t in load_file(f).items()}
    for rank in (0, 3, 7):
        cfg = ParallelConfig(8, 1, rank)
        model = build_model(tmp_path / "mixed", CPU, torch.float32, Parallel.without_groups(cfg), progress=False)
        for name, tensor in full.items():
            if "kv_b_proj" in name:
                assert torch.equal(_rank_tensor(model, name), _expected_slice(name, tensor, cfg, 0)), name


@pytest.mark.parametrize("drop,message", [
    ("model.layers.1.self_attn.q_b_proj.weight_scale_inv",
     r"fp8 tensor model\.layers\.1\.self_attn\.q_b_proj\.weight has no model\.layers\.1\.self_attn\.q_b_proj\."
     r"weight_scale_inv"),
    ("model.layers.2.mlp.experts.3.down_proj.weight", r"missing 1 tensor\(s\), first: model\.layers\.2\.mlp\."
                                                      r"experts\.3\.down_proj\.weight")])
def test_fp8_checkpoint_errors_name_the_tensor(drop: str, message: str, tmp_path: Path,
                                               fp8_models: dict[str, tuple[Path, Path]]) -> None:
    shutil.copytree(fp8_models["deepseek_v32"][0], tmp_path / "m")
    _rewrite_tensor(tmp_path / "m", drop)
    with pytest.raises(CheckpointError, match=message):
        build_model(tmp_path / "m", CPU, torch.float32, progress=False)


Q_B = "model.layers.1.self_attn.q_b_proj.weight"


@pytest.mark.parametrize("name,recast,message", [
    (Q_B, lambda w: w.float().to(torch.float8_e5m2), r"is F8_E5M2: dsaserve loads block FP8 in e4m3 \(F8_E4M3\) only"),
    (Q_B, lambda w: w.float().to(torch.bfloat16), r"is BF16 but has .*q_b_proj\.weight_scale_inv beside it"),
    (Q_B, lambda w: w.view(torch.uint8), r"is U8 but has .*q_b_proj\.weight_scale_inv beside it"),
    (Q_B + "_scale_inv", lambda s: s.to(torch.int32), r" is I32: block scales are floating-point"),
    ("model.layers.1.input_layernorm.weight", lambda w: w.to(torch.int64), r"is I64: expected a floating-point"),
    ("model.layers.1.input_layernorm.weight", lambda w: w.to(FP8), r"is F8_E4M3 of shape \[\d+\]: block FP8 "
                                                                   r"tensors are matrices")])
def test_a_tensor_of_the_wrong_dtype_is_refused(name: str, recast, message: str, tmp_path: Path,
                                                fp8_models: dict[str, tuple[Path, Path]]) -> None:
    """Tensors of a dtype the loader would copy wrongly, each named with its dtype: an e5m2 weight with its
    weight_scale_inv loaded as plain values, its scales left out (off by up to 700x); likewise an FP8 weight cast
    to bf16 without its scale, or its e4m3 bytes stored as U8 (older tooling: they loaded as the integers 0-255);
    integer scales and norms became values; a 1-D FP8 tensor failed with an IndexError."""
    shutil.copytree(fp8_models["deepseek_v32"][0], tmp_path / "m")
    shard = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite_tensor(tmp_path / "m", name, recast(load_file(tmp_path / "m" / shard)[name]))
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)}.*{message}"):
        build_model(tmp_path / "m", CPU, torch.float32, progress=False)


@pytest.mark.parametrize("ep", [1, 4])
def test_parallel_fp8_matches_single_device(ep: int, small_block_models: dict[str, tuple[Path, Path]]) -> None:
    """Real rank processes (TP 4 with DP attention 2; and with --ep 4, whole FP8 experts per rank) on FP8
    checkpoints equal the single-device run; also with the FP8 KV cache, at page size 64 and at page size 1 with
    MTP (S = 2) and graph buckets of 2 (padded layouts, idle groups replaying dummies), against the single-device
    run over the FP8 cache."""
    fp8_cache = [({"page_size": 64}, None), ({"page_size": 64, "kv_cache_dtype": "fp8_e4m3"}, 64),
                 ({"page_size": 1, "kv_cache_dtype": "fp8_e4m3", "speculative_algorithm": "NEXTN",
                   "speculative_num_steps": 2, "cuda_graph_max_bs": 2}, 1)]
    cases = [(a, flags, page) for a in ARCHS for flags, page in fp8_cache]
    jobs = [Job({"model_path": str(small_block_models[a][0]), **flags},
                [OfflineRequest(p, GREEDY, dp_rank=i % 2) for i, p in enumerate(PROMPTS)]) for a, flags, _ in cases]
    results = run_jobs(ServerArgs(tp=4, dp=2, ep=ep, enable_dp_attention=True, max_total_tokens=2048), jobs)
    for (arch, flags, page), got in zip(cases, results):
        model = str(small_block_models[arch][0])
        if page is None:
            want = single_device(model, 64)
        else:
            llm = LLM(model, page_size=page, kv_cache_dtype="fp8_e4m3", max_total_tokens=2048)
            want = [list(c.token_ids) for c in llm.generate(PROMPTS, GREEDY)]
        assert got == want, f"ep={ep} {arch} {flags}"


def test_dequantize_partial_blocks() -> None:
    w = torch.randn(40, 70)
    scale = torch.rand(3, 5) + 0.5
    q = w.to(torch.float8_e4m3fn)
    got = dequantize(q, scale, (16, 16))
    for i in range(40):
        for j in range(70):
            assert got[i, j] == q[i, j].float() * scale[i // 16, j // 16]
    sliced = dequantize(q[5:30, 20:70], scale[0:2, 1:5], (16, 16), offset=(5, 4))
    assert torch.equal(sliced, got[5:30, 20:70])


@pytest.mark.parametrize("max_values", [1, 16 * 70 * 2, 1 << 24])
def test_a_stack_dequantized_in_row_runs_equals_the_one_piece_product(max_values: int) -> None:
    """BlockFP8.dequantize works a run of whole row blocks at a time (its fp32 temporaries stay small): every
    run length gives the one-piece values, over a stack of experts and a last row block that is partial."""
    w = torch.randn(3, 40, 70).to(FP8)
    scale = torch.rand(3, 3, 5) + 0.5
    got = BlockFP8(w, scale, (16, 16)).dequantize(torch.bfloat16, max_values=max_values)
    assert got.shape == (3, 40, 70) and got.dtype == torch.bfloat16
    for e in range(3):
        assert torch.equal(got[e], dequantize(w[e], scale[e], (16, 16)).to(torch.bfloat16))
    assert torch.equal(BlockFP8(w[1], scale[1], (16, 16)).dequantize(max_values=max_values),
                       dequantize(w[1], scale[1], (16, 16)))


def test_block_fp8_check_names_a_scale_of_the_wrong_shape_or_dtype() -> None:
    w = torch.randn(3, 40, 70).to(FP8)
    BlockFP8(w, torch.ones(3, 3, 5), (16, 16)).check("experts")  # ceil(40 / 16) x ceil(70 / 16) per expert
    with pytest.raises(ValueError, match=r"experts: weight \[3, 40, 70\] in blocks of \[16, 16\] needs a scale of "
                                         r"\[3, 3, 5\], got \[3, 3, 4\]"):
        BlockFP8(w, torch.ones(3, 3, 4), (16, 16)).check("experts")
    with pytest.raises(ValueError, match="scale float32"):
        BlockFP8(w, torch.ones(3, 3, 5, dtype=torch.bfloat16), (16, 16)).check("experts")


def test_quantize_weight_round_trip() -> None:
    w = torch.randn(40, 70) * torch.linspace(0.01, 10, 70)
    q, s = quantize_weight(w, (16, 32))
    assert q.dtype == FP8 and s.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            block = w[i * 16:(i + 1) * 16, j * 32:(j + 1) * 32]
            assert torch.isclose(s[i, j] * 448, block.abs().max())
    err = (dequantize(q, s, (16, 32)) - w).abs() / w.abs().clamp(min=1e-3)
    assert err.max() < 2 ** -4 + 1e-6  # e4m3: 3 mantissa bits, relative rounding error <= 2^-4


def test_fp8_linear_reference_is_the_blockwise_sum() -> None:
    """fp8.linear (the kernels' reference) equals the per-group sum the kernels compute, from explicit loops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=gen)
    w = BlockFP8(*quantize_weight(torch.randn(50, 300, generator=gen), (16, 128)), (16, 128))
    xq, xs = act_quant(x, 128)
    assert xq.shape == (3, 300) and xs.shape == (3, 3)
    want = torch.zeros(3, 50, dtype=torch.float64)
    for m in range(3):
        for g in range(3):
            cols = slice(g * 128, min((g + 1) * 128, 300))
            amax = x[m, cols].abs().max()
            assert xs[m, g] == amax / 448 and (xq[m, cols].float() - x[m, cols] * (448 / amax)).abs().max() <= 16
            for n in range(50):
                dot = (xq[m, cols].double() * w.weight[n, cols].double()).sum()
                want[m, n] += dot * xs[m, g].double() * w.scale[n // 16, g].double()
    assert torch.allclose(linear(x, w).double(), want, rtol=1e-5, atol=1e-5)


def test_projections_fuse_where_blocks_allow(fp8_models: dict[str, tuple[Path, Path]],
                                             small_block_models: dict[str, tuple[Path, Path]]) -> None:
    """q_a, the indexer's wk and kv_a load into one GEMM (rows side by side, scale blocks too) when every part
    but the last fills whole blocks; the slices test above proves each part's rows are its tensor's."""
    small = build_model(small_block_models["deepseek_v32"][0], CPU, torch.float32, progress=False)
    attn = small.layers[0].self_attn
    assert [name for name, _, _ in attn.input_proj.sources] == ["q_a_proj", "indexer.wk", "kv_a_proj_with_mqa"]
    assert attn.input_proj.weight.dtype == FP8 and not hasattr(attn, "q_a_proj")
    wide = build_model(fp8_models["deepseek_v32"][0], CPU, torch.float32, progress=False)
    assert wide.cfg.q_lora_rank % 128 and wide.layers[0].self_attn.input_proj is None  # would straddle a block


def test_a_linear_reads_only_quantized_rows_that_are_its_inputs() -> None:
    """The wiring of rows handed over quantized (GPU: from the RMSNorm kernels), run on CPU with a GEMM that
    records what it is given: rows up to quantized_rows reach the GEMM with their QuantizedRows, more rows or no
    FP8 kernels never do, and rows of another shape are refused loudly instead of computing a wrong product."""
    from dsaserve.model.quant import Linear
    from dsaserve.ops.fp8 import QuantizedRows
    seen = []

    def gemm(x: torch.Tensor, w: BlockFP8, xq: QuantizedRows | None = None) -> torch.Tensor:
        seen.append(xq)
        return linear(x, w).to(x.dtype)

    lin = Linear(256, 64)
    lin.to_fp8((128, 128))
    lin.weight.data, lin.weight_scale_inv.data = quantize_weight(torch.randn(64, 256), (128, 128))
    lin.prepare(gemm, torch.float32, quantized_rows=4)
    x = torch.randn(2, 3, 256)  # leading dims: 6 rows
    xq = QuantizedRows(*act_quant(x.reshape(6, 256), 128), 128)
    assert lin.input_group(4) == 128 and lin.input_group(5) == 0
    lin(x[:, :1], QuantizedRows(xq.values[:2], xq.scales[:2], 128))  # 2 rows: read
    lin(x, xq)  # 6 rows, above quantized_rows: not read
    assert seen[0] is not None and seen[1] is None
    with pytest.raises(ValueError, match="quantized input rows"):
        lin(x[:, :1], QuantizedRows(xq.values[:3], xq.scales[:3], 128))  # 3 rows for 2
    lin.prepare(gemm, torch.float32)  # no rows handed over
    assert lin.input_group(1) == 0


def test_the_gemm_warm_up_runs_each_shape_at_each_row_count_also_quantized() -> None:
    """quant.warm_up_gemms (the GPU start-up's, engine/warmup.py), on CPU with a GEMM that records what it is
    given: each distinct FP8 Linear once per row count (a second module of the same shape adds nothing), with
    act_quant's rows as well where the module reads its rows quantized, and never a dequantized module."""
    from torch import nn
    from dsaserve.model import quant
    from dsaserve.ops.fp8 import QuantizedRows
    seen = []

    def gemm(x: torch.Tensor, w: BlockFP8, xq: QuantizedRows | None = None) -> torch.Tensor:
        if xq is not None:
            assert torch.equal(xq.values.float(), act_quant(x, 128)[0].float())
        seen.append((tuple(w.weight.shape), x.shape[0], xq is not None))
        return linear(x, w).to(x.dtype)

    def fp8_module(k: int, n: int, quantized_rows: int, kernels: bool = True) -> quant.Linear:
        lin = quant.Linear(k, n)
        lin.to_fp8((128, 128))
        lin.weight.data, lin.weight_scale_inv.data = quantize_weight(torch.randn(n, k), (128, 128))
        lin.prepare(gemm if kernels else None, torch.float32, quantized_rows)
        return lin

    model = nn.ModuleList([fp8_module(256, 64, 16), fp8_module(256, 64, 16), fp8_module(128, 256, 0),
                           fp8_module(384, 128, 16, kernels=False), quant.Linear(128, 128)])
    assert quant.warm_up_gemms(model, (16, 32), torch.float32) == len(seen) == 5
    assert sorted(seen) == [((64, 256), 16, False), ((64, 256), 16, True), ((64, 256), 32, False),
                            ((256, 128), 16, False), ((256, 128), 32, False)]
