"""What `pip install` gives (issue 37 §2): torchattacks declared at a release that drags in no
torchvision, and a non-editable install that holds every file a job needs — it runs a job end
to end, migrates a job store and serves the dashboard's files, away from the repository."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bulwark", "contract", "attacks", "defenses", "workers", "store", "service")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared(name: str) -> str:
    """The requirement string pyproject.toml declares for ``name``."""
    hits = [r for r in PROJECT["dependencies"]
            if re.match(r"[A-Za-z0-9_.-]+", r).group().lower() == name]
    assert len(hits) == 1, f"{name} declared {len(hits)} times"
    return hits[0]


def test_torchattacks_is_declared_at_a_release_that_declares_nothing():
    req = declared("torchattacks")
    pin = re.fullmatch(r"torchattacks==([\d.]+)", req.replace(" ", ""))
    assert pin, f"an exact pin, so the attacks of every report are one code: {req!r}"
    assert md.version("torchattacks") == pin.group(1)
    # a release that declared torchvision would make pip install PyPI's CUDA build of it,
    # which fails to import beside the CPU torch
    assert not md.requires("torchattacks"), md.requires("torchattacks")
    assert "torchvision" not in " ".join(PROJECT["dependencies"])


def test_no_install_step_adds_a_package_outside_the_declared_ones():
    for path in (REPO / "scripts" / "install.sh", REPO / "docker" / "Dockerfile.worker",
                 REPO / "docker" / "Dockerfile.api"):
        text = path.read_text()
        assert "--no-deps \"torchattacks" not in text and "torchattacks==" not in text, path


@pytest.mark.slow
@pytest.mark.training
def test_a_non_editable_install_runs_a_job_away_from_the_repository(tmp_path):
    """The wheel pip builds from the clone, installed (not editable) into an environment whose
    other packages are this one's: `bulwark run` trains and evaluates (torchattacks' PGD and
    APGD) a digits job from a folder outside the repository, the installed store migrates a
    fresh SQLite database, and the dashboard's files are in the package."""
    target, venv, work = tmp_path / "site", tmp_path / "venv", tmp_path / "work"
    # the sources pip would see in a clean clone (a build/ folder left in the repository by an
    # earlier build would lend the wheel files its own configuration leaves out)
    src = tmp_path / "src"
    listed = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "--",
                                      "pyproject.toml", "README.md", "LICENSE", *PACKAGES],
                                     cwd=REPO, text=True).split()
    for name in listed:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "bulwark" / "__init__.py").is_file(), "installed as files, not a link"
    # a bare venv that sees the installed wheel first and this environment's other packages;
    # the editable install's finder is never loaded (its .pth is not processed there)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([py, "-c", purelib], text=True).strip())
    (site / "deps.pth").write_text(f"{target}\n{sysconfig.get_paths()['purelib']}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULWARK_", "PYTHON"))}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.check_output([py, "-c", "import bulwark; print(bulwark.__file__)"],
                                    text=True, env=env, cwd=tmp_path).strip()
    assert where.startswith(str(target)), where

    work.mkdir()
    spec = (REPO / "examples" / "digits-fgsm-elle.yaml").read_text()
    (work / "job.yaml").write_text(spec.replace("epochs: 15", "epochs: 2"))
    run = subprocess.run([py, str(target / "bin" / "bulwark"), "run", "job.yaml", "--quiet"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = (work / "runs" / "job" / "report.json")
    assert report.is_file() and (work / "runs" / "job" / "model.safetensors").is_file()
    assert "autoattack-apgd-ce" in run.stdout and "pgd20-2" in run.stdout, run.stdout
    environment = json.loads(report.read_text())["environment"]
    assert environment["torchattacks"] == md.version("torchattacks"), environment

    db = tmp_path / "jobs.db"
    check = (
        "import sys, sqlalchemy as sa; from importlib.resources import files;"
        "from bulwark.store.store import Store;"
        f"s = Store('sqlite:///{db}'); s.migrate();"
        "print(sorted(sa.inspect(s.engine).get_table_names()));"
        "ui = files('bulwark.service.ui');"
        "print(sorted(p.name for p in ui.iterdir() if not p.name.startswith('_')))"
    )
    out = subprocess.run([py, "-c", check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    tables, ui = out.stdout.strip().splitlines()
    assert "'jobs'" in tables and "alembic_version" in tables, tables
    shipped = sorted(p.name for p in (REPO / "service" / "ui").iterdir()
                     if not p.name.startswith("_"))
    assert ui == str(shipped), (ui, shipped)
