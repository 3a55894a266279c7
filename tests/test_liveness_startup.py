"""Start-up: every failure names the file or the flag (checked before any rank loads the model, ports
by binding them first); a rank's own start-up failure names the rank; SIGTERM at any moment of the
start exits 143 without a traceback and leaves no process and no temporary folder behind."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from server_process import ServerProcess, descendants, free_port, is_running

pytestmark = pytest.mark.timeout(300)
FLAGS = dict(page_size=4, max_total_tokens=1024)


def serve(model: str, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dsaserve", "serve", "--model-path", model, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def generate(model: str, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dsaserve", "generate", "--model-path", model, "--prompt", "Hi", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def refused(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "rank0" not in out.stderr, out.stderr[-3000:]  # no rank started
    return out.stderr


def test_the_main_process_starts_ranks_before_torch_loads(tiny_ds: str) -> None:
    """`dsaserve serve`'s main process parses its flags and checks the checkpoint without torch (or transformers,
    which imports it): it starts the ranks seconds earlier, and loads its tokenizer while they load."""
    code = ("import contextlib, sys\n"
            "from dsaserve.cli import main\n"
            "from dsaserve.server import launch, preflight\n"
            "from dsaserve.server_args import ServerArgs\n"
            "with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):\n"
            "    main(['serve', '--help'])\n"
            f"preflight.check_model(ServerArgs(model_path={tiny_ds!r}))\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-3000:])


def test_flags_are_checked_before_anything_loads(tiny_ds: str) -> None:
    err = refused(serve(tiny_ds, "--mem-fraction", "5", "--port", "99999", "--dist-init-addr", "nohost", "--tp", "2",
                        "--ep", "4"))
    assert "--mem-fraction must be in (0, 1], got 5.0" in err and "--port must be in [1, 65535], got 99999" in err
    assert "--dist-init-addr must be HOST:PORT" in err and "--ep (4) must divide --tp (2)" in err
    err = refused(serve(tiny_ds, "--context-length", "100000", "--port", str(free_port())))
    assert "--context-length 100000 is longer than the model's 4096" in err
    err = refused(serve(tiny_ds, "--tp", "0", "--max-queued-requests", "0", "--api-key", " ",
                        "--served-model-name", ""))
    assert "--tp and --dp must be >= 1, got 0 and 1" in err and "--max-queued-requests must be >= 1, got 0" in err
    assert "--api-key must not be empty" in err and "--served-model-name must not be empty" in err
    assert "--log-level must be debug, info, warning or error, got 'bogus'" in refused(serve(tiny_ds, "--log-level",
                                                                                            "bogus"))


def test_model_dependent_flags_are_checked_before_the_ranks_start(tmp_path: Path, tiny_ds: str) -> None:
    """What config.json and the folder already say: a --tp that splits the heads unevenly, NEXTN without an MTP
    layer, no tokenizer. (Each used to surface as a traceback from every rank.) A dummy load needs no shards."""
    heads = json.loads((Path(tiny_ds) / "config.json").read_text())["num_attention_heads"]
    assert f"num_attention_heads={heads} is not divisible by the attention-TP size (--tp / --dp) 3" in refused(
        serve(tiny_ds, "--tp", "3"))
    no_mtp, bare = tmp_path / "no-mtp", tmp_path / "bare"
    shutil.copytree(tiny_ds, no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    (no_mtp / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    assert "has num_nextn_predict_layers=0" in refused(serve(str(no_mtp), "--speculative-algorithm", "NEXTN"))
    bare.mkdir()
    shutil.copy(Path(tiny_ds) / "config.json", bare / "config.json")  # a config alone: dummy weights
    assert "has no tokenizer (none of tokenizer.json" in refused(serve(str(bare), "--load-format", "dummy"))


def test_taken_port_fails_before_the_model_loads(tiny_ds: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        err = refused(serve(tiny_ds, "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port} (--host / --port)" in err
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a prefill server's bootstrap port, likewise
        port = taken.getsockname()[1]
        err = refused(serve(tiny_ds, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port),
                            "--port", str(free_port())))
    assert f"cannot listen on 127.0.0.1:{port} (--disaggregation-bootstrap-port)" in err


def test_a_store_address_node_0_cannot_listen_on_fails_before_the_ranks_start(tiny_ds: str) -> None:
    """--dist-init-addr on node 0 (rank 0's torch.distributed store binds it): a taken port, the HTTP port itself,
    or an address of another machine. Each ended in rank 0's traceback and exit 1; now one line and exit 2."""
    two = ("--tp", "2", "--page-size", "4")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        err = refused(serve(tiny_ds, *two, "--port", str(free_port()), "--dist-init-addr", f"127.0.0.1:{port}"))
    assert f"cannot listen on 127.0.0.1:{port} (--dist-init-addr)" in err
    port = free_port()
    err = refused(serve(tiny_ds, *two, "--port", str(port), "--dist-init-addr", f"127.0.0.1:{port}"))
    assert f"cannot listen on 127.0.0.1:{port} (--dist-init-addr)" in err
    err = refused(serve(tiny_ds, *two, "--nnodes", "2", "--port", str(free_port()), "--dist-init-addr",
                        "192.0.2.1:29500"))  # (TEST-NET-1: never a local address)
    assert "cannot listen on 192.0.2.1:29500 (--dist-init-addr)" in err


def test_broken_checkpoint_files_are_named(tmp_path: Path, tiny_ds: str) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_ds, model)
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-tensor
    assert f"{shard} is not a readable safetensors file" in refused(serve(str(model)))
    (model / "config.json").write_text('{"model_type": "deepseek_v32",')
    assert f"{model / 'config.json'} is not valid JSON" in refused(serve(str(model)))


def test_generate_runs_the_same_checks_before_loading(tmp_path: Path, tiny_ds: str) -> None:
    """`dsaserve generate` loads in-process, after serve's preflight: a context the model does not accept was
    taken, and a truncated shard ended in a traceback from the loader."""
    assert "--context-length 100000 is longer than the model's 4096" in refused(
        generate(tiny_ds, "--context-length", "100000"))
    model = tmp_path / "m"
    shutil.copytree(tiny_ds, model)
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert f"{shard} is not a readable safetensors file" in refused(generate(str(model)))


def test_a_rank_start_failure_names_the_rank_in_one_line(tmp_path: Path, tiny_ds: str) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_ds, model)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"  # readable files, a tensor missing: the loader finds it
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard))
    out = serve(str(model), "--port", str(free_port()), "--tp", "2", "--page-size", "4")
    assert out.returncode == 2, out.stderr[-3000:]  # a checkpoint that cannot be served, as preflight's refusals
    assert "error: rank 0 (DP group 0): " in out.stderr and "mlp.experts.3.up_proj" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # A flag only the engine can check (whether the pool fits the memory it finds): one line naming it, exit 2 (it
    # was a traceback and exit 1)
    out = serve(tiny_ds, "--port", str(free_port()), "--max-total-tokens", str(10**13))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"--max-total-tokens {10**13} needs " in out.stderr.splitlines()[-1], out.stderr[-3000:]


@pytest.mark.parametrize("moment", ["temporary folder made", "rank loading", "rank loaded"])
def test_sigterm_while_starting_exits_cleanly(tmp_path: Path, tiny_ds: str, moment: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = ServerProcess(tiny_ds, tmp_path / "server.log", env={"TMPDIR": str(tmp)}, **FLAGS)
    server.launch()
    # The server's own folder: tempfile's first gettempdir() writes and deletes a probe file there too, possibly
    # while imports run, before the server's handlers exist (a SIGTERM then ends it with -15 and no log).
    reached = {"temporary folder made": lambda: any(p.name.startswith("dsaserve-") for p in tmp.iterdir()),
               "rank loading": lambda: "Loading shards" in server.log(),
               "rank loaded": lambda: "KV pool" in server.log()}[moment]
    deadline = time.monotonic() + 120
    while not reached() and server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reached(), f"the server never reached '{moment}':\n{server.log()[-3000:]}"
    tree = descendants(server.proc.pid)
    assert tree or moment == "temporary folder made", "no rank process to outlive the server"
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(30)
    log = server.log()
    # 0 only if it became ready within the instant after its last rank loaded (then it shut down as usual)
    assert code == 143 or (moment == "rank loaded" and code == 0), log[-3000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert not list(tmp.iterdir()), "the temporary folder was left behind"
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in tree if is_running(pid)], "a child outlived the server"
