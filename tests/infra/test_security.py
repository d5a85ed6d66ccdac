"""Security basics: weights load from safetensors only, no code shipped with a checkpoint ever runs, nothing
from outside is unpickled, and every download is checked before use."""

import ast
from pathlib import Path

import pytest

from humpback_nb.infra import sources
from humpback_nb.infra.models import ModelError, resolve

PACKAGE = Path(__file__).resolve().parents[2] / "humpback_nb"


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def name_of(node: ast.Call) -> str:
    return ast.unparse(node.func)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_remote_code_and_no_unpickling_in_the_kit(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in calls(tree):
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code":
                assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, \
                    f"{path.name}:{node.lineno} passes trust_remote_code={ast.unparse(keyword.value)}"
        assert name_of(node) not in {"torch.load", "pickle.load", "pickle.loads", "joblib.load"}, \
            f"{path.name}:{node.lineno} unpickles with {name_of(node)}"
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "dill", "joblib", "cloudpickle"}, f"{path.name} imports a pickler"


def test_every_from_pretrained_of_a_model_asks_for_safetensors():
    checked = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in calls(tree):
            if name_of(node) == "AutoModelForCausalLM.from_pretrained" and "gguf_file" not in ast.unparse(node):
                text = ast.unparse(node)
                assert "kwargs" in text or "use_safetensors" in text, f"{path.name}:{node.lineno}: {text}"
                checked += 1
    assert checked


def test_a_checkpoint_of_pickled_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="safetensors"):
        resolve(str(tmp_path))


def test_every_download_is_pinned_by_version_and_sha256():
    for archive in {source.archive for source in sources.SOURCES.values()}:
        assert "==" in archive.requirement, archive
        assert len(archive.sha256) == 64 and int(archive.sha256, 16) >= 0, archive
