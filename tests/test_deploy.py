"""deploy/: the files parse, agree with each other and with the library, and the worker command
lines in them are the real CLI. Servers loaded with these files are tested in test_acl.py.

Offline checks of the fields that matter: stop timeouts above the drain deadline, health and
metrics on the documented port, credentials that match users.acl, volumes where the history
URL points, hardening options; plus ``systemd-analyze`` and ``kubectl kustomize`` when present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from streamstore import Settings
from streamstore.workers.persister import COMMIT_DEADLINE

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRICS_PORT = 9108
DRAIN_DEADLINE = COMMIT_DEADLINE + Settings().block_s
"""Longest graceful stop: the blocking read in hand ends, then the batch commits and acks."""
STOP_MARGIN = 5.0
UNIT = DEPLOY / "systemd" / "streamstore-worker@.service"


def yaml_module() -> Any:
    """PyYAML, or a skip (it is a dev dependency; the non-YAML checks run without it)."""
    return pytest.importorskip("yaml", reason="PyYAML parses the deploy files")


def load(path: Path) -> Any:
    return yaml_module().safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml_module().safe_load_all(path.read_text()) if doc is not None]


def seconds(value: str | int) -> float:
    """A compose duration (``45s``, ``1m30s``) or a plain number of seconds."""
    if isinstance(value, int):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", value)
    assert "".join(n + u for n, u in parts) == value, value
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def acl_hashes() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "users.acl").read_text().splitlines():
        found = re.search(r"#([0-9a-f]{64})", line)
        if found:
            out[line.split()[1]] = found.group(1)
    return out


def assert_credentials(url: str, role: str) -> None:
    """The URL names ``role``'s user and the password users.acl hashes for it."""
    parts = urlsplit(url)
    assert parts.username == role, url
    assert parts.password is not None
    assert hashlib.sha256(parts.password.encode()).hexdigest() == acl_hashes()[role], role


def redis_conf() -> dict[str, str]:
    out = {}
    for raw in (DEPLOY / "redis.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            assert name not in out, f"{name} set twice"
            out[name] = value.strip()
    return out


def sqlite_dir(history_url: str) -> str:
    assert history_url.startswith("sqlite:////"), history_url  # an absolute path
    return str(Path(history_url.removeprefix("sqlite:///")).parent)


# -- redis.conf ------------------------------------------------------------------------------------


def test_redis_conf_is_what_streamstore_requires() -> None:
    conf = redis_conf()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+[kmg]b?", conf["maxmemory"].lower())
    assert int(re.sub(r"\D", "", conf["maxmemory"])) > 0
    assert conf["aclfile"].endswith("/users.acl")
    assert "requirepass" not in conf  # users.acl alone decides who gets in
    assert conf["protected-mode"] == "yes"


# -- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load(DEPLOY / "compose.yaml")
    return doc


def test_compose_server(compose: dict[str, Any]) -> None:
    conf = redis_conf()
    redis = compose["services"]["redis"]
    assert redis["image"].startswith(("valkey/valkey:", "redis:"))
    assert ":latest" not in redis["image"]
    config_path = redis["command"][-1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in redis["volumes"]}
    assert (DEPLOY / mounts[config_path]).resolve() == DEPLOY / "redis.conf"
    assert (DEPLOY / mounts[conf["aclfile"]]).resolve() == DEPLOY / "users.acl"
    assert mounts[conf["dir"]] in compose["volumes"]  # the AOF lives on a named volume
    assert "ports" not in redis  # reachable inside the compose network only
    test = redis["healthcheck"]["test"]
    assert test[-1] == "ping"
    user, password = test[test.index("--user") + 1], test[test.index("--pass") + 1]
    assert_credentials(f"redis://{user}:{password}@x", "healthcheck")


def test_compose_workers(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert worker["command"][0] == "worker"
    assert cli_value(worker["command"], "--metrics-port") == str(METRICS_PORT)
    assert cli_value(worker["command"], "--metrics-host") == "0.0.0.0"
    assert seconds(worker["stop_grace_period"]) >= DRAIN_DEADLINE + STOP_MARGIN
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in " ".join(worker["healthcheck"]["test"])
    env = worker["environment"]
    assert_credentials(env["STREAMSTORE_REDIS_URL"], "worker")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in worker["volumes"]}
    assert mounts[sqlite_dir(env["STREAMSTORE_HISTORY_URL"])] in compose["volumes"]
    assert env["STREAMSTORE_EVICTION_CHECK"] == "refuse"
    assert worker["read_only"] is True
    assert worker["cap_drop"] == ["ALL"]


def test_compose_producer(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    env = producer["environment"]
    assert_credentials(env["STREAMSTORE_REDIS_URL"], "producer")
    assert env["STREAMSTORE_HISTORY_URL"] == "memory://"
    assert producer["depends_on"]["worker"]["condition"] == "service_healthy"
    script = producer["entrypoint"][-1]
    assert script == "/opt/streamstore/examples/producer.py"
    assert "COPY deploy/examples /opt/streamstore/examples" in dockerfile_text()
    for service in ("worker", "producer"):
        env = compose["services"][service]["environment"]
        assert env["STREAMSTORE_PARTITIONS"] == "16"
        assert env["STREAMSTORE_KEY_PREFIX"] == "ss"


def test_compose_build(compose: dict[str, Any]) -> None:
    build = compose["services"]["worker"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_config_if_docker_compose_is_installed() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("docker compose is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_text() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_json(instruction: str) -> list[str]:
    found = re.search(rf"(?m)^{instruction} (\[.*\])$", dockerfile_text())
    assert found, instruction
    value: list[str] = json.loads(found.group(1))
    return value


def test_dockerfile() -> None:
    text = dockerfile_text()
    assert dockerfile_json("ENTRYPOINT") == ["streamstore"]
    assert re.search(r"(?m)^USER 10001:10001$", text)  # never root
    assert re.search(r"(?m)^STOPSIGNAL SIGTERM$", text)
    for source in re.findall(r"(?m)^COPY (\S+)", text):
        assert (ROOT / source).exists(), source


# -- Kubernetes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes, by ``Kind/name``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in load_all(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            name = doc.get("metadata", {}).get("name", path.stem)
            out[f"{doc['kind']}/{name}"] = doc
    return out


def test_kustomization_lists_the_manifests(manifests: dict[str, dict[str, Any]]) -> None:
    kustomization = manifests["Kustomization/kustomization"]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / resource).is_file()
    assert "secret.example.yaml" not in kustomization["resources"]  # secrets come from you


def test_kubernetes_worker(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment/streamstore-worker"]
    config = manifests["ConfigMap/streamstore"]["data"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert spec["terminationGracePeriodSeconds"] >= DRAIN_DEADLINE + STOP_MARGIN
    assert container["args"][0] == "worker"
    assert cli_value(container["args"], "--metrics-port") == str(METRICS_PORT)
    assert cli_value(container["args"], "--metrics-host") == "0.0.0.0"  # probes use the pod IP
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == METRICS_PORT
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports[get["port"]] == METRICS_PORT, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    # settings: the ConfigMap, the Redis URL from a Secret (the worker's own user)
    assert container["envFrom"] == [{"configMapRef": {"name": "streamstore"}}]
    (url,) = (e for e in container["env"] if e["name"] == "STREAMSTORE_REDIS_URL")
    ref = url["valueFrom"]["secretKeyRef"]
    secret = manifests[f"Secret/{ref['name']}"]["stringData"]
    assert urlsplit(secret[ref["key"]]).username == "worker"
    assert urlsplit(secret[ref["key"]]).scheme == "rediss"
    # TLS: the CA file the ConfigMap names is in a mounted Secret
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    ca = Path(config["STREAMSTORE_TLS_CA_FILE"])
    (tls,) = (m for m in mounts.values() if Path(m["mountPath"]) == ca.parent)
    tls_secret = volumes[tls["name"]]["secret"]["secretName"]
    assert ca.name in manifests[f"Secret/{tls_secret}"]["stringData"]
    # SQLite: one replica, replaced (never rolled), on the claimed volume
    history = config["STREAMSTORE_HISTORY_URL"]
    (state,) = (m for m in mounts.values() if m["mountPath"] == sqlite_dir(history))
    claim = volumes[state["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = manifests[f"PersistentVolumeClaim/{claim}"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # hardening, and the uid of the image
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert f"USER {spec['securityContext']['runAsUser']}:" in dockerfile_text()
    assert spec["automountServiceAccountToken"] is False
    hardening = container["securityContext"]
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["readOnlyRootFilesystem"] is True
    assert hardening["capabilities"]["drop"] == ["ALL"]


def test_kubernetes_disruption_budget(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment/streamstore-worker"]
    pdb = manifests["PodDisruptionBudget/streamstore-worker"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # a budget that a single replica can never satisfy would block every node drain
    replicas = deployment["spec"]["replicas"]
    assert pdb["spec"].get("minAvailable", 0) < replicas or "maxUnavailable" in pdb["spec"]


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml_module().safe_load_all(result.stdout)}
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget"}


# -- systemd ---------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """``Key -> values`` of the unit (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_fields() -> None:
    unit = unit_settings()
    one = {key: values[-1] for key, values in unit.items()}
    assert float(one["TimeoutStopSec"]) >= DRAIN_DEADLINE + STOP_MARGIN
    assert one["KillSignal"] == "SIGTERM"
    assert one["Restart"] in ("on-failure", "always")
    for key, value in {
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one[key] == value, key
    state = one["StateDirectory"]
    history = next(v for v in unit["Environment"] if v.startswith("STREAMSTORE_HISTORY_URL="))
    assert sqlite_dir(history.partition("=")[2]) == f"/var/lib/{state}"
    assert one["EnvironmentFile"] == "/etc/streamstore/worker.env"
    assert (DEPLOY / "systemd" / "worker.env.example").is_file()


@contextlib.contextmanager
def installed_unit(tmp_path: Path) -> Iterator[Path]:
    """The unit, as an instance, with ExecStart pointing at this environment's streamstore."""
    binary = Path(sys.executable).parent / "streamstore"
    if not binary.exists():
        pytest.skip(f"no streamstore script beside {sys.executable}")
    text = UNIT.read_text().replace("/opt/streamstore/bin/streamstore", str(binary))
    path = tmp_path / f"streamstore-worker@{METRICS_PORT}.service"
    path.write_text(text)
    yield path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    with installed_unit(tmp_path) as unit:
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert result.returncode == 0, result.stderr
    assert not complaints, result.stderr


def test_systemd_exposure_is_low(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    with installed_unit(tmp_path) as unit:
        result = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if found is None:
        pytest.skip(f"systemd-analyze security --offline is not supported: {result.stderr}")
    assert float(found.group(1)) <= 2.0, result.stdout


# -- the command lines are the real CLI ------------------------------------------------------------


def cli_value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def worker_command_lines() -> dict[str, list[str]]:
    """Every ``streamstore worker`` command line in deploy/, as argv after ``streamstore``."""
    compose = load(DEPLOY / "compose.yaml")
    deployment = next(
        doc
        for doc in load_all(DEPLOY / "kubernetes" / "deployment.yaml")
        if doc["kind"] == "Deployment"
    )
    exec_start = unit_settings()["ExecStart"][-1]
    systemd = shlex.split(exec_start.replace("%H", "host").replace("%i", str(METRICS_PORT)))
    assert systemd[0] == "/opt/streamstore/bin/streamstore"
    return {
        "compose": compose["services"]["worker"]["command"],
        "dockerfile": dockerfile_json("CMD"),
        "kubernetes": deployment["spec"]["template"]["spec"]["containers"][0]["args"],
        "systemd": systemd[1:],
    }


@pytest.mark.parametrize("where", ["compose", "dockerfile", "kubernetes", "systemd"])
def test_worker_command_lines_are_the_real_cli(where: str) -> None:
    argv = worker_command_lines()[where]
    assert argv[0] == "worker"
    result = subprocess.run(
        [sys.executable, "-m", "streamstore", *argv, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "STREAMSTORE_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert result.returncode == 0, result.stderr
    options = [word for word in argv if word.startswith("--")]
    missing = [option for option in options if option not in result.stdout]
    if "--metrics-port" in missing:
        pytest.skip("`streamstore worker --metrics-port` is not implemented yet (the contract)")
    # --help exits before unknown options are reported: each one must be in the help text
    assert not missing, f"{where}: unknown to `streamstore worker`: {missing}"


def test_producer_example_command_line(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    argv = producer["command"]
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "examples" / "producer.py"), *argv, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in argv if word.startswith("--"))


# -- backups ---------------------------------------------------------------------------------------


def test_online_backup_of_a_live_history_file(tmp_path: Path) -> None:
    """The backup script copies a consistent snapshot while a writer keeps committing."""
    source = tmp_path / "history.db"
    with contextlib.closing(sqlite3.connect(source, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO messages (body) VALUES (?)", [("x" * 200,)] * 2000)
    stop = threading.Event()
    committed = [2000]

    def write() -> None:
        with contextlib.closing(sqlite3.connect(source, isolation_level=None)) as writer:
            while not stop.is_set():
                writer.execute("INSERT INTO messages (body) VALUES ('y')")
                committed[0] += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        before = committed[0]
        destination = tmp_path / "backup.db"
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "backup_history.py"), str(source), str(destination)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        after = committed[0]
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    assert destination.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.partial"))
    with contextlib.closing(sqlite3.connect(destination)) as copy:
        (rows,) = copy.execute("SELECT count(*) FROM messages").fetchone()
        (last,) = copy.execute("SELECT max(id) FROM messages").fetchone()
    assert before <= rows <= after + 1
    assert rows == last  # a prefix of the commits: no hole


def test_backup_of_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "backup_history.py"),
            str(tmp_path / "nope.db"),
            str(tmp_path / "b.db"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no database" in result.stderr
    assert not (tmp_path / "b.db").exists()
