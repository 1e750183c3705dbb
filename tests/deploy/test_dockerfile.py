"""The CPU Dockerfile. No Docker engine runs here, so the image is never built in the test run:
these checks parse it and hold it to the repository (paths it copies, the CLI command it runs,
the user and port the Helm chart expects)."""

from __future__ import annotations

import json
import re

import yaml

from tests.deploy._support import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_image_and_cpu_torch_before_the_package() -> None:
    steps = _instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [rest for op, rest in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "download.pytorch.org/whl/cpu" in runs[torch_at]
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (-e )?\.", r))
    assert torch_at < package_at


def test_copied_paths_exist_and_cover_the_package() -> None:
    sources = [s for op, rest in _instructions() if op == "COPY" for s in rest.split()[:-1]]
    assert all((ROOT / s).exists() for s in sources), sources
    package = {"platform", "adapters_store", "services", "migrations", "pyproject.toml", "setup.py"}
    assert package <= set(sources)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    assert not set(sources) & set(ignored)


def test_entrypoint_runs_a_real_cli_command() -> None:
    from lorafleet.services.cli.main import app

    steps = dict(_instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["lorafleet"]
    [command] = json.loads(steps["CMD"])
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}  # type: ignore[union-attr]
    assert command in registered


def test_user_and_port_match_the_helm_chart() -> None:
    steps = _instructions()
    values = yaml.safe_load((ROOT / "helm" / "lorafleet" / "values.yaml").read_text())
    [user] = [rest for op, rest in steps if op == "USER"]
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    assert ("EXPOSE", "8000") in steps
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "LORAFLEET_PORT=8000" in env and "LORAFLEET_HOST=0.0.0.0" in env
