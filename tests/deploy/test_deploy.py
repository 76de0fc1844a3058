"""Tests of the deployment files (Dockerfile, .dockerignore, deploy/): the checks in deploy/check.py pass on the
real files and fail, naming the problem, on deliberately broken copies; and the health checks, probes and metrics
the deployment relies on work against a real server process started the way the image starts it."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embtrain_deploy_check", DEPLOY / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _load_check()
PROMTOOL = check.promtool_path()


def _need_promtool() -> str:
    # The Makefile installs promtool (Debian's `prometheus` package), so under `make test` and in CI this never
    # skips; CI=true turns a missing promtool into a failure rather than a silent skip.
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus); `make test` installs it")
    return PROMTOOL


# ---------------------------------------------------------------------------------------------------------------
# The real files pass every check.


@pytest.mark.parametrize("name", list(check.all_checks(ROOT)))
def test_repository_files_pass(name: str) -> None:
    assert check.all_checks(ROOT)[name]() == []


def test_alert_unit_tests_pass_in_promtool() -> None:
    promtool = _need_promtool()
    assert check.check_alert_rules(DEPLOY / "prometheus" / "alerts.yml", DEPLOY / "prometheus" / "alerts_test.yml",
                                   promtool) == []


def test_check_script_exits_zero() -> None:
    proc = subprocess.run([sys.executable, str(DEPLOY / "check.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Broken copies fail, naming the problem.


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{path.name}: {old!r} not found; the test no longer breaks anything"
    path.write_text(text.replace(old, new) if count == 0 else text.replace(old, new, count))


def _copy_tree(tmp_path: Path) -> Path:
    """The deployment files plus a skeleton of the packages, enough for every check."""
    root = tmp_path / "repo"
    shutil.copytree(DEPLOY, root / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    for rel in ("client/embtrain/__init__.py", "client/embtrain/v1/embtrain_pb2.py",
                "server/embtrain_server/__init__.py", "tests/deploy/test_deploy.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


K8S_BREAKS = [
    ("statefulset.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent", "imagePullPolcy"),
    ("statefulset.yaml", "              port: 50051\n            periodSeconds: 10",
     "              port: grpc\n            periodSeconds: 10", "is not of type 'integer'"),
    ("statefulset.yaml", '              ephemeral-storage: 4Gi\n              nvidia.com/gpu: "1"',
     "              ephemeral-storage: 4Gi", "nvidia.com/gpu"),
    ("statefulset.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 30",
     "terminationGracePeriodSeconds"),
    ("statefulset.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem"),
    ("statefulset.yaml", "runAsNonRoot: true\n        runAsUser: 10001", "runAsNonRoot: false\n        runAsUser: 0",
     "runAsUser is 0"),
    ("statefulset.yaml", "fieldPath: metadata.name", "fieldPath: metadata.namespace", "EMBTRAIN_NODE_ID"),
    ("statefulset.yaml", "value: /etc/embtrain/tokens/tokens", "value: /etc/embtrain/tokens/token",
     "has no key 'token'"),
    ("statefulset.yaml", "              mountPath: /var/lib/embtrain", "              mountPath: /var/lib/state",
     "state directory /var/lib/embtrain"),
    ("statefulset.yaml", 'prometheus.io/port: "9400"', 'prometheus.io/port: "9090"', "prometheus.io/port"),
    ("service-headless.yaml", "  clusterIP: None\n", "", "headless Service"),
    ("pdb.yaml", "      app.kubernetes.io/component: server", "      app.kubernetes.io/component: worker",
     "PodDisruptionBudget"),
    ("configmap.yaml", "drain_seconds: 30", "drain_seconds: 90", "drain_seconds 90"),
    ("statefulset.yaml", "podManagementPolicy: Parallel", "podManagementPolicy: OrderedReady",
     "podManagementPolicy must be Parallel"),
    ("service-headless.yaml", "publishNotReadyAddresses: true", "publishNotReadyAddresses: false",
     "publishNotReadyAddresses"),
    ("statefulset.yaml", "  replicas: 2", "  replicas: 3", "WORLD_SIZE is 2"),
    ("statefulset.yaml", "metadata.labels['apps.kubernetes.io/pod-index']", "metadata.name", "RANK must come"),
    ("statefulset.yaml", "value: embtrain-0.embtrain-headless", "value: embtrain-1.embtrain-headless",
     "MASTER_ADDR"),
    ("statefulset.yaml", 'value: "29500"', 'value: "29501"', "MASTER_PORT"),
]


@pytest.mark.parametrize("file,old,new,expected", K8S_BREAKS, ids=[b[3] for b in K8S_BREAKS])
def test_broken_k8s_manifest_fails(tmp_path: Path, file: str, old: str, new: str, expected: str) -> None:
    root = _copy_tree(tmp_path)
    _edit(root / "deploy" / "k8s" / file, old, new)
    # One Kubernetes version is enough to see the break (the real files are checked against all of them).
    problems = check.check_k8s(root / "deploy" / "k8s", root / "Dockerfile", versions=check.K8S_VERSIONS[-1:])
    assert any(expected in p for p in problems), problems


def test_k8s_object_without_a_schema_fails(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "deploy" / "k8s" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nmetadata:\n  name: x\nresources: []\n")
    problems = check.check_k8s(root / "deploy" / "k8s", root / "Dockerfile")
    assert any("Couldn't find schema for kind Kustomization" in p for p in problems), problems


ALERT_BREAKS = [
    ('expr: up{job="embtrain"} == 0', 'expr: (up{job="embtrain"} == 0', "does not parse"),
    ('embtrain_device_memory_limit_bytes{job="embtrain"} > 0', 'embtrain_device_memory_total_bytes{job="embtrain"} > 0',
     "'embtrain_device_memory_total_bytes' is not exported"),
    ("          severity: critical", "          priority: critical", "labels.severity"),
    ("for: 2m", "for: two minutes", "`for` must be a duration"),
    ("- alert: EmbtrainDown", "- alert: embtrain_down", "CamelCase"),
    ("- alert: EmbtrainDown", "- alert: EmbtrainIsDown", "no test in which EmbtrainIsDown fires"),
    ('summary: "No embtrain target is being scraped"', 'summary: "No {{ $labels.job target"', "unbalanced"),
]


@pytest.mark.parametrize("old,new,expected", ALERT_BREAKS, ids=[b[2] for b in ALERT_BREAKS])
def test_broken_alert_rules_fail(tmp_path: Path, old: str, new: str, expected: str) -> None:
    root = _copy_tree(tmp_path)
    rules = root / "deploy" / "prometheus" / "alerts.yml"
    _edit(rules, old, new)
    problems = check.check_alert_rules(rules, rules.parent / "alerts_test.yml", promtool=None)
    assert any(expected in p for p in problems), problems


def test_promtool_rejects_a_rule_that_does_not_parse(tmp_path: Path) -> None:
    promtool = _need_promtool()
    root = _copy_tree(tmp_path)
    rules = root / "deploy" / "prometheus" / "alerts.yml"
    _edit(rules, 'expr: up{job="embtrain"} == 0', 'expr: (up{job="embtrain"} == 0')
    problems = check.check_alert_rules(rules, None, promtool)
    assert any(p.startswith("promtool check rules") for p in problems), problems


@pytest.mark.parametrize("old,new", [
    # A threshold the unit test's 10% server errors no longer cross: the alert stops firing where it must.
    (") > 0.05\n        for: 10m", ") > 0.5\n        for: 10m"),
    # Device memory on a device that reports no limit (0) divides into +Inf: without the guard it would fire.
    ("\n          and embtrain_device_memory_limit_bytes{job=\"embtrain\"} > 0", ""),
], ids=["server-error threshold", "no-limit guard"])
def test_alert_unit_tests_catch_a_wrong_rule(tmp_path: Path, old: str, new: str) -> None:
    promtool = _need_promtool()
    root = _copy_tree(tmp_path)
    rules = root / "deploy" / "prometheus" / "alerts.yml"
    _edit(rules, old, new)
    problems = check.check_alert_rules(rules, rules.parent / "alerts_test.yml", promtool)
    assert any(p.startswith("promtool test rules") for p in problems), problems


def _dashboard(root: Path) -> tuple[Path, dict]:
    path = root / "deploy" / "grafana" / "embtrain.json"
    return path, json.loads(path.read_text())


def _drop_panels_using(metric: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        before = len(d["panels"])
        d["panels"] = [p for p in d["panels"] if metric not in json.dumps(p.get("targets", []))]
        assert len(d["panels"]) < before
    return edit


def _overlap(d: dict) -> None:
    graphs = [p for p in d["panels"] if p["type"] != "row"]
    graphs[1]["gridPos"] = dict(graphs[0]["gridPos"])


def _retarget(old: str, new: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        text = json.dumps(d)
        assert old in text
        d.clear()
        d.update(json.loads(text.replace(old, new)))
    return edit


DASHBOARD_BREAKS = [
    (_retarget("embtrain_open_streams{", "embtrain_streams_open{"), "'embtrain_streams_open' is not exported"),
    (_drop_panels_using("embtrain_device_memory_limit_bytes"), "no panel shows device memory limit by device"),
    (_drop_panels_using("embtrain_active_triplet_fraction"), "no panel shows active-triplet fraction by loss"),
    (_retarget("sum by (method, code) (rate(embtrain_requests_total",
               "sum by (method) (rate(embtrain_requests_total"), "no panel shows request rate by method and code"),
    (_retarget("histogram_quantile(0.99, sum by (loss, le) (rate(embtrain_compute_duration_seconds_bucket",
               "histogram_quantile(0.99, sum by (le) (rate(embtrain_compute_duration_seconds_bucket"),
     None),  # the p50 query still breaks it down by loss: not a problem
    (_retarget('embtrain_open_streams{job=~\\"$job\\", instance=~\\"$instance\\"}',
               'embtrain_open_streams{job=~\\"$job\\", instance=~\\"$node\\"}'), "uses $node"),
    (_retarget("sum by (loss) (rate(embtrain_mined_triplets_total",
               "sum by (loss) (rate(embtrain_mined_triplets_total["),
     "does not parse"),
    (_overlap, "overlaps"),
]


@pytest.mark.parametrize("edit,expected", DASHBOARD_BREAKS, ids=[str(b[1]) for b in DASHBOARD_BREAKS])
def test_broken_dashboard_fails(tmp_path: Path, edit: Callable[[dict], None], expected: str | None) -> None:
    root = _copy_tree(tmp_path)
    path, dash = _dashboard(root)
    edit(dash)
    path.write_text(json.dumps(dash))
    problems = check.check_dashboard(path)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_dashboard_that_is_not_json_fails(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path, _ = _dashboard(root)
    path.write_text(path.read_text()[:-10])
    assert any("not JSON" in p for p in check.check_dashboard(path))


COMPOSE_BREAKS = [
    ("docker-compose.yml", "      EMBTRAIN_DEVICE: cuda\n",
     '      EMBTRAIN_DEVICE: cuda\n      EMBTRAIN_TOKENS: "alice:0123456789abcdef0123"\n', "EMBTRAIN_TOKENS inline"),
    ("docker-compose.yml", "    deploy:\n      resources:\n        reservations:\n          devices:\n"
     "            - driver: nvidia\n              count: 1\n              capabilities: [gpu]\n", "",
     "no NVIDIA GPU reservation"),
    ("docker-compose.yml", "capabilities: [gpu]", "capability: [gpu]", "not a valid Compose file"),
    ("docker-compose.yml", "    stop_grace_period: 60s", "    stop_grace_period: 20s", "stop_grace_period"),
    ("docker-compose.yml", "    healthcheck:\n", "    x-healthcheck:\n", "healthcheck"),
    ("docker-compose.yml", "EMBTRAIN_TOKEN_FILE: /run/secrets/embtrain_tokens",
     "EMBTRAIN_TOKEN_FILE: /etc/embtrain/tokens", "EMBTRAIN_TOKEN_FILE"),
    ("docker-compose.yml", "file: ../prometheus/alerts.yml", "file: ../prometheus/rules.yml", "does not exist"),
    ("docker-compose.cpu.yml", "    deploy: !reset {}\n", "", "keeps the GPU reservation"),
    ("docker-compose.cpu.yml", "VARIANT: cpu", "VARIANT: gpu", "VARIANT=cpu"),
    ("prometheus.yml", "job_name: embtrain", "job_name: embtrain-server", "no scrape job named embtrain"),
    ("prometheus.yml", '["embtrain:9400"]', '["embtrain:9401"]', "does not scrape embtrain:9400"),
    ("grafana/provisioning/datasources/prometheus.yml", "url: http://prometheus:9090",
     "url: http://localhost:9090", "no data source at http://prometheus:9090"),
    ("grafana/provisioning/dashboards/embtrain.yml", "path: /etc/grafana/dashboards",
     "path: /var/lib/grafana/dashboards", "no dashboard is mounted"),
    ("docker-compose.replicas.yml", 'RANK: "1"', 'RANK: "0"', "ranks 0..W-1"),
    ("docker-compose.replicas.yml", "      MASTER_ADDR: embtrain\n      MASTER_PORT: \"29500\"\n      EMBTRAIN_NODE_ID: "
     "embtrain-1", "      MASTER_ADDR: embtrain-1\n      MASTER_PORT: \"29500\"\n      EMBTRAIN_NODE_ID: embtrain-1",
     "is not replica 0's service"),
    ("docker-compose.replicas.yml", "embtrain-state-1:/var/lib/embtrain", "embtrain-state:/var/lib/embtrain",
     "its own state volume"),
]


@pytest.mark.parametrize("file,old,new,expected", COMPOSE_BREAKS, ids=[b[3] for b in COMPOSE_BREAKS])
def test_broken_compose_stack_fails(tmp_path: Path, file: str, old: str, new: str, expected: str) -> None:
    root = _copy_tree(tmp_path)
    _edit(root / "deploy" / "compose" / file, old, new)
    problems = check.check_compose(root / "deploy" / "compose")
    assert any(expected in p for p in problems), problems


DOCKERFILE_BREAKS = [
    ("USER 10001:10001", "USER root", "non-root USER"),
    ("USER 10001:10001", "USER root", "DL3002"),  # hadolint: last USER should not be root
    ('ENTRYPOINT ["embtrain-server"]', "ENTRYPOINT embtrain-server", "exec-form ENTRYPOINT"),
    ("EXPOSE 50051 9400", "EXPOSE 50051", "EXPOSE 9400 missing"),
    ("COPY --from=builder /opt/venv /opt/venv",
     "RUN apt-get update && apt-get install -y curl\nCOPY --from=builder /opt/venv /opt/venv", "DL3008"),
    ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "HEALTHCHECK"),
]


@pytest.mark.parametrize("old,new,expected", DOCKERFILE_BREAKS, ids=[str(b[2]) for b in DOCKERFILE_BREAKS])
def test_broken_dockerfile_fails(tmp_path: Path, old: str, new: str, expected: str | None) -> None:
    root = _copy_tree(tmp_path)
    _edit(root / "Dockerfile", old, new)
    if expected == "HEALTHCHECK":  # drop the continuation line too
        _edit(root / "Dockerfile", '\n  CMD ["/bin/sh"', '\n# CMD ["/bin/sh"')
    problems = check.check_dockerfile(root / "Dockerfile")
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


DOCKERIGNORE_BREAKS = [
    ("\n*\n", "\n", "tests/deploy/test_deploy.py"),
    ("**/__pycache__/\n**/*.py[cod]\n", "", "__pycache__"),
    ("!server/embtrain_server/\n", "", "leaves out server/embtrain_server/__init__.py"),
    ("!README.md\n", "", "leaves out README.md"),
]


@pytest.mark.parametrize("old,new,expected", DOCKERIGNORE_BREAKS, ids=[b[2] for b in DOCKERIGNORE_BREAKS])
def test_broken_dockerignore_fails(tmp_path: Path, old: str, new: str, expected: str) -> None:
    root = _copy_tree(tmp_path)
    _edit(root / ".dockerignore", old, new)
    problems = check.check_dockerignore(root)
    assert any(expected in p for p in problems), problems


# The examples of Docker's .dockerignore documentation: (patterns, path, sent to the daemon?).
@pytest.mark.parametrize("patterns,path,included", [
    ("*/temp*", "somedir/temporary.txt", False),
    ("*/temp*", "temp", True),
    ("*/temp*", "somedir/subdir/temporary.txt", True),
    ("*/*/temp*", "somedir/subdir/temporary.txt", False),
    ("temp?", "tempa", False),
    ("temp?", "tempab", True),
    ("**/*.go", "a/b/c.go", False),
    ("**/*.go", "c.go", False),
    ("*.md\n!README*.md\nREADME-secret.md", "README.md", True),
    ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", False),
    ("*.md\n!README*.md\nREADME-secret.md", "CHANGES.md", False),
    ("*.md\nREADME-secret.md\n!README*.md", "README-secret.md", True),
    ("node_modules", "node_modules/a/b.js", False),
])
def test_dockerignore_matcher_follows_docker_semantics(patterns: str, path: str, included: bool) -> None:
    assert check.DockerIgnore(patterns).included(path) is included


# ---------------------------------------------------------------------------------------------------------------
# The deployment's view of a running server: started like the image starts it (configuration from the Compose
# example file, tokens from a file), on loopback and free ports.


def _venv_tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    found = str(tool) if tool.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return found


def _server_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBTRAIN_")}
    tokens = tmp / "tokens"
    tokens.write_text("alice:0123456789abcdef0123456789\n")
    env.update(EMBTRAIN_CONFIG=str(DEPLOY / "compose" / "config.yaml"), EMBTRAIN_TOKEN_FILE=str(tokens),
               EMBTRAIN_HOST="127.0.0.1", EMBTRAIN_PORT="0", EMBTRAIN_METRICS_PORT="-1",
               EMBTRAIN_STATE_DIR=str(tmp / "state"), EMBTRAIN_DEVICE="cpu", EMBTRAIN_WORKERS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


class ServerProcess:
    def __init__(self, tmp: Path) -> None:
        self.env = _server_env(tmp)
        self.proc = subprocess.Popen([_venv_tool("embtrain-server")], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port, self.metrics_port = self._wait_listening()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_listening(self) -> tuple[int, int]:
        while True:
            try:
                line = self.lines.get(timeout=90)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError("server did not start:\n" + "".join(self.log)) from None
            self.log.append(line)
            m = re.search(r"listening on [\d.]+:(\d+) .*metrics on https?://[\d.]+:(\d+)/metrics", line)
            if m:
                return int(m.group(1)), int(m.group(2))
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("server exited:\n" + "".join(self.log))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _dockerfile_healthcheck() -> list[str]:
    stages = check.dockerfile_stages((ROOT / "Dockerfile").read_text())
    args = [a for i, a in stages[-1] if i == "HEALTHCHECK"][-1]
    return json.loads(args[args.index("CMD") + 3:].strip())


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_server_as_deployed(tmp_path: Path) -> None:
    """One server process through its life, as Docker and Kubernetes see it: health checks and probes pass while
    it serves, /metrics carries exactly the families the dashboard and alerts are checked against, SIGTERM ends it
    with status 0, and then the image's health check reports it unhealthy. (One process, because starting one
    imports torch: seconds.)"""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = ServerProcess(tmp_path)
    try:
        env = {**srv.env, "EMBTRAIN_PORT": str(srv.port)}

        # Docker's HEALTHCHECK, exactly as the Dockerfile writes it.
        proc = _run(_dockerfile_healthcheck(), env)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # Compose's healthcheck, pointed at this server's port.
        compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
        test = compose["services"]["embtrain"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        proc = _run([a.replace("127.0.0.1:50051", f"127.0.0.1:{srv.port}") for a in test[1:]], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # Kubernetes' native gRPC probes: the health service names they ask for answer SERVING without a token.
        docs = [d for _, d in check._k8s_documents(DEPLOY / "k8s")]
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        container = sts["spec"]["template"]["spec"]["containers"][0]
        services = {container[p]["grpc"].get("service", "")
                    for p in ("livenessProbe", "readinessProbe", "startupProbe")}
        assert check.HEALTH_SERVICE in services
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in sorted(services):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

        # Prometheus' view: the metric families the checks allow are exactly those the server exports.
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        exported = dict(re.findall(r"^# TYPE (embtrain_\w+) (\w+)$", text, flags=re.M))
        assert exported == check.EXPORTED_METRICS

        # `docker stop` / pod deletion: SIGTERM, a clean exit, and the health check now fails.
        assert srv.stop() == 0, "".join(srv.log)
        proc = _run(_dockerfile_healthcheck(), env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
    finally:
        srv.kill()


def test_image_defaults_without_tokens_refuse_to_start(tmp_path: Path) -> None:
    # The image sets EMBTRAIN_HOST=0.0.0.0; with no token file the server must refuse rather than serve anyone.
    from embtrain_server import auth, config, server

    image_env = check.dockerfile_env((ROOT / "Dockerfile").read_text())
    assert image_env["EMBTRAIN_HOST"] == "0.0.0.0"
    env = {k: v for k, v in image_env.items() if k.startswith("EMBTRAIN_")}
    env["EMBTRAIN_CONFIG"] = str(DEPLOY / "compose" / "config.yaml")
    cfg, _ = config.load([], env=env)
    with pytest.raises(ValueError, match="without authentication"):
        server.check_exposure(cfg, auth.Authenticator(auth.load_tokens(cfg.token_file, cfg.tokens)))
