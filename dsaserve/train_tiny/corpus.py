"""The training corpus: docstrings of the running interpreter's standard library, present offline everywhere.

Every module, class and function docstring becomes a document, in file order (so a long window holds
one module's related docstrings: context that sparse attention must pick from). Short first
paragraphs also become chat turns ("What does json.dumps do?" -> the summary), so the chat template
is trained too. Files are split into train / held-out by a CRC of their module name: the same files are
held out on every Python version.
"""
from __future__ import annotations

import ast
import inspect
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dsaserve.tiny import SPECIALS

# Not prose about the library (tests, demos, vendored or generated code) or the GUI toolkit.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
              "ensurepip", "tkinter", "__pycache__", "__phello__"}
HELD_OUT_EVERY = 10  # one file in 10 (by path hash) is held out
BOS, EOS, _, USER, ASSISTANT = SPECIALS


@dataclass(frozen=True)
class Corpus:
    train: list[str]  # documents, each a complete text with its special tokens
    held_out: list[str]
    files: int


def stdlib_files() -> list[tuple[str, Path]]:
    """(module name, path) of the standard library's Python sources, sorted by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _SKIP_DIRS or not rel.parts[0].isidentifier() and len(rel.parts) > 1:
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((module, path))
    out.sort()
    if not out:
        raise RuntimeError(f"no Python sources under {root}: the corpus needs the standard library's .py files")
    return out


def module_documents(module: str, path: Path) -> list[str]:
    """The docstrings of one file as documents, plus chat turns asking what each function or class does."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node, qualname in _documented(tree, module):
        text = inspect.cleandoc(ast.get_docstring(node, clean=False) or "").strip()
        if len(text) < 20:
            continue
        docs.append(f"{BOS}{text}{EOS}")
        summary = text.split("\n\n")[0].replace("\n", " ").strip()
        public = not qualname.split(".")[-1].startswith("_")
        if not isinstance(node, ast.Module) and 20 <= len(summary) <= 300 and public:
            docs.append(f"{BOS}{USER}What does {qualname} do?{ASSISTANT}{summary}{EOS}")
    return docs


def _documented(tree: ast.Module, module: str) -> list[tuple[ast.AST, str]]:
    found: list[tuple[ast.AST, str]] = [(tree, module)]

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                found.append((child, name))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return found


def build_corpus(limit_files: int | None = None) -> Corpus:
    """`limit_files` (tests) keeps that many training files and one held-out file per eight."""
    files = stdlib_files()
    held_files = [f for f in files if zlib.crc32(f[0].encode()) % HELD_OUT_EVERY == 0]
    train_files = [f for f in files if zlib.crc32(f[0].encode()) % HELD_OUT_EVERY != 0]
    if limit_files is not None:
        train_files, held_files = train_files[:limit_files], held_files[:max(1, limit_files // 8)]
    train = [d for module, path in train_files for d in module_documents(module, path)]
    held = [d for module, path in held_files for d in module_documents(module, path)]
    if not train or not held:
        raise RuntimeError(f"the corpus has {len(train)} train / {len(held)} held-out documents: "
                           f"too few standard-library docstrings under {sysconfig.get_paths()['stdlib']}")
    return Corpus(train, held, len(train_files) + len(held_files))


def token_stream(docs: list[str], tokenizer: object) -> torch.Tensor:
    """All documents encoded and concatenated (each carries its own BOS / EOS)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):  # type: ignore[attr-defined]
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows [N, length] of the stream (the tail that does not fill one is dropped)."""
    n = stream.numel() // length
    return stream[: n * length].view(n, length)
