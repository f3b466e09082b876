"""``pyramid-lb export``: real nginx and HAProxy in front of real spawned instances."""

import math
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pyramid_lb import cli
from pyramid_lb.affinity_cookie import sign
from pyramid_lb.export import export as export_config
from pyramid_lb.process import StartupError
from tests.dispatcher.site import (
    free_base_port,
    free_port,
    from_another_address,
    write_ini,
)
from tests.processes import BIN, LOGGING_INI, ROOT, Processes, wait_until


def binary(name):
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


NGINX = binary("nginx")
HAPROXY = binary("haproxy")
ENGINES = [
    pytest.param(
        "nginx",
        marks=pytest.mark.skipif(NGINX is None, reason="nginx is not installed"),
    ),
    pytest.param(
        "haproxy",
        marks=pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed"),
    ),
]
SECRET = "export-test-secret"

BASE_INI = """
[server:main]
use = egg:waitress#main
threads = 2

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 2
base_port = 7001
{settings}

[server:dispatcher]
use = egg:waitress#main
{server}
"""


def ini_with(settings="", server="port = 1"):
    return BASE_INI.format(settings=settings, server=server)


def config_file(tmp_path, engine):
    return tmp_path / ("nginx.conf" if engine == "nginx" else "haproxy.cfg")


def export(tmp_path, engine, settings="", server="listen = 127.0.0.1:8080", *args):
    """Export ``settings`` to a file; its text."""
    ini = tmp_path / "site.ini"
    ini.write_text(ini_with(settings, server))
    out = config_file(tmp_path, engine)
    assert cli.main(["export", engine, str(ini), "-o", str(out), *args]) == 0
    return out.read_text()


def check_config(engine, path):
    """The engine's own check of the file: nothing to complain about."""
    if engine == "nginx":
        if NGINX is None:
            pytest.skip("nginx is not installed")
        argv = [NGINX, "-t", "-p", path.parent, "-c", path, "-e", "stderr"]
    else:
        if HAPROXY is None:
            pytest.skip("HAProxy is not installed")
        argv = [HAPROXY, "-c", "-f", path]
    result = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=30
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warn" not in output.lower(), output


WEIGHTS = "backends = http://127.0.0.1:7005 weight=3 http://127.0.0.1:7006"
STICKY = f"affinity_secret = {SECRET}\nsticky = "


@pytest.mark.parametrize(
    ("settings", "engine", "expected"),
    [
        pytest.param(
            "", "nginx", ["upstream pyramid_lb {\n        zone"], id="rr nginx"
        ),
        pytest.param("", "haproxy", ["balance roundrobin"], id="rr haproxy"),
        pytest.param(
            f"strategy = weighted_round_robin\n{WEIGHTS}",
            "nginx",
            ["server 127.0.0.1:7005 max_fails=3 fail_timeout=5s weight=3;"],
            id="weights nginx",
        ),
        pytest.param(
            f"strategy = weighted_round_robin\n{WEIGHTS}",
            "haproxy",
            ["balance roundrobin", "127.0.0.1:7005 weight 3\n"],
            id="weights haproxy",
        ),
        pytest.param(
            f"strategy = round_robin\n{WEIGHTS}",
            "haproxy",
            ["server 127.0.0.1:7005 127.0.0.1:7005\n"],
            id="weights unused haproxy",
        ),
        pytest.param(
            "strategy = least_connections", "nginx", ["least_conn;"], id="lc nginx"
        ),
        pytest.param(
            "strategy = least_connections",
            "haproxy",
            ["balance leastconn"],
            id="lc haproxy",
        ),
        pytest.param(
            "strategy = p2c", "nginx", ["random two least_conn;"], id="p2c nginx"
        ),
        pytest.param(
            "strategy = p2c", "haproxy", ["balance random(2)"], id="p2c haproxy"
        ),
        pytest.param(
            "strategy = hash",
            "nginx",
            ["hash $remote_addr consistent;"],
            id="hash client nginx",
        ),
        pytest.param(
            "strategy = hash\nhash_balance = 1.25",
            "nginx",
            ["hash $remote_addr consistent;", "no bounded loads"],
            id="hash bounded nginx",
        ),
        pytest.param(
            "strategy = hash\nhash_balance = 1.5",
            "haproxy",
            ["balance source", "hash-type consistent", "hash-balance-factor 150"],
            id="hash client haproxy",
        ),
        pytest.param(
            "strategy = hash\nhash_balance = 1",
            "haproxy",
            ["hash-balance-factor 101"],
            id="hash_balance 1 haproxy",
        ),
        pytest.param(
            "strategy = hash\nhash_key = path",
            "nginx",
            ["hash $uri consistent;"],
            id="hash path nginx",
        ),
        pytest.param(
            "strategy = hash\nhash_key = path",
            "haproxy",
            ["balance uri path-only"],
            id="hash path haproxy",
        ),
        pytest.param(
            "strategy = hash\nhash_key = cookie:sid",
            "nginx",
            [
                "map $cookie_sid $pyramid_lb_hash_key {",
                '"" $request_id;',
                "hash $pyramid_lb_hash_key consistent;",
            ],
            id="hash cookie nginx",
        ),
        pytest.param(
            "strategy = hash\nhash_key = cookie:sid",
            "haproxy",
            ["balance hash req.cook(sid)", "hash-type consistent"],
            id="hash cookie haproxy",
        ),
        pytest.param(
            "strategy = hash\nhash_key = header:X-User",
            "nginx",
            ["map $http_x_user $pyramid_lb_hash_key {"],
            id="hash header nginx",
        ),
        pytest.param(
            "strategy = hash\nhash_key = header:X-User",
            "haproxy",
            ["balance hdr(X-User)"],
            id="hash header haproxy",
        ),
        pytest.param(
            STICKY + "cookie",
            "nginx",
            [
                "map $cookie_lb_affinity $pyramid_lb_upstream {",
                f'"{sign("site-2", SECRET)}" pyramid_lb_1;',
                "server 127.0.0.1:7001 max_fails=3 fail_timeout=5s max_conns=2 backup;"
                "  # site-1",
                "proxy_pass http://$pyramid_lb_upstream;",
            ],
            id="sticky cookie nginx",
        ),
        pytest.param(
            STICKY + "cookie",
            "haproxy",
            [
                "    cookie lb_affinity\n",
                "option redispatch 1",
                "server site-2 127.0.0.1:7002 maxconn 2 "
                f"cookie {sign('site-2', SECRET)}\n",
            ],
            id="sticky cookie haproxy",
        ),
        pytest.param(
            STICKY + "insert\naffinity_cookie = pin",
            "nginx",
            [
                "map $cookie_pin $pyramid_lb_upstream {",
                "add_header Set-Cookie $pyramid_lb_set_cookie always;",
            ],
            id="sticky insert nginx",
        ),
        pytest.param(
            STICKY + "insert\naffinity_cookie = pin",
            "haproxy",
            ["cookie pin insert indirect nocache httponly", "option redispatch 1"],
            id="sticky insert haproxy",
        ),
        pytest.param(
            "health_check_path = /ready\nhealth_check_interval = 250ms\n"
            "health_check_timeout = 0.5\nrise = 1\nfall = 4\neject_after = 0",
            "haproxy",
            [
                "option httpchk GET /ready",
                "http-check expect status 200",
                "timeout check 500ms",
                "default-server check inter 250ms rise 1 fall 4 slowstart 3s "
                "pool-max-conn 32\n",
            ],
            id="checks haproxy",
        ),
        pytest.param(
            "eject_after = 5\neject_time = 30",
            "nginx",
            ["max_fails=5 fail_timeout=30s max_conns=2;", "only passive health checks"],
            id="checks nginx",
        ),
        pytest.param(
            "connect_timeout = 1.5\nread_timeout = 30\nmax_body_size = 10M\n"
            "pool_size = 8\nretries = 1",
            "nginx",
            [
                "client_max_body_size 10m;",
                "proxy_connect_timeout 1500ms;",
                "proxy_read_timeout 30s;",
                "keepalive 8;",
                "proxy_next_upstream_tries 2;",
                "proxy_next_upstream error timeout;",
            ],
            id="limits nginx",
        ),
        pytest.param(
            "connect_timeout = 1.5\nread_timeout = 30\nmax_body_size = 10M\n"
            "pool_size = 8\nretries = 1",
            "haproxy",
            [
                "deny_status 413 if { req.hdr_val(content-length) gt 10485760 }",
                "timeout connect 1500ms",
                "timeout server 30s",
                "pool-max-conn 8",
                "retries 1",
            ],
            id="limits haproxy",
        ),
    ],
)
def test_settings_map_to_directives(tmp_path, settings, engine, expected):
    text = export(tmp_path, engine, settings)
    for line in expected:
        assert line in text
    check_config(engine, config_file(tmp_path, engine))


CACHE = "cache = memory\ncache_size = 32M\ncache_max_object = 2M"


@pytest.mark.parametrize(
    ("settings", "engine", "expected", "unexpected"),
    [
        pytest.param("", "nginx", [], ["proxy_cache", "X-Cache"], id="off nginx"),
        pytest.param("", "haproxy", [], ["cache-", "X-Cache"], id="off haproxy"),
        pytest.param(
            CACHE,
            "nginx",
            [
                "proxy_cache_path cache levels=1:2 keys_zone=pyramid_lb_cache:10m "
                "max_size=32m",
                "proxy_cache pyramid_lb_cache;",
                "proxy_cache_key $scheme$http_host$request_uri;",
                "proxy_cache_lock on;",
                "proxy_cache_lock_timeout 5s;",
                "proxy_cache_revalidate on;",
                "proxy_cache_bypass $pyramid_lb_no_cache $http_authorization;",
                "proxy_no_cache $http_authorization;",
                "add_header X-Cache $upstream_cache_status always;",
                "it has no cache_max_object",
            ],
            ["proxy_cache_use_stale", "$cookie_lb_affinity"],
            id="memory nginx",
        ),
        pytest.param(
            f"{CACHE}\ncache_stale_if_error = 30\n{STICKY}insert",
            "nginx",
            [
                "proxy_cache_use_stale error timeout http_500 http_502 http_503 "
                "http_504;",
                "not only\n            # 30 s past its freshness",
                "proxy_no_cache $http_authorization $cookie_lb_affinity;",
            ],
            [],
            id="stale and insert nginx",
        ),
        pytest.param(
            CACHE,
            "haproxy",
            [
                "cache pyramid_lb\n",
                "total-max-size 32\n",
                "max-object-size 2097152\n",
                "max-age 86400\n",
                "process-vary on\n",
                "http-request cache-use pyramid_lb\n",
                "http-response cache-store pyramid_lb if "
                "!{ res.hdr_cnt(set-cookie) gt 0 }\n",
                "X-Cache %[res.cache_hit,iif(HIT,MISS)]",
                "no cache_stale_if_error",
            ],
            ["pyramid_lb_pinned"],
            id="memory haproxy",
        ),
        pytest.param(
            f"cache = memory\ncache_size = 1M\n{STICKY}insert",
            "haproxy",
            [
                "total-max-size 1\n",
                "max-object-size 524288\n",  # HAProxy takes half the cache at most
                "req.cook_cnt(lb_affinity)",
                "!{ var(txn.pyramid_lb_pinned) -m int gt 0 }",
            ],
            [],
            id="small and insert haproxy",
        ),
    ],
)
def test_the_cache_blocks_mirror_the_settings(
    tmp_path, settings, engine, expected, unexpected
):
    text = export(tmp_path, engine, settings)
    for line in expected:
        assert line in text
    for word in unexpected:
        assert word not in text
    check_config(engine, config_file(tmp_path, engine))


@pytest.mark.parametrize("engine", ["nginx", "haproxy"])
def test_a_hashed_key_stays_home_unless_bounded_loads_are_asked_for(tmp_path, engine):
    for balance, bounded in (("", False), ("hash_balance = 2\n", True)):
        text = export(tmp_path, engine, f"strategy = hash\n{balance}")
        word = "no bounded loads" if engine == "nginx" else "hash-balance-factor"
        assert (word in text) is bounded


CAPPED_BACKENDS = (
    "backends = http://127.0.0.1:7005 max_in_flight=3 http://127.0.0.1:7006"
)
NUMBERS = "max_in_flight = 5\nqueue_size = 7\nqueue_timeout = 1.5\nslow_start = 20"
OFF = "max_in_flight = off\nslow_start = 0"
HAPROXY_QUEUE = ("timeout queue", "queue()")


@pytest.mark.parametrize(
    ("settings", "engine", "expected", "unexpected"),
    [
        pytest.param(
            "",
            "haproxy",
            [
                # auto: the threads of [server:main]
                "server site-1 127.0.0.1:7001 maxconn 2\n",
                "server site-2 127.0.0.1:7002 maxconn 2\n",
                "timeout queue 10s\n",
                "http-request deny deny_status 503 hdr Retry-After 1 "
                "if { queue() ge 100 }\n",
                "rise 2 fall 3 observe layer4 error-limit 3 on-error mark-down "
                "slowstart 3s pool-max-conn 32\n",
                "maxqueue bounds its own queue only",
            ],
            [],
            id="defaults haproxy",
        ),
        pytest.param(
            "",
            "nginx",
            [
                "server 127.0.0.1:7001 max_fails=3 fail_timeout=5s max_conns=2;"
                "  # site-1",
                "server 127.0.0.1:7002 max_fails=3 fail_timeout=5s max_conns=2;"
                "  # site-2",
                "nginx OSS has no queue",
                "gets 502 at once",
                "(queue_size = 100,\n    # queue_timeout = 10s)",
                "nginx OSS has no slow start",
                "slow_start = 3s.",
            ],
            ["by hash or affinity"],
            id="defaults nginx",
        ),
        pytest.param(
            f"{NUMBERS}\n{CAPPED_BACKENDS}",
            "haproxy",
            [
                "server site-1 127.0.0.1:7001 maxconn 5\n",
                # its own number, else the setting's
                "server 127.0.0.1:7005 127.0.0.1:7005 maxconn 3\n",
                "server 127.0.0.1:7006 127.0.0.1:7006 maxconn 5\n",
                "timeout queue 1500ms\n",
                "if { queue() ge 7 }\n",
                " slowstart 20s ",
            ],
            [],
            id="numbers haproxy",
        ),
        pytest.param(
            f"{NUMBERS}\n{CAPPED_BACKENDS}",
            "nginx",
            [
                "max_conns=5;  # site-1",
                "max_conns=3;  # 127.0.0.1:7005",
                "max_conns=5;  # 127.0.0.1:7006",
                "(queue_size = 7,\n    # queue_timeout = 1500ms)",
                "slow_start = 20s.",
            ],
            [],
            id="numbers nginx",
        ),
        pytest.param(
            CAPPED_BACKENDS,
            "haproxy",
            [
                "server site-1 127.0.0.1:7001 maxconn 2\n",
                "server 127.0.0.1:7005 127.0.0.1:7005 maxconn 3\n",
                # auto: no cap for a backend without its own
                "server 127.0.0.1:7006 127.0.0.1:7006\n",
            ],
            [],
            id="backends auto haproxy",
        ),
        pytest.param(
            CAPPED_BACKENDS,
            "nginx",
            ["max_conns=3;  # 127.0.0.1:7005", "fail_timeout=5s;  # 127.0.0.1:7006"],
            [],
            id="backends auto nginx",
        ),
        pytest.param(
            OFF,
            "haproxy",
            [],
            ["maxconn", "slowstart", "max_in_flight", *HAPROXY_QUEUE],
            id="off haproxy",
        ),
        pytest.param(
            OFF, "nginx", [], ["max_conns", "no queue", "slow start"], id="off nginx"
        ),
        pytest.param(
            f"{OFF}\n{CAPPED_BACKENDS}",
            "haproxy",
            [
                "server site-1 127.0.0.1:7001\n",
                "server 127.0.0.1:7005 127.0.0.1:7005 maxconn 3\n",
                "server 127.0.0.1:7006 127.0.0.1:7006\n",
                *HAPROXY_QUEUE,
            ],
            ["slowstart"],
            id="off but a backend haproxy",
        ),
        pytest.param(
            "queue_size = 0",
            "haproxy",
            ["queue_size = 0: no queue", "timeout queue 1ms\n"],
            ["queue() ge"],
            id="no queue haproxy",
        ),
        pytest.param(
            "queue_size = 0",
            "nginx",
            ["where the dispatcher answers 503 (queue_size = 0)."],
            ["queue_timeout"],
            id="no queue nginx",
        ),
        pytest.param(
            f"strategy = hash\n{STICKY}cookie",
            "nginx",
            ["One whose own instance (by hash or affinity) is at max_conns"],
            [],
            id="hash nginx",
        ),
    ],
)
def test_caps_queue_and_slow_start(tmp_path, settings, engine, expected, unexpected):
    text = export(tmp_path, engine, settings)
    for line in expected:
        assert line in text
    for word in unexpected:
        assert word not in text
    if engine == "nginx":  # nothing of nginx Plus's
        directives = [ln.strip() for ln in text.splitlines() if "#" not in ln]
        assert not [ln for ln in directives if "slow_start" in ln or "queue" in ln]
    check_config(engine, config_file(tmp_path, engine))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_complete_config_with_forwarded_headers_and_no_admin(tmp_path, engine):
    text = export(tmp_path, engine)
    assert text.startswith(f"# {engine} configuration generated by `pyramid-lb export")
    assert f"pyramid-lb serve {tmp_path / 'site.ini'} --no-dispatcher" in text
    if engine == "nginx":
        assert "pid nginx.pid;" in text and "events {" in text and "http {" in text
        assert "location ^~ /_lb/ { return 404; }" in text
        for line in (
            "proxy_set_header Host $http_host;",
            "proxy_set_header X-Forwarded-For $remote_addr;",
            "proxy_set_header X-Forwarded-Port $pyramid_lb_port;",
            'proxy_set_header X-Forwarded-Prefix "";',
            'proxy_set_header Forwarded "";',
            'proxy_set_header Connection "";',
            "proxy_http_version 1.1;",
        ):
            assert line in text
    else:
        assert re.search(r"^global\n(.*\n)*defaults\n(.*\n)*frontend ", text, re.M)
        assert "path,url_dec -m beg /_lb/" in text
        assert "option forwardfor" in text and "http-reuse safe" in text
    # No file of its own outside its directory (nginx's prefix).
    for line in (
        "pid nginx.pid;",
        "error_log error.log",
        "proxy_temp_path proxy_temp;",
    ):
        assert (line in text) is (engine == "nginx")
    directives = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    for word in ("chroot", "pidfile", "stats socket", "daemon", "user "):
        assert not [line for line in directives if word in line]


def test_instances_are_named_and_numbered_as_the_supervisor_does(tmp_path):
    (tmp_path / "other.ini").write_text(
        "[app:main]\n[server:main]\nuse = egg:waitress#main\nthreads = 3\n"
    )
    text = export(
        tmp_path,
        "haproxy",
        "ini_files = other.ini site.ini\nbackends = http://10.0.0.5:6543",
    )
    servers = re.findall(r"^    server (\S+) (\S+)(?: maxconn (\d+))?", text, re.M)
    # Each spawned one capped by the threads of its own ini (auto).
    assert servers == [
        ("site-1", "127.0.0.1:7001", "2"),
        ("site-2", "127.0.0.1:7002", "2"),
        ("other-1", "127.0.0.1:7003", "3"),
        ("site-3", "127.0.0.1:7004", "2"),
        ("10.0.0.5:6543", "10.0.0.5:6543", ""),
    ]
    check_config("haproxy", config_file(tmp_path, "haproxy"))


@pytest.mark.parametrize(
    ("server", "args", "nginx_lines", "haproxy_lines"),
    [
        pytest.param(
            "listen = 127.0.0.1:8080 [::1]:8081",
            [],
            ["listen 127.0.0.1:8080;", "listen [::1]:8081;"],
            ["bind 127.0.0.1:8080", "bind ::1:8081"],
            id="listen",
        ),
        pytest.param(
            "host = 0.0.0.0\nport = 9000",
            [],
            ["listen 0.0.0.0:9000;"],
            ["bind 0.0.0.0:9000"],
            id="host and port",
        ),
        pytest.param(
            "listen = 127.0.0.1:0",
            ["--listen", "*:8090"],
            ["listen *:8090;"],
            ["bind *:8090"],
            id="--listen",
        ),
    ],
)
def test_listens_where_the_dispatcher_would(
    tmp_path, server, args, nginx_lines, haproxy_lines
):
    for engine, lines in (("nginx", nginx_lines), ("haproxy", haproxy_lines)):
        text = export(tmp_path, engine, "", server, *args)
        listens = re.findall(r"^    +(?:listen|bind) .*$", text, re.M)
        assert [line.strip() for line in listens] == lines


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        pytest.param(None, [], "no such file", id="missing"),
        pytest.param(
            "[app:main]\nuse = egg:pyramid_lb#demo_app\n",
            [],
            "has no [app:dispatcher] section",
            id="no dispatcher",
        ),
        pytest.param(
            ini_with("strategy = fastest"),
            [],
            "[app:dispatcher] strategy = 'fastest' is not valid",
            id="bad setting",
        ),
        pytest.param(
            ini_with("sticky = cookie"),
            [],
            "sticky = 'cookie' needs affinity_secret",
            id="sticky without secret",
        ),
        pytest.param(
            ini_with("instances = 3"),
            [],
            "option 'instances' in section 'app:dispatcher' already exists",
            id="malformed",
        ),
        pytest.param(
            "[app:dispatcher]\nuse = egg:pyramid_lb#dispatcher\n",
            [],
            "has no instances",
            id="no instances",
        ),
        pytest.param(
            ini_with("ini_files = nowhere.ini"),
            [],
            "ini_files: 'nowhere.ini' is not a file",
            id="ini_files",
        ),
        pytest.param(
            ini_with().replace("base_port = 7001", "base_port = 65535"),
            [],
            "base_port leaves too few ports",
            id="base_port",
        ),
        pytest.param(
            "[app:dispatcher]\nuse = egg:pyramid_lb#dispatcher\ninstances = 1\n"
            "[server:main]\nuse = egg:waitress#main\n",
            [],
            "has no [server:dispatcher] section: give --listen HOST:PORT",
            id="no server",
        ),
        pytest.param(
            ini_with(server="listen = 127.0.0.1:0"),
            [],
            "a front end needs a fixed port",
            id="port 0",
        ),
        pytest.param(
            ini_with("sticky = cookie\naffinity_secret = s\naffinity_cookie = lb-pin"),
            [],
            "nginx has no variable for the cookie 'lb-pin'",
            id="cookie name nginx",
        ),
        pytest.param(
            ini_with("strategy = hash\nhash_key = header:a#b"),
            ["--engine", "haproxy"],
            "hash_key: HAProxy cannot take the name 'a#b' as written",
            id="header name haproxy",
        ),
        pytest.param(
            ini_with(),
            ["-o", "/nonexistent/nginx.conf"],
            "cannot write /nonexistent/nginx.conf: No such file or directory",
            id="output",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, content, args, message):
    ini = tmp_path / "site.ini"
    if content is not None:
        ini.write_text(content)
    engine = "nginx"
    if args[:1] == ["--engine"]:
        engine, args = args[1], args[2:]
    assert cli.main(["export", engine, str(ini), *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pyramid-lb: error: ")
    assert captured.err.count("\n") == 1 and message in captured.err


def test_prints_to_stdout_without_o(tmp_path, capsys):
    ini = tmp_path / "site.ini"
    ini.write_text(ini_with("max_body_size = 1000\npool_size = 0"))
    assert cli.main(["export", "nginx", str(ini)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# nginx configuration generated")
    assert "client_max_body_size 1000;" in text and "keepalive" not in text
    with pytest.raises(StartupError, match="'apache' is not an engine"):
        export_config("apache", str(ini))


# -- end to end ----------------------------------------------------------------


def answers(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def front(processes, ini, engine, directory, nginx_globals="daemon off;"):
    """``engine`` running the export of ``ini``, from ``directory``, on a
    free port, answering: its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    directory.mkdir()
    config = config_file(directory, engine)
    argv = ["export", engine, str(ini), "--listen", f"127.0.0.1:{port}"]
    assert cli.main([*argv, "-o", str(config)]) == 0
    if engine == "nginx":
        argv = [NGINX, "-p", directory, "-c", config, "-e", "stderr"]
        argv += ["-g", nginx_globals]
    else:
        argv = [HAPROXY, "-db", "-f", config]
    proxy = processes.start(argv, name=engine)
    try:
        wait_until(lambda: answers(url + "/whoami"), 15)
    except AssertionError:
        raise AssertionError(f"{engine} does not answer:\n{proxy.output()}") from None
    return url, proxy


class Site:
    """Three demo instances under ``pyramid-lb serve --no-dispatcher``, fronted
    by the exported configuration of ``engine``, running."""

    def __init__(self, processes, tmp_path, engine, sticky="cookie"):
        app = "pyramid_lb.affinity = session\npyramid_lb.affinity_secret = "
        ini = write_ini(
            tmp_path,
            instances=3,
            # A killed instance stays dead: the supervisor does not restart it.
            max_restarts=0,
            # The app pins clients itself, or not at all (the balancer does).
            app_extra=app + SECRET if sticky == "cookie" else "",
            dispatcher_extra=f"sticky = {sticky}\naffinity_secret = {SECRET}",
        )
        self.base_port = int(re.search(r"base_port = (\d+)", ini.read_text())[1])
        processes.start(
            [BIN / "pyramid-lb", "serve", ini, "--no-dispatcher"], name="instances"
        )
        for port in self.ports:
            wait_until(lambda p=port: answers(f"http://127.0.0.1:{p}/readyz"), 30)
        self.dir = tmp_path / engine
        self.url, self.proxy = front(processes, ini, engine, self.dir)

    @property
    def ports(self):
        return [self.base_port + n for n in range(3)]

    def whoami(self, session=requests, count=1):
        got = [session.get(self.url + "/whoami", timeout=10) for _ in range(count)]
        assert [response.status_code for response in got] == [200] * count
        return [response.json()["instance"] for response in got]


@pytest.fixture(scope="module", params=ENGINES)
def site(request, tmp_path_factory):
    """A running site per engine, shared by the tests that leave it as it is."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    started = Processes(tmp_path)
    try:
        yield Site(started, tmp_path, request.param)
    finally:
        started.stop_all()


def test_requests_are_balanced_over_every_instance(site):
    assert set(site.whoami(count=9)) == {"site-1", "site-2", "site-3"}


def test_client_host_and_scheme_reach_the_app(site):
    seen = from_another_address(site.url)
    assert seen["client_addr"] == "127.0.0.2"
    assert seen["host_url"] == site.url
    assert seen["scheme"] == "http"


def test_the_admin_path_is_not_exposed(site):
    for path in ("/_lb/", "/_lb/stats.json", "/_lb", "/%5Flb/"):
        assert requests.get(site.url + path, timeout=10).status_code == 404, path


def test_a_client_with_the_affinity_cookie_stays_on_its_instance(site):
    with requests.Session() as session:
        [first] = site.whoami(session)
        # The app pinned the client once its session held data.
        assert session.cookies["lb_affinity"] == sign(first, SECRET)
        assert set(site.whoami(session, count=50)) == {first}


@pytest.mark.parametrize("engine", ENGINES)
def test_the_exported_cache_computes_a_shared_answer_once(processes, tmp_path, engine):
    ini = write_ini(tmp_path, instances=2, dispatcher_extra="cache = memory")
    base = int(re.search(r"base_port = (\d+)", ini.read_text())[1])
    ports = [base, base + 1]
    processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--no-dispatcher"], name="instances"
    )
    for port in ports:
        wait_until(lambda p=port: answers(f"http://127.0.0.1:{p}/readyz"), 30)
    # nginx's workers (nobody, under root) cannot reach into pytest's
    # private tmp_path, where they would write the cache's files.
    url, _ = front(processes, ini, engine, tmp_path / engine, "daemon off; user root;")
    got = [requests.get(url + "/cached?max_age=30", timeout=10) for _ in range(10)]
    assert [r.headers.get("X-Cache") for r in got] == ["MISS"] + ["HIT"] * 9
    assert len({r.content for r in got}) == 1
    before = [
        requests.get(f"http://127.0.0.1:{p}/cached?max_age=30", timeout=10).json()[
            "computed"
        ]
        - 1
        for p in ports
    ]
    assert sum(before) == 1
    # An answer setting a cookie (the demo's session) is not shared.
    seen = [requests.get(url + "/whoami", timeout=10) for _ in range(2)]
    assert "HIT" not in [r.headers.get("X-Cache") for r in seen]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_balancer_can_set_the_affinity_cookie_itself(processes, tmp_path, engine):
    site = Site(processes, tmp_path, engine, sticky="insert")
    with requests.Session() as session:
        first = session.get(site.url + "/whoami", timeout=10)
        instance = first.json()["instance"]
        # The value the dispatcher would set: the instance id, signed.
        assert session.cookies["lb_affinity"] == sign(instance, SECRET)
        again = [session.get(site.url + "/whoami", timeout=10) for _ in range(20)]
    assert {response.json()["instance"] for response in again} == {instance}
    # Not sent again to a client that has it.
    assert not [r for r in again if "lb_affinity" in r.headers.get("Set-Cookie", "")]
    # Clients without it are balanced as usual.
    assert set(site.whoami(count=6)) == {"site-1", "site-2", "site-3"}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_instance_is_avoided(processes, tmp_path, engine):
    """The instance killed stays dead (max_restarts = 0: the supervisor does
    not start it again), so what is measured is the front end alone."""
    site = Site(processes, tmp_path, engine)
    assert set(site.whoami(count=6)) == {"site-1", "site-2", "site-3"}
    with requests.Session() as pinned:
        for _ in range(12):
            pinned.cookies.clear()
            if site.whoami(pinned) == ["site-2"]:
                break
        else:
            pytest.fail("no request landed on site-2")
        victim = requests.get(f"http://127.0.0.1:{site.ports[1]}/whoami", timeout=10)
        os.kill(victim.json()["pid"], signal.SIGKILL)
        wait_until(lambda: not answers(f"http://127.0.0.1:{site.ports[1]}/healthz"))
        if engine == "haproxy":
            haproxy_takes_it_out(site)
        else:
            nginx_takes_it_out(site)
        # A client pinned to the dead instance lands on another one, which
        # pins it anew (and tells the app where it came from).
        moved = pinned.get(site.url + "/whoami", timeout=10).json()
        assert moved["moved_from"] == "site-2"
        assert pinned.cookies["lb_affinity"] == sign(moved["instance"], SECRET)
        assert set(site.whoami(pinned, count=10)) == {moved["instance"]}


def haproxy_takes_it_out(site):
    """Its health check does (fall = 2 probes, 0.1 s apart); no request is
    sent there after that."""
    down = site.proxy.wait_for_output(r"Server pyramid_lb/site-2 is DOWN")
    assert set(site.whoami(count=30)) == {"site-1", "site-3"}

    def logged():
        return site.proxy.output()[down.end() :]

    # HAProxy logs a request once its answer is out: the client can be a
    # little ahead of the log.
    wait_until(lambda: logged().count("pyramid_lb pyramid_lb/site-") >= 30, 5)
    assert "pyramid_lb pyramid_lb/site-2 " not in logged()


def nginx_takes_it_out(site):
    """nginx finds out from the requests it sends there: each fails over to
    another instance (proxy_next_upstream), and after max_fails = 3 the
    instance is left alone for fail_timeout = 5 s."""
    started = time.monotonic()
    log = site.dir / "access.log"
    before = len(log.read_text().splitlines())
    assert set(site.whoami(count=30)) == {"site-1", "site-3"}
    assert time.monotonic() - started < 5, "too slow to see fail_timeout"
    dead = f"127.0.0.1:{site.ports[1]}"

    def logged():
        return log.read_text().splitlines()[before:]

    # nginx writes a request's line once the answer is out: the client can
    # be a little ahead of the log.
    wait_until(lambda: len(logged()) >= 30, 5)
    tried = [dead in line for line in logged()]
    assert len(tried) == 30
    assert 1 <= sum(tried) <= 3
    assert not any(tried[-15:])
    disabled = "upstream server temporarily disabled"
    assert disabled in (site.dir / "error.log").read_text()


COUNTING_INI = """
[app:main]
use = call:tests.fixtureapps.counting_app:main

[server:main]
use = call:tests.fixtureapps.counting_app:server_factory
get port = http_port
threads = 1

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 1
base_port = {base_port}

[server:dispatcher]
use = egg:waitress#main
listen = 127.0.0.1:0

[DEFAULT]
http_port = 6543
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_an_instance_gets_no_more_requests_at_once_than_its_threads(
    processes, tmp_path, engine
):
    """threads = 1 (max_in_flight = auto), and a server that shows the app
    every request sent: HAProxy keeps the second of two requests in its queue
    until the first is done; nginx OSS, which has no queue, answers it 502."""
    base_port = free_base_port(1)
    ini = tmp_path / "site.ini"
    ini.write_text(COUNTING_INI.format(base_port=base_port) + LOGGING_INI)
    processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--no-dispatcher"],
        name="instances",
        env={"PYTHONPATH": str(ROOT)},  # for tests.fixtureapps
    )
    instance = f"http://127.0.0.1:{base_port}"
    wait_until(lambda: answers(instance + "/readyz"), 30)
    url, _ = front(processes, ini, engine, tmp_path / engine)

    def counts():
        return requests.get(instance + "/counts", timeout=5).json()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.get, url + "/slow?s=1", timeout=10)
        wait_until(lambda: counts()["now"] == 1, 5)
        started = time.monotonic()
        second = requests.get(url + "/slow?s=0.1", timeout=10)
        took = time.monotonic() - started
        assert first.result().status_code == 200
    assert counts()["most"] == 1
    if engine == "haproxy":
        assert second.status_code == 200
        assert took > 0.5  # it waited for the first
    else:
        assert second.status_code == 502
        assert took < 0.5  # at once
        assert "no live upstreams" in (tmp_path / engine / "error.log").read_text()


# -- systemd -------------------------------------------------------------------

SYSTEMD_ANALYZE = binary("systemd-analyze")

SYSTEMD_INI = """
[server:main]
use = egg:waitress#main

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 2
base_port = 7001
startup_timeout = 20
drain_timeout = 7
stop_timeout = 3.2

[server:dispatcher]
use = egg:waitress#main
listen = 127.0.0.1:0
graceful_timeout = 12.5
"""


def unit(tmp_path, content=SYSTEMD_INI, name="site.ini"):
    """``content`` exported as a unit: its path, its (section, key) values."""
    ini = tmp_path / name
    ini.write_text(content)
    out = tmp_path / "pyramid-lb-site.service"
    assert cli.main(["export", "systemd", str(ini), "-o", str(out)]) == 0
    values, section = {}, None
    for line in out.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[section, key] = value
    return out, values


def test_the_unit_runs_this_pyramid_lb_with_timeouts_from_the_ini(tmp_path):
    out, values = unit(tmp_path)
    service = {key: value for (section, key), value in values.items()}
    assert service["ExecStart"] == f"{BIN / 'pyramid-lb'} serve {tmp_path}/site.ini"
    assert service["WorkingDirectory"] == str(tmp_path)
    # graceful_timeout 12.5 + drain_timeout 7 + stop_timeout 3.2, rounded up,
    # plus the margin; startup_timeout 20 plus the margin.
    assert service["TimeoutStopSec"] == str(math.ceil(12.5 + 7 + 3.2) + 10) == "33"
    assert "# margin: 12.5 + 7 + 3.2 + 10 = 33 seconds." in out.read_text()
    assert service["TimeoutStartSec"] == "30"
    assert {
        key: service[key]
        for key in (
            "Type",
            "NotifyAccess",
            "ExecReload",
            "KillMode",
            "Restart",
            "NoNewPrivileges",
            "ProtectSystem",
            "PrivateTmp",
        )
    } == {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "full",
        "PrivateTmp": "yes",
    }
    assert "User" not in service and "#User=" in out.read_text()
    assert values["Install", "WantedBy"] == "multi-user.target"


def test_the_unit_takes_the_defaults_of_an_ini_without_timeouts(tmp_path):
    _, values = unit(tmp_path, ini_with())
    # graceful_timeout 30, drain_timeout 30, stop_timeout 10, margin 10;
    # startup_timeout 30 plus 10.
    assert values["Service", "TimeoutStopSec"] == "80"
    assert values["Service", "TimeoutStartSec"] == "40"


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd)",
)
@pytest.mark.parametrize(
    "directory",
    [pytest.param("app", id="plain"), pytest.param("my app $HOME", id="odd")],
)
def test_the_unit_passes_systemd_analyze_verify(tmp_path, directory):
    here = tmp_path / directory
    here.mkdir()
    out, values = unit(here)
    # Offline: no running systemd is needed; it checks every key and that
    # ExecStart's program exists (this venv's pyramid-lb).
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    if directory != "app":  # the odd path is quoted and escaped, not mangled
        assert values["Service", "ExecStart"].endswith(
            f'serve "{tmp_path}/my app $$HOME/site.ini"'
        )
        assert values["Service", "WorkingDirectory"] == f"{tmp_path}/my app $HOME"


@pytest.mark.parametrize(
    "content, args, message",
    [
        pytest.param(
            SYSTEMD_INI,
            ["--listen", "127.0.0.1:80"],
            "--listen has no meaning",
            id="listen",
        ),
        pytest.param(
            SYSTEMD_INI.replace("graceful_timeout = 12.5", "graceful_timeout = soon"),
            [],
            "graceful_timeout = 'soon' is not valid",
            id="graceful_timeout",
        ),
        pytest.param(
            SYSTEMD_INI.partition("[server:dispatcher]")[0],
            [],
            "[server:dispatcher]",
            id="no server section",
        ),
    ],
)
def test_bad_systemd_input_is_one_line_and_exit_1(
    tmp_path, capsys, content, args, message
):
    ini = tmp_path / "site.ini"
    ini.write_text(content)
    assert cli.main(["export", "systemd", str(ini), *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pyramid-lb: error: ")
    assert captured.err.count("\n") == 1 and message in captured.err
