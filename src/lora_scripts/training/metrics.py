"""Loss logging a person can read: loss.csv, TensorBoard scalars and a loss.png curve, plus warnings when
the loss is non-finite or drifts upwards (usually a learning rate that is too high, or inconsistent captions)."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from ..atomic import atomic_write_bytes

log = logging.getLogger(__name__)
_COLUMNS = ("step", "epoch", "loss", "lr", "seconds")


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected EMA, as TensorBoard's smoothing slider: diffusion loss per step is very noisy."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss(path: Path, steps: list[int], losses: list[float], title: str,
              validation: list[tuple[int, float]] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="loss per step")
    if len(losses) > 1:
        ax.plot(steps, smooth(losses), color="#08519c", linewidth=2, label="smoothed (EMA 0.9)")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", color="#e6550d", linewidth=2,
                markersize=4, label="validation (fixed noise)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


class MetricsLogger:
    """Main-process only. Appends to loss.csv at every step so a crash loses nothing already logged."""

    def __init__(self, output_dir: Path, log_dir: Path, title: str, resume_step: int = 0):
        self.csv_path = output_dir / "loss.csv"
        self.val_path = output_dir / "val_loss.csv"
        self.validation: list[tuple[int, float]] = []
        self.png_path = output_dir / "loss.png"
        self.title = title
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._warned_divergence = False
        self._read_existing(resume_step)
        new = not self.csv_path.exists()
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(list(_COLUMNS))
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(log_dir))

    def _read_existing(self, resume_step: int) -> None:
        """On resume, keep the rows up to the checkpoint's step (later ones will be logged again)."""
        self.steps, self.losses = [], []
        rows = _rows_up_to(self.csv_path, resume_step)
        self.steps = [int(r["step"]) for r in rows]
        self.losses = [float(r["loss"]) for r in rows]
        _rewrite(self.csv_path, list(_COLUMNS), [[r[c] for c in _COLUMNS] for r in rows])
        self.validation = [(int(r["step"]), float(r["val_loss"])) for r in _rows_up_to(self.val_path, resume_step)]
        _rewrite(self.val_path, ["step", "val_loss"], [[s, f"{v:.6f}"] for s, v in self.validation])

    def log(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self._writer.writerow([step, epoch, f"{loss:.6f}", f"{lr:.3e}", f"{seconds:.2f}"])
        self._csv.flush()
        self._tb.add_scalar("loss", loss, step)
        self._tb.add_scalar("lr", lr, step)
        self._check_divergence()

    def log_validation(self, step: int, loss: float) -> None:
        self.validation.append((step, loss))
        new = not self.val_path.exists()
        with open(self.val_path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "val_loss"])
            w.writerow([step, f"{loss:.6f}"])
        self._tb.add_scalar("loss/validation", loss, step)
        log.info("step %d: validation loss %.5f", step, loss)

    @property
    def tensorboard(self):
        return self._tb

    def _check_divergence(self) -> None:
        if self._warned_divergence or len(self.losses) < 60:
            return
        sm = smooth(self.losses, beta=0.95)
        best, now = min(sm[20:]), sm[-1]
        if math.isfinite(now) and now > 2.0 * best:
            self._warned_divergence = True
            log.warning(
                "loss is climbing (smoothed %.4f, best so far %.4f): the learning rate is probably too high, or the "
                "captions contradict each other. Try halving learning_rate.", now, best)

    def plot(self) -> Path | None:
        self._tb.flush()
        return plot_loss(self.png_path, self.steps, self.losses, self.title, self.validation) if self.steps else None

    def close(self) -> None:
        self.plot()
        self._csv.close()
        self._tb.close()


def read_curves(output_dir: Path) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """(steps, losses, [(step, validation loss)]) as a run's loss.csv and val_loss.csv hold them so far."""
    rows = _rows_up_to(Path(output_dir) / "loss.csv", None)
    val = _rows_up_to(Path(output_dir) / "val_loss.csv", None)
    return ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
            [(int(r["step"]), float(r["val_loss"])) for r in val])


def _rows_up_to(path: Path, step: int | None) -> list[dict]:
    """Rows with step <= `step` (None: all)."""
    if not path.exists() or step == 0:
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if step is None or int(r["step"]) <= step]


def _rewrite(path: Path, header: list[str], rows: list[list]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
