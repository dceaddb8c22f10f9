"""A PNG of reward accuracy and reward margin over training (train and eval), from log_history."""

from __future__ import annotations

from pathlib import Path


def plot_training_curves(log_history: list[dict], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in ((axes[0], "rewards/accuracies", "reward accuracy"),
                            (axes[1], "rewards/margins", "reward margin")):
        for prefix, style, label in (("", "-", "train"), ("eval_", "o-", "eval")):
            pts = [(h["step"], h[prefix + name]) for h in log_history
                   if prefix + name in h and "step" in h]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle("SimPO training")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
