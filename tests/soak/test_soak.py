"""A bounded soak with faults: many clients on both APIs while the text manager is failed from outside.

ALLM_SOAK_S sets the traffic's duration (90 s by default; scripts/soak --minutes 60 for the
long run), ALLM_SOAK_CLIENTS the number of clients (16), ALLM_SOAK_SEED their choices, and
ALLM_SOAK_RECORDS a file to write every request and fault to (JSON).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.harness import SUMMARIES, Settings, run_soak
from tests.soak.report import summary, violations, write_records

SETTINGS = Settings.from_env()
# Start-up, the last requests and probes (each bounded by the client timeout), the stop.
TIMEOUT_S = int(SETTINGS.duration_s + 600)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_soak_with_faults_keeps_every_invariant(tmp_path):
    report = run_soak(SETTINGS, tmp_path)
    SUMMARIES.append(summary(report))
    if os.environ.get("ALLM_SOAK_RECORDS"):
        write_records(report, Path(os.environ["ALLM_SOAK_RECORDS"]))
    broken = {i: v for i, v in violations(report).items() if v}
    assert not broken, "invariants broken (the soak summary has the figures): " + "; ".join(
        f"{i}: {v[0]}" + (f" (+{len(v) - 1} more)" if len(v) > 1 else "") for i, v in broken.items()
    )
