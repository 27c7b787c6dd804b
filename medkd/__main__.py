"""Command line interface: ``python -m medkd <command> ...`` (also installed as ``medkd``).

Add a sub-command by writing an ``add_<name>_parser(subparsers)`` function that calls
``parser.set_defaults(handler=fn)`` with ``fn(args) -> int`` and registering it in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medkd.bundle_generation import add_bundles_parser
from medkd.data.check_data import add_check_data_parser
from medkd.errors import install_excepthook
from medkd.planning.cli import add_plan_parser
from medkd.prepare import add_prepare_parser
from medkd.tools.compare import add_compare_parser
from medkd.tools.deploy import add_deploy_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``medkd`` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(prog="medkd", description="MONAI-native knowledge distillation toolkit.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_bundles_parser(subparsers)
    add_check_data_parser(subparsers)
    add_compare_parser(subparsers)
    add_deploy_parser(subparsers)
    add_prepare_parser(subparsers)
    add_plan_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the chosen sub-command and return its exit code."""
    args = build_parser().parse_args(argv)
    install_excepthook()  # a user error (e.g. compare's output folder of other settings) prints as one message
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
