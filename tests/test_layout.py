"""The layering of docs/design.md, read from the project's own imports (top-level and inside
functions alike): no import cycles between modules, and every import points down. The
repository's top-level folders install as subpackages of ``bulwark`` (pyproject.toml's
package-dir), so every module is named, and imported, as ``bulwark.<folder>...``.

    bulwark           the public face (bulwark/__init__.py): may import anything below
    workers/client/   CLI, HTTP client, embedded serve: contract, store, service, workers.engine,
                      workers.jobs
    workers/jobs/     Celery app, task, trainer process: contract, store, workers.engine (never
                      the HTTP API)
    workers/engine/   data, models, runner, reports: contract, attacks, defenses
    service/          the HTTP API (app, routers): contract, store (and never torch)
    store/            the job store, its lifecycle, events, queue, artifact storage: contract
                      (and never torch)
    defenses/         attacks, contract
    attacks/          nothing of Bulwark
    contract/         the torch-free job contract: nothing of Bulwark
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bulwark", "contract", "attacks", "defenses", "workers", "store", "service")
# the folders installed under bulwark.
FOLDERS = ("contract", "attacks", "defenses", "workers", "store", "service")

# layer -> the layers it may import (itself always allowed), by installed name
_B = "bulwark."
ALLOWED = {
    _B + "contract": set(),
    _B + "workers": set(),  # the umbrella package itself holds nothing
    _B + "attacks": set(),
    _B + "defenses": {_B + "attacks", _B + "contract"},
    _B + "store": {_B + "contract"},
    _B + "service": {_B + "contract", _B + "store"},
    _B + "workers.engine": {_B + "contract", _B + "attacks", _B + "defenses"},
    _B + "workers.jobs": {_B + "contract", _B + "store", _B + "workers.engine"},
    _B + "workers.client": {_B + "contract", _B + "store", _B + "service", _B + "workers.engine",
                            _B + "workers.jobs"},
    "bulwark": {_B + "contract", _B + "attacks", _B + "defenses", _B + "store", _B + "service",
                _B + "workers.engine", _B + "workers.jobs", _B + "workers.client"},
}


def module_name(path: Path) -> str:
    """The installed name of a project file: contract/spec.py is bulwark.contract.spec."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "bulwark":
        parts.insert(0, "bulwark")
    return ".".join(parts)


def layer(module: str) -> str | None:
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            out[module_name(path)] = path
    return out


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `from pkg import name` may name a module or not
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for a in node.names:
                add(f"{target}.{a.name}")
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def test_every_import_points_down():
    bad = []
    for mod, deps in graph().items():
        src = layer(mod)
        assert src is not None, f"{mod} belongs to no layer of docs/design.md"
        for dep in deps:
            dst = layer(dep)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} ({src}) imports {dep} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above must be able to fail: feed them a tree that breaks both rules."""
    for pkg in ("contract", "service"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "contract" / "spec.py").write_text("from bulwark.service.app import x\n")
    (tmp_path / "service" / "app.py").write_text("from bulwark.contract.spec import y\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("contract", "service"))
    g = graph()
    assert g["bulwark.contract.spec"] == {"bulwark.service.app"}
    assert g["bulwark.service.app"] == {"bulwark.contract.spec"}
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "bulwark.contract.spec" in str(e)
    else:
        raise AssertionError("the cycle went unnoticed")
    try:
        test_every_import_points_down()
    except AssertionError as e:
        assert ("bulwark.contract.spec (bulwark.contract) imports bulwark.service.app "
                "(bulwark.service)") in str(e)
    else:
        raise AssertionError("the upward import went unnoticed")


def test_service_store_and_contract_never_import_torch():
    for mod, path in project_modules().items():
        if layer(mod) in (_B + "service", _B + "store", _B + "contract"):
            tree = ast.parse(path.read_text())
            names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
            names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom)}
            assert "torch" not in names, f"{mod} imports torch"


def bare_names(path: Path) -> list[str]:
    """Imports of a project folder by its bare name (``import contract.spec``), and strings
    that name a project module that way (``python -m workers.client.cli``): from the repository
    root they would load a second copy of the module, and installed they do not exist."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in FOLDERS]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in FOLDERS:
                found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = node.value.split()
            head = words[0].split(":")[0] if words else ""
            if head.split(".")[0] in FOLDERS and "." in head and "/" not in head:
                found.append(repr(node.value))
    return found


def test_every_project_module_is_named_under_bulwark():
    files = [p for pkg in PACKAGES + ("tests", "bench", "experiments", "examples")
             for p in (REPO / pkg).rglob("*.py") if p != Path(__file__).resolve()]
    bad = [f"{p.relative_to(REPO)}: {name}" for p in files for name in bare_names(p)]
    assert not bad, "bare project names (write bulwark.<folder>...):\n" + "\n".join(bad)


def test_the_bare_name_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import contract.spec\nfrom service.app import x\n"
                 "cmd = ['python', '-m', 'workers.client.cli']\nok = 'service.settings is fine?'\n")
    assert sorted(bare_names(f)) == sorted(["contract.spec", "service.app", "'workers.client.cli'",
                                            "'service.settings is fine?'"])


def needs_stack_mark(path: Path) -> bool:
    """A test module that builds the service stack (``Stack(``) or takes its fixtures
    (``stack``, ``alice``, ``bob``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stack":
            return True
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            if {a.arg for a in node.args.args} & {"stack", "alice", "bob"}:
                return True
    return False


def marks_of(path: Path) -> set[str]:
    """The marks a module's ``pytestmark`` gives every test in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                for t in node.targets):
            return {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)
                    and getattr(n.value, "attr", "") == "mark"}
    return set()


def test_the_fast_lane_never_starts_a_stack():
    """scripts/test.sh --fast deselects `stack`, `training` and `slow`: every module that
    starts the service stack must carry one of them, or the fast lane is not fast."""
    bad = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
           if needs_stack_mark(p) and not marks_of(p) & {"stack", "training", "slow"}]
    assert not bad, f"modules that start the stack without the `stack` mark: {bad}"


def test_the_lane_check_can_fail(tmp_path):
    plain = tmp_path / "test_a.py"
    plain.write_text("def test_x(alice):\n    pass\n")
    marked = tmp_path / "test_b.py"
    marked.write_text("import pytest\npytestmark = [pytest.mark.stack, pytest.mark.skipif(True)]\n"
                      "def test_x():\n    Stack(1, 2)\n")
    assert needs_stack_mark(plain) and marks_of(plain) == set()
    assert needs_stack_mark(marked) and marks_of(marked) == {"stack", "skipif"}
