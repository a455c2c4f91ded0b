"""Configuration: the embedded default, files, environment overrides, clear errors."""

import pytest

from firehose_zmq.config import ConfigError, apply_environment, default_config, load_config

EXAMPLE = "conf/cluster.example.toml"


def test_default_is_one_local_edge_and_two_workers():
    config = default_config()
    assert (config.edge.host, config.edge.port) == ("127.0.0.1", 7474)
    assert [w.id for w in config.workers] == ["w1", "w2"]
    assert config.edge.long_poll_timeout_s == 20.0
    assert config.limits.max_message_bytes == 5 * 1024 * 1024


def test_environment_overrides():
    config = apply_environment(default_config(), {"PORT": "8080",
                                                  "FIREHOSE_LONG_POLL_TIMEOUT": "2.5"})
    assert (config.edge.port, config.edge.long_poll_timeout_s) == (8080, 2.5)


@pytest.mark.parametrize("env", [{"PORT": "x"}, {"PORT": "70000"},
                                 {"FIREHOSE_LONG_POLL_TIMEOUT": "-1"},
                                 {"FIREHOSE_LONG_POLL_TIMEOUT": "soon"}])
def test_bad_environment_is_refused(env):
    with pytest.raises(ConfigError):
        apply_environment(default_config(), env)


def test_example_config_loads():
    """The annotated example in conf/ is a valid config."""
    config = load_config(EXAMPLE, environ={})
    assert len(config.workers) >= 2
    assert config.curve.enabled and config.auth.publish == "required"


@pytest.mark.parametrize("text, message", [
    ("", "at least one"),
    ("[[workers]]\nid = 'w1'\n", "router_bind"),
    ("bogus = 1\n[[workers]]\n", "unknown top-level"),
    ("[edge]\nport = 'x'\n", "edge.port must be"),
    ("[limits]\nmax_buffer_size = 10\ndefault_buffer_size = 50\n", "above"),
    ("not toml [", "not valid TOML"),
    ("[storage]\npublish_id_window_s = 0\n", "must be positive"),
    ("[edge]\nrequest_timeout_s = 8\n[storage]\npublish_id_window_s = 10\n",
     "at least twice edge.request_timeout_s"),
    ("[storage]\ncommit_window_ms = 1001\n", "from 0 to 1000"),
    ("[storage]\ncommit_window_ms = -1\n", "non-negative integer"),
    ("[storage]\ncommit_on = \"disk\"\n", "commit_on must be one of loop, thread"),
    ("[edge]\nrequest_timeout_s = 1\n[storage]\ncommit_window_ms = 500\npublish_id_window_s = 10\n",
     "below half of edge.request_timeout_s"),
])
def test_bad_files_are_refused(tmp_path, text, message):
    workers = ("[[workers]]\nid='w1'\nrouter_bind='tcp://127.0.0.1:1'\n"
               "router_connect='tcp://127.0.0.1:1'\npub_bind='tcp://127.0.0.1:2'\n"
               "pub_connect='tcp://127.0.0.1:2'\n")
    if text.startswith(("[edge]", "[limits]", "[storage]")):
        text = workers + text
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), environ={})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "nope.toml"), environ={})
