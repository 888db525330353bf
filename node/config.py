"""Typed, validated configuration, loaded once from one TOML file.

Where the file comes from, first match wins: ``ainode --config PATH``, the
``AINODE_CONFIG`` environment variable, ``config/ainode.toml`` of the checkout
(the embedded default), and last the built-in defaults below, which are the
same values as that file.

Every error names the file, the key and the reason in one line, for example::

    config/ainode.toml: [node] ae_title: must be 1 to 16 characters, got 17
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from node.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

ENV_CONFIG = "AINODE_CONFIG"
CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "ainode.toml"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_DEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEVICES = ("auto", "cpu", "cuda")
SR_CLASSES = ("comprehensive", "enhanced", "comprehensive3d")
#: The result objects a destination may receive: the SR, the summary image, the key object selection.
RESULT_OBJECTS = ("sr", "sc", "ko")


def ae_title_problem(value: object) -> str | None:
    """Why ``value`` is not a valid AE title, or None if it is.

    DICOM PS3.5 (AE value representation): 1 to 16 characters of the default
    character repertoire, no backslash, no control characters; leading and
    trailing spaces are not significant, so an all-space title is empty.
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not 1 <= len(value) <= 16:
        return f"must be 1 to 16 characters, got {len(value)}"
    if "\\" in value:
        return "must not contain a backslash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain control characters"
    if any(ord(c) > 0x7E for c in value):
        return "must be plain ASCII"
    if not value.strip():
        return "must not be blank"
    return None


def host_problem(value: object) -> str | None:
    """Why ``value`` is not an IP address or host name, or None if it is."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string (an IP address or host name)"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", value):  # digits and dots only: meant as an IPv4 address, and not one
        return f"{value!r} is not a valid IPv4 address"
    if not _HOSTNAME.match(value):
        return f"{value!r} is not an IP address or host name"
    return None


def port_problem(value: object) -> str | None:
    """Why ``value`` is not a TCP port (1-65535), or None if it is."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {type(value).__name__}"
    if not 1 <= value <= 65535:
        return f"must be between 1 and 65535, got {value}"
    return None


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: the SCP and its storage. ``port`` 0 turns the plain (non-TLS) port off."""

    ae_title: str = "AINODE"
    host: str = "127.0.0.1"
    port: int = 11112
    storage: Path = Path("var/ainode")
    max_associations: int = 32
    max_pdu: int = 131072
    min_free_mb: int = 1024
    max_connections_per_host: int = 16
    associate_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    receivers: int = 1  # receiving processes sharing the port(s) (SO_REUSEPORT); 1: the node process receives


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: DICOM TLS (TLS 1.2 or later) for receiving and sending.

    ``enabled`` starts a second SCP on ``port``; ``cert``/``key`` are this
    node's certificate and unencrypted private key (PEM), also presented as the
    client certificate when sending to a destination with ``tls = true``;
    ``ca`` holds the certificates trusted to sign peers' certificates (empty:
    the system's trust store, for sending only). Paths are made absolute.
    """

    enabled: bool = False
    port: int = 2762
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False
    check_hostname: bool = True  # sending: the destination's host must be named in its certificate


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the audit trail (see node.audit).

    ``path`` empty: ``<storage>/audit.jsonl``. ``syslog``: empty, or
    ``host:port`` / ``udp://host:port`` (UDP) or ``tcp://host:port``.
    """

    path: str = ""
    syslog: str = ""


@dataclass(frozen=True)
class CompletionConfig:
    """``[completion]``: when a study counts as complete."""

    quiet_seconds: float = 10.0
    max_wait_seconds: float = 1800.0


@dataclass(frozen=True)
class RedisConfig:
    """``[redis]``: empty ``url`` means ainode runs its own Redis server."""

    url: str = ""


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: empty ``path`` means the bundled model."""

    path: str = ""
    device: str = "auto"
    threshold: float | None = None  # None (empty in the file): the model card's threshold
    max_findings: int = 3  # located findings reported per study, at most


@dataclass(frozen=True)
class Caller:
    """One ``[[callers]]`` entry: a calling AE title allowed to associate."""

    ae_title: str
    host: str | None = None

    def admits(self, ae_title: str, address: str) -> bool:
        """True if a peer calling as ``ae_title`` from ``address`` is this caller."""
        return ae_title.strip() == self.ae_title.strip() and (self.host is None or self.host == address)


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` entry: where results (or forwarded instances) go.

    ``kind``: ``dicom`` (C-STORE to ``ae_title@host:port``, over DICOM TLS with
    ``tls``), ``dicomweb`` (STOW-RS to the base ``url``; ``auth_file`` holds a
    bearer token, or ``user:password`` for basic auth; ``ca`` the CA bundle
    trusted for its HTTPS, empty: the system's) or ``hl7`` (an ORU^R01 over
    MLLP to ``host:port``, over TLS with ``tls``; ``application`` and
    ``facility`` are the receiving application and facility of its MSH).
    """

    name: str
    kind: str = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    sr_class: str = "comprehensive"  # comprehensive | enhanced | comprehensive3d
    tls: bool = False  # send over TLS, with the [tls] certificate, key and CA
    objects: tuple[str, ...] = RESULT_OBJECTS  # which result objects it gets: sr, sc, ko
    url: str = ""
    auth_file: str = ""
    ca: str = ""
    application: str = ""
    facility: str = ""


@dataclass(frozen=True)
class SeriesRules:
    """``[series]``: which series of a study may be analysed (see node.volume)."""

    modality: str = "CT"
    require_original: bool = True  # ImageType ORIGINAL only
    require_axial: bool = True  # slice normal within 10 degrees of z
    min_slices: int = 10
    max_slice_thickness_mm: float = 5.0  # max(SliceThickness, position step)
    exclude_localizers: bool = True
    max_volume_mb: int = 2048  # the decoded series (int16 HU) may take at most this, checked before decoding

    def __post_init__(self) -> None:
        if self.modality != "CT":
            raise ValueError(f'Argument "modality" must be "CT", got {self.modality!r}')
        if self.min_slices < 1:
            raise ValueError(f'Argument "min_slices" must be at least 1, got {self.min_slices}')
        if self.max_volume_mb < 16:
            raise ValueError(f'Argument "max_volume_mb" must be at least 16, got {self.max_volume_mb}')
        if not self.max_slice_thickness_mm > 0:
            raise ValueError(f'Argument "max_slice_thickness_mm" must be more than 0, got {self.max_slice_thickness_mm}')


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: how long studies are kept."""

    keep_days: float = 0.0  # delete a study this long after its SR was sent; 0 keeps everything


#: ``[[pipelines]] model`` for a pipeline that stores and forwards, with no analysis.
FORWARD = "none"
DESTINATION_KINDS = ("dicom", "dicomweb", "hl7")


@dataclass(frozen=True)
class Pipeline:
    """One ``[[pipelines]]`` entry: a called AE title and what happens to the studies sent to it.

    ``callers``: the calling AE titles that may call it (empty: every allowed
    caller). ``model``: empty for ``[model] path`` (the bundled model when that
    is empty too), a path to an ONNX model with its card, or ``"none"``: store
    and forward (the received instances go to the destinations, not analysed).
    ``threshold`` empty: ``[model] threshold`` (empty: the model card's).
    ``series``: a named ``[series.NAME]`` rule set (``default`` is ``[series]``).
    ``destinations``: names of ``[[destinations]]``. ``quiet_seconds`` empty:
    ``[completion] quiet_seconds``. Its name is its AE title.
    """

    ae_title: str
    callers: tuple[str, ...] = ()
    model: str = ""
    threshold: float | None = None
    series: str = "default"
    destinations: tuple[str, ...] = ()
    quiet_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.ae_title.strip()

    @property
    def forwards(self) -> bool:
        """True for store and forward: no model, the instances themselves are sent on."""
        return self.model == FORWARD

    def admits(self, calling: str) -> bool:
        return not self.callers or calling.strip() in {c.strip() for c in self.callers}


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the node's HTTP side (``/healthz``, ``/readyz``, ``/metrics``), a process of its own.

    ``tls``: HTTPS with ``[tls] cert``/``key``.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8112
    tls: bool = False


@dataclass(frozen=True)
class SendConfig:
    """``[send]``: delivery of results to the destinations."""

    retry_hours: float = 24.0  # keep retrying with back-off this long, then dead-letter
    retry_first_seconds: float = 30.0  # the first back-off interval; each next one doubles (at most 1 h)
    timeout_seconds: float = 30.0  # per network operation


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None: built-in)."""

    node: NodeConfig = field(default_factory=NodeConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    callers: tuple[Caller, ...] = ()
    destinations: tuple[Destination, ...] = ()
    send: SendConfig = field(default_factory=SendConfig)
    series: SeriesRules = field(default_factory=SeriesRules)
    tls: TLSConfig = field(default_factory=TLSConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    web: WebConfig = field(default_factory=WebConfig)
    pipeline_entries: tuple[Pipeline, ...] = ()  # ``[[pipelines]]`` as written; see :attr:`pipelines`
    series_sets: tuple[tuple[str, SeriesRules], ...] = ()  # (name, rules); "default" is ``series``
    source: Path | None = None

    def __post_init__(self) -> None:
        others = tuple((n, r) for n, r in self.series_sets if n != "default")
        object.__setattr__(self, "series_sets", (("default", self.series), *others))

    @property
    def pipelines(self) -> tuple[Pipeline, ...]:
        """Every pipeline, at least one: without ``[[pipelines]]``, the one of ``[node] ae_title``, ``[model]``,
        ``[series]`` and every destination (as ainode 0.1 had)."""
        if self.pipeline_entries:
            return self.pipeline_entries
        return (Pipeline(self.node.ae_title, destinations=tuple(d.name for d in self.destinations)),)

    @property
    def declared_pipelines(self) -> bool:
        return bool(self.pipeline_entries)

    def destination(self, name: str) -> Destination | None:
        """The destination called ``name``, or None."""
        return next((d for d in self.destinations if d.name == name), None)

    def pipeline(self, name: str) -> Pipeline | None:
        """The pipeline of that called AE title (padding ignored); ``""`` (a study of ainode 0.1): the first.

        Without ``[[pipelines]]`` every study is the one pipeline's, whatever AE title it came to (an
        admin who renames ``[node] ae_title`` keeps the studies received under the old one).
        """
        if not name.strip() or not self.declared_pipelines:
            return self.pipelines[0]
        return next((p for p in self.pipelines if p.name == name.strip()), None)

    def rules(self, pipeline: Pipeline) -> SeriesRules:
        """The series rule set a pipeline names."""
        return dict(self.series_sets)[pipeline.series]

    def model_path(self, pipeline: Pipeline) -> str:
        """The model a pipeline runs: its own, else ``[model] path`` ("" = the bundled model)."""
        return pipeline.model or self.model.path

    def threshold(self, pipeline: Pipeline) -> float | None:
        """The threshold a pipeline sets (its own, else ``[model] threshold``); None: the model card's."""
        return pipeline.threshold if pipeline.threshold is not None else self.model.threshold

    def quiet_seconds(self, pipeline: Pipeline) -> float:
        return pipeline.quiet_seconds if pipeline.quiet_seconds is not None else self.completion.quiet_seconds

    def describe(self, pipeline: Pipeline) -> str:
        """A pipeline in one line, as resolved: what it does, with which model and threshold, from whom, to where."""
        if pipeline.forwards:
            what = "store and forward"
        else:
            threshold = self.threshold(pipeline)
            limit = "the card's" if threshold is None else f"{threshold:g}"
            what = f"analyse with {self.model_path(pipeline) or 'bundled model'}, threshold {limit}"
        callers = ", ".join(pipeline.callers) if pipeline.callers else "every allowed caller"
        return (f"{pipeline.name}: {what}; series {pipeline.series}; quiet {self.quiet_seconds(pipeline):g} s; "
                f"from {callers}; to {', '.join(pipeline.destinations) or 'nowhere'}")

    def destinations_of(self, pipeline: Pipeline) -> tuple[Destination, ...]:
        """The destinations of a pipeline, as configured now (one removed since is left out)."""
        return tuple(d for name in pipeline.destinations if (d := self.destination(name)) is not None)

    @property
    def audit_path(self) -> Path:
        """Where the audit trail is written: ``[audit] path``, else ``<storage>/audit.jsonl``."""
        return Path(self.audit.path) if self.audit.path else self.node.storage / "audit.jsonl"


class _Checker:
    """Reads one TOML table into a dataclass, raising ConfigError with file and key."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.origin}: {where}: {reason}")

    def table(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(f"[{name}]", "must be a table")
        return value

    def build(self, cls: type, raw: Mapping[str, Any], where: str) -> Any:
        known = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise self.fail(f"{where} {key}", f"unknown key (known: {', '.join(known)})")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in raw:
                continue
            value = raw[name]
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            values[name] = self.coerce(value, kind, f"{where} {name}")
        return cls(**values)

    def coerce(self, value: Any, kind: str, where: str) -> Any:
        if kind == "str":
            if not isinstance(value, str):
                raise self.fail(where, f"must be a string, got {type(value).__name__}")
            return value
        if kind == "str | None":
            if not isinstance(value, str):
                raise self.fail(where, f"must be a string, got {type(value).__name__}")
            return value or None
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(where, f"must be an integer, got {type(value).__name__}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(where, f"must be true or false, got {type(value).__name__}")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(where, f"must be a number, got {type(value).__name__}")
            return float(value)
        if kind == "float | None":
            if value == "":
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(where, f"must be a number or empty, got {type(value).__name__}")
            return float(value)
        if kind == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(where, "must be a list of strings")
            return tuple(value)
        if kind == "Path":
            if not isinstance(value, str) or not value:
                raise self.fail(where, "must be a non-empty path string")
            return Path(value)
        raise AssertionError(f"no coercion for {kind}")  # pragma: no cover


def parse(data: Mapping[str, Any], origin: str = "<config>", base: Path | None = None) -> Config:
    """Build a validated Config from parsed TOML ``data``.

    ``origin`` names the file in errors. Relative ``node.storage`` paths are
    made absolute against ``base`` (default: the current directory).
    """
    ck = _Checker(origin)
    sections = {"node", "completion", "redis", "model", "callers", "destinations", "send", "series", "tls", "audit",
                "storage", "web", "pipelines"}
    for key in data:
        if key not in sections:
            raise ck.fail(f"[{key}]", f"unknown section (known: {', '.join(sorted(sections))})")

    here = base or Path.cwd()
    tls = ck.build(TLSConfig, ck.table(data, "tls"), "[tls]")
    node = ck.build(NodeConfig, ck.table(data, "node"), "[node]")
    if (p := ae_title_problem(node.ae_title)) is not None:
        raise ck.fail("[node] ae_title", p)
    if (p := host_problem(node.host)) is not None:
        raise ck.fail("[node] host", p)
    if not (node.port == 0 and tls.enabled) and (p := port_problem(node.port)) is not None:
        raise ck.fail("[node] port", p)
    if not 1 <= node.max_associations <= 1000:
        raise ck.fail("[node] max_associations", f"must be between 1 and 1000, got {node.max_associations}")
    if node.max_pdu != 0 and not 4096 <= node.max_pdu <= 2**32 - 1:
        raise ck.fail("[node] max_pdu", f"must be 0 (unlimited) or between 4096 and 4294967295, got {node.max_pdu}")
    if node.min_free_mb < 0:
        raise ck.fail("[node] min_free_mb", f"must be 0 or more, got {node.min_free_mb}")
    if not 1 <= node.max_connections_per_host <= 1000:
        raise ck.fail("[node] max_connections_per_host",
                      f"must be between 1 and 1000, got {node.max_connections_per_host}")
    if not 1 <= node.receivers <= 64:
        raise ck.fail("[node] receivers", f"must be between 1 and 64, got {node.receivers}")
    for key in ("associate_timeout_seconds", "idle_timeout_seconds"):
        if not 0 < getattr(node, key) <= 3600:
            raise ck.fail(f"[node] {key}", f"must be more than 0 and at most 3600, got {getattr(node, key):g}")
    storage = node.storage.expanduser()
    if not storage.is_absolute():
        storage = here / storage
    node = NodeConfig(**{**node.__dict__, "storage": storage})

    completion = ck.build(CompletionConfig, ck.table(data, "completion"), "[completion]")
    if completion.quiet_seconds <= 0:
        raise ck.fail("[completion] quiet_seconds", f"must be more than 0, got {completion.quiet_seconds:g}")
    if completion.max_wait_seconds < completion.quiet_seconds:
        raise ck.fail(
            "[completion] max_wait_seconds",
            f"must be at least quiet_seconds ({completion.quiet_seconds:g}), got {completion.max_wait_seconds:g}",
        )

    redis_cfg = ck.build(RedisConfig, ck.table(data, "redis"), "[redis]")
    if redis_cfg.url and not redis_cfg.url.startswith(("redis://", "rediss://", "unix://")):
        raise ck.fail("[redis] url", "must be empty or start with redis://, rediss:// or unix://")

    model = ck.build(ModelConfig, ck.table(data, "model"), "[model]")
    if model.device not in DEVICES:
        raise ck.fail("[model] device", f"must be one of {', '.join(DEVICES)}, got {model.device!r}")
    if model.threshold is not None and not 0.0 <= model.threshold <= 1.0:
        raise ck.fail("[model] threshold", f"must be between 0 and 1, or empty for the model card's, got {model.threshold:g}")
    if not 1 <= model.max_findings <= 20:
        raise ck.fail("[model] max_findings", f"must be 1..20, got {model.max_findings}")

    callers = tuple(_entries(ck, data, "callers", Caller))
    seen: set[tuple[str, str | None]] = set()  # titles compare without padding, as in Caller.admits
    for i, c in enumerate(callers):
        where = f"[[callers]] #{i + 1}"
        if (p := ae_title_problem(c.ae_title)) is not None:
            raise ck.fail(f"{where} ae_title", p)
        if c.host is not None and (p := host_problem(c.host)) is not None:
            raise ck.fail(f"{where} host", p)
        if (c.ae_title.strip(), c.host) in seen:
            raise ck.fail(f"{where} ae_title", f"{c.ae_title!r} is listed twice")
        seen.add((c.ae_title.strip(), c.host))

    destinations = list(_entries(ck, data, "destinations", Destination))
    names: set[str] = set()
    for i, d in enumerate(destinations):
        where = f"[[destinations]] #{i + 1}"
        if not _DEST_NAME.match(d.name):
            raise ck.fail(f"{where} name", f"{d.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if d.name in names:
            raise ck.fail(f"{where} name", f"{d.name!r} is listed twice")
        names.add(d.name)
        destinations[i] = d = _check_destination(ck, d, where, here)

    series_sets = _series_sets(ck, ck.table(data, "series"))
    series = dict(series_sets)["default"]
    pipelines = _pipelines(ck, data, node, callers, destinations, series_sets, completion, here)

    tls = _check_tls(ck, tls, node, any(d.tls for d in destinations if d.kind != "dicomweb"), here)
    audit = _check_audit(ck, ck.build(AuditConfig, ck.table(data, "audit"), "[audit]"), here)

    send = ck.build(SendConfig, ck.table(data, "send"), "[send]")
    if send.retry_hours < 0:
        raise ck.fail("[send] retry_hours", f"must be 0 or more, got {send.retry_hours:g}")
    if send.retry_first_seconds < 1:
        raise ck.fail("[send] retry_first_seconds", f"must be at least 1, got {send.retry_first_seconds:g}")
    if send.timeout_seconds <= 0:
        raise ck.fail("[send] timeout_seconds", f"must be more than 0, got {send.timeout_seconds:g}")

    storage_cfg = ck.build(StorageConfig, ck.table(data, "storage"), "[storage]")
    if storage_cfg.keep_days < 0:
        raise ck.fail("[storage] keep_days", f"must be 0 (keep everything) or more, got {storage_cfg.keep_days:g}")

    web = ck.build(WebConfig, ck.table(data, "web"), "[web]")
    if (p := host_problem(web.host)) is not None:
        raise ck.fail("[web] host", p)
    if (p := port_problem(web.port)) is not None:
        raise ck.fail("[web] port", p)
    if web.tls and not (tls.cert and tls.key):
        raise ck.fail("[web] tls", "needs [tls] cert and key")
    if web.enabled and web.port in {node.port, tls.port if tls.enabled else -1} and web.host == node.host:
        raise ck.fail("[web] port", f"{web.port} is also a DICOM port of this node")

    return Config(
        node=node, completion=completion, redis=redis_cfg, model=model, callers=callers,
        destinations=tuple(destinations), send=send, series=series, tls=tls, audit=audit, storage=storage_cfg, web=web,
        pipeline_entries=pipelines, series_sets=series_sets,
    )


def _check_destination(ck: _Checker, d: Destination, where: str, base: Path) -> Destination:
    """One destination, checked for its kind: a C-STORE SCP, a DICOMweb base URL or an HL7 MLLP listener."""
    if d.kind not in DESTINATION_KINDS:
        raise ck.fail(f"{where} kind", f"must be one of {', '.join(DESTINATION_KINDS)}, got {d.kind!r}")
    unknown = [o for o in d.objects if o not in RESULT_OBJECTS]
    if unknown or not d.objects or len(set(d.objects)) != len(d.objects):
        raise ck.fail(f"{where} objects", f"must list each of {', '.join(RESULT_OBJECTS)} at most once, at least one, "
                                         f"got {list(d.objects)}")
    if d.sr_class not in SR_CLASSES:
        raise ck.fail(f"{where} sr_class", f"must be one of {', '.join(SR_CLASSES)}, got {d.sr_class!r}")
    needs = {"dicom": ("ae_title", "host", "port"), "dicomweb": ("url",), "hl7": ("host", "port")}[d.kind]
    allowed = set(needs) | {"name", "kind", "objects", "sr_class"} | {
        "dicom": {"tls"}, "dicomweb": {"auth_file", "ca"}, "hl7": {"tls", "application", "facility"}}[d.kind]
    for f in fields(Destination):
        value = getattr(d, f.name)
        if f.name in needs and value in ("", 0):
            raise ck.fail(f"{where} {f.name}", f"is required for kind = {d.kind!r}")
        if f.name not in allowed and value != f.default:
            raise ck.fail(f"{where} {f.name}", f"does not apply to kind = {d.kind!r}")
    if d.kind == "dicom" and (p := ae_title_problem(d.ae_title)) is not None:
        raise ck.fail(f"{where} ae_title", p)
    if d.kind in ("dicom", "hl7"):
        if (p := host_problem(d.host)) is not None:
            raise ck.fail(f"{where} host", p)
        if (p := port_problem(d.port)) is not None:
            raise ck.fail(f"{where} port", p)
    if d.kind == "dicomweb":
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", d.url):
            raise ck.fail(f"{where} url", f"must be an http:// or https:// base URL, got {d.url!r}")
        if "@" in d.url.split("/")[2]:
            raise ck.fail(f"{where} url", "must not hold credentials: put them in auth_file")
        d = replace(d, url=d.url.rstrip("/"), auth_file=_absolute(d.auth_file, base), ca=_absolute(d.ca, base))
    return d


def _series_sets(ck: _Checker, raw: Mapping[str, Any]) -> tuple[tuple[str, SeriesRules], ...]:
    """``[series]`` (the ``default`` set) and every named ``[series.NAME]`` set."""
    plain = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    named = {k: v for k, v in raw.items() if isinstance(v, dict)}
    if plain and "default" in named:
        raise ck.fail("[series.default]", "is given twice: as [series] keys and as [series.default]")
    tables = {"default": plain, **named}
    out = []
    for name, table in tables.items():
        where = "[series]" if name == "default" and plain else f"[series.{name}]"
        if not _DEST_NAME.match(name):
            raise ck.fail(where, f"{name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        try:
            out.append((name, ck.build(SeriesRules, table, where)))
        except ValueError as exc:
            raise ck.fail(where, str(exc).replace("Argument ", "")) from None
    return tuple(out)


def _pipelines(ck: _Checker, data: Mapping[str, Any], node: NodeConfig, callers: tuple[Caller, ...],
               destinations: list[Destination], series_sets: tuple[tuple[str, SeriesRules], ...],
               completion: CompletionConfig, base: Path) -> tuple[Pipeline, ...]:
    """``[[pipelines]]`` checked against the callers, destinations and series sets; () when there are none."""
    pipelines = _entries(ck, data, "pipelines", Pipeline)
    if "pipelines" in data and not pipelines:
        raise ck.fail("[[pipelines]]", "is empty: give at least one, or leave it out for the [node] ae_title pipeline")
    titles: set[str] = set()
    known_callers = {c.ae_title.strip() for c in callers}
    by_name = {d.name: d for d in destinations}
    for i, pl in enumerate(pipelines):
        where = f"[[pipelines]] #{i + 1}"
        if (p := ae_title_problem(pl.ae_title)) is not None:
            raise ck.fail(f"{where} ae_title", p)
        if pl.name in titles:
            raise ck.fail(f"{where} ae_title", f"{pl.name!r} is listed twice")
        titles.add(pl.name)
        for c in pl.callers:
            if (p := ae_title_problem(c)) is not None:
                raise ck.fail(f"{where} callers", f"{c!r} {p}")
            if callers and c.strip() not in known_callers:
                raise ck.fail(f"{where} callers", f"{c!r} is not a [[callers]] ae_title")
        if pl.threshold is not None and not 0.0 <= pl.threshold <= 1.0:
            raise ck.fail(f"{where} threshold", f"must be between 0 and 1, or empty, got {pl.threshold:g}")
        if pl.series not in dict(series_sets):
            raise ck.fail(f"{where} series", f"{pl.series!r} is not a rule set (known: "
                                             f"{', '.join(n for n, _ in series_sets)})")
        if len(set(pl.destinations)) != len(pl.destinations):
            raise ck.fail(f"{where} destinations", "lists a destination twice")
        for name in pl.destinations:
            if name not in by_name:
                raise ck.fail(f"{where} destinations", f"{name!r} is not a [[destinations]] name")
            if pl.forwards and by_name[name].kind == "hl7":
                raise ck.fail(f"{where} destinations", f"{name!r} is an HL7 destination, which takes results "
                                                       "only: a store-and-forward pipeline (model = \"none\") "
                                                       "has none")
        if pl.quiet_seconds is not None and not 0 < pl.quiet_seconds <= completion.max_wait_seconds:
            raise ck.fail(f"{where} quiet_seconds", f"must be more than 0 and at most [completion] max_wait_seconds "
                                                    f"({completion.max_wait_seconds:g}), got {pl.quiet_seconds:g}")
        if pl.model not in ("", FORWARD):
            pipelines[i] = replace(pl, model=_absolute(pl.model, base))
    return tuple(pipelines)


def file_problem(path: str) -> str | None:
    """Why ``path`` is not a regular file this process can read, or None. Never reads its contents."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return f"{path}: no such file"
    except IsADirectoryError:
        return f"{path}: is a folder, not a file"
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    if not Path(path).is_file():
        return f"{path}: not a regular file"
    return None


def _absolute(value: str, base: Path) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _check_tls(ck: _Checker, tls: TLSConfig, node: NodeConfig, sends_tls: bool, base: Path) -> TLSConfig:
    """Validate ``[tls]``: its files must exist and be readable when TLS is used at all."""
    tls = replace(tls, cert=_absolute(tls.cert, base), key=_absolute(tls.key, base), ca=_absolute(tls.ca, base))
    if (p := port_problem(tls.port)) is not None:
        raise ck.fail("[tls] port", p)
    if tls.enabled and tls.port == node.port:
        raise ck.fail("[tls] port", f"must differ from [node] port ({node.port})")
    if not (tls.enabled or sends_tls):
        return tls
    if tls.enabled:
        for key in ("cert", "key"):
            if not getattr(tls, key):
                raise ck.fail(f"[tls] {key}", "is required when [tls] enabled = true")
    if bool(tls.cert) != bool(tls.key):
        missing = "key" if tls.cert else "cert"
        raise ck.fail(f"[tls] {missing}", "cert and key go together: give both or neither")
    if tls.require_client_cert and not tls.ca:
        raise ck.fail("[tls] ca", "is required when require_client_cert = true (the CA of client certificates)")
    for key in ("cert", "key", "ca"):
        value = getattr(tls, key)
        if value and (p := file_problem(value)) is not None:
            raise ck.fail(f"[tls] {key}", p)
    return tls


def syslog_target(value: str) -> tuple[str, str, int]:
    """``(protocol, host, port)`` of an ``[audit] syslog`` value; raises ValueError naming the problem.

    ``host:port`` and ``udp://host:port`` mean UDP (RFC 5426), ``tcp://host:port``
    TCP with octet counting (RFC 6587); an IPv6 host is written in brackets.
    """
    proto, sep, rest = value.partition("://")
    if not sep:
        proto, rest = "udp", value
    if proto not in ("udp", "tcp"):
        raise ValueError(f"protocol must be udp:// or tcp://, got {proto!r}")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port, tcp://host:port or udp://host:port, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (p := host_problem(host)) is not None:
        raise ValueError(p)
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be an integer, got {port_text!r}") from None
    if (p := port_problem(port)) is not None:
        raise ValueError(f"port {p}")
    return proto, host, port


def _check_audit(ck: _Checker, audit: AuditConfig, base: Path) -> AuditConfig:
    if audit.syslog:
        try:
            syslog_target(audit.syslog)
        except ValueError as exc:
            raise ck.fail("[audit] syslog", str(exc)) from None
    return replace(audit, path=_absolute(audit.path, base))


def _entries(ck: _Checker, data: Mapping[str, Any], name: str, cls: type) -> list[Any]:
    raw = data.get(name, [])
    if not isinstance(raw, list):
        raise ck.fail(f"[[{name}]]", "must be an array of tables")
    out = []
    for i, item in enumerate(raw):
        where = f"[[{name}]] #{i + 1}"
        if not isinstance(item, dict):
            raise ck.fail(where, "must be a table")
        required = [f.name for f in fields(cls) if f.default is f.default_factory]  # type: ignore[misc]
        for key in required:
            if key not in item:
                raise ck.fail(f"{where} {key}", "is required")
        out.append(ck.build(cls, item, where))
    return out


def parse_text(text: str, origin: str = "<config>", base: Path | None = None) -> Config:
    """Parse TOML ``text`` and validate it (see :func:`parse`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    return parse(data, origin, base)


def resolve_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: ``path``, else $AINODE_CONFIG, else the checkout's, else None."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    if CHECKOUT_CONFIG.is_file():
        return CHECKOUT_CONFIG
    return None


def read_text(path: Path) -> str:
    """A config file's text, exactly as written (line endings kept); ConfigError in one line."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def kept_for_restart(old: Config, new: Config) -> Config:
    """``new`` with what only a restart changes taken from ``old``: where the node listens and stores, its
    receiving processes, Redis, TLS on or off and its port, the audit trail (what a SIGHUP keeps)."""
    node = replace(new.node, host=old.node.host, port=old.node.port, storage=old.node.storage,
                   receivers=old.node.receivers)
    tls = replace(new.tls, enabled=old.tls.enabled, port=old.tls.port)
    return replace(new, node=node, redis=old.redis, tls=tls, audit=old.audit)


def reread(cfg: Config, seen: float | None) -> tuple[Config | None, float | None]:
    """For a process no SIGHUP reaches (a worker, the web page): ``cfg``'s file loaded again if its
    modification time is no longer ``seen``, else None; and the time now seen. A file that no longer
    validates (or cannot be read) is logged and gives None: the running config is kept."""
    if cfg.source is None:
        return None, seen
    try:
        mtime = cfg.source.stat().st_mtime
    except OSError as exc:
        logger.error("Config %s not re-read, keeping the running one: %s", cfg.source, exc.strerror or exc)
        return None, seen
    if mtime == seen:
        return None, seen
    try:
        return load(cfg.source), mtime
    except ConfigError as exc:
        logger.error("Config %s not re-read, keeping the running one: %s", cfg.source, exc)
        return None, mtime


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the configuration (see the module docstring for where from)."""
    source = resolve_path(path)
    if source is None:
        cfg = parse({}, "<built-in defaults>")
        logger.debug("Config: built-in defaults")
        return cfg
    cfg = parse_text(read_text(source), str(source))
    cfg = replace(cfg, source=source.resolve())
    logger.debug("Config from %s: %s", source, cfg)
    return cfg
