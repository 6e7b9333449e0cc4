"""Which way imports flow (docs/architecture.md): the packages import each other in one
direction only, and captioning and exporting never load Apache Beam."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "trainer", "inference", "pipelines", "orchestration")
# What each package may import of the project's other packages.
ALLOWED = {
    "schemas": set(),
    "trainer": {"schemas"},
    "inference": {"schemas", "trainer"},
    "pipelines": {"schemas", "trainer", "inference"},
    "orchestration": {"schemas", "trainer", "inference", "pipelines"},
}


def _imported_packages(path: Path) -> set[str]:
    """The project's top-level packages that a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_packages_below_it(package):
    wrong = {
        f"{path.relative_to(REPO)} imports {sorted(imported - ALLOWED[package] - {package})}"
        for path in sorted((REPO / package).glob("*.py"))
        if (imported := _imported_packages(path)) - ALLOWED[package] - {package}
    }
    assert not wrong


@pytest.mark.parametrize("module", ["inference.captioner", "inference.export"])
def test_captioning_and_exporting_never_import_apache_beam(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
