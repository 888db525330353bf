"""The ``ainode`` command."""

from __future__ import annotations

import argparse
import logging
import re
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from node import __version__
from node import config as config_mod
from node.errors import AinodeError, ConfigError

logger = logging.getLogger("node")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EscapeControl(logging.Filter):
    """Control characters in a message (peer text that reached it: AE titles, library errors) as \\xNN.

    One record is one line: nothing a peer sends can fake a line, move the
    cursor or colour a terminal. Tracebacks are formatted apart and kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
            record.args = None
        return True


def setup_logging(level: str) -> None:
    """Configure the root logger; pynetdicom's own chatter stays at WARNING."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeControl())
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    # dicomweb-client's retry library logs a traceback for every failed STOW-RS, though the send job
    # retries on its own and logs that in one line (node.send)
    logging.getLogger("retrying").setLevel(logging.ERROR)


def _serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # everything the node and its children write is theirs alone (files 0600, folders 0700)
    cfg = config_mod.load(args.config)
    node = cfg.node
    if args.port is not None:
        node = replace(node, port=args.port)
    if args.host is not None:
        node = replace(node, host=args.host)
    if args.storage is not None:
        node = replace(node, storage=Path(args.storage).resolve())
    if node != cfg.node:  # overrides are validated like the file
        config_mod.parse(
            {"node": {**{k: v for k, v in node.__dict__.items()}, "storage": str(node.storage)},
             "tls": dict(cfg.tls.__dict__)}, "command line"
        )
        cfg = replace(cfg, node=node)
    from node.store import prepare_metrics_dir

    if "prometheus_client" in sys.modules:  # imported before its mode could be set: a bug, said loudly
        logging.getLogger("node").error("prometheus_client was imported too early: /metrics will not sum the "
                                        "node's processes")
    else:  # the node's processes count into one folder (node.metrics)
        try:
            prepare_metrics_dir(cfg.node.storage)
        except OSError as exc:
            logging.getLogger("node").warning("Metrics of this node's processes not shared: %s", exc)
    from node.serve import serve

    return serve(cfg, args.workers, args.log_level)


def _worker(args: argparse.Namespace) -> int:
    from node.worker import run_worker

    os.umask(0o077)
    cfg = config_mod.load(args.config)
    if args.storage is not None:
        cfg = replace(cfg, node=replace(cfg.node, storage=Path(args.storage).resolve()))
    return run_worker(cfg, args.role, burst=args.burst, supervisor=args.supervised_by)


def _receive(args: argparse.Namespace) -> int:
    from node.receive.process import run_receiver

    os.umask(0o077)
    cfg = config_mod.load(args.config)
    node = cfg.node
    node = replace(node, host=args.host or node.host, port=node.port if args.port is None else args.port,
                   storage=Path(args.storage).resolve() if args.storage else node.storage)
    return run_receiver(replace(cfg, node=node), args.index, args.supervised_by)


def _web(args: argparse.Namespace) -> int:
    os.umask(0o077)
    cfg = config_mod.load(args.config)
    if args.storage is not None:
        cfg = replace(cfg, node=replace(cfg.node, storage=Path(args.storage).resolve()))
    if args.supervised_by is not None:
        from node.jobs import die_with

        die_with(args.supervised_by)
    from node.store import METRICS_ENV, metrics_dir

    if METRICS_ENV not in os.environ and metrics_dir(cfg.node.storage).is_dir():
        os.environ[METRICS_ENV] = str(metrics_dir(cfg.node.storage))  # the counts of the node's processes
    from node.web.app import run_web

    return run_web(cfg, args.log_level)


def _demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(keep=args.keep, slices=args.slices)


def _since(text: str) -> float:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``) or a date (``2026-12-01``)."""
    from node.history import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _results_list(args: argparse.Namespace) -> int:
    import json

    from node.history import list_states, local_time
    from node.store import Storage
    from node.worker import redis_for

    cfg = config_mod.load(args.config)
    states = list_states(Storage(cfg.node.storage), cfg, redis_for(cfg), args.state or (), args.since)
    if args.json:
        print(json.dumps([s.to_json() for s in states], indent=1))
        return 0
    if not states:
        print(f"no studies{' matching' if args.state or args.since else ''} in {cfg.node.storage}")
    for s in states:
        via = f"  via {s.pipeline}" if cfg.declared_pipelines else ""
        print(f"{local_time(s.last_at)}  {s.state:9s}  {s.study_uid}  r{s.revision}  {s.instances:4d} inst  "
              f"received {local_time(s.received_at)}{via}  {s.detail}")
    return 0


def _results_show(args: argparse.Namespace) -> int:
    from node.history import local_time, study_state, timeline
    from node.store import Storage, check_uid
    from node.worker import redis_for

    cfg = config_mod.load(args.config)
    storage = Storage(cfg.node.storage)
    uid = check_uid(args.study_uid, "Study Instance UID")
    if not (storage.studies / uid).is_dir():
        print(f"ainode: error: no study {uid} in {cfg.node.storage}", file=sys.stderr)
        return 2
    st = study_state(storage, cfg, redis_for(cfg), uid)
    via = f", pipeline {st.pipeline}" if cfg.declared_pipelines else ""
    print(f"study {uid}: {st.state}, revision {st.revision}, {st.instances} instances{via}")
    print(f"  {st.detail}")
    for at, what in timeline(storage, cfg.audit_path, uid):
        print(f"  {local_time(at, seconds=True)}  {what}")
    return 0


def _results_resend(args: argparse.Namespace) -> int:
    from node.history import resend
    from node.store import Storage, check_uid
    from node.worker import redis_for

    cfg = config_mod.load(args.config)
    try:
        jobs = resend(Storage(cfg.node.storage), cfg, redis_for(cfg), check_uid(args.study_uid), args.dest)
    except LookupError as exc:
        print(f"ainode: error: {exc.args[0]}", file=sys.stderr)
        return 2
    for jid in jobs:
        print(f"queued {jid}")
    return 0


def _results_reanalyse(args: argparse.Namespace) -> int:
    import getpass

    from node.audit import Action, Outcome, open_trail
    from node.history import reanalyse
    from node.store import Storage, check_uid
    from node.worker import redis_for

    cfg = config_mod.load(args.config)
    study_uid = check_uid(args.study_uid, "Study Instance UID")
    try:
        rev = reanalyse(Storage(cfg.node.storage), redis_for(cfg), study_uid)
    except LookupError as exc:
        print(f"ainode: error: {exc.args[0]}", file=sys.stderr)
        return 2
    audit = open_trail(cfg.audit_path, cfg.node.ae_title, "cli", cfg.audit.syslog)
    try:
        audit.job(study_uid, rev.revision, Action.EXECUTE, Outcome.SUCCESS,
                  f"re-analysis requested by {getpass.getuser()}: revision {rev.revision} of "
                  f"{len(rev.instances)} instances queued")
    finally:
        audit.close()
    print(f"queued revision {rev.revision} of {study_uid} ({len(rev.instances)} instances) as job {rev.job_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ainode", description="DICOM node for lung-CT AI results.")
    parser.add_argument("--version", action="version", version=f"ainode {__version__}")
    parser.add_argument(
        "--config",
        default=None,
        help=f"config file (default: ${config_mod.ENV_CONFIG}, else the checkout's config/ainode.toml)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AINODE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM node (C-ECHO/C-STORE SCP, completion, queue)")
    p.add_argument("--host", help="listen address (overrides [node] host)")
    p.add_argument("--port", type=int, help="listen port (overrides [node] port)")
    p.add_argument("--storage", help="storage folder (overrides [node] storage)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="analysis workers to run beside the SCP, plus one sender (default 1; -1: none)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run one worker (analyse studies, or send results)")
    p.add_argument("--role", choices=["analyse", "send"], default="analyse")
    p.add_argument("--storage", help="storage folder (overrides [node] storage)")
    p.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p.add_argument("--supervised-by", type=int, metavar="PID", help=argparse.SUPPRESS)  # set by `ainode serve`
    p.set_defaults(func=_worker)

    p = sub.add_parser("receive", help="one receiving process (`serve` starts [node] receivers of them)")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--storage")
    p.add_argument("--supervised-by", type=int, metavar="PID", required=True)
    p.set_defaults(func=_receive)

    p = sub.add_parser("web", help="serve /healthz, /readyz and /metrics ([web]; `serve` runs it too)")
    p.add_argument("--storage", help="storage folder (overrides [node] storage)")
    p.add_argument("--supervised-by", type=int, metavar="PID", help=argparse.SUPPRESS)  # set by `ainode serve`
    p.set_defaults(func=_web)

    p = sub.add_parser("demo", help="run the whole path once in a temp folder: CT in, SR out")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, storage, SR)")
    p.add_argument("--slices", type=int, default=None, help="send this many slices (the volume is tiled)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("results", help="what happened to each study")
    rsub = p.add_subparsers(dest="results_command", required=True, metavar="ACTION")
    from node.history import STATES

    q = rsub.add_parser("list", help="each study's state, the most recently active first")
    q.add_argument("--json", action="store_true")
    q.add_argument("--state", action="append", choices=STATES, help="only studies in this state (repeatable)")
    q.add_argument("--since", type=_since, help="only studies active since: 90m, 24h, 7d or a date")
    q.set_defaults(func=_results_list)
    q = rsub.add_parser("show", help="one study: its state and its timeline, as it happened")
    q.add_argument("study_uid")
    q.set_defaults(func=_results_show)
    q = rsub.add_parser("resend", help="send a study's latest result again")
    q.add_argument("study_uid")
    q.add_argument("--dest", help="only this destination")
    q.set_defaults(func=_results_resend)
    q = rsub.add_parser("reanalyse", help="analyse a study again: a new revision of the same instances, "
                                          "its result objects superseding the last")
    q.add_argument("study_uid")
    q.set_defaults(func=_results_reanalyse)

    from node import admin

    admin.add_commands(sub)
    _global_options_anywhere(parser)
    return parser


def _global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--log-level`` after the subcommand too (``ainode config check --config F``).

    Each subcommand gets both, defaulting to "not given" so the value given before it stays.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                sub.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, help=argparse.SUPPRESS,
                                 choices=["DEBUG", "INFO", "WARNING", "ERROR"])
                _global_options_anywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ainode`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"ainode: error: {exc}", file=sys.stderr)
        return 2
    except AinodeError as exc:
        print(f"ainode: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the port is taken, the storage is not writable...
        print(f"ainode: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
