"""``pyramid-lb export kubernetes``: objects the official client's models take
field by field, with the ini's values; the pod's command run for real."""

import math
import os
import re
import signal
import subprocess
import time

import kubernetes.client
import pytest
import requests
import yaml

from pyramid_lb import cli
from pyramid_lb.export_kubernetes import MARGIN, PRESTOP_SLEEP, WAITRESS_SHUTDOWN
from tests.dispatcher.site import free_port
from tests.processes import BIN, LOGGING_INI, wait_until
from tests.test_export import binary

KUBECTL = binary("kubectl")

# Non-default values everywhere the export reads one.
KUBE_INI = """
[app:main]
use = egg:pyramid_lb#demo_app
pyramid.includes = pyramid_lb
pyramid_lb.trusted_proxies = 10.1.0.0/16
pyramid_lb.health_path = /alive
pyramid_lb.ready_path = /ready
pyramid_lb.drain_on_sigterm = {drain}
demo.session_secret = kubernetes-test-secret

[server:main]
use = {server}
host = 0.0.0.0
get port = http_port
clear_untrusted_proxy_headers = false
{server_extra}

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 4
base_port = {base_port}
startup_timeout = 45
health_check_interval = 1.5
health_check_timeout = 2.5
rise = 3
fall = 4
{dispatcher_extra}

[server:dispatcher]
use = egg:pyramid_lb#waitress
listen = *:9090

[DEFAULT]
http_port = 6543
"""


def ini_text(
    drain="12.5",
    server="egg:pyramid_lb#waitress",
    server_extra="graceful_timeout = 7",
    base_port=7100,
    dispatcher_extra="",
):
    return KUBE_INI.format(
        drain=drain,
        server=server,
        server_extra=server_extra,
        base_port=base_port,
        dispatcher_extra=dispatcher_extra,
    )


def exported(tmp_path, content=None):
    """``content`` (an ini's text) exported: the file, its YAML documents."""
    ini = tmp_path / "site.ini"
    ini.write_text(ini_text() if content is None else content)
    out = tmp_path / "site.yaml"
    assert cli.main(["export", "kubernetes", str(ini), "-o", str(out)]) == 0
    return out, [doc for doc in yaml.safe_load_all(out.read_text()) if doc]


# -- a strict loader over the client's models ---------------------------------

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def strict(data, kind: str, where: str):
    """``data`` as the client type ``kind`` (``V1Deployment``, ``List[str]``...);
    ValueError naming the place of any key the model does not have, or of a
    value of the wrong type. (The client's own deserialize skips unknown keys.)
    """
    listed = re.fullmatch(r"(?:List|list)\[(.+)\]", kind)
    if listed:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {data!r}")
        return [strict(v, listed[1], f"{where}[{i}]") for i, v in enumerate(data)]
    mapped = re.fullmatch(r"(?:Dict\[str, (.+)\]|dict\(str, (.+)\))", kind)
    if mapped:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {data!r}")
        inner = mapped[1] or mapped[2]
        return {k: strict(v, inner, f"{where}.{k}") for k, v in data.items()}
    if kind == "object":  # IntOrString and the like
        return data
    if kind in PRIMITIVES:
        if isinstance(data, bool) != (kind == "bool") or not isinstance(
            data, PRIMITIVES[kind]
        ):
            raise ValueError(f"{where}: expected {kind}, got {data!r}")
        return data
    model = getattr(kubernetes.client, kind)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a {kind} mapping, got {data!r}")
    attributes = {key: attribute for attribute, key in model.attribute_map.items()}
    unknown = sorted(set(data) - set(attributes))
    if unknown:
        raise ValueError(f"{where}: {kind} has no field {', '.join(unknown)}")
    return model(
        **{
            attributes[key]: strict(
                value, model.openapi_types[attributes[key]], f"{where}.{key}"
            )
            for key, value in data.items()
        }
    )


def typed(document):
    """A document as the model of its apiVersion and kind (``apps/v1``
    ``Deployment``: ``V1Deployment``)."""
    version = document["apiVersion"].rpartition("/")[2]
    return strict(document, version.capitalize() + document["kind"], document["kind"])


@pytest.fixture
def objects(tmp_path):
    out, documents = exported(tmp_path)
    deployment, service, budget = (typed(document) for document in documents)
    return out, deployment, service, budget


def test_every_document_is_a_kubernetes_object_without_an_unknown_field(tmp_path):
    _, documents = exported(tmp_path)
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
    ]
    assert [type(typed(d)).__name__ for d in documents] == [
        "V1Deployment",
        "V1Service",
        "V1PodDisruptionBudget",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(
            lambda spec: spec.update(terminationGracePeriodSecond=30),
            "V1PodSpec has no field terminationGracePeriodSecond",
            id="typo",
        ),
        pytest.param(
            lambda spec: spec["containers"][0].update(command="pserve"),
            "containers[0].command: expected a list",
            id="type",
        ),
        pytest.param(
            lambda spec: spec["containers"][0]["ports"][0].update(containerPort="1"),
            "containerPort: expected int",
            id="quoted number",
        ),
    ],
)
def test_the_strict_loader_catches_what_the_client_would_skip(
    tmp_path, change, message
):
    _, [deployment, *_] = exported(tmp_path)
    change(deployment["spec"]["template"]["spec"])
    with pytest.raises(ValueError, match=re.escape(message)):
        typed(deployment)


def test_the_pods_run_one_instance_each_on_its_port(objects):
    _, deployment, service, budget = objects
    assert deployment.metadata.name == "site"
    # instances = 4, the user's to change (the file says so).
    assert deployment.spec.replicas == 4
    strategy = deployment.spec.strategy
    assert strategy.type == "RollingUpdate"
    assert strategy.rolling_update.max_unavailable == 0
    assert strategy.rolling_update.max_surge == 1
    pod = deployment.spec.template.spec
    [container] = pod.containers
    assert container.command == ["pserve", "/app/site.ini", "http_port=7100"]
    assert [(p.name, p.container_port) for p in container.ports] == [("http", 7100)]
    env = {e.name: e for e in container.env}
    assert env["PYRAMID_LB_INSTANCE"].value_from.field_ref.field_path == (
        "metadata.name"
    )
    assert env["PYRAMID_LB_TRUSTED_PROXIES"].value == ""
    assert env["PYTHONUNBUFFERED"].value == "1"
    assert pod.security_context.run_as_non_root is True
    labels = deployment.spec.template.metadata.labels
    assert deployment.spec.selector.match_labels == labels
    assert service.spec.selector == labels
    assert budget.spec.selector.match_labels == labels
    # Reached on [server:dispatcher]'s port.
    [port] = service.spec.ports
    assert (port.port, port.target_port) == (9090, "http")
    assert budget.spec.max_unavailable == 1


def test_the_probes_are_the_addons_paths_timed_as_the_dispatcher_probes(objects):
    _, deployment, _, _ = objects
    [container] = deployment.spec.template.spec.containers
    ready, alive, start = (
        container.readiness_probe,
        container.liveness_probe,
        container.startup_probe,
    )
    for probe in (ready, alive, start):
        assert probe.http_get.port == "http"
        # health_check_timeout = 2.5, rounded up
        assert probe.timeout_seconds == 3
    assert ready.http_get.path == start.http_get.path == "/ready"
    assert alive.http_get.path == "/alive"
    # health_check_interval = 1.5, rounded up; rise = 3, fall = 4
    assert (ready.period_seconds, ready.success_threshold) == (2, 3)
    assert ready.failure_threshold == 4
    assert alive.period_seconds > ready.period_seconds
    assert alive.failure_threshold == 3
    # startup_timeout = 45, in periods of 2 s
    assert start.period_seconds * start.failure_threshold >= 45
    assert start.period_seconds * (start.failure_threshold - 1) < 45


def test_the_grace_period_outlasts_the_sleep_the_drain_and_the_stop(objects):
    out, deployment, _, _ = objects
    pod = deployment.spec.template.spec
    [container] = pod.containers
    assert container.lifecycle.pre_stop._exec.command == [
        "sleep",
        str(PRESTOP_SLEEP),
    ]
    # preStop 5 + drain_on_sigterm 12.5 + [server:main] graceful_timeout 7,
    # rounded up, + the margin.
    grace = math.ceil(PRESTOP_SLEEP + 12.5 + 7) + MARGIN
    assert pod.termination_grace_period_seconds == grace == 30
    text = out.read_text()
    assert "preStop's sleep 5 + pyramid_lb.drain_on_sigterm 12.5" in text
    assert "+ a margin of 5 = 30 seconds" in text


def test_waitresss_own_server_gets_its_shutdown_time(tmp_path):
    content = ini_text(server="egg:waitress#main", server_extra="")
    _, [deployment, *_] = exported(tmp_path, content)
    spec = typed(deployment).spec.template.spec
    grace = math.ceil(PRESTOP_SLEEP + 12.5 + WAITRESS_SHUTDOWN) + MARGIN
    assert spec.termination_grace_period_seconds == grace


def test_what_the_dispatcher_does_that_a_service_cannot_is_said(tmp_path):
    content = ini_text(
        dispatcher_extra="strategy = hash\nmax_memory = 256M\n"
        "sticky = cookie\naffinity_secret = s\nbackends = http://10.0.0.5:6543"
    )
    out, [deployment, service, _] = exported(tmp_path, content)
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    [container] = typed(deployment).spec.template.spec.containers
    assert container.resources.limits == {"memory": str(256 << 20)}
    text = out.read_text()
    assert "a Service cannot route by the lb_affinity cookie" in text
    assert "backends in the ini run elsewhere" in text


APP_WITHOUT_PATHS = """
[app:main]
use = egg:pyramid_lb#demo_app
pyramid_lb.drain_on_sigterm = 3

[server:main]
use = {server}
port = 7300

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 1
health_check_path = /ping
liveness_path = /live
"""


def test_an_app_without_the_addons_paths_is_probed_where_the_dispatcher_probes(
    tmp_path,
):
    """No path settings in [app:main]: the dispatcher's. No
    [server:dispatcher]: the Service takes the pod's port."""
    content = APP_WITHOUT_PATHS.format(server="egg:waitress#main")
    out, documents = exported(tmp_path, content)
    deployment, service, _ = (typed(document) for document in documents)
    [container] = deployment.spec.template.spec.containers
    assert container.readiness_probe.http_get.path == "/ping"
    assert container.startup_probe.http_get.path == "/ping"
    assert container.liveness_probe.http_get.path == "/live"
    # port = 7300 whatever http_port says: not passed.
    assert container.command == ["pserve", "/app/site.ini"]
    assert service.spec.ports[0].port == 7300
    text = out.read_text()
    assert "waitress deletes the headers" in text  # no clear_untrusted...
    assert "With one pod, that one is down meanwhile" in text


def test_a_server_other_than_waitress_leaves_its_stop_time_to_the_user(tmp_path):
    server = "call:tests.fixtureapps.counting_app:server_factory"
    out, [deployment, *_] = exported(tmp_path, APP_WITHOUT_PATHS.format(server=server))
    spec = typed(deployment).spec.template.spec
    assert spec.termination_grace_period_seconds == PRESTOP_SLEEP + 3 + MARGIN
    assert (
        "+ 0 for the requests in flight (unknown for "
        "tests.fixtureapps.counting_app:server_factory: add its time)"
    ) in out.read_text()


def test_the_pods_command_serves_its_probes_and_drains_on_sigterm(processes, tmp_path):
    """What the kubelet would see of the pod, with its command and its
    environment run here: probes answered, SIGTERM drains (readiness fails,
    requests served), and the pod is gone within its grace period."""
    port = free_port()
    content = ini_text(drain="1", base_port=port) + LOGGING_INI
    _, [deployment, *_] = exported(tmp_path, content)
    pod = typed(deployment).spec.template.spec
    [container] = pod.containers
    assert container.command[1] == "/app/site.ini"
    command = [BIN / "pserve", tmp_path / "site.ini", *container.command[2:]]
    env = {e.name: e.value or "" for e in container.env}
    env["PYRAMID_LB_INSTANCE"] = "site-6d9f7c-x2x4q"  # the pod's name
    served = processes.start(command, name="pod", env=env)
    base = f"http://127.0.0.1:{container.ports[0].container_port}"
    start = container.startup_probe
    wait_until(
        lambda: answers(base + start.http_get.path),
        start.period_seconds * start.failure_threshold,
    )
    assert answers(base + container.liveness_probe.http_get.path)
    whoami = requests.get(base + "/whoami", timeout=5).json()
    assert whoami["instance"] == "site-6d9f7c-x2x4q"
    signalled = time.monotonic()
    served.signal(signal.SIGTERM)
    wait_until(lambda: not answers(base + container.readiness_probe.http_get.path))
    assert requests.get(base + "/whoami", timeout=5).status_code == 200
    served.wait(pod.termination_grace_period_seconds - PRESTOP_SLEEP)
    assert time.monotonic() - signalled >= 1  # drain_on_sigterm = 1


def answers(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_reads_every_document(tmp_path):
    """Offline: `kubectl label --local` decodes the file as kubectl does
    (every document, comments and quoting), without an API server."""
    out, _ = exported(tmp_path)
    result = kubectl(tmp_path, "label", "--local", "-f", out, "checked=yes", "-o=name")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split() == [
        "deployment.apps/site",
        "service/site",
        "poddisruptionbudget.policy/site",
    ]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_create_dry_run_takes_the_file(tmp_path):
    """The README's check. Against the cluster of $PYRAMID_LB_TEST_KUBECONFIG
    when set (validated against its schema); else with a throwaway
    kubeconfig, which needs an API server all the same."""
    out, documents = exported(tmp_path)
    given = os.environ.get("PYRAMID_LB_TEST_KUBECONFIG")
    validate = "--validate=strict" if given else "--validate=false"
    result = kubectl(
        tmp_path, "create", "--dry-run=client", validate, "-f", out, "-o=yaml"
    )
    if result.returncode and not given and "unable to recognize" in result.stderr:
        pytest.skip(
            "kubectl create --dry-run=client needs an API server even with "
            "--validate=false and a throwaway kubeconfig: it maps each kind to "
            "its resource through the server's discovery (/api, /apis); set "
            "PYRAMID_LB_TEST_KUBECONFIG to a cluster's kubeconfig to run it"
        )
    assert (result.returncode, result.stderr) == (0, "")
    created = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    if len(created) == 1 and created[0].get("kind") == "List":
        created = created[0]["items"]
    assert [doc["kind"] for doc in created] == [doc["kind"] for doc in documents]


def kubectl(tmp_path, *args):
    """kubectl with the test's kubeconfig: $PYRAMID_LB_TEST_KUBECONFIG, else
    one naming a loopback port nobody listens on (and a token, so that it
    asks for no password)."""
    config = os.environ.get("PYRAMID_LB_TEST_KUBECONFIG")
    if not config:
        config = tmp_path / "kubeconfig"
        config.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: none, cluster: {{server: "
            f"'https://127.0.0.1:{free_port()}'}}}}]\n"
            "users: [{name: none, user: {token: none}}]\n"
            "contexts: [{name: none, context: {cluster: none, user: none}}]\n"
            "current-context: none\n"
        )
    return subprocess.run(
        [KUBECTL, f"--kubeconfig={config}", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@pytest.mark.parametrize(
    "content, args, message",
    [
        pytest.param(
            ini_text(),
            ["--listen", "127.0.0.1:80"],
            "--listen has no meaning",
            id="listen",
        ),
        pytest.param(
            ini_text().replace("pyramid_lb.drain_on_sigterm = 12.5", ""),
            [],
            "does not set pyramid_lb.drain_on_sigterm",
            id="no drain",
        ),
        pytest.param(
            ini_text().replace("host = 0.0.0.0", "host = localhost"),
            [],
            "[server:main] listens on localhost: in a pod",
            id="loopback",
        ),
        pytest.param(
            ini_text().replace("get port = http_port", "port = 0"),
            [],
            "[server:main] gives no fixed port ('0')",
            id="port 0",
        ),
        pytest.param(
            ini_text(dispatcher_extra="ini_files = other.ini"),
            [],
            "ini_files = other.ini: a Deployment runs copies of one [app:main]",
            id="ini_files",
        ),
        pytest.param(
            ini_text(dispatcher_extra="backends = http://10.0.0.5:6543").replace(
                "instances = 4", "instances = 0"
            ),
            [],
            "instances = 0: the pods are copies",
            id="no instances",
        ),
        pytest.param(
            ini_text().replace("get port = http_port", "listen = *:7100 *:7101"),
            [],
            "listens on ports 7100, 7101: a pod serves one",
            id="two ports",
        ),
        pytest.param(
            ini_text(server_extra="graceful_timeout = soon"),
            [],
            "[server:main] graceful_timeout = 'soon' is not valid",
            id="graceful_timeout",
        ),
        pytest.param(
            ini_text(server="call:no_such_module:server"),
            [],
            "[server:main]: No module named 'no_such_module'",
            id="server not importable",
        ),
        pytest.param(
            ini_text().replace("/ready", "ready"),
            [],
            "pyramid_lb.ready_path",
            id="bad add-on setting",
        ),
    ],
)
def test_bad_kubernetes_input_is_one_line_and_exit_1(
    tmp_path, capsys, content, args, message
):
    ini = tmp_path / "site.ini"
    ini.write_text(content)
    (tmp_path / "other.ini").write_text(content)
    assert cli.main(["export", "kubernetes", str(ini), *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pyramid-lb: error: ")
    assert captured.err.count("\n") == 1 and message in captured.err
