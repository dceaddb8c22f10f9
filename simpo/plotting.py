"""``training_curves.png``: loss, learning rate, reward accuracy and reward margin over training
(train and eval), from the Trainer's ``log_history``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger("simpo.plotting")

# (log key without the eval_ prefix, panel title, whether eval values exist): one panel each
PANELS = (("loss", "loss", True), ("learning_rate", "learning rate", False),
          ("rewards/accuracies", "reward accuracy", True), ("rewards/margins", "reward margin", True))


def curve_points(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, value), ...], "eval_loss": [...], "learning_rate": [...], ...}``: every
    series a panel draws, each in log order. The run's summary entry (``train_loss`` etc., logged
    once at the end) is no point of any series."""
    series = {}
    for name, _, has_eval in PANELS:
        for key in (name, "eval_" + name) if has_eval else (name,):
            series[key] = [(h["step"], float(h[key])) for h in log_history
                           if key in h and "step" in h]
    return series


def training_figure(log_history: list[dict], title: str = "SimPO training"):
    """The matplotlib figure of :func:`plot_training_curves` (2 x 2 panels, see :data:`PANELS`),
    or None when nothing was logged (a run shorter than ``logging_steps`` without evaluation)."""
    series = curve_points(log_history)
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, panel, has_eval) in zip(axes.flat, PANELS):
        for key, style, label in ((name, "-", "train"), ("eval_" + name, "o-", "eval")):
            if series.get(key):
                xs, ys = zip(*series[key])
                ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[1][0].set_ylim(-0.02, 1.02)
    axes[0][1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(log_history: list[dict], path,
                         title: str = "SimPO training") -> Optional[Path]:
    """Write the training curves to ``path`` (PNG) and return it; None, with a log line and no
    file, when nothing was logged (an empty picture would say nothing)."""
    fig = training_figure(log_history, title)
    if fig is None:
        logger.info("no training curves: nothing was logged (a run shorter than logging_steps "
                    "and without evaluation); %s not written", path)
        return None
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


COMPLETIONS_NAME = "completions.jsonl"


def prompt_ids(row: dict, label_pad_token_id: int = -100) -> list[int]:
    """The prompt tokens of a tokenised pair (:func:`simpo.data.prepare_dataset`): the leading
    ``chosen_input_ids`` whose labels are ``label_pad_token_id``."""
    ids, labels = row["chosen_input_ids"], row["chosen_labels"]
    n = next((i for i, label in enumerate(labels) if label != label_pad_token_id), len(ids))
    return list(ids[:n])


class LogCompletions:
    """At each evaluation, greedy completions of the first ``num_prompts`` eval prompts
    (``max_new_tokens`` each), appended to ``output_dir/completions.jsonl`` as
    ``{"step", "prompt", "completion"}`` lines (as TRL's ``LogCompletionsCallback``, to a file).
    Generates on the main process only, so it is for runs whose model is whole on each process
    (one process, DDP; simpo-train refuses it under ZeRO-3 and FSDP)."""

    def __init__(self, trainer, eval_dataset, num_prompts: int, max_new_tokens: int):
        from transformers import TrainerCallback

        self.trainer, self.max_new_tokens = trainer, max_new_tokens
        pad = trainer.args.label_pad_token_id
        rows = eval_dataset.select(range(min(num_prompts, len(eval_dataset))))
        self.prompts = [prompt_ids(row, pad) for row in rows]
        # a TrainerCallback subclass made here: this module imports no transformers at load time
        outer = self

        class _Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, **kwargs):
                outer.log(state.global_step)

        self.callback = _Callback()

    def log(self, step: int) -> None:
        import json
        import os

        import torch

        trainer = self.trainer
        if not trainer.is_world_process_zero():
            return
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        lines = []
        try:
            with torch.no_grad(), trainer.autocast_smart_context_manager():
                for ids in self.prompts:
                    inputs = torch.tensor([ids], device=model.device)
                    out = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                         max_new_tokens=self.max_new_tokens, do_sample=False,
                                         use_cache=True, pad_token_id=tokenizer.pad_token_id)
                    lines.append({"step": int(step),
                                  "prompt": tokenizer.decode(ids, skip_special_tokens=False),
                                  "completion": tokenizer.decode(out[0, len(ids):],
                                                                 skip_special_tokens=True)})
        finally:
            model.train(was_training)
        path = os.path.join(trainer.args.output_dir, COMPLETIONS_NAME)
        with open(path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        logger.info("step %d: %d completions appended to %s", step, len(lines), path)
