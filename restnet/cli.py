"""The `restnet` command: one parser whose sub-commands live beside the concern they drive."""
from __future__ import annotations

import argparse
import sys

from restnet import (catalog_commands, demo, device_commands, experiment_commands, fl_commands, fleet_commands,
                     key_commands)
from shared.errors import RestnetError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restnet",
        description="ReStNet Fleet: stitch two pre-trained models into a CKA-ranked catalog of variants, "
                    "assign them to devices by budget over MQTT, and fine-tune their stitching layers with Flower.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for commands in (catalog_commands, experiment_commands, fleet_commands, device_commands, fl_commands,
                     key_commands, demo):
        commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RestnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
