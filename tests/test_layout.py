"""Layout rules: platform/ never shadows the stdlib, the library never imports jobs/ or serve/, entrypoints are thin."""

import ast
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_still_works_from_the_repo_root():
    code = "import platform; print(platform.system()); print(platform.__file__)"
    system, path = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    # The reference: the same interpreter in isolated mode (-I: no cwd, no PYTHONPATH on sys.path), away from the repo.
    real = subprocess.run([sys.executable, "-I", "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout.splitlines()
    assert system in ("Linux", "Darwin", "Windows") and system == real[0], f"platform.system() from the repo root gave {system!r}, isolated {real[0]!r}"
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    assert Path(path).resolve() == stdlib / "platform.py" == Path(real[1]).resolve(), (
        f"`import platform` from the repo root resolved to {path}, not the stdlib's {stdlib / 'platform.py'}: platform/ shadows it"
    )


def test_platform_folder_holds_no_python_file():
    assert not list((REPO / "platform").glob("*.py")), "platform/ must hold only the lorag package"


def test_lorag_never_imports_jobs_or_serve():
    for py in (REPO / "platform" / "lorag").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("jobs", "serve"), f"{py.name} imports {n}: dependencies point from jobs/serve to lorag only"


def test_importing_lorag_modules_does_no_heavy_work():
    code = "import sys, lorag.config, lorag.data, lorag.adapters, lorag.retrieval; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"importing config/data/adapters/retrieval pulled in torch/ray: {out}"


def test_job_entrypoints_have_help():
    for job in ("jobs.ingest", "jobs.finetune", "jobs.evaluate"):
        r = subprocess.run([sys.executable, "-m", job, "--help"], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0 and "--config" in r.stdout and "ray job submit" in r.stdout, r.stderr


def test_serve_config_points_at_the_builder_and_a_real_config():
    sc = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    app = sc["applications"][0]
    assert app["import_path"] == "serve.app:app"
    assert (REPO / app["args"]["config"]).is_file()


def test_nothing_reads_outside_the_repository():
    """A plain clone passes alone: no test, script or Makefile target reaches ../shared (or any
    neighbour of the checkout). `.ci/run` runs the suite from a clone with nothing beside it."""
    files = subprocess.run(["git", "ls-files", "*.py", "Makefile", ".ci/*", "*.sh", "*.toml", "*.cfg"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"""\.\./shared|parents?\b[^\n]*["']shared["']""")
    offenders = [f for f in files if f != "tests/test_layout.py" and pattern.search((REPO / f).read_text(errors="replace"))]
    assert not offenders, f"these read outside the repository (copy what they need in): {offenders}"
