"""``pyramid-lb serve`` itself: its checks of the server section and what it
logs (the dispatcher's behaviour is in test_supervisor.py)."""

import re

import pytest

from pyramid_lb.dispatcher.serve import ServeError, check_listen, public_url
from tests.dispatcher.site import write_ini
from tests.processes import BIN, LOGGING_INI


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"listen": "127.0.0.1:8080"}, None, id="fine"),
        pytest.param({"listen": "127.0.0.1:0"}, None, id="any free port"),
        pytest.param(
            {"listen": "*:99999"},
            "[server:dispatcher] listen = '*:99999' is not valid: the port of "
            "'*:99999' is above 65535; expected a TCP port from 1 to 65535 "
            "(0: any free port)",
            id="wrapped by waitress",
        ),
        pytest.param(
            {"host": "127.0.0.1", "port": "70000"},
            "[server:dispatcher] port = '70000' is not valid: above 65535",
            id="port key",
        ),
    ],
)
def test_check_listen(options, message):
    if message is None:
        check_listen(options)
        return
    with pytest.raises(ServeError) as info:
        check_listen(options)
    assert str(info.value).startswith(message)


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
