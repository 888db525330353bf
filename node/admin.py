"""Admin commands: allowed callers (``ainode ae``), destinations (``ainode dest``),
pipelines (``ainode pipeline``) and ``ainode config check``.

Edits go through :func:`edit_config`: read the file with tomlkit (comments and
layout kept), change the ``[[callers]]`` / ``[[destinations]]`` tables, validate
the new text with :func:`node.config.parse_text`, then replace the file
atomically. Bad input leaves the file untouched and exits with
:data:`EXIT_USAGE` after one ``ainode: error: ...`` line.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from node import config, store
from node.config import Caller, Destination, TLSConfig
from node.errors import AdminError, AinodeError, ConfigError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but the peer failed (C-ECHO)
EXIT_USAGE = 2  # bad input, unknown name, invalid or missing config

ERROR_PREFIX = "ainode: error: "
RELOAD_HINT = "Reload a running node with SIGHUP (systemctl reload ainode)."
DEFAULT_ECHO_TIMEOUT = 10.0
STATUS_SUCCESS = 0x0000

CALLERS = "callers"
DESTINATIONS = "destinations"
PIPELINES = "pipelines"
CARDS = "the model card's"

Command = Callable[[argparse.Namespace], int]
Change = Callable[[TOMLDocument], "str | None"]


# --------------------------------------------------------------------------
# read-modify-validate-write


def edit_config(path_arg: str | None, change: Change) -> tuple[Path, str | None]:
    """Apply ``change`` to the config file and write it back atomically.

    ``change`` edits the tomlkit document in place and returns a one-line
    description of what changed, or None when there is nothing to do (the file
    is then not written). The new text is validated before it is written, so an
    invalid edit leaves the file untouched. Returns the file and the description.
    """
    path = config.resolve_path(path_arg)
    if path is None:
        raise AdminError("no config file to edit: pass --config PATH or set AINODE_CONFIG")
    old_text = config.read_text(path)
    config.parse_text(old_text, str(path))  # refuse to edit a file that is already invalid
    try:
        doc = tomlkit.parse(old_text)
    except TOMLKitError as exc:  # pragma: no cover - tomllib accepted it above
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if tomlkit.dumps(doc) != old_text:  # e.g. [[callers]] tables split by another table
        raise AdminError(f"{path}: cannot edit this file without changing its layout; edit it by hand")
    what = change(doc)
    if what is None:
        return path, None
    new_text = _keep_ending(old_text, tomlkit.dumps(doc))
    config.parse_text(new_text, str(path))
    write_atomic(path, new_text)
    logger.info("Config %s: %s", path, what)
    return path, what


def _keep_ending(old: str, new: str) -> str:
    """``new`` ending in the same run of newlines as ``old`` (removing the last
    table would otherwise leave the blank line that separated it)."""
    body = old.rstrip("\r\n")
    return new.rstrip("\r\n") + old[len(body):]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, keeping its mode (and owner
    where allowed). A symlink is followed."""
    target = Path(os.path.realpath(path))
    try:
        old = os.stat(target)
        store.write_atomic(
            target, text.encode("utf-8"), mode=stat.S_IMODE(old.st_mode), owner=(old.st_uid, old.st_gid)
        )
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None


# --------------------------------------------------------------------------
# arrays of tables that keep the comments around them


def _tables(doc: TOMLDocument, name: str) -> AoT | None:
    """The ``[[name]]`` array of tables, None if absent; refuse other spellings."""
    item = doc.get(name)
    if item is None:
        return None
    if not isinstance(item, AoT):
        raise AdminError(f"{name!r} is not written as [[{name}]] tables; edit the file by hand")
    return item


def _pop_detached(table: Table) -> list[Any]:
    """Remove and return the blank lines and comments that end ``table``'s body,
    from its first blank line after the last key on: they belong to what follows.
    Comments right under the last key (no blank line) stay with the table."""
    body = table.value.body
    last_key = max((i for i, (k, _) in enumerate(body) if k is not None), default=-1)
    start = next(
        (i for i in range(last_key + 1, len(body)) if isinstance(body[i][1], Whitespace)),
        len(body),
    )
    detached = [item for _, item in body[start:]]
    del body[start:]
    return detached


def _ends_blank(table: Table) -> bool:
    body = table.value.body
    return bool(body) and isinstance(body[-1][1], Whitespace)


def _append_table(doc: TOMLDocument, name: str, values: dict[str, Any]) -> None:
    """Append a ``[[name]]`` table; create the array at the end when absent."""
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, value)
    aot = _tables(doc, name)
    if aot is None:
        new = tomlkit.aot()
        new.append(table)
        doc.append(name, new)
        return
    last = aot[-1]
    detached = _pop_detached(last)  # comments about the next section move below the new table
    last.add(tomlkit.nl())
    aot.append(table)
    for item in detached:
        table.add(item)


def _remove_tables(doc: TOMLDocument, name: str, indexes: list[int]) -> None:
    """Remove tables ``indexes`` of ``[[name]]``, keeping the comments that
    followed each one where they were."""
    aot = _tables(doc, name)
    assert aot is not None
    for i in sorted(indexes, reverse=True):
        detached = _pop_detached(aot[i])
        holder = aot[i - 1] if i > 0 else _neighbour(doc, aot, before=True)
        del aot[i]
        if not detached:
            continue
        if holder is not None:
            if _ends_blank(holder) and isinstance(detached[0], Whitespace):
                detached = detached[1:]
            for item in detached:
                holder.add(item)
            continue
        # Nothing before (the array opens the file): put them in front of what follows.
        successor = aot[i] if i < len(aot) else _neighbour(doc, aot, before=False)
        if successor is not None:
            text = "".join(item.as_string() for item in detached)
            successor.trivia.indent = text + successor.trivia.indent
        else:
            for item in detached:
                doc.add(item)
    if len(aot) == 0:
        del doc[name]


def _neighbour(doc: TOMLDocument, aot: AoT, before: bool) -> Table | None:
    """The table rendered just before (or after) ``aot`` in ``doc``, or None."""
    body = doc.body
    index = next(i for i, (_, item) in enumerate(body) if item is aot)
    others = reversed(body[:index]) if before else iter(body[index + 1:])
    for key, item in others:
        if key is None:
            continue
        if isinstance(item, Table):
            return item
        if isinstance(item, AoT) and len(item) > 0:
            return item[-1] if before else item[0]
        return None
    return None


# --------------------------------------------------------------------------
# checks of command-line values


def _check(what: str, problem: str | None) -> None:
    if problem is not None:
        raise AdminError(f"{what}: {problem}")


def _int_arg(what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AdminError(f"{what}: must be an integer, got {text!r}") from None


def _float_arg(what: str, text: str, meaning: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AdminError(f"{what}: must be {meaning}, got {text!r}") from None


def _where(caller_host: str | None) -> str:
    return f"from {caller_host}" if caller_host else "from any host"


def _dest_label(d: Destination) -> str:
    if d.kind == "dicomweb":
        return f"{d.name} (DICOMweb {mask_url(d.url)}{', token from ' + d.auth_file if d.auth_file else ''})"
    if d.kind == "hl7":
        return f"{d.name} (HL7 {d.host}:{d.port}{', TLS' if d.tls else ''})"
    return f"{d.name} ({d.ae_title}@{d.host}:{d.port}{', TLS' if d.tls else ''})"


# --------------------------------------------------------------------------
# ae


def cmd_ae_list(args: argparse.Namespace) -> int:
    """Print the allowed calling AE titles."""
    cfg = config.load(args.config)
    origin = cfg.source or "built-in defaults"
    if not cfg.callers:
        print(f"No callers listed ({origin}): any calling AE title is accepted.")
        return EXIT_OK
    width = max(len(c.ae_title) for c in cfg.callers)
    for c in cfg.callers:
        print(f"{c.ae_title:<{width}}  {c.host or 'any host'}")
    return EXIT_OK


def cmd_ae_allow(args: argparse.Namespace) -> int:
    """Add a ``[[callers]]`` entry (nothing to do if it is there)."""
    _check("AE title", config.ae_title_problem(args.ae_title))
    if args.host is not None:
        _check("--host", config.host_problem(args.host))
    caller = Caller(args.ae_title.strip(), args.host)

    def change(doc: TOMLDocument) -> str | None:
        for c in _callers(doc):
            if c.ae_title.strip() == caller.ae_title and c.host == caller.host:
                return None
        values: dict[str, Any] = {"ae_title": caller.ae_title}
        if caller.host is not None:
            values["host"] = caller.host
        _append_table(doc, CALLERS, values)
        return f"allowed caller {caller.ae_title} {_where(caller.host)}"

    path, what = edit_config(args.config, change)
    if what is None:
        print(f"{caller.ae_title} {_where(caller.host)} is already allowed in {path}; nothing changed.")
        return EXIT_OK
    print(f"Allowed {caller.ae_title} {_where(caller.host)} in {path}.")
    print(RELOAD_HINT)
    return EXIT_OK


def cmd_ae_deny(args: argparse.Namespace) -> int:
    """Remove the ``[[callers]]`` entries of an AE title (with --host: that binding only)."""
    ae_title = args.ae_title.strip()
    removed: list[Caller] = []
    left = 0

    def change(doc: TOMLDocument) -> str:
        nonlocal left
        callers = _callers(doc)
        hits = [
            i for i, c in enumerate(callers)
            if c.ae_title.strip() == ae_title and (args.host is None or c.host == args.host)
        ]
        if not hits:
            bound = f" bound to host {args.host}" if args.host is not None else ""
            raise AdminError(f"no caller {ae_title!r}{bound} is listed; see `ainode ae list`")
        _remove_tables(doc, CALLERS, hits)
        removed.extend(callers[i] for i in hits)
        left = len(callers) - len(hits)
        return "denied caller " + ", ".join(f"{c.ae_title} {_where(c.host)}" for c in removed)

    path, _ = edit_config(args.config, change)
    print(f"Denied {', '.join(f'{c.ae_title} {_where(c.host)}' for c in removed)} in {path}.")
    if left == 0:
        print("No callers are listed any more: any calling AE title is now accepted.")
    print(RELOAD_HINT)
    return EXIT_OK


def _callers(doc: TOMLDocument) -> list[Caller]:
    aot = _tables(doc, CALLERS)
    return [Caller(str(t.get("ae_title", "")), str(t.get("host") or "") or None) for t in (aot or [])]


# --------------------------------------------------------------------------
# dest


def cmd_dest_list(args: argparse.Namespace) -> int:
    """Print the destinations."""
    cfg = config.load(args.config)
    if not cfg.destinations:
        print(f"No destinations ({cfg.source or 'built-in defaults'}).")
        return EXIT_OK
    width = max(len(d.name) for d in cfg.destinations)
    for d in cfg.destinations:
        users = [p.name for p in cfg.pipelines if d.name in p.destinations]
        used = f"  pipelines: {', '.join(users) or 'none'}" if cfg.declared_pipelines else ""
        print(f"{d.name:<{width}}  {_dest_label(d).removeprefix(d.name + ' ')}  gets {', '.join(_object_words(d))}"
              f"{used}")
    return EXIT_OK


def _object_words(d: Destination) -> list[str]:
    if d.kind == "hl7":
        return ["ORU^R01 naming the SR"]
    words = {"sr": f"SR ({d.sr_class})", "sc": "summary image", "ko": "key objects"}
    return [words[o] for o in d.objects]


def cmd_dest_add(args: argparse.Namespace) -> int:
    """Add a ``[[destinations]]`` entry of one kind; the name must be new."""
    kind = args.kind
    needs = {"dicom": ("ae", "host", "port"), "dicomweb": ("url",), "hl7": ("host", "port")}[kind]
    for key in needs:
        if not getattr(args, key):
            raise AdminError(f"--{key}: is required for --kind {kind}")
    for key in ("ae", "url", "auth_file", "ca", "application", "facility"):
        if getattr(args, key) and key not in needs and key not in {"dicom": (), "dicomweb": ("auth_file", "ca"),
                                                                   "hl7": ("application", "facility")}[kind]:
            raise AdminError(f"--{key.replace('_', '-')}: does not apply to --kind {kind}")
    values: dict[str, Any] = {"name": args.name}
    if kind != "dicom":
        values["kind"] = kind
    if kind == "dicom":
        _check("--ae", config.ae_title_problem(args.ae))
        values["ae_title"] = args.ae.strip()
    if kind in ("dicom", "hl7"):
        _check("--host", config.host_problem(args.host))
        port = _int_arg("--port", args.port)
        _check("--port", config.port_problem(port))
        values.update(host=args.host, port=port)
        if args.tls:
            values["tls"] = True
    elif args.tls:
        raise AdminError("--tls: a DICOMweb destination uses TLS when its URL is https://")
    for key in ("url", "auth_file", "ca", "application", "facility"):
        if getattr(args, key):
            values[key] = getattr(args, key)
    objects = tuple(o.strip() for o in args.objects.split(",")) if args.objects else config.RESULT_OBJECTS
    if not objects or any(o not in config.RESULT_OBJECTS for o in objects) or len(set(objects)) != len(objects):
        _check("--objects", f"must be a comma-separated list of {', '.join(config.RESULT_OBJECTS)}, "
                            f"each at most once, got {args.objects!r}")
    if objects != config.RESULT_OBJECTS:
        values["objects"] = list(objects)
    label = args.name

    def change(doc: TOMLDocument) -> str:
        nonlocal label
        if any(t.get("name") == args.name for t in _tables(doc, DESTINATIONS) or []):
            raise AdminError(f"destination {args.name!r} already exists; remove it first to change it")
        _append_table(doc, DESTINATIONS, values)
        label = _dest_label(config.parse_text(tomlkit.dumps(doc)).destination(args.name))  # type: ignore[arg-type]
        return f"added destination {label}"

    path, _ = edit_config(args.config, change)
    print(f"Added destination {label} to {path}.")
    cfg = config.load(path)
    if cfg.declared_pipelines:
        print(f"No pipeline sends to it yet: `ainode pipeline add AE ... --dest {args.name}` or edit [[pipelines]].")
    print(RELOAD_HINT)
    return EXIT_OK


def cmd_dest_remove(args: argparse.Namespace) -> int:
    """Remove the ``[[destinations]]`` entry called NAME."""

    def change(doc: TOMLDocument) -> str:
        tables = list(_tables(doc, DESTINATIONS) or [])
        hits = [i for i, t in enumerate(tables) if t.get("name") == args.name]
        if not hits:
            raise AdminError(f"no destination {args.name!r}; see `ainode dest list`")
        users = [str(t.get("ae_title")) for t in _tables(doc, PIPELINES) or [] if args.name in t.get("destinations", [])]
        if users:
            raise AdminError(f"destination {args.name!r} is used by pipeline {', '.join(users)}: take it out of "
                             "their destinations first")
        _remove_tables(doc, DESTINATIONS, hits)
        return f"removed destination {args.name}"

    path, _ = edit_config(args.config, change)
    print(f"Removed destination {args.name} from {path}.")
    print(RELOAD_HINT)
    return EXIT_OK


# --------------------------------------------------------------------------
# pipeline


def cmd_pipeline_list(args: argparse.Namespace) -> int:
    """Print the pipelines, one line each."""
    cfg = config.load(args.config)
    if not cfg.declared_pipelines:
        print(f"One pipeline, from [node] ae_title, [model], [series] and every destination "
              f"({cfg.source or 'built-in defaults'}):")
    for pl in cfg.pipelines:
        print(f"  {cfg.describe(pl)}")
    return EXIT_OK


def cmd_pipeline_show(args: argparse.Namespace) -> int:
    """Print one pipeline with everything it uses, resolved (the model's card, the series rules, the destinations)."""
    cfg = config.load(args.config)
    pl = next((p for p in cfg.pipelines if p.name == args.ae_title.strip()), None)
    if pl is None:
        raise AdminError(f"no pipeline {args.ae_title.strip()!r}; see `ainode pipeline list`")
    print(f"pipeline {pl.name}{'' if cfg.declared_pipelines else ' (from [node] ae_title: no [[pipelines]])'}")
    print(f"  called AE title: {pl.name}")
    print(f"  callers:         {', '.join(pl.callers) if pl.callers else 'every allowed caller'}")
    if pl.forwards:
        print("  model:           none: store and forward (the instances go on as received)")
    else:
        print(f"  model:           {_model_summary(cfg, pl)}")
        threshold = cfg.threshold(pl)
        print(f"  threshold:       {CARDS if threshold is None else f'{threshold:g}'}")
    rules = cfg.rules(pl)
    print(f"  series:          {pl.series}: {', '.join(f'{k}={v}' for k, v in rules.__dict__.items())}")
    print(f"  quiet period:    {cfg.quiet_seconds(pl):g} s (at most {cfg.completion.max_wait_seconds:g} s)")
    for name in pl.destinations or ("(none: results are kept here only)",):
        d = cfg.destination(name)
        print(f"  destination:     {_dest_label(d) if d else name}")
    return EXIT_OK


def cmd_pipeline_add(args: argparse.Namespace) -> int:
    """Add a ``[[pipelines]]`` entry. The first one added also writes out the implicit
    ``[node] ae_title`` pipeline, so what reached the node before still does."""
    _check("AE title", config.ae_title_problem(args.ae_title))
    values: dict[str, Any] = {"ae_title": args.ae_title.strip()}
    for key, arg in (("callers", args.callers), ("destinations", args.dest)):
        if arg:
            values[key] = [v.strip() for v in arg.split(",") if v.strip()]
    if args.model:
        values["model"] = args.model
    if args.threshold:
        values["threshold"] = _float_arg("--threshold", args.threshold, "a number between 0 and 1")
    if args.series:
        values["series"] = args.series
    if args.quiet:
        values["quiet_seconds"] = _float_arg("--quiet", args.quiet, "a number of seconds")
    kept: list[str] = []

    def change(doc: TOMLDocument) -> str:
        before = config.parse_text(tomlkit.dumps(doc))
        if before.pipeline(values["ae_title"]) is not None and before.declared_pipelines:
            raise AdminError(f"pipeline {values['ae_title']!r} already exists; remove it first to change it")
        if not before.declared_pipelines:
            implicit = before.pipelines[0]
            if implicit.name == values["ae_title"]:
                raise AdminError(f"{implicit.name!r} is already the node's pipeline ([node] ae_title)")
            first: dict[str, Any] = {"ae_title": implicit.name}
            if implicit.destinations:
                first["destinations"] = list(implicit.destinations)
            _append_table(doc, PIPELINES, first)
            kept.append(implicit.name)
        _append_table(doc, PIPELINES, values)
        return f"added pipeline {values['ae_title']}"

    path, _ = edit_config(args.config, change)
    if kept:
        print(f"Wrote the node's pipeline {kept[0]} ([node] ae_title, every destination) as [[pipelines]] too, "
              "so it keeps working.")
    cfg = config.load(path)
    print(f"Added pipeline {cfg.describe(cfg.pipeline(values['ae_title']))} to {path}.")  # type: ignore[arg-type]
    print(RELOAD_HINT)
    return EXIT_OK


def cmd_pipeline_remove(args: argparse.Namespace) -> int:
    """Remove the ``[[pipelines]]`` entry of that called AE title; never the last one."""
    name = args.ae_title.strip()

    def change(doc: TOMLDocument) -> str:
        tables = list(_tables(doc, PIPELINES) or [])
        hits = [i for i, t in enumerate(tables) if str(t.get("ae_title", "")).strip() == name]
        if not hits:
            raise AdminError(f"no pipeline {name!r} in [[pipelines]]; see `ainode pipeline list`")
        if len(tables) == 1:
            raise AdminError(f"{name!r} is the only pipeline: a node needs one (change it, or add another first)")
        _remove_tables(doc, PIPELINES, hits)
        return f"removed pipeline {name}"

    path, _ = edit_config(args.config, change)
    print(f"Removed pipeline {name} from {path}: its called AE title is refused from the next reload on; "
          "studies it received keep their results.")
    print(RELOAD_HINT)
    return EXIT_OK


@dataclass(frozen=True)
class EchoResult:
    """The outcome of one C-ECHO: ``ok`` and what happened, in words."""

    ok: bool
    detail: str
    elapsed_ms: int


def echo(calling_ae: str, dest: Destination, timeout: float, tls: TLSConfig | None = None) -> EchoResult:
    """Associate with ``dest`` as ``calling_ae`` and send one C-ECHO.

    Every network step is bounded by ``timeout`` seconds; the time reported
    covers association and echo. A destination with ``tls`` is reached over
    TLS with the ``tls`` settings.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    tls_args = None
    if dest.tls:
        from node.tls import tls_args as make_tls_args

        tls_args = make_tls_args(tls or TLSConfig(), dest.host)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    start = time.monotonic()

    def ms() -> int:
        return round((time.monotonic() - start) * 1000)

    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except OSError as exc:  # the host name does not resolve
        return EchoResult(False, f"no association: cannot connect to {dest.host}: {exc.strerror or exc}", ms())

    rsp = assoc.acceptor.primitive  # the A-ASSOCIATE answer, None if there was none
    if not assoc.is_established:
        if rsp is None:
            return EchoResult(False, f"no association: {_connect_problem(dest, timeout, tls_args)}", ms())
        if assoc.is_rejected:
            reason = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}"
            return EchoResult(False, f"association rejected ({reason})", ms())
        return EchoResult(False, "association aborted: the peer accepted no Verification context", ms())
    try:
        status = assoc.send_c_echo()
        elapsed = ms()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return EchoResult(False, f"no C-ECHO response within {timeout:g} s (association aborted)", elapsed)
    if status.Status != STATUS_SUCCESS:
        return EchoResult(False, f"C-ECHO failed with status 0x{status.Status:04X}", elapsed)
    return EchoResult(True, f"C-ECHO success (0x{STATUS_SUCCESS:04X})", elapsed)


def _reach_problem(host: str, port: int, timeout: float, tls_args: Any = None) -> str | None:
    """Why one TCP connection (and TLS handshake) to ``host:port`` fails, in words, or None when it succeeds."""
    if tls_args is not None:
        from node.tls import handshake_problem

        return handshake_problem(host, port, tls_args, timeout)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"cannot connect to {host}:{port}: timed out after {timeout:g} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _connect_problem(dest: Destination, timeout: float, tls_args: Any = None) -> str:
    """Why no association answer came from ``dest``: try one TCP connection
    (and TLS handshake), as pynetdicom does not say whether connecting failed, or why."""
    problem = _reach_problem(dest.host, dest.port, timeout, tls_args)
    if problem is not None:
        return problem
    return (f"{dest.host}:{dest.port} did not accept the association within {timeout:g} s"
            " (no answer, or it aborted or closed the connection)")


def _probe_dicomweb(calling_ae: str, dest: Destination, timeout: float, tls: TLSConfig | None = None) -> EchoResult:
    from node.send.dicomweb import probe

    started = time.monotonic()
    ok, detail = probe(dest, timeout)
    return EchoResult(ok, detail, int((time.monotonic() - started) * 1000))


def _probe_hl7(calling_ae: str, dest: Destination, timeout: float, tls: TLSConfig | None = None) -> EchoResult:
    """An MLLP listener has no echo: connect (and shake hands over TLS), send nothing."""
    started = time.monotonic()
    tls_args = None
    if dest.tls:
        from node.tls import tls_args as make_tls_args

        tls_args = make_tls_args(tls or TLSConfig(), dest.host)
    problem = _reach_problem(dest.host, dest.port, timeout, tls_args)
    elapsed = int((time.monotonic() - started) * 1000)
    if problem is not None:
        return EchoResult(False, problem, elapsed)
    return EchoResult(True, f"connected{' over TLS' if dest.tls else ''} (no message sent: HL7 has no echo)", elapsed)


def cmd_dest_echo(args: argparse.Namespace) -> int:
    """C-ECHO a destination from our own AE title (a DICOMweb one: a QIDO-RS search; an HL7 one: a
    connection); exit 1 when it fails."""
    try:
        timeout = float(args.timeout)
    except ValueError:
        raise AdminError(f"--timeout: must be a number of seconds, got {args.timeout!r}") from None
    if not 0 < timeout <= 3600:
        raise AdminError(f"--timeout: must be more than 0 and at most 3600 seconds, got {args.timeout}")
    cfg = config.load(args.config)
    dest = cfg.destination(args.name)
    if dest is None:
        raise AdminError(f"no destination {args.name!r}; see `ainode dest list`")
    result = {"dicom": echo, "dicomweb": _probe_dicomweb, "hl7": _probe_hl7}[dest.kind](
        cfg.node.ae_title, dest, timeout, cfg.tls)
    if result.ok:
        print(f"{_dest_label(dest)}: {result.detail} in {result.elapsed_ms} ms")
        return EXIT_OK
    print(f"{ERROR_PREFIX}{_dest_label(dest)}: {result.detail} after {result.elapsed_ms} ms", file=sys.stderr)
    return EXIT_FAILED


# --------------------------------------------------------------------------
# config


def mask_url(url: str) -> str:
    """``url`` with any password (user info or ``password=`` parameter) replaced by ``***``."""

    def userinfo(m: re.Match[str]) -> str:
        user, sep, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if sep else f"{m.group(1)}***@"

    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@]*)@", userinfo, url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Load and validate the config; print a short summary."""
    cfg = config.load(args.config)
    n = cfg.node
    models = {pl.name: _model_summary(cfg, pl) for pl in cfg.pipelines if not pl.forwards}  # checked now, not at 3 a.m.
    problems = [p for p in (_storage_problem(n.storage), _redis_problem(cfg.redis.url)) if p]
    if problems:
        raise ConfigError("; ".join(problems))
    print(f"OK: {cfg.source or 'built-in defaults (no config file)'}")
    print(f"  AE title:     {n.ae_title}{'' if cfg.declared_pipelines else ' (the one pipeline)'}")
    listen = f"{n.host}:{n.port}" if n.port else "plain port off ([node] port = 0)"
    if cfg.tls.enabled:
        listen += f", TLS on {n.host}:{cfg.tls.port}"
    print(f"  listen:       {listen}")
    print(f"  storage:      {n.storage}")
    print(f"  redis:        {mask_url(cfg.redis.url) if cfg.redis.url else 'embedded'}")
    callers = str(len(cfg.callers)) if cfg.callers else "0 (any calling AE title is accepted)"
    print(f"  callers:      {callers}")
    dests = ", ".join(_dest_label(d) for d in cfg.destinations) or "none"
    print(f"  destinations: {dests}")
    for line in _tls_summary(cfg):
        print(f"  {line}")
    audit = f"{cfg.audit_path}" + (f", syslog {cfg.audit.syslog}" if cfg.audit.syslog else "")
    print(f"  audit:        {audit}")
    if cfg.declared_pipelines:
        for pl in cfg.pipelines:
            print(f"  pipeline:     {cfg.describe(pl)}")
            if not pl.forwards:
                print(f"                model {models[pl.name]}")
    else:
        print(f"  model:        {models[cfg.pipelines[0].name]}")
        print("  pipelines:    one, from [node] ae_title, [model], [series] and every destination; for more "
              "called AE titles, `ainode pipeline add AE --dest NAME,...` (it writes this one as [[pipelines]] too)")
    w = cfg.web
    web = f"{'https' if w.tls else 'http'}://{w.host}:{w.port} (/healthz, /readyz, /metrics)" if w.enabled else "off"
    print(f"  web:          {web}")
    for host, port, key in _listen_ports(cfg):
        if not _port_free(host, port):
            print(f"  warning: {key}: {host}:{port} is in use (by a running ainode? serve needs it free)")
    return EXIT_OK


def _model_summary(cfg: config.Config, pipeline: config.Pipeline | None = None) -> str:
    """The model a pipeline's workers will load, checked as they check it (file, card, hash); ConfigError
    if unusable."""
    from node.errors import ModelError
    from node.model_card import ModelCard, resolve_model_path
    from node.preprocessing import PREPROCESSING_VERSION

    pipeline = pipeline or cfg.pipelines[0]
    where = "[model] path" if not pipeline.model else f"[[pipelines]] {pipeline.name} model"
    try:
        path = resolve_model_path(cfg.model_path(pipeline))
        card = ModelCard.read(path)
        card.check(path, PREPROCESSING_VERSION)
    except ModelError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith("[model]") else f"{where}: {text}") from None
    return f"{card.name} {card.version} ({'bundled' if not cfg.model_path(pipeline) else path})"


def _storage_problem(storage: Path) -> str | None:
    """Why serve could not create or write ``storage``, naming the key, or None.

    Tried for real (access() says yes to root even where the kernel says no): the
    folders missing are made and removed again, and a probe file is written in it.
    """
    import tempfile

    made: list[Path] = []
    try:
        for folder in reversed([storage, *storage.parents]):
            if not folder.exists():
                folder.mkdir(mode=0o700)
                made.append(folder)
        fd, probe = tempfile.mkstemp(dir=storage, prefix=".ainode-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"[node] storage: {storage} cannot be {'written' if storage.is_dir() else 'created'}: " \
               f"{exc.strerror or exc}"
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass
    return None


def _redis_problem(url: str) -> str | None:
    """Why the configured Redis does not answer, or None (the embedded one is started by serve)."""
    if not url:
        return None
    from redis.exceptions import RedisError

    from node.enqueue import redis_client

    try:
        with redis_client(url, timeout=2.0, retries=0) as r:
            r.ping()
    except (RedisError, OSError) as exc:
        return f"[redis] url: {mask_url(url)} does not answer: {exc}"
    return None


def _listen_ports(cfg: config.Config) -> list[tuple[str, int, str]]:
    out = [(cfg.node.host, cfg.node.port, "[node] port")] if cfg.node.port else []
    if cfg.tls.enabled:
        out.append((cfg.node.host, cfg.tls.port, "[tls] port"))
    if cfg.web.enabled:
        out.append((cfg.web.host, cfg.web.port, "[web] port"))
    return out


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tls_summary(cfg: config.Config) -> list[str]:
    """What ``[tls]`` does, in words: paths and certificate subjects, never a key's contents.

    The certificate and key are loaded as the node would load them, so a key
    that does not match its certificate fails the check.
    """
    from node.tls import client_context, describe_cert, server_context

    t = cfg.tls
    uses = t.enabled or any(d.tls for d in cfg.destinations)
    if not uses:
        return ["tls:          off"]
    origin = str(cfg.source or "built-in defaults")
    if t.enabled:
        server_context(t, origin)
    if any(d.tls for d in cfg.destinations):
        client_context(t, origin)
    out = [f"tls:          {'port ' + str(t.port) if t.enabled else 'listener off'}"
           f"{', client certificate required' if t.enabled and t.require_client_cert else ''}"
           f"{'' if t.check_hostname else ', destination host names not checked'}"]
    if t.cert:
        detail = describe_cert(t.cert)
        out.append(f"  cert:       {t.cert}{f' ({detail})' if detail else ''}")
        out.append(f"  key:        {t.key} (not shown)")
    out.append(f"  ca:         {t.ca or 'system trust store (sending only)'}")
    return out


# --------------------------------------------------------------------------
# argparse


def _guarded(func: Command) -> Command:
    """Turn an AinodeError into one ``ainode: error:`` line and EXIT_USAGE."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except AinodeError as exc:
            print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _read_password() -> str:
    """From the terminal (asked twice), or the first line of standard input (scripts, tests)."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise AdminError("the two passwords differ")
    return first


def cmd_user_add(args: argparse.Namespace) -> int:
    from node.users import Users

    cfg = config.load(args.config)
    Users(cfg.node.storage).add(args.name, _read_password(), args.role)
    print(f"user {args.name} ({args.role}) added; the web page knows it at the next login")
    return EXIT_OK


def cmd_user_remove(args: argparse.Namespace) -> int:
    from node.users import Users

    cfg = config.load(args.config)
    Users(cfg.node.storage).remove(args.name)
    print(f"user {args.name} removed (a session already open ends within a minute)")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    from node.users import Users

    cfg = config.load(args.config)
    users = Users(cfg.node.storage).list()
    for u in users:
        print(f"{u.name}  {u.role}")
    if not users:
        print("no users: add one with `ainode user add NAME --role admin`")
    return EXIT_OK


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `ae`, `dest`, `pipeline`, `config` and `user` sub-commands; each sets args.func(args) -> int."""
    user = subparsers.add_parser("user", help="who may log in to the web page")
    user_sub = user.add_subparsers(dest="user_command", metavar="{add,remove,list}", required=True)
    p = user_sub.add_parser("add", help="add a user (or set a new password); the password is asked for")
    p.add_argument("name")
    p.add_argument("--role", choices=["viewer", "admin"], default="viewer")
    p.set_defaults(func=_guarded(cmd_user_add))
    p = user_sub.add_parser("remove", help="remove a user")
    p.add_argument("name")
    p.set_defaults(func=_guarded(cmd_user_remove))
    p = user_sub.add_parser("list", help="list the users and their roles")
    p.set_defaults(func=_guarded(cmd_user_list))
    ae = subparsers.add_parser("ae", help="calling AE titles allowed to send to this node")
    ae_sub = ae.add_subparsers(dest="ae_command", metavar="{list,allow,deny}", required=True)
    p = ae_sub.add_parser("list", help="list the allowed callers")
    p.set_defaults(func=_guarded(cmd_ae_list))
    p = ae_sub.add_parser("allow", help="allow a calling AE title (optionally only from one host)")
    p.add_argument("ae_title", metavar="AE", help="calling AE title (1-16 characters)")
    p.add_argument("--host", metavar="H", help="accept this AE title only from this IP address or host name")
    p.set_defaults(func=_guarded(cmd_ae_allow))
    p = ae_sub.add_parser("deny", help="remove a calling AE title (with --host: that binding only)")
    p.add_argument("ae_title", metavar="AE")
    p.add_argument("--host", metavar="H")
    p.set_defaults(func=_guarded(cmd_ae_deny))

    dest = subparsers.add_parser("dest", help="destinations that receive results")
    dest_sub = dest.add_subparsers(dest="dest_command", metavar="{list,add,remove,echo}", required=True)
    p = dest_sub.add_parser("list", help="list the destinations")
    p.set_defaults(func=_guarded(cmd_dest_list))
    p = dest_sub.add_parser("add", help="add a destination (a C-STORE SCP, a DICOMweb archive or an HL7 listener)")
    p.add_argument("name", metavar="NAME", help="1-64 letters, digits, '_', '.' or '-'")
    p.add_argument("--kind", choices=config.DESTINATION_KINDS, default="dicom",
                   help="dicom: C-STORE (default); dicomweb: STOW-RS to --url; hl7: ORU^R01 over MLLP")
    p.add_argument("--ae", metavar="AE", help="dicom: the destination's AE title")
    p.add_argument("--host", metavar="H", help="dicom, hl7: its IP address or host name")
    p.add_argument("--port", metavar="P", help="dicom, hl7: its TCP port")
    p.add_argument("--tls", action="store_true", help="dicom, hl7: send over TLS (with the [tls] cert, key and CA)")
    p.add_argument("--url", metavar="URL", help="dicomweb: the base URL (…/dicom-web)")
    p.add_argument("--auth-file", metavar="F", help="dicomweb: a file holding a bearer token, or user:password")
    p.add_argument("--ca", metavar="F", help="dicomweb: CA certificates trusted for its HTTPS (default: the system's)")
    p.add_argument("--application", metavar="A", help="hl7: the receiving application (MSH-5)")
    p.add_argument("--facility", metavar="F", help="hl7: the receiving facility (MSH-6)")
    p.add_argument("--objects", metavar="LIST", default="",
                   help="which result objects it gets: sr,sc,ko (SR, summary image, key objects; default all)")
    p.set_defaults(func=_guarded(cmd_dest_add))
    p = dest_sub.add_parser("remove", help="remove a destination")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_guarded(cmd_dest_remove))
    p = dest_sub.add_parser("echo", help="C-ECHO a destination from this node's AE title "
                                         "(DICOMweb: a QIDO-RS search; HL7: a connection)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", default=str(DEFAULT_ECHO_TIMEOUT), metavar="S",
                   help=f"seconds allowed for each network step (default {DEFAULT_ECHO_TIMEOUT:g})")
    p.set_defaults(func=_guarded(cmd_dest_echo))

    pipe = subparsers.add_parser("pipeline", help="called AE titles, each with its model, threshold and destinations")
    pipe_sub = pipe.add_subparsers(dest="pipeline_command", metavar="{list,show,add,remove}", required=True)
    p = pipe_sub.add_parser("list", help="list the pipelines")
    p.set_defaults(func=_guarded(cmd_pipeline_list))
    p = pipe_sub.add_parser("show", help="one pipeline, with its model, series rules and destinations")
    p.add_argument("ae_title", metavar="AE")
    p.set_defaults(func=_guarded(cmd_pipeline_show))
    p = pipe_sub.add_parser("add", help="add a pipeline (a called AE title of its own)")
    p.add_argument("ae_title", metavar="AE", help="the called AE title scanners use for it")
    p.add_argument("--callers", metavar="LIST", help="calling AE titles that may use it (default: every allowed caller)")
    p.add_argument("--model", metavar="PATH", help="its model (default: [model] path); none: store and forward")
    p.add_argument("--threshold", metavar="T", help="its threshold, 0-1 (default: [model] threshold, else the card's)")
    p.add_argument("--series", metavar="NAME", help="a [series.NAME] rule set (default: [series])")
    p.add_argument("--dest", metavar="LIST", help="destination names, comma-separated")
    p.add_argument("--quiet", metavar="S", help="its quiet period (default: [completion] quiet_seconds)")
    p.set_defaults(func=_guarded(cmd_pipeline_add))
    p = pipe_sub.add_parser("remove", help="remove a pipeline")
    p.add_argument("ae_title", metavar="AE")
    p.set_defaults(func=_guarded(cmd_pipeline_remove))

    cfg = subparsers.add_parser("config", help="the configuration file")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="{check}", required=True)
    p = cfg_sub.add_parser("check", help="validate the config file and summarise it")
    p.set_defaults(func=_guarded(cmd_config_check))
