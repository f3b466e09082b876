"""``pyramid-lb serve`` itself: where it says it listens, and what it logs (the
dispatcher's behaviour is in test_supervisor.py and
test_supervisor_replacement.py, the checks of its server section in
tests/test_process.py)."""

import re

import pytest

from pyramid_lb.dispatcher.serve import public_url
from tests.dispatcher.site import subprocess_run, write_ini
from tests.processes import BIN, LOGGING_INI


class Listening:
    def __init__(self, host, port):
        self.effective_host, self.effective_port = host, port


class ListeningOnSeveral:
    def __init__(self, *listen):
        self.effective_listen = list(listen)


@pytest.mark.parametrize(
    ("server", "url"),
    [
        pytest.param(Listening("127.0.0.1", 8080), "http://127.0.0.1:8080/", id="ip"),
        pytest.param(Listening("0.0.0.0", 80), "http://localhost:80/", id="any"),
        pytest.param(Listening("::1", 8080), "http://[::1]:8080/", id="ipv6"),
        pytest.param(
            ListeningOnSeveral(("127.0.0.1", 8080), ("::1", 8080)),
            "http://localhost:8080/",
            id="listen = localhost:8080",
        ),
        pytest.param(object(), None, id="unknown server"),
    ],
)
def test_public_url(server, url):
    assert public_url(server) == url


def test_without_loggers_it_still_says_where_it_listens(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    ini.write_text(ini.read_text().replace(LOGGING_INI, ""))
    assert "[loggers]" not in ini.read_text()
    process = processes.start([BIN / "pyramid-lb", "serve", ini], name="dispatcher")
    ready = process.wait_for_output(
        r"INFO  \[pyramid_lb.dispatcher\] 1/1 instances ready: "
        r"(http://127.0.0.1:\d+/) takes requests from now on",
        timeout=20,
    )
    serving = re.search(
        r"INFO  \[waitress\] Serving on (http://127.0.0.1:\d+)", process.output()
    )
    assert serving and ready[1] == serving[1] + "/"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        pytest.param(
            "use = egg:pyramid#wsgiref",
            "[server:dispatcher] must use egg:pyramid_lb#waitress "
            "(or egg:waitress#main)",
            id="not waitress",
        ),
        pytest.param(
            "use = egg:waitress#main\nlisten = *:99999",
            "[server:dispatcher] listen = '*:99999' is not valid",
            id="wrapped port",
        ),
        pytest.param(
            "use = egg:waitress#main\nlisten = 127.0.0.1:0\nthreads = many",
            "[server:dispatcher]: ",
            id="waitress refuses",
        ),
        pytest.param(
            "use = egg:pyramid_lb#nothing",
            "[server:dispatcher]: Entry point 'nothing' not found in egg 'pyramid_lb'",
            id="no such server",
        ),
    ],
)
def test_server_section_errors_are_one_line_naming_the_file(tmp_path, server, message):
    ini = write_ini(tmp_path, instances=1)
    ini.write_text(
        ini.read_text().replace(
            "use = egg:waitress#main\nlisten = 127.0.0.1:0\n", server
        )
    )
    result = subprocess_run([BIN / "pyramid-lb", "serve", ini])
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"pyramid-lb: error: {ini} {message}")
    assert result.stderr.count("\n") == 1
