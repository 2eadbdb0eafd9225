"""The set-up a newcomer relies on: pyproject and environment.yml agree, the commands exist."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements() -> dict[str, Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for group in meta["optional-dependencies"].values() for r in group]
    return {_norm(r.name): r for r in map(Requirement, reqs)}


def _environment_requirements() -> tuple[dict[str, SpecifierSet], str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs, python = {}, None
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("python="):
                python = item.split("=", 1)[1]
                continue
            if item == "pip":
                continue
            r = Requirement(item)
            specs[_norm(r.name)] = r.specifier
    return specs, python


def test_environment_yml_agrees_with_pyproject():
    py = _pyproject_requirements()
    env, python = _environment_requirements()
    assert set(env) == set(py), (
        f"only in pyproject: {sorted(set(py) - set(env))}; only in environment.yml: {sorted(set(env) - set(py))}")
    for name, req in py.items():
        assert env[name] == req.specifier, f"{name}: pyproject {req.specifier} != environment.yml {env[name]}"
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert python is not None and f"{python}.0" in requires


def test_torch_pins_match_the_machine_wheels():
    py = _pyproject_requirements()
    assert str(py["torch"].specifier) == "==2.14.1"
    assert str(py["torchvision"].specifier) == "==0.29.1"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci
    assert "make test" in readme and "make demo" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)


def test_console_script_points_at_cli_main():
    from mdlib.cli import build_parser, main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mdlib"] == "mdlib.cli:main"
    assert callable(main)
    assert {"mini", "course", "info"} <= set(build_parser()._subparsers._group_actions[0].choices)
