"""Training feedback: OUT/metrics.jsonl (one JSON object per logged step), TensorBoard when installed,
and OUT/loss_curve.png at the end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to OUT/metrics.jsonl; on resume drops rows past the resumed step first, so the
    file reads like one uninterrupted run."""

    def __init__(self, out: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                log.debug("tensorboard not installed: metrics go to metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and validation loss, keep) against step; None when matplotlib is missing or no rows."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss-curve PNG")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", lw=1)
    if any("ce" in r for r in rows) and any(r.get("kl") for r in rows):
        ax.plot(steps, [r.get("ce") for r in rows], label="train CE", lw=1, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="val CE", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    keeps = [r.get("keep") for r in rows]
    if any(k is not None for k in keeps):
        ax2 = ax.twinx()
        ax2.plot(steps, keeps, color="gray", ls="--", lw=1, label="keep")
        ax2.set_ylabel("keep per bank (mean)")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)
