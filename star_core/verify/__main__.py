"""Entry point of ``python -m star_core.verify``."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from .report import Report

# Group modules in run order; each exposes run(fixture_dir, report) -> bool (False: no files of that group).
GROUPS = ("units", "colour", "helpers", "forward", "sampling", "text", "vae", "train", "e2e")


def run_group(name: str, directory: Path, report: Report) -> bool:
    """
    Runs one group on a fixture directory. A group that raises (a file it cannot read, a configuration the
    implementation rejects, a bug) becomes a FAIL line with the exception and where it was raised, and the other
    groups still run; the exit status is 1 at the end.

    Parameters:
        name (`str`): a name of `GROUPS`.
        directory (`Path`): the fixture directory.
        report (`Report`): where the lines go.

    Returns:
        `bool`: whether the group found files of its own in the directory (a group that raised did).
    """
    try:
        module = importlib.import_module(f"star_core.verify.{name}")
        return module.run(directory, report)
    except Exception as exc:  # noqa: BLE001 - every failure of a group is reported, never a traceback
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        message = " ".join(str(exc).split()) or "(no message)"
        report.fail(f"{directory.name}/{name}", f"group stopped: {type(exc).__name__}: {message} "
                                                f"(at {Path(frame.filename).name}:{frame.lineno})")
        return True


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
            ran = run_group(name, directory, report) or ran
        if not ran:
            report.fail(str(directory), "holds no fixture file this checker understands")
    if report.failures:
        print(f"verify: {len(report.failures)} of {report.count} checks FAILED: {', '.join(report.failures[:10])}")
        return 1
    print(f"verify: all {report.count} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
