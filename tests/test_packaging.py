"""The package as pip installs it: declared dependencies that agree with requirements.txt, and a
non-editable install (and an editable one) whose commands and configs work from outside the source tree."""
import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
SOURCES = ("setup.py", "pyproject.toml", "chinese_clip", "recipes", "data_tools")


def pins() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return {canonicalize_name(req.name): req for req in map(Requirement, filter(None, lines))}


def imported_distributions() -> set[str]:
    """The distributions whose modules the installed code (the library, recipes and data tools) imports."""
    modules = set()
    for folder in ("chinese_clip", "recipes", "data_tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    return {canonicalize_name(dist) for module in modules for dist in owners.get(module, [])}


def test_declared_dependencies_agree_with_the_pins():
    declared = {canonicalize_name(req.name): req for req in map(Requirement, PYPROJECT["project"]["dependencies"])}
    pinned = pins()
    for name, req in declared.items():
        assert name in pinned, f"{name} is a dependency in pyproject.toml but not pinned in requirements.txt"
        version = next(iter(pinned[name].specifier)).version
        assert req.specifier.contains(version), f"requirements.txt pins {name}=={version}, outside {req.specifier}"
    imported_but_undeclared = (imported_distributions() & pinned.keys()) - declared.keys()
    assert not imported_but_undeclared, f"imported and pinned but not declared in pyproject.toml: {imported_but_undeclared}"


def fresh_venv(path: Path) -> Path:
    """A virtual environment whose dependencies are this one's site-packages (through a .pth file):
    installing the project into it downloads nothing. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def pip_install(python: Path, source: Path, *args: str) -> None:
    # --ignore-installed: this environment's own editable install (visible through the .pth) is not replaced.
    subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-deps",
                    "--ignore-installed", "--quiet", *args, str(source)], check=True, cwd=source.parent)


def copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, dest / name)
    return dest


# Runs each installed command's script file with --help in one interpreter, so the heavy imports are paid once.
RUN_HELP = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
    results[script] = [code, out.getvalue()]
print(json.dumps(results))
"""


def where(python: Path, module: str, outside: Path) -> Path:
    origin = subprocess.run([python, "-c", f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"],
                            capture_output=True, text=True, check=True, cwd=outside).stdout.strip()
    return Path(origin)


@pytest.mark.slow
def test_a_wheel_install_runs_every_command_outside_the_source_tree(tmp_path):
    source = copy_sources(tmp_path / "source")
    env = tmp_path / "env"
    python = fresh_venv(env)
    pip_install(python, source)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    assert where(python, "chinese_clip", outside).is_relative_to(env)
    configs = where(python, "chinese_clip.recipes", outside).parent / "configs"
    assert {p.name for p in configs.glob("*.yaml")} == {p.name for p in (ROOT / "recipes" / "configs").glob("*.yaml")}

    scripts = [str(env / "bin" / name) for name in SCRIPTS]
    helped = subprocess.run([python, "-c", RUN_HELP, *scripts], capture_output=True, text=True, cwd=outside,
                            env={**os.environ, "COLUMNS": "1000"})  # help lines unwrapped
    assert helped.returncode == 0, helped.stderr[-3000:]
    results = json.loads(helped.stdout.splitlines()[-1])
    for script, (code, out) in results.items():
        assert code == 0 and out.startswith(f"usage: {Path(script).name} "), f"{script} --help: exit {code}\n{out}"
    # The pretraining command's default config is the installed copy.
    assert f"(default: {configs / 'tiny_synthetic.yaml'})" in results[str(env / "bin" / "chinese-clip-pretrain")][1]


@pytest.mark.slow
def test_an_editable_install_maps_the_recipes_to_the_source_folders(tmp_path):
    source = copy_sources(tmp_path / "source")
    python = fresh_venv(tmp_path / "env")
    pip_install(python, source, "--editable")
    assert where(python, "chinese_clip.recipes.pretrain", tmp_path) == source / "recipes" / "pretrain.py"
    assert where(python, "chinese_clip.data_tools.build_shards", tmp_path) == source / "data_tools" / "build_shards.py"
