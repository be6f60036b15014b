"""metrics.jsonl: one JSON object per logged step (docs/design.md, "metrics.jsonl").

Every line has `step`, `phase` ("mle", "rl" or "eval") and `time` (seconds since the run started,
counting the time of earlier sessions of a resumed run). TensorBoard gets the same numbers when asked.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from pglm import dist
from pglm.errors import UserError


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash: the rest is still good
                continue
    return rows


class MetricsLog:
    """Appends metric lines; on resume, drops the lines past the step the run resumes from."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, elapsed: float = 0.0, tensorboard=False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writes = dist.is_main()  # with several processes only rank 0 writes the run directory
        if resume_step is not None and self.writes:  # those later lines belong to a trajectory that is about to be redone
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self.t0 = time.perf_counter() - elapsed
        self.tb = None
        if tensorboard and self.writes:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install 'pglm[tb]'") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, step: int, phase: str, **values) -> dict:
        row = {"step": step, "phase": phase, "time": round(self.elapsed(), 3)}
        for k, v in values.items():
            v = float(v) if not isinstance(v, (int, str)) else v
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        if not self.writes:
            return row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "phase", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{phase}/{k}", v, step)
        return row

    def close(self):
        if self.tb is not None:
            self.tb.close()
