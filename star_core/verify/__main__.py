"""Entry point of ``python -m star_core.verify``."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .report import Report

# Group modules in run order; each exposes run(fixture_dir, report) -> bool (False: no files of that group).
GROUPS = ("units", "colour", "helpers", "forward", "sampling", "text", "vae", "train", "e2e")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m star_core.verify", description=__doc__)
    parser.add_argument("fixture_dirs", nargs="*", type=Path, help="fixture directories (star_tiny format)")
    parser.add_argument("--manifest", type=Path, action="append", default=[],
                        help="key manifest JSON (like star_keys_i2vgenxl.json): build the full model on meta and compare")
    parser.add_argument("--only", default=None, help="comma-separated group names to run (default: all)")
    args = parser.parse_args(argv)
    if not args.fixture_dirs and not args.manifest:
        parser.error("give at least one fixture directory or --manifest FILE")
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown group(s) {unknown}; choose from {list(GROUPS)}")
    report = Report()
    for manifest in args.manifest:
        from .manifest import check_manifest
        check_manifest(manifest, report)
    for directory in args.fixture_dirs:
        if not directory.is_dir():
            report.fail(str(directory), "is not a directory")
            continue
        ran = False
        for name in groups:
            module = importlib.import_module(f"star_core.verify.{name}")
            ran = module.run(directory, report) or ran
        if not ran:
            report.fail(str(directory), "holds no fixture file this checker understands")
    if report.failures:
        print(f"verify: {len(report.failures)} of {report.count} checks FAILED: {', '.join(report.failures[:10])}")
        return 1
    print(f"verify: all {report.count} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
