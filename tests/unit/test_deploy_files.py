"""The deployment files are valid without a Docker engine: compose structure, Dockerfile stages and
hygiene, one worker command everywhere (compose, image, systemd unit, docs, mi300x_cert.deploy), and no
secrets outside the documented development defaults."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mi300x_cert import deploy
from mi300x_cert.errors import ProfileError
from mi300x_cert.fleet import load_fleet

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
UNIT = REPO / "deploy" / "systemd" / "mi300x-cert-edge-worker@.service"
DOCS = REPO / "docs" / "deployment.md"
ENV_EXAMPLE = REPO / ".env.example"

CONTROL_PLANE = {"postgres", "airflow-init", "api-server", "scheduler", "dag-processor", "triggerer", "object-store"}
AIRFLOW_SERVICES = {"airflow-init", "api-server", "scheduler", "dag-processor", "triggerer"}
WORKERS = {"gpu-worker-amd": "gpu-amd", "gpu-worker-nvidia": "gpu-nvidia"}
TEMPLATE = deploy.worker_command_template()
SECRET_KEY_RE = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|JWT|FERNET|TOKEN)", re.I)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# ---- Dockerfile parsing and lint ------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(text: str) -> dict[str, dict]:
    """Stage name → {"from": resolved image, "instructions": [...]}; global ARG defaults resolved."""
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current: dict | None = None
    for ins, rest in _dockerfile_instructions(text):
        if ins == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif ins == "FROM":
            m = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            assert m, f"cannot parse FROM {rest!r}"
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: args.get(g.group(1) or g.group(2), g.group(0)), m.group(1))
            current = {"from": image, "instructions": []}
            stages[m.group(2) or f"stage{len(stages)}"] = current
        elif current is not None:
            current["instructions"].append((ins, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return _stages(DOCKERFILE.read_text())


def test_dockerfile_has_the_three_targets_on_the_right_bases(stages) -> None:
    assert {"control-plane", "gpu-amd", "gpu-nvidia"} <= set(stages)
    assert stages["control-plane"]["from"].startswith("python:3.11-slim")
    assert stages["gpu-amd"]["from"].startswith("rocm/pytorch:")
    assert re.match(r"^(pytorch/pytorch:.*cuda12\.\d+.*|nvcr\.io/nvidia/pytorch:.+)$", stages["gpu-nvidia"]["from"])


def test_dockerfile_lint(stages) -> None:
    names = set(stages)
    for name, st in stages.items():
        image = st["from"]
        if image in names:
            continue
        assert "$" not in image, f"stage {name}: unresolved base image {image!r}"
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest", f"stage {name}: base image {image!r} needs a pinned tag (not latest)"
        for ins, rest in st["instructions"]:
            if ins == "COPY" and "--from=" in rest:
                src = re.search(r"--from=(\S+)", rest).group(1)
                assert src in names, f"stage {name}: COPY --from={src} names no stage"
            if ins == "ADD":
                assert not re.search(r"https?://", rest), f"stage {name}: ADD of a URL (use a pinned download)"
            if ins == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest, \
                    f"stage {name}: apt-get install without --no-install-recommends / list cleanup"
            if ins == "RUN":
                assert not re.search(r"\bsudo\b", rest), f"stage {name}: sudo in RUN"
            if ins in ("ENV", "ARG"):
                for key in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                    assert not SECRET_KEY_RE.search(key), f"stage {name}: secret-looking {ins} {key} baked into the image"
    for target in ("control-plane", "gpu-amd", "gpu-nvidia"):
        ins = [i for i, _ in stages[target]["instructions"]]
        users = [r for i, r in stages[target]["instructions"] if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target}: final USER must be non-root"
        assert "HEALTHCHECK" in ins, f"{target}: no HEALTHCHECK"
        assert "CMD" in ins, f"{target}: no CMD"


def test_hadolint_when_available() -> None:
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (the built-in lint above still ran)")
    r = subprocess.run([exe, "--failure-threshold", "error", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_images_keep_the_base_torch_and_take_gpu_libraries_from_the_vendor(stages) -> None:
    text = DOCKERFILE.read_text()
    amd = " ".join(r for i, r in stages["gpu-amd"]["instructions"] if i == "RUN")
    assert "/opt/rocm/share/amd_smi" in amd
    # the GPU requirement files drop torch and its triton (the base image's builds match each
    # other) and amdsmi; nvidia-ml-py only for AMD
    assert re.search(r"grep -v -i -E '\^\(torch\|triton\|amdsmi\|nvidia-ml-py\)==' \S+ > requirements-gpu-amd.txt", text)
    assert re.search(r"grep -v -i -E '\^\(torch\|triton\|amdsmi\)==' \S+ > requirements-gpu-nvidia.txt", text)
    assert "triton==" in (REPO / "requirements.txt").read_text()
    assert "nvidia-ml-py==" in (REPO / "requirements.txt").read_text()


def test_dockerignore_keeps_secrets_and_state_out_of_the_context() -> None:
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for must in (".git", ".venv", ".env", "*.pem", "**/__pycache__"):
        assert must in lines, f".dockerignore lacks {must}"


# ---- compose --------------------------------------------------------------------------------


def test_compose_services_and_profiles(services) -> None:
    assert CONTROL_PLANE | set(WORKERS) <= set(services)
    for name in CONTROL_PLANE:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    for name in WORKERS:
        assert services[name].get("profiles"), f"{name} must sit behind a profile (no GPU → not started)"


def test_compose_images_and_build_targets_exist(services, stages) -> None:
    for name, svc in services.items():
        assert "image" in svc, f"{name}: no image"
        assert not str(svc["image"]).endswith(":latest"), f"{name}: image {svc['image']} uses latest"
        if "build" in svc:
            target = svc["build"]["target"]
            assert target in stages, f"{name}: build target {target!r} is no Dockerfile stage"
    for name, target in WORKERS.items():
        assert services[name]["build"]["target"] == target
    for name in AIRFLOW_SERVICES | {"object-store"}:
        assert services[name]["build"]["target"] == "control-plane"


def test_compose_healthchecks(services) -> None:
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if name == "airflow-init":  # a one-shot job: others wait for it to complete
            assert hc == {"disable": True}
            continue
        assert hc and hc.get("test"), f"{name}: no healthcheck"
    api = " ".join(services["api-server"]["healthcheck"]["test"])
    assert "/api/v2/monitor/health" in api
    deps = services["scheduler"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_edge_executor_settings_everywhere(services) -> None:
    secrets = set()
    for name in AIRFLOW_SERVICES | set(WORKERS):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == deploy.EXECUTORS, name
        assert env["AIRFLOW__EDGE__API_ENABLED"] == "True", name
        assert env["AIRFLOW__EDGE__API_URL"].endswith("/edge_worker/v1/rpcapi"), name
        assert env["AIRFLOW__API__BASE_URL"], name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/"), name
        assert env["MI300X_CERT_GPU_EXECUTOR"] == "EdgeExecutor", name
        if name in WORKERS:  # Edge workers reach the api-server only
            assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env and "AIRFLOW__API__SECRET_KEY" not in env, name
        else:
            assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"), name
        secrets.add(env["AIRFLOW__API_AUTH__JWT_SECRET"])
    # one JWT secret for all, required from the environment (no default)
    assert len(secrets) == 1
    (jwt,) = secrets
    assert re.fullmatch(r"\$\{AIRFLOW_JWT_SECRET:\?[^}]*\}", jwt), jwt


def test_compose_gpu_devices(services) -> None:
    amd = services["gpu-worker-amd"]
    assert {"/dev/kfd", "/dev/dri"} <= set(amd["devices"])
    assert services["gpu-worker-nvidia"]["gpus"] == "all"
    for name in WORKERS:
        env = services[name]["environment"]
        assert "HOST" in env and "SLOTS" in env


def _compose_vars(text: str) -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{(\w+)", text))


def test_every_compose_variable_is_documented_in_env_example() -> None:
    documented = {ln.split("=", 1)[0].strip() for ln in ENV_EXAMPLE.read_text().splitlines()
                  if "=" in ln and not ln.lstrip().startswith("#")}
    missing = _compose_vars(COMPOSE.read_text()) - documented
    assert not missing, f"variables used in docker-compose.yaml but not in .env.example: {sorted(missing)}"


def test_jwt_default_in_env_example_is_long_enough_and_marked_dev() -> None:
    for ln in ENV_EXAMPLE.read_text().splitlines():
        if ln.startswith("AIRFLOW_JWT_SECRET="):
            value = ln.split("=", 1)[1].split("#")[0].strip()
            assert len(value.encode()) >= 64 and "# DEV" in ln
            return
    pytest.fail("AIRFLOW_JWT_SECRET missing from .env.example")


# ---- no secrets ---------------------------------------------------------------------------


def _secret_values_in_compose(node, path="") -> list[tuple[str, str]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _secret_values_in_compose(v, f"{path}.{k}")
            if isinstance(v, (str, int)) and SECRET_KEY_RE.search(str(k)) and not str(k).endswith("_FILE"):
                out.append((f"{path}.{k}", str(v)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _secret_values_in_compose(v, f"{path}[{i}]")
    return out


def test_no_literal_secrets_in_compose(compose) -> None:
    for where, value in _secret_values_in_compose(compose):
        # a secret is a required variable, or an optional one whose default is empty
        assert re.fullmatch(r"\$\{\w+:\?[^}]*\}|\$\{\w+:-\}|\$\{\w+\}", value), f"{where} = {value!r} is a literal secret"
    text = COMPOSE.read_text()
    # the database URL takes its password from the environment too
    assert re.search(r"postgresql\+psycopg2://\$\{POSTGRES_USER:-airflow\}:\$\{POSTGRES_PASSWORD:\?", text)


def test_env_example_secrets_are_dev_defaults_or_empty() -> None:
    for ln in ENV_EXAMPLE.read_text().splitlines():
        if "=" not in ln or ln.lstrip().startswith("#"):
            continue
        key, value = ln.split("=", 1)
        if SECRET_KEY_RE.search(key):
            val = value.split(" #")[0].strip()
            assert val == "" or "# DEV" in ln, f".env.example: {key} has a value not marked DEV"
            assert val == "" or "dev" in val.lower(), f".env.example: {key}={val!r} does not say it is a dev value"


def test_deploy_env_examples_carry_no_secret_values() -> None:
    files = sorted((REPO / "deploy" / "env").glob("*.example"))
    assert files
    for f in files:
        for ln in f.read_text().splitlines():
            if "=" not in ln or ln.lstrip().startswith("#"):
                continue
            key, value = ln.split("=", 1)
            if SECRET_KEY_RE.search(key) and not key.endswith("_FILE"):
                assert value.strip() == "", f"{f.name}: {key} must be empty in the example"
            assert "CHANGE_ME" in value or not re.search(r"://[^:/@\s]+:[^@\s]+@", value), f"{f.name}: password in URL {value!r}"


# ---- one worker command -------------------------------------------------------------------


def test_worker_command_helpers() -> None:
    assert deploy.worker_command("mi300x-01", 16) == ["airflow", "edge", "worker", "-q", "gpu-mi300x-01", "-c", "16", "-H", "mi300x-01"]
    assert deploy.worker_command_line("h100-01", 8) == "airflow edge worker -q gpu-h100-01 -c 8 -H h100-01"
    assert TEMPLATE == "airflow edge worker -q gpu-${HOST} -c ${SLOTS} -H ${HOST}"
    with pytest.raises(ProfileError, match="host name"):
        deploy.worker_command("bad host;rm", 4)
    with pytest.raises(ProfileError, match="slots"):
        deploy.worker_command("h", 0)
    with pytest.raises(ProfileError, match="64 bytes"):
        deploy.worker_env("https://airflow.example.org", "short")
    env = deploy.worker_env("https://airflow.example.org/", "x" * 64)
    assert env["AIRFLOW__EDGE__API_URL"] == "https://airflow.example.org/edge_worker/v1/rpcapi"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "https://airflow.example.org/execution/"
    with pytest.raises(ProfileError, match="api_url"):
        deploy.worker_env("airflow.example.org")


def test_pools_and_slots_follow_the_fleet(capsys) -> None:
    fleet = load_fleet()
    cmds = deploy.pool_commands()
    assert [(c[3], int(c[4])) for c in cmds] == [(s.pool, s.cards) for s in fleet.servers]
    assert all(deploy.queue_name(s.name) == s.queue for s in fleet.servers)
    s = fleet.servers[0]
    assert deploy.main(["worker-command", s.name]) == 0
    assert capsys.readouterr().out.strip() == deploy.worker_command_line(s.name, s.cards)
    assert deploy.main(["worker-command", "not-in-fleet"]) == 2
    assert "not in the fleet" in capsys.readouterr().err


def _normalize(cmd: str) -> str:
    cmd = cmd.replace("$${", "${").replace("%i", "${HOST}")
    cmd = re.sub(r"^\S*/bin/airflow ", "airflow ", cmd.strip())
    return re.sub(r"\s+", " ", cmd)


def test_compose_worker_commands_match(services) -> None:
    for name in WORKERS:
        cmd = services[name]["command"]
        assert cmd[:2] == ["sh", "-c"]
        assert _normalize(cmd[2]) == "exec " + TEMPLATE, cmd


def test_dockerfile_worker_cmd_matches(stages) -> None:
    for target in ("gpu-amd", "gpu-nvidia"):
        (cmd,) = [r for i, r in stages[target]["instructions"] if i == "CMD"]
        argv = yaml.safe_load(cmd)  # exec form: a JSON array
        assert argv[:2] == ["sh", "-c"] and _normalize(argv[2]) == "exec " + TEMPLATE


def test_systemd_unit_matches() -> None:
    text = UNIT.read_text()
    execs = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("ExecStart=")]
    assert len(execs) == 1 and _normalize(execs[0]) == TEMPLATE, execs
    assert "Environment=HOST=%i" in text
    assert re.search(r"^User=(?!root)\w", text, re.M)
    assert "EnvironmentFile=/etc/mi300x-cert/edge-worker-%i.env" in text
    example = (REPO / "deploy" / "env" / "edge-worker.env.example").read_text()
    assert re.search(r"^SLOTS=\d+$", example, re.M)


def _fenced_commands(markdown: str) -> list[str]:
    cmds = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", markdown, re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        cmds += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return cmds


def test_docs_worker_commands_match_the_code() -> None:
    cmds = _fenced_commands(DOCS.read_text())
    edge = [c for c in cmds if c.startswith("airflow edge worker")]
    assert TEMPLATE in edge, "docs must show the worker command template"
    for c in edge:
        if c == TEMPLATE:
            continue
        argv = shlex.split(c)
        host = argv[argv.index("-H") + 1]
        slots = int(argv[argv.index("-c") + 1])
        assert c == deploy.worker_command_line(host, slots), f"docs command {c!r} differs from mi300x_cert.deploy"
    celery = [c for c in cmds if c.startswith("airflow celery worker")]
    for c in celery:
        argv = shlex.split(c)
        host = argv[argv.index("-H") + 1]
        assert argv[argv.index("-q") + 1] == deploy.queue_name(host)
    # every `airflow pools set` in the docs sizes a pool gpu-<host> by the same rule
    for c in cmds:
        if c.startswith("airflow pools set"):
            argv = shlex.split(c)
            assert argv[3].startswith("gpu-") and int(argv[4]) > 0
    # the docs' systemd commands name the shipped unit and env examples
    for path in ("deploy/systemd/mi300x-cert-edge-worker@.service", "deploy/env/common.env.example",
                 "deploy/env/edge-worker.env.example", "deploy/env/control-plane.env.example"):
        assert path in DOCS.read_text() and (REPO / path).is_file(), path


def test_docs_cover_the_operator_tasks() -> None:
    text = DOCS.read_text()
    for heading in ("## Install a control plane", "## Add a GPU server to the fleet", "## Celery instead of Edge",
                    "## Enroll, rotate and revoke host keys", "## Size pools and workers"):
        assert heading in text, heading
    for word in ("MI300X_CERT_SIGNING_KEY", "keys generate", "keys enroll", "keys revoke", "MI300X_CERT_REGISTRY_URL",
                 "AIRFLOW__API_AUTH__JWT_SECRET", "MinIO"):
        assert word in text, word


def test_systemd_unit_verifies(tmp_path) -> None:
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed (the unit's command was still checked above)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # the venv does not exist on the test machine; anything else (unknown keys, bad values) is an error
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "is not executable" not in ln and "No such file" not in ln]
    assert not problems, problems
