"""docker-compose.yml and docker/ agree with the code they deploy (docs/design.md,
"Deployment shapes").

No Docker engine is needed: the compose file is read with PyYAML, interpolated with the
placeholders of .env.example the way `docker compose` does, and checked against the real
Settings, Celery app, worker command line, migrations and FastAPI factory.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from bulwark.store.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SERVICES = ("redis", "postgres", "minio", "minio-bucket", "migrate", "api", "reaper",
            "worker-gpu0", "flower")
APP_SERVICES = ("api", "reaper", "worker-gpu0")  # the ones that talk to DB, Redis and jobs
WORKER = "worker-gpu0"
PREFIX = "BULWARK_"
# BULWARK_* variables read outside Settings, with the file that reads them.
OUTSIDE_SETTINGS = {"BULWARK_DATA_ROOT": "workers/engine/data.py"}
# What the API image leaves out (docker/Dockerfile.api API_SKIP) must never be imported there.
# (numpy stays in: the API reads uploaded .npz datasets with it)
HEAVY = {"torch", "scipy", "scikit-learn", "safetensors"}
IMPORT_NAMES = {"scikit-learn": "sklearn"}


# ------------------------------------------------------------------------------ helpers
def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str], missing: set[str]):
    """Compose interpolation: ``$$``, ``$V``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        expr = m.group(2) if m.group(2) is not None else m.group(3)
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?]?)(.*)", expr).groups()
        if name in env and not (op.startswith(":") and env[name] == ""):
            return env[name]
        if op.endswith("-"):
            return arg
        missing.add(name)
        return ""

    return _VAR.sub(sub, value)


def duration_seconds(text: str) -> float:
    """A compose duration ("120s", "1m30s", "2m") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(text))
    assert parts and "".join(a + b for a, b in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def argv(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(args: list[str], *names: str) -> str | None:
    """Value of ``-x V`` / ``--long V`` / ``--long=V`` in an argv."""
    for i, a in enumerate(args):
        if a in names:
            return args[i + 1]
        for n in names:
            if n.startswith("--") and a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def health_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for short- and long-syntax volumes."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
        else:
            source, target, *mode = v.split(":")
            out[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return out


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in (REPO / "docker" / name).read_text().splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        buf += raw.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            lines.append(buf.strip())
        buf = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The argv of every ``pip install`` in RUN instructions (after ``install``)."""
    out = []
    for kind, args in instructions:
        if kind != "RUN":
            continue
        lex = shlex.shlex(args, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words: list[str] = []
        for tok in [*lex, "&&"]:
            if tok and set(tok) <= set("&|;<>()"):  # a shell operator ends a command
                if len(words) > 1 and words[0].endswith("pip") and words[1] == "install":
                    out.append(words[2:])
                words = []
            else:
                words.append(tok)
    return out


def build_arg(instructions: list[tuple[str, str]], name: str) -> str:
    for kind, args in instructions:
        if kind == "ARG" and args.startswith(name + "="):
            return shlex.split(args.split("=", 1)[1])[0]
    raise AssertionError(f"ARG {name} not found")


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dotenv_example() -> dict[str, str]:
    return dotenv(REPO / ".env.example")


@pytest.fixture(scope="module")
def compose(raw, dotenv_example) -> dict:
    missing: set[str] = set()
    doc = interpolate(raw, dotenv_example, missing)
    assert not missing, f"variables used by docker-compose.yml but not in .env.example: {missing}"
    return doc


@pytest.fixture(scope="module")
def svc(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


# ------------------------------------------------------------------------------ the file
def test_compose_parses_with_all_services(svc):
    assert set(SERVICES) <= set(svc), f"missing services: {set(SERVICES) - set(svc)}"


def test_env_example_holds_only_placeholders(dotenv_example):
    secrets = {k: v for k, v in dotenv_example.items() if "PASSWORD" in k}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_PASSWORD",
            "MINIO_ROOT_PASSWORD"} <= set(secrets)
    for key, value in secrets.items():
        assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored


# ------------------------------------------------------------------------------ settings
def test_every_bulwark_variable_is_read_by_the_code(svc):
    fields = set(Settings.model_fields)
    for name, service in svc.items():
        for key in env_of(service):
            if not key.startswith(PREFIX):
                continue
            if key in OUTSIDE_SETTINGS:
                tree = ast.parse((REPO / OUTSIDE_SETTINGS[key]).read_text())
                consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
                assert key in consts, f"{key} is no longer read by {OUTSIDE_SETTINGS[key]}"
                continue
            field = key[len(PREFIX):].lower()
            assert field in fields, f"{name}: {key} is not a Settings field (silently ignored)"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_production_settings_point_at_the_shared_services(name, svc, dotenv_example,
                                                          monkeypatch):
    from sqlalchemy.engine import make_url

    env = env_of(svc[name])
    for key in ("DATABASE_URL", "REDIS_URL", "ARTIFACT_ROOT"):
        assert env.get(PREFIX + key), f"{name} lacks {PREFIX}{key}"
    s = settings_from(env, monkeypatch)
    db = make_url(s.database_url)
    assert db.drivername == "postgresql+psycopg"  # psycopg 3, a pyproject dependency
    assert db.host == "postgres" and db.host in svc and (db.port or 5432) == 5432
    pg = env_of(svc["postgres"])
    assert (db.username, db.password, db.database) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    rd = make_url(s.redis_url)
    assert rd.drivername == "redis" and rd.host == "redis" and rd.host in svc
    assert rd.password == dotenv_example["REDIS_PASSWORD"]
    assert s.artifact_root is not None and s.artifact_root.is_absolute()
    if name == "api":
        assert s.reaper_enabled is False, "the reaper runs as its own single replica"


def test_reaper_is_a_single_replica(svc):
    reaper = svc["reaper"]
    assert argv(reaper)[:2] == ["bulwark", "reaper"]
    assert (reaper.get("deploy") or {}).get("replicas", 1) == 1
    assert "scale" not in reaper


# ------------------------------------------------------------------------------ redis, health
def test_redis_is_durable_private_and_password_protected(svc, dotenv_example):
    redis = svc["redis"]
    args = argv(redis)
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--appendfsync") == "everysec"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert option(args, "--requirepass") == dotenv_example["REDIS_PASSWORD"] != ""
    assert "ports" not in redis, "Redis must not be published"
    assert "/data" in mounts(redis), "the append-only file needs a volume"
    # the healthcheck reads $REDIS_PASSWORD inside the container: it must be set there
    assert "$REDIS_PASSWORD" in " ".join(health_argv(redis))
    assert env_of(redis).get("REDIS_PASSWORD") == dotenv_example["REDIS_PASSWORD"]


def test_healthchecks(svc):
    for name in ("redis", "postgres", "api", WORKER):
        assert health_argv(svc[name]), f"{name} has no healthcheck"
    assert health_argv(svc["postgres"])[0] == "pg_isready"
    for name in ("api", "reaper", WORKER, "flower", "migrate"):
        for key in ("interval", "timeout", "start_period"):
            value = (svc[name].get("healthcheck") or {}).get(key)
            if value is not None:
                duration_seconds(value)


def test_api_runs_the_factory_and_checks_its_healthz(svc, tmp_path):
    args = argv(svc["api"])
    assert args[0] == "uvicorn" and "--factory" in args
    target = next(a for a in args[1:] if ":" in a and not a.startswith("-"))
    module, attr = target.split(":")
    factory = getattr(importlib.import_module(module), attr)
    assert callable(factory)
    port = option(args, "--port")
    assert f"{port}:{port}" in [str(p) for p in svc["api"]["ports"]]
    url = re.search(r"https?://[^'\"\s]+", " ".join(health_argv(svc["api"]))).group()
    assert url.startswith(f"http://127.0.0.1:{port}/")
    app = factory(Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}",
                           redis_url="redis://127.0.0.1:1/0", artifact_root=tmp_path,
                           reaper_enabled=False))
    path = "/" + url.split("/", 3)[3]
    assert "get" in app.openapi()["paths"].get(path, {}), f"the API serves no GET {path}"


# ------------------------------------------------------------------------------ the worker
def test_worker_stops_cold_within_its_grace_period(svc):
    from bulwark.store.queue import celery_config

    worker = svc[WORKER]
    env = env_of(worker)
    assert env.get("REMAP_SIGTERM") == "SIGQUIT"
    # docs/design.md's broker settings: worker_soft_shutdown_timeout=60; the grace period
    # must outlast it
    soft = celery_config(Settings()).get("worker_soft_shutdown_timeout", 60.0)
    assert duration_seconds(worker["stop_grace_period"]) > max(soft, 60.0)


def test_worker_reserves_exactly_its_gpu(svc):
    worker = svc[WORKER]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert not ("count" in dev and "device_ids" in dev), "count and device_ids are exclusive"
    assert dev["device_ids"] == ["0"]  # strings, as the compose schema requires
    env = env_of(worker)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # the reserved GPU is device 0 inside
    assert env["BULWARK_DEVICE"].startswith("cuda")


def test_worker_command_is_the_code_s_worker_command(svc, monkeypatch):
    from celery import Celery

    from bulwark.workers.client.serve import worker_command

    worker = svc[WORKER]
    args = argv(worker)
    assert args[0] == "celery" and args[3] == "worker"
    app = importlib.import_module(option(args, "-A", "--app")).app
    assert isinstance(app, Celery)
    assert option(args, "-P", "--pool") == "prefork"
    assert option(args, "-c", "--concurrency") == "1"
    assert option(args, "--max-tasks-per-child") == "1"
    assert "-E" in args or "--task-events" in args
    queue = settings_from(env_of(worker), monkeypatch).queue
    assert option(args, "-Q", "--queues") == queue == Settings.model_fields["queue"].default
    node = option(args, "-n", "--hostname")
    assert node == "gpu0@%h"
    # the same argv `bulwark worker` would exec (workers/client/serve.py), minus `python -m`
    assert args[1:] == worker_command(queue=queue, name=node)[3:]
    # the healthcheck pings this very node through the same Celery app
    health = health_argv(worker)
    assert health[:5] == ["celery", "-A", option(args, "-A"), "inspect", "ping"]
    assert option(health, "-d", "--destination") == node.replace("%h", "$HOSTNAME")
    hc = worker["healthcheck"]
    assert (duration_seconds(hc["interval"]), duration_seconds(hc["timeout"]),
            duration_seconds(hc["start_period"])) == (60, 30, 60)


def test_artifacts_go_through_the_minio_bucket(svc, compose, dotenv_example, monkeypatch):
    from bulwark.store.settings import parse_s3_url

    minio = env_of(svc["minio"])
    bucket_job = " ".join(argv(svc["minio-bucket"]))
    for name in APP_SERVICES:
        env = env_of(svc[name])
        s = settings_from(env, monkeypatch)
        bucket, prefix = parse_s3_url(s.artifact_url)
        assert bucket == env_of(svc["minio-bucket"])["S3_BUCKET"] and prefix, name
        assert urlsplit(s.s3_endpoint_url).hostname == "minio" and "minio" in svc, name
        assert urlsplit(s.s3_endpoint_url).port == 9000, name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]), name
    assert "mc mb" in bucket_job and "$S3_BUCKET" in bucket_job
    assert minio["MINIO_ROOT_PASSWORD"] == dotenv_example["MINIO_ROOT_PASSWORD"]
    assert "ports" not in svc["minio"], "MinIO must not be published"
    assert "/data" in mounts(svc["minio"]), "the bucket needs a volume"
    assert health_argv(svc["minio"])[:2] == ["mc", "ready"]
    # no shared filesystem: each service's artifact root is a scratch volume of its own
    api_env, worker_env = env_of(svc["api"]), env_of(svc[WORKER])
    root = api_env["BULWARK_ARTIFACT_ROOT"]
    assert worker_env["BULWARK_ARTIFACT_ROOT"] == root
    api_src, _ = mounts(svc["api"])[root]
    worker_src, worker_ro = mounts(svc[WORKER])[root]
    assert api_src != worker_src and not worker_ro
    assert {api_src, worker_src} <= set(compose["volumes"]), "named volumes, declared on top"
    data_src, data_ro = mounts(svc[WORKER])[worker_env["BULWARK_DATA_ROOT"]]
    assert data_src and data_ro, "the data root is mounted read-only"


def test_startup_order(svc):
    for name in APP_SERVICES:
        deps = svc[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["minio-bucket"]["condition"] == "service_completed_successfully", name
    assert svc["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_migrate_is_one_shot_and_really_migrates(svc, tmp_path, monkeypatch):
    from sqlalchemy import create_engine, inspect

    from bulwark.store.settings import get_settings

    migrate = svc["migrate"]
    assert migrate["restart"] == "no"
    args = argv(migrate)
    assert args[:2] == ["python", "-c"]
    url = f"sqlite:///{tmp_path / 'm.db'}"
    settings_from({"BULWARK_DATABASE_URL": url}, monkeypatch)
    get_settings.cache_clear()
    try:
        exec(compile(args[2], "<migrate>", "exec"), {})
    finally:
        get_settings.cache_clear()
    tables = set(inspect(create_engine(url)).get_table_names())
    assert "alembic_version" in tables and len(tables) > 1


def test_flower_is_authenticated_and_local(svc, dotenv_example):
    flower = svc["flower"]
    args = argv(flower)
    assert args[:4] == ["celery", "-A", "bulwark.workers.jobs.celery_app", "flower"]
    assert option(args, "--basic-auth") == (
        f"{dotenv_example['FLOWER_USER']}:{dotenv_example['FLOWER_PASSWORD']}")
    ports = [str(p) for p in flower["ports"]]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    assert env_of(flower)["BULWARK_REDIS_URL"] == env_of(svc["api"])["BULWARK_REDIS_URL"]


# ------------------------------------------------------------------------------ images
def test_images_are_built_from_the_dockerfiles(svc):
    for name, df in [("api", "Dockerfile.api"), ("reaper", "Dockerfile.api"),
                     ("migrate", "Dockerfile.api"), ("flower", "Dockerfile.api"),
                     (WORKER, "Dockerfile.worker")]:
        build = svc[name]["build"]
        assert build["dockerfile"] == f"docker/{df}" and (REPO / build["dockerfile"]).is_file()
        assert (REPO / build["context"]).resolve() == REPO
    assert len({svc[n]["image"] for n in ("api", "reaper", "migrate", "flower")}) == 1


def test_api_image_has_no_torch(pyproject):
    inst = dockerfile("Dockerfile.api")
    base = next(a for k, a in inst if k == "FROM")
    m = re.match(r"python:(\d+)\.(\d+)", base)
    assert m and (int(m[1]), int(m[2])) >= (3, 11), base  # requires-python >= 3.11
    skip = set(build_arg(inst, "API_SKIP").split())
    assert HEAVY <= skip
    deps = {dist_name(r) for r in pyproject["dependencies"]}
    assert skip <= deps, f"stale API_SKIP entries: {skip - deps}"
    assert "flower" in {dist_name(r) for r in pyproject["optional-dependencies"]["flower"]}
    installs = pip_installs(inst)
    for words in installs:
        assert not any(dist_name(w).startswith("torch") for w in words if w[0].isalpha())
        assert not any("download.pytorch.org" in w for w in words)
    assert ["--no-deps", "-e", "."] in installs
    # the skipped distributions are really not needed by what the image runs
    blocked = sorted(IMPORT_NAMES.get(n, n) for n in skip)
    code = (
        "import importlib.abc, sys\n"
        f"BLOCK = set({blocked!r})\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ImportError('not in the API image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bulwark.service.app, bulwark.store.store, bulwark.workers.client.cli,"
        " bulwark.workers.jobs.celery_app, bulwark.workers.jobs.tasks\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]


def test_worker_image_keeps_a_cuda_torch_and_no_torchvision():
    inst = dockerfile("Dockerfile.worker")
    base = build_arg(inst, "TORCH_IMAGE")
    assert re.match(r"pytorch/pytorch:2\.[\d.]+-cuda12\.\d+-cudnn9-runtime$", base), base
    assert not any("torchvision" in a for k, a in inst if k == "RUN")
    installs = pip_installs(inst)
    for words in installs:
        # never a torch wheel: the base image's CUDA build stays
        assert not any(re.match(r"torch(==|>|<|~|$)", w) for w in words), words
    # torchattacks comes with the declared dependencies, not a step of its own
    assert not any(any(x.startswith("torchattacks") for x in w) for w in installs), installs
    deps = [w for w in installs if "-r" in w]
    assert deps and all("-c" in w for w in deps), "dependencies install under the torch pin"
    assert ["--no-deps", "-e", "."] in installs


def test_the_multi_gpu_worker_gives_a_job_every_gpu_it_reserves(svc, monkeypatch):
    multi = svc["worker-gpus01"]
    assert multi["profiles"] == ["multi-gpu"], "opt-in: it shares GPUs with the per-GPU workers"
    env = env_of(multi)
    s = settings_from(env, monkeypatch)
    gpus = multi["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    assert s.worker_devices == len(gpus) == len(env["CUDA_VISIBLE_DEVICES"].split(",")) > 1
    node = option(argv(multi), "-n").split("@")[0]
    assert f"-d {node}@" in " ".join(health_argv(multi))
    before_name = [argv(w)[:argv(w).index("-n")] for w in (multi, svc[WORKER])]
    assert before_name[0] == before_name[1], "the same worker flags as the per-GPU worker"
