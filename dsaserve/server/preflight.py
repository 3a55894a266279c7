"""Checks that run in the server process before any rank loads the model: the checkpoint's files
(config.json, the shard index, each shard's header) and the flags that depend on the model, and
the HTTP port, bound here first and handed to uvicorn. Each failure names the file or the flag."""
from __future__ import annotations

import json
import socket
from pathlib import Path

from dsaserve.config import ConfigError, ModelConfig
from dsaserve.engine.admission import pages_to_admit
from dsaserve.engine.tokenizer import read_chat_template
from dsaserve.generation_config import read_generation_config
from dsaserve.model.checkpoint import Checkpoint, default_model_path
from dsaserve.server_args import ServerArgs, split_host_port

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # one of them: AutoTokenizer


def checked_args(args: ServerArgs) -> ServerArgs:
    """What `serve` and `generate` run before loading: the args with the model's folder (the embedded model's
    where none is given, resolved once here), after check_model."""
    if args.model_path is None:
        args = args.replace(model_path=str(default_model_path()))
    # Chats render on rank 0 only (node 0's frontend or offline engine): other nodes never open the file.
    if args.chat_template is not None and args.node_rank == 0:  # one absolute path for the processes that read it
        read_chat_template(args.chat_template)
        args = args.replace(chat_template=str(Path(args.chat_template).resolve()))
    check_model(args)
    return args


def check_model(args: ServerArgs) -> None:
    """Raise ConfigError / CheckpointError / ValueError naming the file or flag that cannot be served."""
    path = Path(args.model_path)
    try:
        cfg = ModelConfig.from_path(path, args.model_overrides)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    check_flags_for(cfg, args, path / "config.json")
    read_generation_config(path)  # (its end-of-sequence ids and sampling defaults: ConfigError naming a bad field)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if args.load_format == "dummy":  # random weights of this config: no shards to check
        return
    Checkpoint(path)  # every shard the index names is there and its header reads (CheckpointError names it)


def check_flags_for(cfg: ModelConfig, args: ServerArgs, config_file: Path) -> None:
    """The flags that depend on config.json alone (serve, generate and plan): ValueError naming the flag."""
    if args.context_length is not None and args.context_length > cfg.context_length:
        raise ValueError(f"--context-length {args.context_length} is longer than the model's "
                         f"{cfg.context_length} (max_position_embeddings in {config_file})")
    cfg.check_parallel(args.tp, args.tp // args.dp, args.ep)
    check_pool_flag(args)
    if args.speculative_algorithm is not None and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"--speculative-algorithm {args.speculative_algorithm} drafts with the checkpoint's MTP "
                         f"layer, and {config_file} has num_nextn_predict_layers=0")


def check_pool_flag(args: ServerArgs) -> None:
    """An explicit --max-total-tokens too small to start any request, refused before the weights load (the
    engine's own check, Scheduler.capacity_problem, comes after)."""
    if args.max_total_tokens is None:
        return
    pages, need = args.max_total_tokens // args.page_size, pages_to_admit(args.page_size, args.spec_steps)
    if pages < need:
        spec = f" with {args.spec_steps} speculative steps" if args.spec_steps else ""
        raise ValueError(f"--max-total-tokens {args.max_total_tokens} holds {pages} page(s) of {args.page_size} "
                         f"tokens (--page-size), and a request needs {need} free to start{spec}: give at least "
                         f"{need * args.page_size}")


def bind_listener(host: str, port: int, flags: str = "--host / --port") -> socket.socket:
    """The HTTP socket, bound before the model loads so that a taken port fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({flags}): {exc.strerror or exc}") from None


def check_node0_ports(args: ServerArgs) -> None:
    """Node 0's other listening ports, tried before the model loads (call it while the HTTP socket is held): a
    prefill server's bootstrap port (its server binds it once the ranks are up, minutes later on a real model)
    and the torch.distributed store's --dist-init-addr (rank 0 binds it: a taken port or an address of another
    machine ended in a rank's traceback and exit 1). Each is held while the next is tried, so two of them that
    collide fail too; a failure names the flag."""
    held = []
    try:
        if args.disaggregation_mode == "prefill":
            held.append(bind_listener(args.host, args.disaggregation_bootstrap_port, "--disaggregation-bootstrap-port"))
        addr = split_host_port(args.dist_init_addr) if args.tp > 1 and args.dist_init_addr is not None else None
        if addr is not None:
            held.append(bind_listener(*addr, "--dist-init-addr"))
    finally:
        for sock in held:
            sock.close()
