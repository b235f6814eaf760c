"""Calibrate the scan's decision threshold on clean and poisoned models (issue 12, step 3).

Trains small CNNs on MNIST (the shared data folder's 10,000 test images: 8,000 to train)
clean (5 seeds) and poisoned (5 target<-base pairs of the thesis at 20% and at 10% of the
base class, a 3x3 white corner patch), scans each, and writes every class's score to
docs/results/scan-calibration.json. Run: python examples/calibrate_scan_threshold.py
(about 4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

from safedl_ext.poison.demo import demo_data, poisoned_run
from safedl_ext.poison.scan import ScanConfig
from safedl_ext.report import machine_info, write_json_atomic

PAIRS = [(5, 3), (6, 8), (3, 1), (2, 0), (4, 7)]  # thesis pairs 1-5 (target, base)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/scan-calibration.json")
    d = demo_data("mnist")
    # all steps run (decide afterwards); both base rules reported
    config = ScanConfig(threshold=0.0, max_share=0.5, base_compare=True)
    runs = []
    for seed in range(5):
        runs.append(poisoned_run(d, target=None, seed=seed, config=config).summary())
        print(runs[-1], flush=True)
    for fraction in (0.2, 0.1):
        for i, (t, b) in enumerate(PAIRS):
            runs.append(poisoned_run(d, target=t, base=b, fraction=fraction, seed=i,
                                     config=config).summary())
            print(runs[-1], flush=True)
    write_json_atomic(out, {"data": d.name, "model": "SmallCNN(width=16), 4 epochs",
                            "trigger": "3x3 white patch, bottom-right", "runs": runs,
                            "machine": dict(machine_info())})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
