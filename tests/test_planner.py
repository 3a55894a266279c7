"""`dsaserve plan`: the official DeepSeek-V3.2 and GLM-5 configs (FP8) on one 8 x H200 node, and the
planner counting exactly what the engine allocates."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from dsaserve.cli import main
from dsaserve.config import ModelConfig
from dsaserve.planner import plan, weight_bytes
from dsaserve.server_args import ServerArgs

CONFIGS = Path(__file__).parent / "configs"
GIB = 2 ** 30


def _model(tmp_path: Path, name: str) -> str:
    (tmp_path / name).mkdir()
    shutil.copy(CONFIGS / f"{name}.json", tmp_path / name / "config.json")
    return str(tmp_path / name)


@pytest.mark.parametrize("flags", [["--tp", "8"], ["--tp", "8", "--dp", "8", "--enable-dp-attention"],
                                   ["--tp", "8", "--speculative-algorithm", "NEXTN", "--kv-cache-dtype", "fp8_e4m3"],
                                   ["--tp", "8", "--ep", "8", "--dp", "8", "--enable-dp-attention"]])
@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa", "glm_5_2"])
def test_fp8_models_fit_one_8x141gb_node(name: str, flags: list[str], tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model-path", _model(tmp_path, name), "--gpu-memory-gb", "141", *flags]) == 0
    out = capsys.readouterr().out
    assert "weights per rank" in out and "tokens fit" in out
    assert ("--ep 8" in out.splitlines()[0]) == ("--ep" in flags)


def test_v32_does_not_fit_4x80gb(tmp_path: Path, capsys) -> None:
    """At --tp 4 the routed experts alone (by hand, as below) are over 80 GB; the refusal names both sizes."""
    assert main(["plan", "--model-path", _model(tmp_path, "deepseek_v32"), "--tp", "4", "--gpu-memory-gb", "80"]) == 1
    out = capsys.readouterr().err
    need = float(re.search(r"need ([0-9.]+) GB but a GPU has 80.0 GB", out).group(1))
    inter, hidden = 2048 // 4, 7168
    experts = (61 - 3) * 256 * (3 * inter * hidden + 4 * 3 * (inter // 128) * (hidden // 128))  # + fp32 scales
    assert need * 1e9 >= experts > 80e9


@pytest.mark.parametrize("fraction", [0.8, 0.88, 0.92])
def test_mem_fraction_is_sglangs_share_of_weights_and_pool(fraction: float, tmp_path: Path, capsys) -> None:
    """--mem-fraction(-static) is SGLang's: the weights and the KV pool together take that share of the device
    (its model runner leaves (1 - f) x the memory free before loading to activations and graphs), not a share of
    what the weights leave: V3.2 FP8 at --tp 8 on 141 GB. Below the weights' own share nothing fits, named."""
    model = _model(tmp_path, "deepseek_v32")
    args = ServerArgs(model_path=model, tp=8, mem_fraction=fraction, max_running_requests=100_000)
    cfg = ModelConfig.from_path(Path(model))
    device = int(141e9)
    p = plan(cfg, args, device)
    page = args.page_size * p.kv_bytes_per_token
    assert p.kv_pool_bytes == p.kv_tokens * p.kv_bytes_per_token + page  # (whole pages and the reserved page 0)
    assert p.kv_tokens > 0 and p.weight_bytes + p.kv_pool_bytes <= fraction * device < p.weight_bytes + p.kv_pool_bytes + page
    too_small = plan(cfg, args.replace(mem_fraction=0.95 * p.weight_bytes / device), device)
    assert too_small.kv_tokens == 0 and not too_small.fits
    assert main(["plan", "--model-path", model, "--tp", "8", "--mem-fraction", "0.5"]) == 1
    assert "the weights and the pool may take --mem-fraction 0.5 of the 131.32 GiB" in capsys.readouterr().err


def test_glm52_fp8_is_planned_as_its_checkpoint_holds_it(tmp_path: Path, capsys) -> None:
    """GLM-5.2-FP8's config.json (tests/configs/glm_5_2.json: IndexShare, an indexer on 21 of 78 layers; its
    modules_to_not_convert names `indexers_proj`, a module the checkpoint lacks). At --tp 1 the planner's weights
    are the bytes the zai-org/GLM-5.2-FP8 shards' headers hold, 745.585 GB for the target model and 755.617 GB with
    its MTP layer (GB = 1e9, to the MB), plus what dsaserve holds wider: kv_b_proj dequantized to bf16 (it is read
    as a matrix) and the indexer's weights_proj in fp32. At --tp 8 a rank's share does not fit an 80 GB GPU."""
    cfg = ModelConfig.from_dict(__import__("json").loads((CONFIGS / "glm_5_2.json").read_text()))
    kv_b_wider = 28672 * 512 - 4 * 224 * 4  # bf16 (2 bytes) instead of e4m3 (1) and its fp32 128 x 128 scales
    weights_proj_wider = 32 * 6144 * 2  # fp32 instead of bf16
    for spec, on_disk, layers, indexers in ((None, 745.585e9, 78, 21), ("NEXTN", 755.617e9, 79, 22)):
        p = plan(cfg, ServerArgs(tp=1, speculative_algorithm=spec), int(2e12))
        assert abs(p.weight_bytes - (on_disk + layers * kv_b_wider + indexers * weights_proj_wider)) < 1e6, spec
    assert p.weights["routed experts"] == 75 * 256 * 3 * (2048 * 6144 + 4 * 16 * 48)
    assert p.weights["router"] == 75 * 256 * (6144 * 2 + 4)  # bf16 weight, fp32 correction bias
    derived = ModelConfig.from_dict({k: v for k, v in cfg.raw.items() if k != "indexer_types"})
    assert derived.indexer_types == cfg.indexer_types and cfg.index_share_for_mtp_iteration  # freq 4, offset 3
    assert main(["plan", "--model-path", _model(tmp_path, "glm_5_2"), "--tp", "8", "--gpu-memory-gb", "80"]) == 1
    assert re.search(r"need 9[0-9.]+ GB but a GPU has 80.0 GB", capsys.readouterr().err)


def test_a_tp_split_inside_an_fp8_block_is_refused_from_the_config(tmp_path: Path, capsys) -> None:
    """At --tp 32 a rank's dense MLP would hold 576 of 18432 rows, 4.5 blocks of 128: refused before any weight
    exists, with the loader's own message (tensor, this rank's rows, block)."""
    assert main(["plan", "--model-path", _model(tmp_path, "deepseek_v32"), "--tp", "32"]) == 2
    out = capsys.readouterr().err
    assert ("error: tensor model.layers.0.mlp.gate_proj.weight: this rank's rows [0, 576) of 18432 split a 128x128 "
            "FP8 scale block") in out, out
    assert "weights per rank" not in out


def test_flags_that_cannot_be_served_are_named(tmp_path: Path, capsys) -> None:
    """A pool under one page blamed the weights ("use more GPUs"), and one too small to start a request (two
    pages; with MTP's lookahead more) was said to fit; a --context-length over the model's was taken (serve
    refuses it); errors go to stderr."""
    model = _model(tmp_path, "deepseek_v32")
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "10"]) == 2
    assert ("--max-total-tokens 10 holds 0 page(s) of 64 tokens (--page-size), and a request needs 2 free to start: "
            "give at least 128") in capsys.readouterr().err
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "64"]) == 2
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "128"]) == 0
    mtp = ["--page-size", "1", "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3"]
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "7", *mtp]) == 0
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "6", *mtp]) == 2
    assert ("holds 6 page(s) of 1 tokens (--page-size), and a request needs 7 free to start with 3 speculative "
            "steps: give at least 7") in capsys.readouterr().err
    assert main(["plan", "--model-path", model, "--tp", "8", "--context-length", "999999999"]) == 2
    assert "--context-length 999999999 is longer than the model's" in capsys.readouterr().err
    # a pool larger than the memory left: said to fit, and serve failed in the allocator after loading the weights;
    # it does not fit (exit 1, the plan printed), its bytes with the reserved page (as the engine allocates them)
    assert main(["plan", "--model-path", model, "--tp", "8"]) == 0
    per_token = int(re.search(r"KV cache: (\d+) bytes per token", capsys.readouterr().out).group(1))
    assert main(["plan", "--model-path", model, "--tp", "8", "--max-total-tokens", "100000000"]) == 1
    out, err = capsys.readouterr()
    assert "weights per rank: " in out
    assert (f"--max-total-tokens 100000000 needs {(1e8 + 64) * per_token / 2**30:.2f} GiB of KV cache ({per_token} bytes "
            "per token), and ") in err and " GiB is free after the weights" in err, err


@pytest.mark.parametrize("gb", ["0", "-5", "nan", "inf"])
def test_gpu_memory_must_be_a_positive_number(gb: str, tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model-path", _model(tmp_path, "deepseek_v32"), "--gpu-memory-gb", gb]) == 2
    assert f"--gpu-memory-gb must be a positive number of GB, got {float(gb)}" in capsys.readouterr().err


def test_v32_routed_experts_by_hand() -> None:
    """At --tp 8 each rank holds 1/8 of every expert's intermediate dim, in e4m3 plus one fp32 scale per
    128 x 128 block: 58 MoE layers x 256 experts (the MTP layer's experts are counted under mtp)."""
    cfg = ModelConfig.from_dict(__import__("json").loads((CONFIGS / "deepseek_v32.json").read_text()))
    inter, hidden = 2048 // 8, 7168
    w13 = 2 * inter * hidden + 4 * (2 * inter // 128) * (hidden // 128)
    w2 = hidden * inter + 4 * (hidden // 128) * (inter // 128)
    p = plan(cfg, ServerArgs(tp=8), int(141e9))
    assert p.weights["routed experts"] == (61 - 3) * 256 * (w13 + w2)
    assert p.weights["shared experts"] == (61 - 3) * (w13 + w2)  # one more stacked expert of the same width
    latent, index = 512 + 64, 128  # bf16 cache: 2 bytes a value, every layer has its own indexer
    assert p.kv_bytes_per_token == 61 * 2 * (latent + index)


def test_v32_routed_experts_by_hand_with_expert_parallelism() -> None:
    """At --tp 8 --ep 8 a rank holds 32 whole experts of every MoE layer (the same bytes as 1/8 of all 256: the
    scale blocks of 128 x 128 divide both ways), and the shared expert split 8 ways as a dense MLP."""
    cfg = ModelConfig.from_dict(__import__("json").loads((CONFIGS / "deepseek_v32.json").read_text()))
    inter, hidden = 2048, 7168
    w13 = 2 * inter * hidden + 4 * (2 * inter // 128) * (hidden // 128)
    w2 = hidden * inter + 4 * (hidden // 128) * (inter // 128)
    p = plan(cfg, ServerArgs(tp=8, ep=8), int(141e9))
    assert p.weights["routed experts"] == (61 - 3) * 32 * (w13 + w2)
    assert p.weights["shared experts"] == (61 - 3) * (w13 + w2) // 8
    with pytest.raises(ValueError, match=r"n_routed_experts=96 is not divisible by the --ep 64"):
        __import__("dataclasses").replace(cfg, n_routed_experts=96).check_parallel(64, 64, 64)


def test_planner_counts_what_the_engine_allocates(tmp_path: Path) -> None:
    """One accounting: the plan of a tiny FP8 checkpoint (config only) equals weight_bytes of the model the
    engine loaded, component by component, and the KV bytes per token the engine sized its pool with."""
    from dsaserve.engine.engine import Engine
    from dsaserve.tiny import make_tiny_model
    ckpt = make_tiny_model(tmp_path / "fp8", "deepseek_v32", fp8=True)
    args = ServerArgs(model_path=str(ckpt), dtype="float32", max_total_tokens=300, speculative_algorithm="NEXTN",
                      speculative_num_steps=2)
    engine = Engine(args, progress=False)
    planned = plan(engine.cfg, args, int(1e9))
    assert planned.weights == weight_bytes(engine.runner.model)
    pools = engine.runner.pools  # what the pool really allocated per slot
    assert planned.kv_bytes_per_token == (pools._latent.nbytes + pools._index.nbytes) // pools.num_slots
    assert planned.weights["mtp"] > 0 and sum(planned.weights.values()) > 0
    # the pool's size by the same rules: --max-total-tokens in whole pages (300: 4 of 64; the plan said 300) and the
    # reserved page 0, else the memory share capped at --max-running-requests requests of the whole context
    assert planned.kv_tokens == 256 == (engine.runner.num_pages - 1) * args.page_size
    assert planned.kv_pool_bytes == pools._latent.nbytes + pools._index.nbytes
    capped = ServerArgs(model_path=str(ckpt), context_length=128, max_running_requests=2)
    assert plan(engine.cfg, capped, int(1e9)).kv_tokens == 256


def test_a_dequantized_copy_that_kept_its_quantization_config_is_planned_as_loaded(tmp_path: Path) -> None:
    """A bf16 copy of an FP8 checkpoint whose config.json still names the FP8 quantization: the engine loads what
    the shards hold (bf16), so the plan reads their headers and counts that, not the config's FP8 (it promised
    the smaller FP8 size, a deployment that then ran out of memory)."""
    import json

    from safetensors.torch import load_file, save_file

    from dsaserve.engine.engine import Engine
    from dsaserve.ops.fp8 import dequantize
    from dsaserve.tiny import make_tiny_model
    fp8 = make_tiny_model(tmp_path / "fp8", "deepseek_v32", fp8=True)
    copy = tmp_path / "bf16-copy"
    copy.mkdir()
    block = tuple(json.loads((fp8 / "config.json").read_text())["quantization_config"]["weight_block_size"])
    shards = {f: load_file(f) for f in fp8.glob("*.safetensors")}
    scales = {n: t for tensors in shards.values() for n, t in tensors.items() if n.endswith("_scale_inv")}
    for f in fp8.iterdir():
        if f.suffix != ".safetensors":
            (copy / f.name).write_bytes(f.read_bytes())
            continue
        save_file({n: dequantize(t, scales[n + "_scale_inv"], block).bfloat16() if n + "_scale_inv" in scales else t
                   for n, t in shards[f].items() if not n.endswith("_scale_inv")}, copy / f.name)
    assert "quantization_config" in json.loads((copy / "config.json").read_text())
    args = ServerArgs(model_path=str(copy), dtype="float32", max_total_tokens=256)
    engine = Engine(args, progress=False)
    planned = plan(engine.cfg, args, int(1e9))
    assert planned.weights == weight_bytes(engine.runner.model)
    by_config = plan(engine.cfg, ServerArgs(model_path=str(copy), dtype="float32", load_format="dummy"), int(1e9))
    assert by_config.weight_bytes < planned.weight_bytes  # the config alone says FP8


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_partial_download_is_named_not_a_traceback(damage: str, tmp_path: Path, capsys) -> None:
    """A folder whose index names a shard that is not there yet, or a shard still being written: `plan` (which
    reads the shards' headers) says which file, in one error line, as `serve` does before it starts."""
    from dsaserve.tiny import make_tiny_model
    folder = make_tiny_model(tmp_path / "m", "deepseek_v32", fp8=True)
    shard = sorted(folder.glob("*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:20])
    assert main(["plan", "--model-path", str(folder)]) == 2
    out = capsys.readouterr().err
    words = "is listed in the shard index but does not exist" if damage == "missing" else \
        "is not a readable safetensors file"
    assert f"error: {shard} {words}" in out, out


@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers"])
def test_modules_the_config_leaves_unquantized_are_planned_and_dummied_as_loaded(key: str, tmp_path: Path) -> None:
    """An FP8 checkpoint whose MTP layer is bf16, as its quantization_config says (modules_to_not_convert, vLLM's
    ignored_layers): `plan` on config.json alone and `--load-format dummy` counted that layer in FP8 (half the
    bytes the engine then allocated); they count what the engine loads from the shards."""
    import json

    from safetensors.torch import load_file, save_file

    from dsaserve.model.loader import build_model
    from dsaserve.ops.fp8 import dequantize
    from dsaserve.tiny import make_tiny_model
    ckpt = make_tiny_model(tmp_path / "m", "deepseek_v32", fp8=True)
    mtp = f"model.layers.{json.loads((ckpt / 'config.json').read_text())['num_hidden_layers']}."
    tensors = {n: t for f in ckpt.glob("*.safetensors") for n, t in load_file(f).items()}
    for f in ckpt.glob("*.safetensors"):
        save_file({n: dequantize(t, tensors[n + "_scale_inv"], (128, 128)).bfloat16()
                   if n.startswith(mtp) and n + "_scale_inv" in tensors else t
                   for n, t in load_file(f).items() if not (n.startswith(mtp) and n.endswith("_scale_inv"))}, f)
    weight_map = {n: f.name for f in ckpt.glob("*.safetensors") for n in load_file(f)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"][key] = ["lm_head", mtp.rstrip(".")]
    (ckpt / "config.json").write_text(json.dumps(config))
    only = tmp_path / "config-only"
    only.mkdir()
    shutil.copy(ckpt / "config.json", only / "config.json")
    cfg = ModelConfig.from_path(ckpt)
    loaded = weight_bytes(build_model(ckpt, torch.device("cpu"), torch.float32, progress=False))
    assert loaded["mtp"] > 0
    args = dict(dtype="float32", max_total_tokens=256, speculative_algorithm="NEXTN", speculative_num_steps=1)
    assert plan(cfg, ServerArgs(model_path=str(ckpt), **args), int(1e9)).weights == loaded
    assert plan(cfg, ServerArgs(model_path=str(only), **args), int(1e9)).weights == loaded
    dummy = build_model(ckpt, torch.device("cpu"), torch.float32, progress=False, load_format="dummy")
    assert weight_bytes(dummy) == loaded
    assert dummy.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn  # the other layers stay FP8


def _glm52_unquantized(layers: int, full: list[int]) -> list[str]:
    """GLM-5.2-FP8's modules_to_not_convert, 541 names written out (the norms, routers, indexer norms, MTP extras)."""
    out = ["model.norm", "lm_head", "model.embed_tokens"] + [f"model.layers.{layers}.{m}" for m in
                                                            ("hnorm", "enorm", "eh_proj", "shared_head.norm")]
    for i in range(layers + 1):
        out += [f"model.layers.{i}.{m}" for m in ("input_layernorm", "post_attention_layernorm",
                                                    "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm")]
        out += [f"model.layers.{i}.mlp.gate{m}" for m in ("", ".e_score_correction_bias")] if i >= 3 else []
        out += [f"model.layers.{i}.self_attn.{m}" for m in ("indexers_proj", "indexer.k_norm", "indexer.k_norm.bias")
                ] if i in full else []
    return out


def test_a_config_naming_hundreds_of_unquantized_modules_compiles_each_once(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """More modules_to_not_convert names than Python's regular-expression cache holds (512) recompiled every
    pattern for every module: `plan` on GLM-5.2-FP8's config took 38 s (1.7 s without the list), and so did every
    rank's `--load-format dummy`. Counted here as compilations (re's compiler behind its cache): at most one per
    pattern. The same modules stay unquantized as with the list written as three patterns."""
    import json
    raw = json.loads((CONFIGS / "glm_moe_dsa.json").read_text()) | {"index_topk_freq": 4, "index_skip_topk_offset": 3}
    cfg = ModelConfig.from_dict(raw)
    full = [i for i, t in enumerate(cfg.indexer_types) if t == "full"] + [cfg.num_hidden_layers]
    names = _glm52_unquantized(cfg.num_hidden_layers, full)
    assert len(names) == 541
    args = ServerArgs(model_path=str(tmp_path), tp=8, speculative_algorithm="NEXTN")
    compiles = []
    real = re._compiler.compile
    monkeypatch.setattr(re._compiler, "compile", lambda *a, **k: compiles.append(a[0]) or real(*a, **k))
    listed = plan(ModelConfig.from_dict(raw | {"quantization_config": raw["quantization_config"] | {
        "modules_to_not_convert": names}}), args, 141 * 10 ** 9).weights
    assert len(compiles) <= 2 * len(names), f"{len(compiles)} compilations for {len(names)} patterns"
    monkeypatch.undo()
    short = ["lm_head", "model.layers.78.eh_proj", "model.embed_tokens"]
    assert listed == plan(ModelConfig.from_dict(raw | {"quantization_config": raw["quantization_config"] | {
        "modules_to_not_convert": short}}), args, 141 * 10 ** 9).weights
