"""The layering of docs/design.md, read from the project's own imports (top-level and inside
functions alike): no import cycles between modules, and every import points down.

    bulwark/          the public face: may import anything below
    workers/client/   CLI and HTTP client: contract, service, workers.engine, workers.jobs
    workers/jobs/     Celery app, task, trainer process, embedded serve: contract, service, engine
    workers/engine/   data, models, runner, reports: contract, attacks, defenses
    service/          the API and its store: contract only (and never torch)
    defenses/         attacks, contract
    attacks/          nothing of Bulwark
    contract/         the torch-free job contract: nothing of Bulwark
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bulwark", "contract", "attacks", "defenses", "workers", "service")

# layer -> the layers it may import (itself always allowed)
ALLOWED = {
    "contract": set(),
    "workers": set(),  # the umbrella package itself holds nothing
    "attacks": set(),
    "defenses": {"attacks", "contract"},
    "service": {"contract"},
    "workers.engine": {"contract", "attacks", "defenses"},
    "workers.jobs": {"contract", "service", "workers.engine"},
    "workers.client": {"contract", "service", "workers.engine", "workers.jobs"},
    "bulwark": {"contract", "attacks", "defenses", "service", "workers.engine", "workers.jobs",
                "workers.client"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
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
    (tmp_path / "contract" / "spec.py").write_text("from service.app import x\n")
    (tmp_path / "service" / "app.py").write_text("from contract.spec import y\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("contract", "service"))
    g = graph()
    assert g["contract.spec"] == {"service.app"} and g["service.app"] == {"contract.spec"}
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "contract.spec" in str(e)
    else:
        raise AssertionError("the cycle went unnoticed")
    try:
        test_every_import_points_down()
    except AssertionError as e:
        assert "contract.spec (contract) imports service.app (service)" in str(e)
    else:
        raise AssertionError("the upward import went unnoticed")


def test_service_and_contract_never_import_torch():
    for mod, path in project_modules().items():
        if layer(mod) in ("service", "contract"):
            tree = ast.parse(path.read_text())
            names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
            names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom)}
            assert "torch" not in names, f"{mod} imports torch"
