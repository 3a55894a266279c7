"""--chat-template FILE (SGLang's and vLLM's flag): the file's Jinja template replaces the tokenizer's in the
server (/tokenize, chat completions) and offline; an unreadable or malformed file, or one given beside
--tokenizer-mode deepseek_v32, stops the launch with a line naming it."""
from __future__ import annotations

from pathlib import Path

import httpx
import jinja2
import openai
import pytest

from dsaserve.engine.tokenizer import Tokenizer
from server_process import ServerProcess

pytestmark = pytest.mark.timeout(300)
TEMPLATE = ("{% for m in messages %}<<{{ m['role'] | upper }}>> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<ASSISTANT>>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def expected_ids(model: str) -> list[int]:
    """The prompt rendered by jinja2 itself (not through dsaserve or transformers), then tokenized."""
    text = jinja2.Environment().from_string(TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    return Tokenizer(model).hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


def test_the_server_renders_chats_with_the_given_template(tiny_ds: str, template: Path, tmp_path: Path) -> None:
    ids = expected_ids(tiny_ds)
    assert Tokenizer(tiny_ds).hf.apply_chat_template(MESSAGES, add_generation_prompt=True) != ids  # another format
    with ServerProcess(tiny_ds, tmp_path / "server.log", page_size=4, max_total_tokens=2048,
                       chat_template=str(template)) as server:
        r = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
        assert r["tokens"] == ids
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == len(ids)


def test_offline_engine_renders_with_the_given_template(tiny_ds: str, template: Path) -> None:
    from dsaserve.llm import LLM
    llm = LLM(tiny_ds, chat_template=str(template), page_size=4, max_total_tokens=1024, skip_server_warmup=True)
    assert llm.engine.tokenizer.chat(MESSAGES) == expected_ids(tiny_ds)


def test_bad_template_files_stop_the_launch(tiny_ds: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dsaserve.cli import main
    from dsaserve.server.preflight import checked_args
    from dsaserve.server_args import ServerArgs
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}\n")  # the loop never ends
    port = "1"  # never bound: every check below fails before the port is
    assert main(["serve", "--model-path", tiny_ds, "--port", port, "--chat-template", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"error: --chat-template {broken}: not a valid Jinja template: " in err and "endfor" in err
    missing = tmp_path / "missing.jinja"
    assert main(["serve", "--model-path", tiny_ds, "--port", port, "--chat-template", str(missing)]) == 2
    assert f"error: --chat-template {missing}: cannot read it as a UTF-8 text file" in capsys.readouterr().err
    assert main(["serve", "--model-path", tiny_ds, "--chat-template", str(missing), "--tokenizer-mode",
                 "deepseek_v32"]) == 2
    assert "--chat-template replaces the tokenizer's template" in capsys.readouterr().err
    good = tmp_path / "good.jinja"
    good.write_text(TEMPLATE)
    monkeypatch.chdir(tmp_path)  # a relative path reaches the ranks as an absolute one
    args = checked_args(ServerArgs(model_path=tiny_ds, chat_template="good.jinja"))
    assert args.chat_template == str(good.resolve())


def test_other_nodes_start_without_the_template_file(tiny_ds: str, tmp_path: Path) -> None:
    """Chats render on rank 0 (node 0) only: a node of a multi-node launch whose machine lacks the file, or holds
    it at another path, still passes the launch checks (they read the file on node 0 only)."""
    from dsaserve.server.preflight import checked_args
    from dsaserve.server_args import ServerArgs
    missing = str(tmp_path / "only-on-node-0.jinja")
    nodes = dict(model_path=tiny_ds, chat_template=missing, tp=2, nnodes=2, dist_init_addr="127.0.0.1:29999")
    assert checked_args(ServerArgs(node_rank=1, **nodes)).chat_template == missing
    with pytest.raises(ValueError, match="cannot read it as a UTF-8 text file"):
        checked_args(ServerArgs(node_rank=0, **nodes))
