"""The package's two halves stay apart: the login side never loads torch or mpi4py, and no module reaches
into the other half except through the shared pieces directly in hpcml/."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "hpcml"
SHARED = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# The one object that crosses sbatch: built on the login node, it imports the compute half when called.
CROSSES_SBATCH = {"hpcml.job_entry": {"hpcml.compute"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_in(folder: str) -> list[str]:
    return sorted(module_name(p) for p in (PACKAGE / folder).rglob("*.py") if p.stem != "__main__")


def hpcml_imports(path: Path) -> set[str]:
    """Every hpcml module the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name == "hpcml" or name.startswith("hpcml.")}


def half_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("login", "compute", "localcluster", "bench"):
        return parts[1]
    return "shared"


def test_every_login_module_imports_without_torch_or_mpi4py():
    login = modules_in("login")
    assert "hpcml.login.cli" in login and "hpcml.login.launch" in login  # the scan found the folder
    code = (
        f"import importlib, sys\nfor m in {login + ['hpcml.' + s for s in SHARED]!r}: importlib.import_module(m)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mpi4py'))\n"
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the login side loaded {done.stdout.strip()}"


@pytest.mark.parametrize("half, allowed", [("login", {"login", "shared"}), ("compute", {"compute", "shared"})])
def test_a_half_imports_only_itself_and_the_shared_pieces(half, allowed):
    for path in (PACKAGE / half).rglob("*.py"):
        crossing = {m for m in hpcml_imports(path) if half_of(m) not in allowed and m != "hpcml"}
        assert not crossing, f"{module_name(path)} reaches across: {sorted(crossing)}"


def test_shared_pieces_import_only_each_other():
    for stem in SHARED:
        name = f"hpcml.{stem}"
        allowed = CROSSES_SBATCH.get(name, set())
        crossing = {
            m
            for m in hpcml_imports(PACKAGE / f"{stem}.py")
            if half_of(m) != "shared" and not any(m.startswith(a) for a in allowed)
        }
        assert not crossing, f"{name} is shared but imports {sorted(crossing)}"


def test_importing_hpcml_changes_no_signal_handler():
    """Importing any module of hpcml inside a launched job must not start recording TERM (a program that
    imports hpcml but never runs its training would otherwise ignore scancel until SIGKILL)."""
    every = ["hpcml", *("hpcml." + s for s in SHARED), *modules_in("login"), *modules_in("compute")]
    code = (
        "import signal, importlib\n"
        "before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}\n"
        f"for m in {every!r}: importlib.import_module(m)\n"
        "print(before == {s: signal.getsignal(s) for s in before})"
    )
    env = {"PATH": "/usr/bin:/bin", "SLURM_STEP_ID": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr
