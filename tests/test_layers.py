"""The house's import arrows point down: a test that reads every module's imports and fails on an upward one.

Layers, bottom to top (docs/architecture.md draws them):

    nn                      torch only: generic blocks and the math they share
    models                  assemblies of nn blocks; never training, recipes, the CLI or torch.distributed glue
    generation, diffusion, interop, data, runs, checkpoint
    train, distributed, recipes
    cli                     imported by nothing but `__main__`

`config` (YAML <-> dataclasses, overrides, did-you-mean) and `checkpoint` (atomic safetensors I/O) stand beside
the tower as leaves: they import no other part of vermeil, so any layer may use them (`HybridConfig.from_yaml`
does) without an arrow pointing up.

Every `import` statement counts, also the lazy ones inside functions: a lazy import still couples the files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vermeil"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every `vermeil...` module named by an import statement in `path` (absolute or relative)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from vermeil import train` imports the subpackage `vermeil.train`.
            found.update(f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}"))
    return {m for m in found if m == "vermeil" or m.startswith("vermeil.")}


MODULES = {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}
# Plain data handling on torch and the standard library, usable from any layer.
LEAVES = ("vermeil.config", "vermeil.checkpoint")


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importer_package: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for module, imports in MODULES.items():
        if not _under(module, importer_package):
            continue
        for target in sorted(imports):
            if any(_under(target, f) for f in forbidden):
                out.append(f"{module} imports {target}")
    return out


def test_modules_found() -> None:
    # Guards the test itself: a wrong SRC would make every check below pass vacuously.
    assert "vermeil.nn.attention" in MODULES and "vermeil.models.llm" in MODULES
    assert "vermeil.nn.attention" in MODULES["vermeil.nn.blocks"]


def test_nn_imports_nothing_above_nn() -> None:
    bad = [
        f"{module} imports {target}"
        for module, imports in MODULES.items()
        if _under(module, "vermeil.nn")
        for target in sorted(imports)
        if not _under(target, "vermeil.nn")
    ]
    assert not bad, "vermeil.nn must import only torch and vermeil.nn:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "forbidden",
    [
        "vermeil.train",
        "vermeil.recipes",
        "vermeil.cli",
        "vermeil.distributed",
        "vermeil.runs",
        "vermeil.generation",
    ],
)
def test_models_do_not_import_upper_layers(forbidden: str) -> None:
    bad = _violations("vermeil.models", (forbidden,))
    assert not bad, "models are single-device assemblies of nn blocks:\n" + "\n".join(bad)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_only_leaves(leaf: str) -> None:
    bad = sorted(t for t in MODULES[leaf] if t not in LEAVES)
    assert not bad, f"{leaf} may be imported from every layer, so it imports no other part of vermeil: {bad}"


def test_nothing_imports_cli() -> None:
    bad = [
        f"{module} imports {target}"
        for module, imports in MODULES.items()
        if module not in ("vermeil.cli", "vermeil.__main__")
        for target in sorted(imports)
        if _under(target, "vermeil.cli")
    ]
    assert not bad, "the CLI is the top: only vermeil.__main__ may import it:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "lower", ["vermeil.generation", "vermeil.diffusion", "vermeil.interop", "vermeil.data"]
)
def test_middle_layers_do_not_import_training(lower: str) -> None:
    bad = _violations(lower, ("vermeil.train", "vermeil.recipes", "vermeil.cli"))
    assert not bad, f"{lower} sits below training and recipes:\n" + "\n".join(bad)


def test_run_folder_code_does_not_import_training() -> None:
    # generate and convert read run folders; reading one must not pull in the trainer.
    for module in ("vermeil.runs", "vermeil.checkpoint"):
        if module in MODULES:
            bad = [t for t in MODULES[module] if _under(t, "vermeil.train") or _under(t, "vermeil.recipes")]
            assert not bad, f"{module} imports {bad}"
