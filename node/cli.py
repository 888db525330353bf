"""The ``ainode`` command."""

from __future__ import annotations

import argparse
import logging
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


def setup_logging(level: str) -> None:
    """Configure the root logger; pynetdicom's own chatter stays at WARNING."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))


def _serve(args: argparse.Namespace) -> int:
    from node.serve import serve

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
            {"node": {**{k: v for k, v in node.__dict__.items()}, "storage": str(node.storage)}}, "command line"
        )
        cfg = replace(cfg, node=node)
    return serve(cfg)


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
    p.set_defaults(func=_serve)

    from node import admin

    admin.add_commands(sub)
    return parser


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
