"""One line per compared output, and the pass/fail tally."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_TOL = 1e-4


@dataclass
class Report:
    """Collects comparisons and prints ``PASS/FAIL name max|Δ|=… (tol …)`` lines as they happen."""

    failures: list[str] = field(default_factory=list)
    count: int = 0

    def compare(self, name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = DEFAULT_TOL) -> float:
        """Compares two tensors elementwise in float64; a shape mismatch is a failure."""
        self.count += 1
        actual = actual.detach().to("cpu", torch.float64)
        expected = expected.detach().to("cpu", torch.float64)
        if actual.shape != expected.shape:
            self.fail(name, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
            return float("inf")
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        ok = err <= tol
        print(f"{'PASS' if ok else 'FAIL'} {name}  max|Δ|={err:.3e} (tol {tol:.0e})", flush=True)
        if not ok:
            self.failures.append(name)
        return err

    def equal(self, name: str, actual: object, expected: object) -> bool:
        """Exact comparison of plain values (lists, ints, strings)."""
        self.count += 1
        ok = actual == expected
        print(f"{'PASS' if ok else 'FAIL'} {name}  {'equal' if ok else f'{actual!r} != expected {expected!r}'}", flush=True)
        if not ok:
            self.failures.append(name)
        return ok

    def fail(self, name: str, why: str) -> None:
        print(f"FAIL {name}  {why}", flush=True)
        self.failures.append(name)
