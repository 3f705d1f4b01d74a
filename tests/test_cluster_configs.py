"""Offline validation of the deployment configs in cluster/.

What is checked, and by what:

* ``cluster/aws.yaml`` and ``cluster/gcp.yaml`` (Ray cluster launcher):
  - the JSON schema shipped in the ray wheel (``ray/autoscaler/ray-schema.json``,
    draft-07, rejects unknown keys, integer ``resources``), via ``jsonschema``;
  - ``ray.autoscaler._private.util.validate_config`` on the raw file (schema + Ray's own
    checks: ``head_node_type`` is one of ``available_node_types``, the sum of
    ``min_workers`` <= ``max_workers``, ``cluster_synced_files`` present);
  - ``ray.autoscaler._private.util.prepare_config`` (merges the provider's
    ``defaults.yaml``, merges setup commands, validates the docker section, fills each
    node type's min/max workers) followed by ``validate_config`` on its result. This is
    exactly what ``ray up`` does in ``commands._bootstrap_config`` before it imports the
    cloud provider; the cloud steps after it (``fillout_available_node_types_resources``
    and ``provider.bootstrap_config``: key pairs, IAM, subnets) need credentials and are
    not run. The tests block sockets to prove nothing here reaches the network.
  - project rules: CPU-only head, GPU worker type with ``min_workers == 0`` and an
    integer GPU count > 0, pinned install via ``file_mounts`` + ``pip install -e``.
* ``cluster/kuberay/*.yaml``: parsed with ``yaml.safe_load_all`` and checked against the
  fields the KubeRay ``ray.io/v1`` CRDs require (RayCluster, RayJob, RayCronJob) and
  ``batch/v1`` CronJob. RayCronJob field names are those of the raycronjobs.ray.io CRD in
  ray-project/kuberay (``spec.schedule``, ``spec.jobTemplate`` = an inlined RayJob spec,
  ``spec.suspend``).
* No file in cluster/ carries an inline credential.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray_autoscaler = pytest.importorskip("ray.autoscaler")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
RAY_SCHEMA_PATH = Path(ray_autoscaler.__file__).parent / "ray-schema.json"


# --------------------------------------------------------------------------- helpers


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _load_all(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _ray_schema() -> dict:
    with open(RAY_SCHEMA_PATH) as f:
        return json.load(f)


def _pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_ray_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def _is_gpu_type(node_type: dict) -> bool:
    return node_type.get("resources", {}).get("GPU", 0) > 0


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted during offline validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(params=LAUNCHER_CONFIGS)
def launcher(request) -> tuple[str, dict]:
    return request.param, _load(CLUSTER / request.param)


# ------------------------------------------------------------ cluster launcher (VMs)


def test_ray_schema_ships_in_the_wheel():
    schema = _ray_schema()
    assert schema.get("additionalProperties") is False, "schema should reject unknown keys"
    assert {"provider", "cluster_name"} <= set(schema["required"])


def test_launcher_config_matches_ray_json_schema(launcher):
    name, config = launcher
    errors = _schema_errors(config)
    assert not errors, f"{name} violates ray-schema.json:\n" + "\n".join(errors)


def test_launcher_config_passes_ray_validate_and_prepare(launcher, no_network):
    name, config = launcher
    raw = copy.deepcopy(config)
    validate_config(raw)  # schema + Ray's cross-field checks on the file as written
    assert raw == config, "validate_config must not mutate the config"

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # what `ray up` validates before touching the cloud

    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["min_workers"] == 0 and types[head]["max_workers"] == 0
    # Docker stays disabled after the provider defaults are merged in.
    assert not prepared.get("docker"), f"{name}: docker should be disabled"
    # merge_setup_commands: the pinned install runs on the head and on every worker.
    install = [c for c in prepared["setup_commands"] if "pip install" in c and "-e" in c]
    assert install
    for cmd in install:
        assert cmd in prepared["head_setup_commands"]
        assert cmd in prepared["worker_setup_commands"]
    # The provider defaults must not sneak in the nightly-wheel install they carry.
    assert not any("ray-wheels" in c for c in prepared["head_setup_commands"])


def test_launcher_node_types(launcher):
    name, config = launcher
    types = config["available_node_types"]
    head = types[config["head_node_type"]]

    # Head: no GPU, neither as a Ray resource nor as hardware.
    assert head["resources"].get("GPU", 0) == 0, f"{name}: head must not advertise a GPU"
    assert "guestAccelerators" not in head["node_config"]
    assert not re.match(r"^(g|p)\d", head["node_config"].get("InstanceType", "m")), (
        f"{name}: head should be a CPU instance type"
    )

    gpu_types = {k: v for k, v in types.items() if _is_gpu_type(v)}
    assert gpu_types, f"{name}: no worker type with a GPU resource"
    assert config["head_node_type"] not in gpu_types
    for tname, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name}/{tname}: GPU workers must scale to zero"
        assert 0 < t["max_workers"] <= config["max_workers"], f"{name}/{tname}: max_workers"
        for res, count in t["resources"].items():
            assert isinstance(count, int) and not isinstance(count, bool), (
                f"{name}/{tname}: resource {res} must be an integer, got {count!r}"
            )
        # On GCP the Ray GPU count must match the attached accelerators.
        accels = t["node_config"].get("guestAccelerators")
        if config["provider"]["type"] == "gcp":
            assert accels, f"{name}/{tname}: GPU type without guestAccelerators"
            assert t["resources"]["GPU"] == sum(a["acceleratorCount"] for a in accels)
            # GCE refuses GPU VMs that would live-migrate.
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"

    # Every worker type can scale to zero: nothing is paid for while no audit runs.
    sum_min = sum(t.get("min_workers", 0) for k, t in types.items() if k != config["head_node_type"])
    assert sum_min == 0
    assert isinstance(config["idle_timeout_minutes"], (int, float)) and config["idle_timeout_minutes"] > 0


def test_launcher_installs_project_with_pins(launcher):
    name, config = launcher
    assert "docker" not in config, f"{name}: docker is disabled on purpose (see the header)"
    assert config["file_mounts"].get("~/vog-ray") == ".", (
        f"{name}: the working tree must be mounted at ~/vog-ray"
    )
    cmds = config["setup_commands"]
    joined = "\n".join(cmds)
    assert "file://" not in joined, "pip install 'vog-ray @ file://...' breaks on a fresh node"
    install = [c for c in cmds if "pip install" in c and "-e ~/vog-ray" in c]
    assert install, f"{name}: setup_commands must `pip install -e ~/vog-ray`"
    assert all("-c ~/vog-ray/constraints.txt" in c for c in install), (
        f"{name}: install must use the pins in constraints.txt"
    )
    # Ray is started from the venv the project was installed into (entrypoints run with
    # the raylet's PATH), with token auth enforced on every node.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("vog-venv/bin/activate" in c for c in start), key
        assert all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in config["file_mounts"]
    if config["provider"]["type"] == "aws":
        # Ray 2.60 resolves a missing ImageId / "latest_dlami" to an Ubuntu 18.04 DLAMI
        # whose Python cannot run ray 2.60.
        for t in config["available_node_types"].values():
            assert t["node_config"].get("ImageId", "latest_dlami") not in ("", "latest_dlami")


def test_constraints_pin_the_versions_the_clusters_use():
    ray_version = _pinned("ray")
    assert ray_version == "2.60.0"
    _pinned("torch")
    _pinned("torchvision")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray_version}-"), base
    assert "-c constraints.txt" in dockerfile


# ------------------------------------------------------------------ negative tests


def test_schema_rejects_unknown_top_level_key():
    config = _load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["idle_timeout_minuets"] = 5  # typo of idle_timeout_minutes
    errors = _schema_errors(bad)
    assert any("idle_timeout_minuets" in e for e in errors), errors
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_schema_rejects_unknown_node_type_key():
    config = _load(CLUSTER / "gcp.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_schema_rejects_fractional_gpu_resource():
    config = _load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_validate_config_rejects_unknown_head_node_type():
    config = _load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


# ------------------------------------------------------------------------- KubeRay

RAY_JOB_SPEC_FIELDS = {
    # RayJobSpec json names (ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go,
    # CRD ray.io_rayjobs.yaml / the jobTemplate of ray.io_raycronjobs.yaml).
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionPolicy",
    "deletionStrategy", "entrypoint", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAY_CLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "authOptions",
    "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy",
}
# raycronjobs.ray.io v1 (KubeRay 1.6): required schedule + jobTemplate, optional suspend;
# timeZone arrives with KubeRay 1.7.
RAY_CRON_JOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend", "timeZone"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CRON_RE = re.compile(r"^(\S+\s+){4}\S+$")


def _one(path: Path, kind: str) -> dict:
    docs = _load_all(path)
    matching = [d for d in docs if d.get("kind") == kind]
    assert len(matching) == 1, f"{path.name}: expected exactly one {kind}, got {len(matching)}"
    return matching[0]


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert isinstance(containers, list) and containers
    for c in containers:
        assert c.get("name") and c.get("image"), c
    return containers


def _check_ray_cluster_spec(spec: dict, where: str, max_gpu_replicas: int | None = None):
    unknown = set(spec) - RAY_CLUSTER_SPEC_FIELDS
    assert not unknown, f"{where}: unknown RayCluster spec fields {unknown}"
    assert spec["rayVersion"] == _pinned("ray"), f"{where}: rayVersion != constraints.txt"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    if "autoscalerOptions" in spec:
        mode = spec["autoscalerOptions"].get("upscalingMode", "Default")
        assert mode in {"Default", "Aggressive", "Conservative"}

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        f"{where}: rayStartParams values must be strings"
    )
    head_containers = _containers(head["template"])
    for c in head_containers:
        limits = c.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits, f"{where}: the head must not take a GPU"
    images = {c["image"] for c in head_containers}

    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"{where}: duplicate groupName"
    gpu_groups = []
    for g in groups:
        for field in ("groupName", "minReplicas", "maxReplicas", "replicas", "rayStartParams"):
            assert field in g, f"{where}/{g.get('groupName')}: missing {field}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        containers = _containers(g["template"])
        images |= {c["image"] for c in containers}
        gpus = [
            c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers
        ]
        if any(gpus):
            gpu_groups.append(g)
            for c in containers:
                res = c["resources"]
                gpu = res["limits"]["nvidia.com/gpu"]
                assert isinstance(gpu, int) and gpu > 0, f"{where}: GPU limit {gpu!r}"
                # Kubernetes requires requests == limits for extended resources.
                assert res.get("requests", {}).get("nvidia.com/gpu", gpu) == gpu
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, f"{where}/{g['groupName']}: GPU group must scale to zero"
        assert g["maxReplicas"] > 0
        if max_gpu_replicas is not None:
            assert g["maxReplicas"] <= max_gpu_replicas
    assert len(images) == 1, f"{where}: head and workers must run the same image: {images}"


def _check_ray_job_spec(spec: dict, where: str, script: str):
    unknown = set(spec) - RAY_JOB_SPEC_FIELDS
    assert not unknown, f"{where}: unknown RayJob spec fields {unknown}"
    entrypoint = spec["entrypoint"]
    assert re.match(rf"^python\s+{re.escape(script)}\s+\S+\.ya?ml$", entrypoint), entrypoint
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"
    # Ray logs runtime envs in plain text: no secrets in there.
    for key in runtime_env.get("env_vars", {}):
        assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", key, re.I), key
    assert "clusterSelector" not in spec, f"{where}: should create its own cluster"
    _check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")


def test_kuberay_manifests_parse():
    files = sorted(KUBERAY.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"
    }
    for f in files:
        docs = _load_all(f)
        assert docs, f.name
        for d in docs:
            assert d.get("apiVersion") and d.get("kind") and d["metadata"]["name"], f.name


def test_raycluster_manifest():
    rc = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    # Head keeps Ray tasks off itself.
    assert rc["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_rayjob_manifest():
    rj = _one(KUBERAY / "rayjob.yaml", "RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    _check_ray_job_spec(rj["spec"], "rayjob.yaml", "jobs/audit.py")


def test_raycronjob_manifest():
    rcj = _one(KUBERAY / "raycronjob.yaml", "RayCronJob")
    assert rcj["apiVersion"] == "ray.io/v1"
    spec = rcj["spec"]
    unknown = set(spec) - RAY_CRON_JOB_SPEC_FIELDS
    assert not unknown, f"raycronjob.yaml: fields not in the RayCronJob CRD: {unknown}"
    assert CRON_RE.match(spec["schedule"]), spec["schedule"]
    assert isinstance(spec.get("suspend", False), bool)
    template = spec["jobTemplate"]
    # jobTemplate IS the RayJob spec (no metadata/spec wrapper in the 1.6 CRD).
    assert "spec" not in template and "entrypoint" in template
    _check_ray_job_spec(template, "raycronjob.yaml.jobTemplate", "jobs/scheduled_audit.py")
    # No concurrencyPolicy in this CRD: a run must end before the next one starts.
    assert 0 < template["activeDeadlineSeconds"] < 24 * 3600
    assert spec["schedule"].split()[2:] == ["*", "*", "*"], "deadline assumes a daily schedule"


def test_cronjob_manifest():
    cj = _one(KUBERAY / "cronjob.yaml", "CronJob")
    assert cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    assert CRON_RE.match(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = _containers(pod)
    argv = container.get("command", []) + container.get("args", [])
    cmd = " ".join(argv)
    assert cmd.startswith("ray job submit"), cmd
    assert "--no-wait" not in argv, "the pod must wait for the job, or Forbid means nothing"
    address = argv[argv.index("--address") + 1]
    rc = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    assert address == f"http://{rc['metadata']['name']}-head-svc:8265", address
    assert "--working-dir" in argv
    after = argv[argv.index("--") + 1 :]
    assert after[:2] == ["python", "jobs/scheduled_audit.py"] and after[2].endswith(".yaml")
    # Same image as the standing cluster, so ray versions (and the code) match.
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]


# ---------------------------------------------------------------- no inline secrets

SECRET_NAME_RE = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
# NAME: value / NAME=value with a literal (not a $VAR, <placeholder>, {{template}} or
# a shell substitution), e.g. `AWS_SECRET_ACCESS_KEY: wJalr...`.
INLINE_SECRET_RE = re.compile(
    r"\b(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)"
    r"[\"']?\s*[:=]\s*[\"']?(?![\s\"'$<{(])[A-Za-z0-9/+=]{4,}"
)
AWS_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _inline_secrets(text: str) -> list[str]:
    return [m.group(0) for m in INLINE_SECRET_RE.finditer(text)] + [
        m.group(0) for m in AWS_KEY_ID_RE.finditer(text)
    ]


def _walk_env(node, path=""):
    """Yield (path, env entry) for every container env list in a manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                for e in v:
                    yield f"{path}.env", e
            else:
                yield from _walk_env(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_env(v, f"{path}[{i}]")


def test_secret_detector_catches_inline_values():
    assert _inline_secrets("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert _inline_secrets("env:\n  AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n")
    assert _inline_secrets('"RAY_AUTH_TOKEN": "0123456789abcdef"')
    assert not _inline_secrets('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
    assert not _inline_secrets("- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:\n")


def test_no_inline_secrets_in_cluster_files():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for p in files:
        hits = _inline_secrets(p.read_text())
        assert not hits, f"{p.relative_to(REPO)} has an inline credential: {hits}"


def test_manifest_credentials_come_from_secret_refs():
    seen = set()
    for f in sorted(KUBERAY.glob("*.yaml")):
        for doc in _load_all(f):
            assert doc["kind"] != "Secret", f"{f.name}: Secrets are created out of band"
            for where, entry in _walk_env(doc):
                name = entry["name"]
                if SECRET_NAME_RE.search(name):
                    seen.add(name)
                    assert "value" not in entry, f"{f.name}{where}: {name} has an inline value"
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert ref["name"] and ref["key"], f"{f.name}{where}: {name}"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= seen
