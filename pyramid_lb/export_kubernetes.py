"""``pyramid-lb export kubernetes``: the dispatcher's setup as a Deployment of
one pod per instance, a Service balancing over them and a PodDisruptionBudget.

Each pod runs what one spawned instance runs, ``pserve INI http_port=PORT``,
with the add-on's endpoints as its probes. Written by hand as YAML text, for
the comments: strings are JSON-quoted, which YAML reads as they are.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

from waitress.adjustments import asbool

from pyramid_lb import parse_addon
from pyramid_lb.export import _dispatcher
from pyramid_lb.export_docker import (
    EVERY_ADDRESS,
    IMAGE_DIR,
    IMAGE_UID,
    image_name,
    listen_addresses,
    printable,
)
from pyramid_lb.process import (
    INSTANCE_ENV,
    TRUSTED_PROXIES_ENV,
    StartupError,
    is_waitress,
    serve_paste,
)
from pyramid_lb.process import load as load_section
from pyramid_lb.server import graceful_timeout
from pyramid_lb.settings import ADDON_PREFIX, SettingsError

#: Seconds a stopping pod goes on serving before its SIGTERM, while the
#: endpoint changes reach kube-proxy and the ingress: the cluster's, not the
#: ini's (the file says so, for the user to choose).
PRESTOP_SLEEP = 5
#: Seconds the kubelet waits beyond what the pod's stop takes: Python's exit.
MARGIN = 5
#: Seconds waitress's own server gives requests in flight once it is told to
#: stop (its task dispatcher's ``shutdown(timeout=5)``).
WAITRESS_SHUTDOWN = 5
#: The liveness probe runs this many times less often than readiness.
LIVENESS_EVERY = 10
LIVENESS_FAILURES = 3


class Pod(NamedTuple):
    """What a pod serves: ``[server:main]`` as pserve reads it there."""

    port: int
    port_from_variable: bool  # whether ``http_port=`` sets it
    finish: float | None  # time requests in flight get once it stops; None: unknown
    finish_source: str  # where that time comes from, for the comment
    strips_forwarded: bool  # waitress deletes forwarded headers before the app


def _q(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(str(text))


def _seconds(value: float) -> int:
    """A whole number of seconds Kubernetes takes, at least 1."""
    return max(1, math.ceil(value))


def _addon(path: str, port: int) -> tuple[dict[str, Any], set[str]]:
    """The add-on's settings of ``[app:main]``, checked, and the keys it sets."""
    conf = load_section(
        path, "app:main", {"http_port": str(port)}, hint=": the pods serve it"
    ).local_conf
    try:
        # The pod's own PYRAMID_LB_TRUSTED_PROXIES is added there, not here.
        return parse_addon(conf, environ={}), set(conf)
    except SettingsError as exc:
        raise StartupError(f"{path} [app:main] {exc}") from None


def _pod(path: str, port: int) -> Pod:
    """``[server:main]`` of ``path`` as ``pserve path http_port=port`` serves it."""
    hint = ": the pods serve it with pserve"
    try:
        context = load_section(path, "server:main", {"http_port": str(port)}, hint)
    except ImportError as exc:
        raise StartupError(f"{path} [server:main]: {exc}") from None
    conf = dict(context.local_conf)
    where = f"{path} [server:main]"
    waitress = is_waitress(context)
    ports = set()
    for host, number in listen_addresses(conf):
        if host not in EVERY_ADDRESS:
            raise StartupError(
                f"{where} listens on {host}: in a pod it must listen on every "
                "address (host = * or listen = *:PORT), or neither the kubelet's "
                "probes nor the Service reach it"
            )
        if number == "" and waitress:
            number = "8080"  # waitress's own default
        if not (number.isascii() and number.isdigit() and 0 < int(number) < 65536):
            raise StartupError(
                f"{where} gives no fixed port ({number or 'none'!r}): a pod's "
                "probes and Service need one (get port = http_port takes the "
                "instance's)"
            )
        ports.add(int(number))
    if len(ports) > 1:
        raise StartupError(
            f"{where} listens on ports {', '.join(map(str, sorted(ports)))}: a "
            "pod serves one"
        )
    [served] = ports
    if context.object is serve_paste:  # egg:pyramid_lb#waitress
        try:
            finish = graceful_timeout(conf)
        except SettingsError as exc:
            raise StartupError(f"{where} {exc}") from None
        source = "[server:main] graceful_timeout"
    elif waitress:
        finish, source = WAITRESS_SHUTDOWN, "waitress's own shutdown"
    else:
        runner = context.object
        runner = f"{runner.__module__}:{getattr(runner, '__qualname__', runner)}"
        finish, source = None, f"unknown for {runner}: add its time"
    strips = (
        waitress
        and not conf.get("trusted_proxy")
        and asbool(conf.get("clear_untrusted_proxy_headers", True))
    )
    return Pod(served, served == port, finish, source, bool(strips))


def _probe(kind: str, path: str, period: int, timeout: int, **more: int) -> list:
    lines = [
        f"          {kind}:",
        "            httpGet:",
        f"              path: {_q(path)}",
        "              port: http",
        f"            periodSeconds: {period}",
        f"            timeoutSeconds: {timeout}",
    ]
    return lines + [f"            {key}: {value}" for key, value in more.items()]


def kubernetes(ini: str) -> str:
    """The Deployment, Service and PodDisruptionBudget of ``ini``'s setup."""
    path = printable(os.path.abspath(ini))
    dispatcher = _dispatcher(path)
    settings = dispatcher.config
    if settings.ini_files:
        raise StartupError(
            f"{path} [app:dispatcher] ini_files = {' '.join(settings.ini_files)}: "
            "a Deployment runs copies of one [app:main]; export each file of its "
            "own (with instances = N)"
        )
    if not settings.instances:
        raise StartupError(
            f"{path} [app:dispatcher] instances = 0: the pods are copies of "
            "[app:main], one per instance (backends run elsewhere); set instances = N"
        )
    port = settings.base_port
    addon, given = _addon(path, port)
    drain = addon[ADDON_PREFIX + "drain_on_sigterm"]
    if drain is None:
        # The add-on reads it from [app:main] alone (no variable, no argument).
        raise StartupError(
            f"{path} [app:main] does not set {ADDON_PREFIX}drain_on_sigterm: a "
            "pod must go on serving for a while after SIGTERM, while the "
            f"balancers notice; set it (e.g. {ADDON_PREFIX}drain_on_sigterm = 10; "
            "the dispatcher's own instances are drained without it)"
        )
    pod = _pod(path, port)
    # The paths the app serves: the add-on's, else what the dispatcher probes
    # (an app without the add-on has its own).
    ready = addon[ADDON_PREFIX + "ready_path"]
    if ADDON_PREFIX + "ready_path" not in given:
        ready = settings.health_check_path
    alive = addon[ADDON_PREFIX + "health_path"]
    if ADDON_PREFIX + "health_path" not in given:
        alive = settings.liveness_path
    name = image_name(path)
    period = _seconds(settings.health_check_interval)
    timeout = _seconds(settings.health_check_timeout)
    starts = math.ceil(settings.startup_timeout / period)
    finish = pod.finish or 0
    grace = math.ceil(PRESTOP_SLEEP + drain + finish) + MARGIN
    command = ["pserve", f"{IMAGE_DIR}/{os.path.basename(path)}"]
    if pod.port_from_variable:
        command.append(f"http_port={pod.port}")
    trusted = addon[ADDON_PREFIX + "trusted_proxies"]
    service_port = _service_port(path) or pod.port
    labels = [f"    app.kubernetes.io/name: {_q(name)}"]

    lines = [
        "# Kubernetes objects generated by `pyramid-lb export kubernetes` from",
        f"# {path}.",
        "# One pod per instance, each running what one instance of the",
        "# dispatcher runs (pserve of [app:main] and [server:main], on port",
        f"# {pod.port}), and a Service balancing over the pods that are ready.",
        "# The probes are the pyramid_lb add-on's endpoints: the app includes it.",
        "# Check it, then apply it:",
        "#     kubectl create --dry-run=client -f FILE -o yaml",
        "#     kubectl apply -f FILE",
        "# Export again after changing the ini file.",
        "---",
        "apiVersion: apps/v1",
        "kind: Deployment",
        "metadata:",
        f"  name: {_q(name)}",
        "  labels:",
        *labels,
        "spec:",
        f"  # instances = {settings.instances} in the ini: one pod each. Choose how "
        "many you run",
        "  # (or leave it to a HorizontalPodAutoscaler, without this line).",
        *(
            [
                "  # backends in the ini run elsewhere: they are not among these",
                "  # pods, nor behind the Service.",
            ]
            if settings.backends
            else []
        ),
        f"  replicas: {settings.instances}",
        "  selector:",
        "    matchLabels:",
        *(f"  {line}" for line in labels),
        "  # As the dispatcher's rolling restart: a new pod first, an old one",
        "  # stopped only once it is ready, never fewer ready pods than replicas.",
        "  strategy:",
        "    type: RollingUpdate",
        "    rollingUpdate:",
        "      maxUnavailable: 0",
        "      maxSurge: 1",
        "  template:",
        "    metadata:",
        "      labels:",
        *(f"    {line}" for line in labels),
        "    spec:",
        f"      # preStop's sleep {PRESTOP_SLEEP} + {ADDON_PREFIX}drain_on_sigterm "
        f"{drain:g}",
        f"      # + {finish:g} for the requests in flight ({pod.finish_source})",
        f"      # + a margin of {MARGIN} = {grace} seconds; SIGKILL after that.",
        f"      terminationGracePeriodSeconds: {grace}",
        "      securityContext:",
        f"        # The image of `pyramid-lb export docker` runs as user {IMAGE_UID}.",
        "        runAsNonRoot: true",
        "      containers:",
        '        - name: "app"',
        "          # Choose: your image, with the app, pyramid_lb and this ini file",
        f"          # in {IMAGE_DIR}/ (`pyramid-lb export docker` writes a "
        "Dockerfile for one).",
        f"          image: {_q(name + ':latest')}",
        f"          command: [{', '.join(map(_q, command))}]",
        "          ports:",
        "            - name: http",
        f"              containerPort: {pod.port}",
        "          env:",
        "            # request.lb_instance: the pod's name.",
        f"            - name: {INSTANCE_ENV}",
        "              valueFrom:",
        "                fieldRef:",
        "                  fieldPath: metadata.name",
        "            # Choose: whose forwarded headers the app applies, besides",
        f"            # {ADDON_PREFIX}trusted_proxies of the ini "
        f"({str(trusted) or 'nobody'}):",
        "            # your ingress controller's pods, or the pod network (e.g.",
        "            # 10.244.0.0/16). Empty: only the ini's.",
    ]
    if pod.strips_forwarded:
        lines += [
            "            # [server:main] sets neither clear_untrusted_proxy_headers",
            "            # = false nor trusted_proxy: waitress deletes the headers",
            "            # before the add-on sees them. Set the first.",
        ]
    lines += [
        f"            - name: {TRUSTED_PROXIES_ENV}",
        '              value: ""',
        "            - name: PYTHONUNBUFFERED",
        '              value: "1"',
        f"          # startup_timeout = {settings.startup_timeout:g} s to become "
        f"ready ({period} s x {starts} = {period * starts} s),",
        "          # as the dispatcher gives an instance; then it is restarted.",
        "          # The other probes begin once it passes.",
        *_probe("startupProbe", ready, period, timeout, failureThreshold=starts),
        "          # Requests only while ready, probed as the dispatcher probes",
        "          # (health_check_interval, health_check_timeout, rise, fall).",
        *_probe(
            "readinessProbe",
            ready,
            period,
            timeout,
            successThreshold=settings.rise,
            failureThreshold=settings.fall,
        ),
        f"          # Hung: {LIVENESS_FAILURES} failures in a row restart it. "
        "Less often than readiness:",
        "          # a restart costs more than a pause in its traffic.",
        *_probe(
            "livenessProbe",
            alive,
            period * LIVENESS_EVERY,
            timeout,
            failureThreshold=LIVENESS_FAILURES,
        ),
        "          lifecycle:",
        "            # A stopping pod leaves the Service's endpoints at once, but",
        "            # kube-proxy and the ingress learn of it over a few seconds:",
        "            # it serves them meanwhile, then SIGTERM starts its drain.",
        f"            # Choose: {PRESTOP_SLEEP} s suits most clusters. An exec of "
        "sleep (slim Python",
        "            # images have /bin/sleep) rather than the sleep handler, which",
        "            # needs Kubernetes 1.30 or later; a distroless image needs it:",
        f"            #     preStop: {{sleep: {{seconds: {PRESTOP_SLEEP}}}}}",
        "            preStop:",
        "              exec:",
        f'                command: ["sleep", "{PRESTOP_SLEEP}"]',
        "          # Choose: what one instance needs.",
        "          resources:",
        "            requests:",
        '              cpu: "250m"',
        '              memory: "256Mi"',
    ]
    if settings.max_memory is not None:
        lines += [
            f"            # max_memory = {settings.max_memory} bytes in the ini: "
            "above it the pod",
            "            # is killed (OOM) and restarted, where the dispatcher "
            "recycles.",
            "            limits:",
            f'              memory: "{settings.max_memory}"',
        ]
    lines += [
        "          securityContext:",
        "            allowPrivilegeEscalation: false",
        "---",
        "apiVersion: v1",
        "kind: Service",
        "metadata:",
        f"  name: {_q(name)}",
        "  labels:",
        *labels,
        "spec:",
        "  # In the cluster; an Ingress in front, or type: LoadBalancer.",
        "  type: ClusterIP",
    ]
    if settings.sticky != "off":
        lines += [
            f"  # sticky = {settings.sticky}: a Service cannot route by the "
            f"{settings.affinity_cookie} cookie;",
            "  # an ingress with cookie affinity can pin clients instead.",
        ]
    if settings.strategy == "hash" and settings.hash_key == "client":
        lines += [
            "  # strategy = hash on the client's address:",
            "  sessionAffinity: ClientIP",
        ]
    lines += [
        "  selector:",
        *labels,
        "  ports:",
        "    - name: http",
        "      # [server:dispatcher]'s port: reached where the dispatcher was.",
        f"      port: {service_port}",
        "      targetPort: http",
        "---",
        "apiVersion: policy/v1",
        "kind: PodDisruptionBudget",
        "metadata:",
        f"  name: {_q(name)}",
        "  labels:",
        *labels,
        "spec:",
        "  # Node drains and upgrades evict one pod at a time, the next one once",
        "  # its replacement is ready.",
    ]
    if settings.instances == 1:
        lines += ["  # With one pod, that one is down meanwhile: run two or more."]
    lines += [
        "  maxUnavailable: 1",
        "  selector:",
        "    matchLabels:",
        *(f"  {line}" for line in labels),
        "",
    ]
    return "\n".join(lines)


def _service_port(path: str) -> int | None:
    """``[server:dispatcher]``'s fixed port, if it has a section and one."""
    try:
        conf = load_section(path, "server:dispatcher").local_conf
    except StartupError:
        return None
    for _, number in listen_addresses(conf):
        if number.isascii() and number.isdigit() and 0 < int(number) < 65536:
            return int(number)
    return None
