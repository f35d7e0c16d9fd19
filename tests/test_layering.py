"""Imports point one way: storage <- pipeline <- workers, and only workers load the model libraries.

Checked on the syntax tree of every module, so an import inside a function counts as much as one at the
top; and once at run time, so that what a producer process really loads is seen too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"storage": 0, "pipeline": 1, "workers": 2}
MODEL_LIBRARIES = ("torch", "torchvision", "transformers", "bitsandbytes", "accelerate", "celery_batches",
                   "tokenizers", "safetensors")


def module_name(package: str, path: Path) -> str:
    return ".".join(["tuwen", package, *path.relative_to(ROOT / package).with_suffix("").parts])


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """Every module a file imports, absolute, with its line: top-level, in functions, relative ones too."""
    tree = ast.parse(source)
    here = module.split(".")[:-1]  # the package that relative imports start from
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def modules() -> list[tuple[str, Path]]:
    return [(pkg, p) for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_every_layer_has_modules() -> None:
    counts = {pkg: sum(1 for p, _ in modules() if p == pkg) for pkg in LAYERS}
    assert all(n >= 5 for n in counts.values()), counts


@pytest.mark.parametrize("package,path", modules(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_imports_point_one_way(package: str, path: Path) -> None:
    wrong = []
    for line, module in imports_of(path.read_text(encoding="utf-8"), module_name(package, path)):
        top = module.split(".")
        if top[0] in LAYERS:
            wrong.append(f"line {line}: {module} (a bare top-level name; import tuwen.{module})")
        if top[0] == "tuwen" and len(top) > 1 and top[1] in LAYERS and LAYERS[top[1]] > LAYERS[package]:
            wrong.append(f"line {line}: {module} (a higher layer)")
        if top[0] == "tuwen" and len(top) == 1 and package != "workers":
            wrong.append(f"line {line}: {module} (the top package composes layers; layers don't import it)")
        if top[0] in MODEL_LIBRARIES and package != "workers":
            wrong.append(f"line {line}: {module} (only workers load the model libraries)")
    assert not wrong, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(wrong)


def test_the_checker_sees_imports_inside_functions() -> None:
    """The walk must catch what a sys.modules check would miss: an import that only runs in a command."""
    source = "def f():\n    from tuwen.workers.engine.model import Runtime\n    import torch\nfrom . import schema\n"
    found = [m for _, m in imports_of(source, "tuwen.pipeline.probe")]
    assert "tuwen.workers.engine.model" in found and "torch" in found and "tuwen.pipeline.schema" in found


@pytest.mark.timeout(200)
def test_a_producer_process_loads_no_model_library() -> None:
    code = ("import tuwen.pipeline.client, tuwen.pipeline.cli, tuwen.pipeline.gateway.app, "
            "tuwen.pipeline.bulk.store, tuwen.pipeline.bulk.mmbench, tuwen.storage.factory\n"
            "import sys; print('\\n'.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(out.stdout.split())
    assert not {m for m in loaded if m.split(".")[0] in MODEL_LIBRARIES or m.startswith("tuwen.workers")}


# -- the worker's rooms ------------------------------------------------------------------------------------
#: A room of workers/ -> the rooms it must not import. The engine (the model, the running batch, the loop and
#: its policy) knows nothing of the queue; the Celery-facing worker knows nothing of the tooling.
ROOMS_APART = {"engine": {"serve", "bench", "demo"}, "serve": {"bench", "demo"}}
QUEUE_LIBRARIES = ("celery", "kombu", "celery_batches", "redis")


def test_workers_is_four_rooms_and_the_command_line() -> None:
    found = {p.name for p in (ROOT / "workers").iterdir() if not p.name.startswith(("_", "."))}
    assert found == {"engine", "serve", "bench", "demo", "cli.py"}, found


@pytest.mark.parametrize("path", sorted((ROOT / "workers").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_import_only_what_they_may(path: Path) -> None:
    room = path.relative_to(ROOT / "workers").parts[0]
    wrong = []
    for line, module in imports_of(path.read_text(encoding="utf-8"), module_name("workers", path)):
        top = module.split(".")
        if top[:2] == ["tuwen", "workers"] and len(top) > 2 and top[2] in ROOMS_APART.get(room, ()):
            wrong.append(f"line {line}: {module} (the {room} room does not import the {top[2]} room)")
        if room == "engine" and top[0] in QUEUE_LIBRARIES:
            wrong.append(f"line {line}: {module} (the engine knows nothing of the queue)")
    assert not wrong, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(wrong)


def test_every_package_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (the import name differs from the folders): a new
    subpackage must be added there, or it is missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["packages"])
    found = {"tuwen"} | {module_name(pkg, init).rsplit(".", 1)[0] for pkg in LAYERS
                         for init in (ROOT / pkg).rglob("__init__.py")}
    assert listed == found, (sorted(found - listed), sorted(listed - found))


# -- inside pipeline: core <- client <- bulk <- gateway <- cli -------------------------------------------------
PIPELINE_LEVELS = {"core": 0, "client": 1, "bulk": 2, "gateway": 3, "cli": 4}
#: None left: a bulk made over HTTP gets OpenAI's output files whoever refreshes it (the CLI too), so what
#: they are made of (openai_objects, responses_objects, envelope, errors.http_status) sits below bulk.
PIPELINE_EXCEPTIONS: set[str] = set()


def pipeline_level(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["tuwen", "pipeline"] or len(parts) < 3:
        return None
    if parts[2] in ("gateway", "bulk"):
        return parts[2]
    if parts[2] in ("client", "aclient", "conversation"):
        return "client"
    return "cli" if parts[2] in ("cli", "settings_doc") else "core"


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_imports_point_one_way(path: Path) -> None:
    module = module_name("pipeline", path)
    mine = pipeline_level(module)
    assert mine is not None
    wrong = [f"line {line}: {m} ({mine} does not import {other})"
             for line, m in imports_of(path.read_text(encoding="utf-8"), module)
             if (other := pipeline_level(m)) and PIPELINE_LEVELS[other] > PIPELINE_LEVELS[mine]]
    if str(path.relative_to(ROOT)) in PIPELINE_EXCEPTIONS:
        assert wrong, "no longer an exception: take it off PIPELINE_EXCEPTIONS"
        return
    assert not wrong, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(wrong)
