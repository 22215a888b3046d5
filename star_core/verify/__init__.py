"""Public parity checker: ``python -m star_core.verify FIXTURE_DIR... [--manifest FILE]``.

Each check group lives in its own module with ``run(fixture_dir: Path, report: Report) -> bool`` that returns
False when the directory holds none of the group's files (the group is then skipped silently).
"""
