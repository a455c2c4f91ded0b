"""The shared command line (cli.py) and the configuration's environment variables."""

from dataclasses import fields
import json
import subprocess

import pytest

from firehose_zmq import __version__
from firehose_zmq.config import (SECTIONS, ConfigError, default_config, load_config,
                                 load_config_with_sources, variable_name)

from .cluster import BIN, Cluster

COMMANDS = ["firehose-edge", "firehose-worker", "firehose-cluster", "firehose-publish",
            "firehose-consume", "firehose-ctl"]


def run(argv, env=None, timeout_s=30):
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def a_value_for(value):
    """Another valid value of the same type as ``value``."""
    if isinstance(value, bool):
        return not value, str(not value).lower()
    if isinstance(value, int):
        return value + 1, str(value + 1)
    if isinstance(value, float):
        return value + 0.5, str(value + 0.5)
    if isinstance(value, tuple):
        return ("http://a.example", "http://b.example"), "http://a.example, http://b.example"
    return value + "x", value + "x"


# Keys whose value must be one of a few, or that another key must accompany:
# (section, key) -> (expected, variable text, other variables it needs)
_SPECIAL = {
    ("auth", "publish"): ("required", "required", {"FIREHOSE_AUTH_JWT_KEY": "k" * 40}),
    ("auth", "subscribe"): ("required", "required", {"FIREHOSE_AUTH_JWT_KEY": "k" * 40}),
    ("auth", "jwt_algorithms"): (("HS512",), "HS512", {}),
    ("auth", "callout_ops"): (("publish",), "publish", {}),
    ("auth", "callout_url"): ("http://127.0.0.1:9/ok", "http://127.0.0.1:9/ok", {}),
    ("edge", "host"): ("0.0.0.0", "0.0.0.0", {"FIREHOSE_AUTH_ALLOW_OPEN_PUBLISH": "true"}),
    ("edge", "tls_cert"): ("/c.pem", "/c.pem", {"FIREHOSE_EDGE_TLS_KEY": "/k.pem"}),
    ("edge", "tls_key"): ("/k.pem", "/k.pem", {"FIREHOSE_EDGE_TLS_CERT": "/c.pem"}),
    ("storage", "replica_ack"): ("none", "none", {}),
}


def test_every_key_of_every_section_has_a_generated_variable():
    """FIREHOSE_<SECTION>_<KEY> sets each field of every section."""
    base = default_config()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            current = getattr(getattr(base, section), f.name)
            others = {}
            if (section, f.name) in _SPECIAL:
                expected, text, others = _SPECIAL[(section, f.name)]
            elif f.name == "durability":
                expected, text = "async", "async"
            elif f.name == "commit_on":
                expected, text = "thread", "thread"
            elif f.name == "bind":
                expected = text = "127.0.0.2:9"
            elif f.name == "default_buffer_size":
                expected, text = 50, "50"
            elif f.name == "ready_backlog_ratio":
                expected, text = 0.5, "0.5"
            else:
                expected, text = a_value_for(current)
            variable = variable_name(section, f.name)
            assert variable == f"FIREHOSE_{section.upper()}_{f.name.upper()}"
            config = load_config(environ={variable: text, **others})
            assert getattr(getattr(config, section), f.name) == expected, variable


def test_worker_keys_and_ring_vnodes_from_the_environment():
    config = load_config(environ={"FIREHOSE_WORKERS_W1_ADMIN": "127.0.0.1:9999",
                                  "FIREHOSE_WORKERS_W2_ROUTER_CONNECT": "tcp://10.0.0.2:1",
                                  "FIREHOSE_RING_VNODES": "7"})
    assert config.worker("w1").admin == "127.0.0.1:9999"
    assert config.worker("w2").router_connect == "tcp://10.0.0.2:1"
    assert config.ring_vnodes == 7


def test_the_three_older_variables_still_work_and_the_generated_ones_win():
    config = load_config(environ={"PORT": "8080", "FIREHOSE_LONG_POLL_TIMEOUT": "2.5",
                                  "FIREHOSE_DATA_DIR": "/tmp/x"})
    assert (config.edge.port, config.edge.long_poll_timeout_s) == (8080, 2.5)
    assert config.storage.data_dir == "/tmp/x"
    config = load_config(environ={"PORT": "8080", "FIREHOSE_EDGE_PORT": "8081"})
    assert config.edge.port == 8081


@pytest.mark.parametrize("env, message", [
    ({"FIREHOSE_EDGE_PORTT": "1"}, "unknown configuration variable FIREHOSE_EDGE_PORTT"),
    ({"FIREHOSE_WORKERS_W9_ADMIN": "x:1"}, "unknown configuration variable"),
    ({"FIREHOSE_EDGE_PORT": "seven"}, "FIREHOSE_EDGE_PORT must be an integer"),
    ({"FIREHOSE_EDGE_PORT": "0"}, "TCP port"),
    ({"FIREHOSE_LIMITS_MAX_BUFFER_SIZE": "-1"}, "limits.max_buffer_size must be a non-negative"),
    ({"FIREHOSE_STORAGE_DURABILITY": "fast"}, "storage.durability must be one of"),
    ({"FIREHOSE_ADMIN_BIND": "nohost"}, "admin.bind must be host:port"),
    ({"FIREHOSE_PORT_BASE": "x"}, "FIREHOSE_PORT_BASE"),
])
def test_bad_variables_are_refused_with_their_name(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=env)


def test_port_base_moves_every_port_of_the_embedded_default():
    config, sources = load_config_with_sources(environ={"FIREHOSE_PORT_BASE": "20000"})
    ports = [config.edge.port, config.edge.native_pub_bind, config.edge.native_router_bind,
             config.admin.bind] + [getattr(w, key) for w in config.workers
                                   for key in ("router_bind", "pub_bind", "admin")]
    numbers = sorted(int(str(p).rsplit(":", 1)[-1]) for p in ports)
    assert numbers == [20000, 20001, 20002, 20003, 20004, 20005, 20007, 20008, 20009, 20010]
    assert default_config().edge.port == 7474


def test_the_environment_wins_over_the_file(tmp_path):
    layout = Cluster(tmp_path)
    config = load_config(str(layout.config_path), environ={"FIREHOSE_EDGE_PORT": "9001"})
    assert config.edge.port == 9001


def test_print_config_shows_every_value_and_its_source(tmp_path):
    layout = Cluster(tmp_path)
    result = run(["firehose-edge", "--config", str(layout.config_path), "--print-config"],
                 env={**layout.env, "FIREHOSE_EDGE_REQUEST_TIMEOUT_S": "2"})
    assert result.returncode == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert "edge.request_timeout_s = 2.0" in lines["edge.request_timeout_s"]
    assert "# env FIREHOSE_EDGE_REQUEST_TIMEOUT_S" in lines["edge.request_timeout_s"]
    assert f"edge.port = {layout.http_port}" in lines["edge.port"]
    assert f"# file {layout.config_path}; FIREHOSE_EDGE_PORT" in lines["edge.port"]
    assert "# default; FIREHOSE_LIMITS_DEFAULT_TTL_S" in lines["limits.default_ttl_s"]
    assert "# file" in lines["workers.w1.router_bind"]
    assert len(lines) > 40


def test_worker_flags_show_as_sources(tmp_path):
    layout = Cluster(tmp_path)
    result = run(["firehose-worker", "--config", str(layout.config_path), "--id", "w1",
                  "--durability", "memory", "--print-config"], env=layout.env)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith('storage.durability = "memory"') and "# --durability" in line
               for line in result.stdout.splitlines())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_version(command):
    result = run([command, "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command} {__version__}"


@pytest.mark.parametrize("command", ["firehose-edge", "firehose-worker", "firehose-cluster"])
def test_a_bad_log_level_is_one_line(command):
    argv = [command, "--log-level", "loud"] + (["--id", "w1"] if command == "firehose-worker"
                                               else [])
    result = run(argv)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"{command}: --log-level must be one of DEBUG, INFO, "
                                     "WARNING, ERROR, CRITICAL, not 'loud'")


def test_json_logs_are_one_object_per_line(tmp_path):
    """A worker's lifecycle logged as JSON: each line an object with the text format's fields."""
    layout = Cluster(tmp_path, worker_ids=("w1",))
    from .cluster import Process
    process = Process("worker", [str(BIN / "firehose-worker"), "--config",
                                 str(layout.config_path), "--id", "w1", "--log-format", "json"],
                      layout.env)
    try:
        process.wait_for("worker w1 ready")
    finally:
        process.stop()
    entries = [json.loads(line) for line in process.lines if line.strip()]
    assert entries and all(set(e) >= {"time", "level", "logger", "pid", "message"}
                           for e in entries)
    ready = [e for e in entries if "ready" in e["message"]]
    assert ready[0]["level"] == "INFO" and ready[0]["logger"] == "firehose.worker"
    assert ready[0]["pid"] == process.popen.pid


def test_publish_errors_are_plain_text_and_stdin_loses_its_final_newline(cluster):
    """firehose-publish: a refused name is one readable line; `echo hi |` publishes "hi"."""
    result = subprocess.run([str(BIN / "firehose-publish"), cluster.url("/a,b"), "x"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "may not contain ','" in result.stderr and "b'" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for argv, expected in (([], "hi"), (["--keep-newline"], "hi\n")):
        channel = f"/cli/newline{len(argv)}"
        published = subprocess.run([str(BIN / "firehose-publish"), cluster.url(channel), *argv],
                                   input="hi\n", capture_output=True, text=True, timeout=30)
        assert published.returncode == 0, published.stderr
        from .http import request
        assert json.loads(request(cluster.url(channel)).body)["message"] == expected
