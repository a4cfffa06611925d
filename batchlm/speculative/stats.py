"""SpecStats: how speculation went over an engine's life (plain Python).

`record(proposed, accepted)` once per verified sequence and step; the
figures are what `bench throughput` and the job summary report.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecStats:
    proposed: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, kept
    verifications: int = 0  # sequence-steps that verified at least one proposal

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.verifications += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens one verification yields on average: the accepted proposals
        plus the token the target model adds (1.0: nothing accepted)."""
        return 1.0 + self.accepted / self.verifications if self.verifications else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "verifications": self.verifications,
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length}
