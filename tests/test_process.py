"""Loading ini sections, listening and stopping on signals, as every process does."""

import gc
import signal
import socket
import sys

import pytest

from pyramid_lb.process import (
    PORT_IN_USE,
    StartupError,
    create_server,
    handles_sigterm,
    is_waitress,
    listen_host,
    listen_problem,
    load,
    server_threads,
)
from tests.dispatcher.site import free_port
from tests.processes import ROOT, wait_until

APP = "[app:main]\nuse = call:tests.fixtureapps.plain_app:main\n"
SERVER = "[server:main]\nuse = egg:waitress#main\n"


def app(environ, start_response):
    start_response("204 No Content", [])
    return []


@pytest.fixture
def ini(tmp_path):
    """Write an ini file; its path as a string."""

    def write(text: str) -> str:
        path = tmp_path / "site.ini"
        path.write_text(text)
        return str(path)

    return write


def test_load_gives_the_sections_settings_with_variables_winning(ini):
    path = ini(APP + SERVER + "get port = http_port\n[DEFAULT]\nhttp_port = 6543\n")
    server = load(path, "server:main", {"http_port": "7000"})
    assert server.local_conf["port"] == "7000"
    assert is_waitress(server)
    assert not is_waitress(load(path, "app:main"))


@pytest.mark.parametrize(
    ("text", "section", "message"),
    [
        pytest.param(APP, "server:main", "has no [server:main] section", id="section"),
        pytest.param(
            "[app:main]\nuse = egg:no_such_egg\n",
            "app:main",
            "[app:main]: No package metadata was found for no_such_egg",
            id="unknown egg",
        ),
        pytest.param(
            "[app:main]\nuse = egg:pyramid_lb#nope\n",
            "app:main",
            "[app:main]: Entry point 'nope' not found in egg 'pyramid_lb'",
            id="unknown entry point",
        ),
        pytest.param(
            "[app:main]\nuse = egg:demo_app\nuse = egg:demo_app\n",
            "app:main",
            "option 'use' in section 'app:main' already exists",
            id="bad ini",
        ),
        pytest.param(
            "[app:main]\nuse\n",
            "app:main",
            "Source contains parsing errors: ",
            id="not an ini",
        ),
    ],
)
def test_load_errors_are_one_line_naming_the_file(ini, text, section, message):
    path = ini(text)
    with pytest.raises(StartupError) as info:
        load(path, section)
    assert str(info.value).startswith(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.code == 1


def test_the_apps_own_errors_keep_their_traceback(ini):
    # Which import failed, and where, is in the traceback.
    path = ini("[app:main]\nuse = call:tests.fixtureapps.broken_app:main\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        load(path, "app:main")


@pytest.mark.parametrize(
    ("server", "threads"),
    [
        pytest.param("use = egg:waitress#main\n", 4, id="waitress's default"),
        pytest.param(
            "use = egg:waitress#main\nget port = http_port\nthreads = 7\n",
            7,
            id="port from the command line",
        ),
        pytest.param(
            "use = call:no_such_module:serve\nthreads = 2\n",
            2,
            id="a server only its instance can import",
        ),
    ],
)
def test_server_threads(ini, server, threads):
    assert server_threads(ini("[server:main]\n" + server)) == threads


def test_server_threads_must_be_a_number(ini):
    path = ini("[server:main]\nuse = egg:waitress#main\nthreads = many\n")
    with pytest.raises(StartupError, match=r"threads = 'many' is not a number"):
        server_threads(path)


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(StartupError, match=r"^nope\.ini: no such file$") as info:
        load("nope.ini", "app:main")
    assert info.value.code == 2


def test_load_hint_follows_a_missing_section(ini):
    path = ini(APP)
    with pytest.raises(StartupError) as info:
        load(path, "server:dispatcher", hint=": give --listen HOST:PORT")
    assert str(info.value) == (
        f"{path} has no [server:dispatcher] section: give --listen HOST:PORT"
    )


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        pytest.param(
            {"listen": "*:99999"},
            "site.ini [server:main] listen = '*:99999' is not valid: the port of "
            "'*:99999' is above 65535; expected a TCP port from 1 to 65535 "
            "(0: any free port)",
            id="wrapped by waitress",
        ),
        pytest.param(
            {"host": "127.0.0.1", "port": "70000"},
            "site.ini [server:main] port = '70000' is not valid: above 65535",
            id="port key",
        ),
        pytest.param(
            {"listen": "127.0.0.1:0", "graceful_timeout": "soon"},
            "site.ini [server:main] graceful_timeout = 'soon' is not valid",
            id="our key",
        ),
        pytest.param(
            {"listen": "127.0.0.1:0", "threads": "many"},
            "site.ini [server:main]: ",
            id="waitress's key",
        ),
    ],
)
def test_create_server_errors_name_the_section(conf, message):
    with pytest.raises(StartupError) as info:
        create_server(app, conf, "site.ini [server:main]")
    assert str(info.value).startswith(message)


def test_create_server_listens_with_its_graceful_timeout():
    server, grace = create_server(
        app, {"listen": "127.0.0.1:0", "graceful_timeout": "2.5"}, "[server:main]"
    )
    try:
        assert grace == 2.5
        assert server.effective_host == "127.0.0.1"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("conf", "host", "listening"),
    [
        pytest.param({"listen": "127.0.0.2:80"}, "*", "127.0.0.2", id="its host"),
        pytest.param({"port": "8080"}, "127.0.0.2", "127.0.0.2", id="the default"),
    ],
)
def test_create_server_on_another_port(conf, host, listening):
    port = free_port()
    server, _ = create_server(app, conf, "[server:main]", port, host)
    try:
        assert (server.effective_host, int(server.effective_port)) == (listening, port)
    finally:
        server.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_port_in_use_is_one_line_with_its_own_code():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as info:
            create_server(app, {"host": "127.0.0.1", "port": port}, "[server:main]")
    error = info.value
    assert str(error) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert error.code == PORT_IN_USE
    # Waitress leaves the sockets of a server it could not bind to the
    # garbage collector (harmless in a process that stops): collected here.
    del info, error
    gc.collect()


@pytest.mark.parametrize(
    "conf, host",
    [
        pytest.param({}, "127.0.0.1", id="nothing"),
        pytest.param({"host": "*", "port": "80"}, "*", id="any host"),
        pytest.param({"host": "0.0.0.0"}, "0.0.0.0", id="ipv4 any"),
        pytest.param({"host": "localhost"}, "localhost", id="localhost"),
        pytest.param({"host": "::1"}, "[::1]", id="bare ipv6 host"),
        pytest.param({"listen": "127.0.0.1:6543"}, "127.0.0.1", id="listen"),
        pytest.param({"listen": "*:6543 [::]:6543"}, "*", id="first listen"),
        pytest.param({"listen": "[::1]:6543"}, "[::1]", id="listen ipv6"),
        pytest.param({"listen": "[::1]"}, "[::1]", id="listen ipv6 no port"),
        pytest.param({"listen": "localhost"}, "localhost", id="listen no port"),
    ],
)
def test_listen_host(conf, host):
    assert listen_host(conf) == host


@pytest.mark.parametrize(
    "conf, problem",
    [
        pytest.param({"listen": "*:8080"}, None, id="port"),
        pytest.param({"listen": "127.0.0.1:0"}, None, id="any free port"),
        pytest.param({"listen": "*:http"}, None, id="service name"),
        pytest.param({"listen": "[::1]"}, None, id="ipv6 without a port"),
        pytest.param({"listen": "::1"}, None, id="bare ipv6 address"),
        pytest.param({"host": "*", "port": "6543"}, None, id="host and port"),
        pytest.param(
            {"listen": "*:99999"},
            "listen = '*:99999' is not valid: the port of '*:99999' is above 65535",
            id="above 65535",
        ),
        pytest.param(
            {"listen": "127.0.0.1:8080 [::1]:70000"},
            "the port of '[::1]:70000' is above 65535",
            id="second entry",
        ),
        pytest.param(
            {"listen": "*:eighty"},
            "the port of '*:eighty' is not a number",
            id="not a number",
        ),
        pytest.param({"port": "65536"}, "port = '65536' is not valid", id="port key"),
    ],
)
def test_listen_problem(conf, problem):
    found = listen_problem(conf)
    if problem is None:
        assert found is None
    else:
        assert problem in found
        assert found.endswith("expected a TCP port from 1 to 65535 (0: any free port)")


# -- signals, in a process of their own ----------------------------------------

STOPPING = """
import logging, signal, sys, time
from pyramid_lb.process import handles_sigterm, stop_on_signals

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
if "own" in sys.argv:
    signal.signal(signal.SIGTERM, handles_sigterm(lambda *_: print("own handler")))
stop_on_signals(keep_own="own" in sys.argv, quiet=lambda: "quiet" in sys.argv)
print("ready", flush=True)
for _ in range(2):
    try:
        time.sleep(30)
    except (SystemExit, KeyboardInterrupt) as exc:
        print(type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize(
    ("signals", "args", "said"),
    [
        pytest.param(
            [signal.SIGTERM, signal.SIGTERM],
            [],
            [
                "SIGTERM: stopping",
                "SystemExit",
                "SIGTERM: stopping at once",
                "SystemExit",
            ],
            id="sigterm twice",
        ),
        pytest.param(
            [signal.SIGINT], [], ["SIGINT: stopping", "KeyboardInterrupt"], id="sigint"
        ),
        pytest.param([signal.SIGTERM], ["quiet"], ["SystemExit"], id="quiet"),
        pytest.param([signal.SIGTERM], ["own"], ["own handler"], id="own kept"),
        pytest.param(
            [signal.SIGINT],
            ["own"],
            ["SIGINT: stopping", "KeyboardInterrupt"],
            id="own kept, sigint ours",
        ),
    ],
)
def test_stop_on_signals(processes, signals, args, said):
    process = processes.start([sys.executable, "-c", STOPPING, *args], cwd=ROOT)
    process.wait_for_output("ready")

    def handled():
        output = process.output()
        return sum(output.count(word) for word in ("Exit", "Interrupt", "handler"))

    for count, signum in enumerate(signals, 1):
        process.signal(signum)
        wait_until(lambda count=count: handled() >= count)
    # What is logged comes from a thread (see outside_the_handler): in any
    # order with what the main thread prints.
    wait_until(lambda: len(process.output().splitlines()) > len(said))
    process.popen.kill()  # an own handler would let it live on
    assert sorted(process.output().splitlines()[1:]) == sorted(said)


def test_handles_sigterm_marks_a_handler():
    def handler(signum, frame):
        pass

    assert handles_sigterm(handler) is handler and handler.pyramid_lb
