"""`lora-scripts compare`: several runs side by side - their LoRAs on the same prompts and seeds, their loss
curves on one plot, and their key settings and losses in one table - to pick the better run."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from ..errors import LoraScriptsError
from ..training.metrics import read_curves, smooth
from .render import Renderer
from .sheets import contact_sheet

_TABLE_KEYS = ("lora_rank", "lora_alpha", "epochs", "learning_rate")


@dataclass
class Run:
    folder: Path
    label: str
    config: dict
    lora: Path
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    def row(self) -> dict[str, str]:
        c = self.config
        alpha = c.get("lora_alpha") or c.get("lora_rank")
        last = smooth(self.losses)[-1] if self.losses else float("nan")
        val = self.validation[-1][1] if self.validation else None
        return {"run": self.label, "rank": str(c.get("lora_rank")), "alpha": _number(alpha),
                "epochs": str(c.get("epochs")), "lr": _number(c.get("learning_rate")),
                "steps": str(self.steps[-1] if self.steps else 0), "final loss": f"{last:.4f}",
                "val loss": f"{val:.4f}" if val is not None else "-"}


def _number(value) -> str:
    """A setting as the table shows it; a hand-edited config's odd value is shown as written, not a crash."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def read_run(folder: Path, step: int | None = None) -> Run:
    folder = Path(folder)
    from ..training.runs import read_resolved_config_path

    cfg_path = read_resolved_config_path(folder)  # config.yaml, or config.resolved.yaml beside a user's own config.yaml
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise LoraScriptsError(f"{folder} {what}; give the output_dir folders of finished training runs")
    if not cfg_path.is_file():
        raise LoraScriptsError(f"{folder} is not a training run folder (no config.yaml); give output_dir folders")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LoraScriptsError(f"{cfg_path} cannot be read ({str(exc).splitlines()[0]}); it is the run's record of "
                               "its settings: restore it from the run or train again") from None
    if not isinstance(config, dict):
        raise LoraScriptsError(f"{cfg_path} holds no settings (it should be the run's config); give finished "
                               "run folders")
    name = config.get("output_name") or folder.name
    lora = (folder / "checkpoints" / f"step-{step}" / f"{name}.safetensors") if step else folder / f"{name}.safetensors"
    if not lora.is_file():
        have = sorted(p.name for p in (folder / "checkpoints").glob("step-*")) if (folder / "checkpoints").is_dir() else []
        raise LoraScriptsError(f"{lora} does not exist" + (f"; checkpoints here: {', '.join(have)}" if have else
                               " (the run has not finished; use --step with one of its checkpoints)"))
    steps, losses, validation = read_curves(folder)
    return Run(folder, folder.name + (f"@{step}" if step else ""), config, lora, steps, losses, validation)


def table_markdown(runs: list[Run]) -> str:
    rows = [r.row() for r in runs]
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def loss_overlay(runs: list[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        if run.losses:
            ax.plot(run.steps, smooth(run.losses), color=colour, linewidth=2, label=f"{run.label} (train, smoothed)")
        if run.validation:
            ax.plot([s for s, _ in run.validation], [v for _, v in run.validation], "o--", color=colour,
                    markersize=4, label=f"{run.label} (validation)")
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def image_grid(renderer: Renderer, runs: list[Run], prompts: list[str], seeds: list[int], weight: float
               ) -> Image.Image:
    """Rows: prompt x seed; columns: the base, then each run's LoRA at `weight`."""
    keys = []
    for i, run in enumerate(runs):
        key = f"run{i}_{run.folder.name}"
        renderer.add_lora(key, run.lora)
        keys.append(key)
    grid, labels = [], []
    for prompt in prompts:
        columns = [renderer.render(prompt, seeds)] + [renderer.render(f"{prompt}, <lora:{k}:{weight:g}>", seeds)
                                                      for k in keys]
        for j, seed in enumerate(seeds):
            grid.append([col[j].image for col in columns])
            labels.append(f"{prompt}  (seed {seed})")
    footer = [" | ".join(f"{k}: {v}" for k, v in r.row().items()) for r in runs]
    return contact_sheet(grid, labels, ["base"] + [f"{r.label} @ {weight:g}" for r in runs],
                         title="run comparison (same prompts, same seeds)", footer=footer)


def write_comparison(out: Path, sheet: Image.Image, runs: list[Run]) -> dict[str, Path]:
    from ..atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    paths = {"sheet": out / "compare.png", "losses": out / "compare_loss.png", "table": out / "compare.md"}
    sheet.save(paths["sheet"])
    loss_overlay(runs, paths["losses"])
    atomic_write_text(paths["table"], table_markdown(runs))
    atomic_write_text(out / "compare.json", json.dumps([r.row() for r in runs], indent=2))
    return paths
