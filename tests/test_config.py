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


# --------------------------------------------------------------------------- pipelines and destination kinds

DESTS = '''
[[callers]]
ae_title = "CT01"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
[[destinations]]
name = "archive"
kind = "dicomweb"
url = "https://archive.example.org/dicom-web/"
auth_file = "archive.token"
[[destinations]]
name = "ris"
kind = "hl7"
host = "10.0.0.7"
port = 2575
'''


def test_without_pipelines_node_ae_title_is_the_one_pipeline_to_every_destination():
    cfg = config.parse_text('[node]\nae_title = "OLD"\n' + DESTS)
    (only,) = cfg.pipelines
    assert not cfg.declared_pipelines
    assert (only.name, only.destinations, only.model, only.series) == ("OLD", ("pacs", "archive", "ris"), "", "default")
    assert cfg.pipeline("") == only and cfg.pipeline("OLD ") == only
    assert cfg.pipeline("RENAMED") == only  # a study received before [node] ae_title was changed
    assert cfg.quiet_seconds(only) == cfg.completion.quiet_seconds and cfg.threshold(only) is None


def test_pipelines_resolve_their_model_threshold_series_and_destinations(tmp_path):
    cfg = config.parse_text(
        '[model]\nthreshold = 0.6\n[series.thin]\nmax_slice_thickness_mm = 2.5\n' + DESTS
        + '[[pipelines]]\nae_title = "AI_LUNG"\ncallers = ["CT01"]\ndestinations = ["pacs", "ris"]\nquiet_seconds = 5\n'
        + '[[pipelines]]\nae_title = "RESEARCH"\nmodel = "models/r.onnx"\nthreshold = 0.3\nseries = "thin"\n'
        + 'destinations = ["archive"]\n'
        + '[[pipelines]]\nae_title = "FWD"\nmodel = "none"\ndestinations = ["pacs", "archive"]\n',
        base=tmp_path)
    lung, research, fwd = cfg.pipelines
    assert cfg.declared_pipelines and cfg.pipeline("RESEARCH") is research
    assert (cfg.threshold(lung), cfg.threshold(research)) == (0.6, 0.3)
    assert (cfg.quiet_seconds(lung), cfg.quiet_seconds(research)) == (5.0, 10.0)
    assert cfg.model_path(research) == str(tmp_path / "models" / "r.onnx") and cfg.model_path(lung) == ""
    assert cfg.rules(research).max_slice_thickness_mm == 2.5 and cfg.rules(lung).max_slice_thickness_mm == 5.0
    assert [d.name for d in cfg.destinations_of(lung)] == ["pacs", "ris"] and fwd.forwards and not lung.forwards
    assert lung.admits("CT01") and not lung.admits("CT02") and research.admits("ANY")
    archive = cfg.destination("archive")
    assert archive.url == "https://archive.example.org/dicom-web" and archive.auth_file == str(tmp_path / "archive.token")


@pytest.mark.parametrize("text, message", [
    ('[[pipelines]]\nae_title = "A"\ndestinations = ["nope"]', "[[pipelines]] #1 destinations: 'nope' is not a [[destinations]] name"),
    ('[[pipelines]]\nae_title = "A"\n[[pipelines]]\nae_title = "A "', "[[pipelines]] #2 ae_title: 'A' is listed twice"),
    ('[[pipelines]]\nae_title = "A"\ncallers = ["CT09"]', "[[pipelines]] #1 callers: 'CT09' is not a [[callers]] ae_title"),
    ('[[pipelines]]\nae_title = "A"\nseries = "thin"', "[[pipelines]] #1 series: 'thin' is not a rule set (known: default)"),
    ('[[pipelines]]\nae_title = "A"\nthreshold = 2', "[[pipelines]] #1 threshold: must be between 0 and 1"),
    ('[[pipelines]]\nae_title = "A"\nquiet_seconds = 4000', "[[pipelines]] #1 quiet_seconds: must be more than 0 and at most"),
    ('[[pipelines]]\nae_title = "A"\nmodel = "none"\ndestinations = ["ris"]', "'ris' is an HL7 destination, which takes results only"),
    ('[[pipelines]]\nname = "A"', "[[pipelines]] #1 ae_title: is required"),
    ("pipelines = []", "[[pipelines]]: is empty"),
    ('[series]\nmin_slices = 3\n[series.default]\nmin_slices = 4', "[series.default]: is given twice"),
    ('[series.thin]\nmin_slices = 0', "[series.thin]: \"min_slices\" must be at least 1"),
])
def test_pipeline_errors_name_the_entry_and_key(text, message):
    with pytest.raises(ConfigError) as err:
        config.parse_text(text + "\n" + DESTS, "ainode.toml")
    assert message in str(err.value)


@pytest.mark.parametrize("entry, message", [
    ('kind = "smtp"\nhost = "h"\nport = 1', 'kind: must be one of dicom, dicomweb, hl7'),
    ('kind = "dicomweb"', "url: is required for kind = 'dicomweb'"),
    ('kind = "dicomweb"\nurl = "ftp://x/y"', "url: must be an http:// or https:// base URL"),
    ('kind = "dicomweb"\nurl = "https://u:pw@x/dicom-web"', "url: must not hold credentials: put them in auth_file"),
    ('kind = "dicomweb"\nurl = "https://x"\nhost = "h"', "host: does not apply to kind = 'dicomweb'"),
    ('kind = "hl7"\nhost = "h"', "port: is required for kind = 'hl7'"),
    ('kind = "hl7"\nhost = "h"\nport = 1\nae_title = "X"', "ae_title: does not apply to kind = 'hl7'"),
    ('kind = "hl7"\nhost = "999.1.1.1"\nport = 1', "host: '999.1.1.1' is not a valid IPv4 address"),
    ('ae_title = "P"\nhost = "h"\nport = 104\nurl = "https://x"', "url: does not apply to kind = 'dicom'"),
    ('host = "h"\nport = 104', "ae_title: is required for kind = 'dicom'"),
])
def test_destination_kinds_check_their_own_keys(entry, message):
    with pytest.raises(ConfigError) as err:
        config.parse_text(f'[[destinations]]\nname = "d"\n{entry}\n', "ainode.toml")
    assert f"ainode.toml: [[destinations]] #1 {message}" in str(err.value)
