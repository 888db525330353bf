"""Config loading and validation: errors name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import config
from node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_checkout_file_is_the_builtin_default():
    from_file = config.load(REPO / "config" / "ainode.toml")
    builtin = config.parse({}, "<built-in>")
    assert from_file.node == builtin.node
    for section in ("completion", "redis", "model", "send", "series"):
        assert getattr(from_file, section) == getattr(builtin, section)
    assert from_file.callers == () and from_file.destinations == ()


def test_where_the_file_comes_from(tmp_path, monkeypatch):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[node]\nae_title = "FROMFLAG"\n')
    b.write_text('[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("AINODE_CONFIG", str(b))
    assert config.load(a).node.ae_title == "FROMFLAG"
    assert config.load().node.ae_title == "FROMENV"
    monkeypatch.delenv("AINODE_CONFIG")
    assert config.load().source == config.CHECKOUT_CONFIG


def test_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.parse({"node": {"storage": "var/x"}}).node.storage == tmp_path / "var" / "x"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"', "[node] ae_title: must be 1 to 16 characters, got 17"),
        ('[node]\nae_title = "A\\\\B"', "[node] ae_title: must not contain a backslash"),
        ('[node]\nae_title = "   "', "[node] ae_title: must not be blank"),
        ("[node]\nport = 0", "[node] port: must be between 1 and 65535, got 0"),
        ('[node]\nport = "104"', "[node] port: must be an integer, got str"),
        ("[node]\nmin_free_mb = -1", "[node] min_free_mb: must be 0 or more"),
        ("[node]\nprot = 104", "[node] prot: unknown key"),
        ("[nodes]\n", "[nodes]: unknown section"),
        ("[completion]\nquiet_seconds = 0", "[completion] quiet_seconds: must be more than 0"),
        ("[completion]\nquiet_seconds = 60\nmax_wait_seconds = 30", "[completion] max_wait_seconds: must be at least"),
        ('[redis]\nurl = "localhost:6379"', "[redis] url: must be empty or start with redis://"),
        ('[model]\ndevice = "gpu"', "[model] device: must be one of auto, cpu, cuda"),
        ("[model]\nthreshold = 1.5", "[model] threshold: must be between 0 and 1"),
        ('[model]\nthreshold = "high"', "[model] threshold: must be a number or empty, got str"),
        ("[model]\nmax_findings = 0", "[model] max_findings: must be 1..20"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nobjects = ["sr", "pdf"]',
         "[[destinations]] #1 objects: must list each of sr, sc, ko"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nobjects = []',
         "[[destinations]] #1 objects: must list each of sr, sc, ko"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nobjects = "sr"',
         "[[destinations]] #1 objects: must be a list of strings"),
        ('[[callers]]\nhost = "10.0.0.1"', "[[callers]] #1 ae_title: is required"),
        ('[[callers]]\nae_title = "CT01"\nhost = "bad host!"', "[[callers]] #1 host: 'bad host!' is not an IP"),
        ('[[callers]]\nae_title = "CT01"\n[[callers]]\nae_title = "CT01 "', "[[callers]] #2 ae_title: 'CT01 ' is listed twice"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 70000', "[[destinations]] #1 port: must be between"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"', "[[destinations]] #1 port: is required"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_file_key_and_reason(tmp_path, text, message):
    path = tmp_path / "ainode.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_threshold_has_one_owner_and_destinations_get_every_object_by_default():
    cfg = config.parse({"model": {"threshold": ""}, "destinations": [
        {"name": "p", "ae_title": "P", "host": "h", "port": 104}]})
    assert cfg.model.threshold is None  # empty: the model card's
    assert cfg.destinations[0].objects == ("sr", "sc", "ko")
    assert config.parse({"model": {"threshold": 0.7}}).model.threshold == 0.7
    assert config.parse({}).model.threshold is None


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_caller_host_binding():
    c = config.Caller("CT01", "10.0.0.21")
    assert c.admits("CT01", "10.0.0.21") and c.admits("CT01  ", "10.0.0.21")
    assert not c.admits("CT01", "10.0.0.22") and not c.admits("CT02", "10.0.0.21")
    assert config.Caller("CT01").admits("CT01", "192.0.2.1")
