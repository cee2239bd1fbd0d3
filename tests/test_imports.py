"""The runtime path must not pull in torch/transformers/optimum, and the package has no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "epic_ort"
RUNTIME_MODULES = [
    "epic_ort", "epic_ort.cli.main", "epic_ort.decoding", "epic_ort.settings", "epic_ort.chooser",
    "epic_ort.requests", "epic_ort.epic", "epic_ort.epic.chooser", "epic_ort.runtime", "epic_ort.calibration.calibrate",
    "epic_ort.calibration.store", "epic_ort.evaluation",
]


def test_runtime_imports_no_torch():
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {RUNTIME_MODULES!r}];"
        "bad=[m for m in ('torch','transformers','optimum') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"heavy modules imported: {out.stdout} {out.stderr}"


def test_cli_help_does_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from epic_ort.cli.main import main;"
        "r=CliRunner().invoke(main, ['generate','--help']); assert r.exit_code==0, r.output;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """epic_ort modules `path` imports, at module level or inside functions (a deferred import is
    still a dependency); not those under `if TYPE_CHECKING:`, which never run."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("epic_ort"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("epic_ort"))
    return out


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages expose names, not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and modules[m].name == "__init__.py")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if t.startswith(m + "."):
                continue
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [m, t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_modules_stay_small():
    """No module over ~400 lines (the guide's limit, with a little slack)."""
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big
