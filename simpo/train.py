"""``simpo-train [RECIPE] [--key value ...]`` (also ``python -m simpo.train``, ``torchrun -m
simpo.train``, ``accelerate launch -m simpo.train``).

Without a recipe it runs the embedded default (``recipes/tiny.yaml``): a tiny Gemma-2-architecture
model and word-level tokenizer built in code, trained on the preference data shipped with the
package, on CPU in a few minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

logger = logging.getLogger("simpo.train")


def _dtype(name):
    import torch

    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_tokenizer(model_args, data_args, raw_datasets):
    from transformers import AutoTokenizer

    from .modeling import CHAT_TEMPLATES, build_tiny_tokenizer

    template = CHAT_TEMPLATES.get(data_args.chat_template, data_args.chat_template)
    if is_tiny(model_args):
        path = model_args.tokenizer_name_or_path
        if path is None:
            texts = [m["content"] for split in raw_datasets.values()
                     for col in ("chosen", "rejected") if col in split.column_names
                     for msgs in split[col] if isinstance(msgs, list)
                     for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str)]
            kwargs = {"chat_template": template} if template else {}
            return build_tiny_tokenizer(texts, **kwargs)
    else:
        path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                              trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: set chat_template (e.g. 'gemma')")
    return tokenizer


def is_tiny(model_args) -> bool:
    return model_args.model_name_or_path in (None, "tiny")


def load_model(model_args, training_args, tokenizer):
    import transformers
    from transformers import AutoModelForCausalLM

    from .modeling import build_tiny_model

    dtype = _dtype(model_args.torch_dtype)
    if is_tiny(model_args):
        return build_tiny_model(tokenizer, torch_dtype=dtype if dtype != "auto" else None,
                                hidden_size=model_args.tiny_hidden_size,
                                num_layers=model_args.tiny_num_layers)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code,
                  use_cache=not training_args.gradient_checkpointing)
    if dtype is not None:
        # transformers >= 5 calls it `dtype`; 4.x only knows `torch_dtype`
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def setup_distributed(training_args) -> None:
    """Initialise torch.distributed (through ``training_args.device``) and, under DeepSpeed, its
    communication layer, which a ZeRO-3 model init needs and which accelerate leaves alone on CPU
    (``use_cpu=True`` runs)."""
    _ = training_args.device
    if training_args.deepspeed:
        import deepspeed
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=tdist.get_backend())


def run(model_args, data_args, training_args, recipe_path=None) -> dict:
    """Train (and evaluate) as configured; returns the final eval metrics (empty without eval)."""
    import transformers
    from accelerate import PartialState
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .data import load_raw_datasets, prepare_dataset
    from .plotting import plot_training_curves
    from .trainer import SimPOTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    # our own messages at INFO on the main process (and as configured elsewhere)
    logging.getLogger("simpo").setLevel(min(log_level, logging.INFO) if training_args.should_log
                                        else log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("recipe %s -> output_dir %s", recipe_path, training_args.output_dir)

    setup_distributed(training_args)
    set_seed(training_args.seed)
    splits = data_args.dataset_splits
    if not splits or len(splits) > 2:
        raise ValueError(f"dataset_splits must name a train split and optionally an eval split, got {splits}")
    raw = load_raw_datasets(data_args.dataset_name, splits, data_args.dataset_config)
    for name, limit in ((splits[0], data_args.max_train_samples),
                        (splits[-1] if len(splits) == 2 else None, data_args.max_eval_samples)):
        if name is not None and limit is not None:
            raw[name] = raw[name].select(range(min(limit, len(raw[name]))))
    logger.info("splits: %s", {k: len(v) for k, v in raw.items()})

    tokenizer = load_tokenizer(model_args, data_args, raw)
    with PartialState().local_main_process_first():
        processed = {
            name: prepare_dataset(raw[name], tokenizer, training_args,
                                  auto_insert_empty_system_msg=data_args.auto_insert_empty_system_msg,
                                  num_proc=data_args.preprocessing_num_workers, split_name=name)
            for name in splits}
    train_ds = processed[splits[0]]
    eval_ds = processed[splits[1]] if len(splits) == 2 else None
    if eval_ds is None and training_args.eval_strategy != "no":
        raise ValueError("eval_strategy is set but dataset_splits names no eval split")

    set_seed(training_args.seed)
    model = load_model(model_args, training_args, tokenizer)
    trainer = SimPOTrainer(model=model, args=training_args, train_dataset=train_ds,
                           eval_dataset=eval_ds, processing_class=tokenizer)

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(training_args.output_dir):
        # as the official script: pick up the last checkpoint of an interrupted run
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)

    eval_metrics = {}
    if eval_ds is not None:
        done = [h for h in trainer.state.log_history
                if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        if done:  # the trainer already evaluated the final weights (last step hit eval_steps)
            eval_metrics = {k: v for k, v in done[-1].items() if k.startswith("eval_") or k == "epoch"}
        else:
            eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_ds)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        trainer.save_state()  # trainer_state.json with the final evaluation in its log history
    if training_args.plot and trainer.is_world_process_zero():
        path = plot_training_curves(trainer.state.log_history,
                                    os.path.join(training_args.output_dir, "training_curves.png"))
        logger.info("wrote %s", path)
    if trainer.is_world_process_zero():
        acc = eval_metrics.get("eval_rewards/accuracies")
        summary = f"done in {time.time() - start:.0f}s; model, tokenizer and trainer_state.json in " \
                  f"{training_args.output_dir}"
        if acc is not None:
            summary += (f"; eval reward accuracy {acc:.3f}, margin "
                        f"{eval_metrics.get('eval_rewards/margins', float('nan')):.3f}")
        print(summary, flush=True)
    return eval_metrics


def main(argv: Optional[list[str]] = None) -> int:
    """The ``simpo-train`` command. A user error (configuration, data, paths, a busy output_dir)
    prints one line ``simpo-train: error: ...`` and returns its exit status (2 for configuration
    errors, 1 otherwise); ``--debug`` or ``SIMPO_DEBUG=1`` re-raises it with its traceback."""
    from .config import UserError, help_text, parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SIMPO_DEBUG", "").lower() not in ("", "0", "false", "no")
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        debug = True
    try:
        if any(a in ("-h", "--help") for a in args):
            print(help_text(args))
            return 0
        model_args, data_args, training_args, recipe = parse_args(args)
        run(model_args, data_args, training_args, recipe)
    except UserError as exc:
        if debug:
            raise
        print(f"simpo-train: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
