"""What makes a finished run's ``output_dir`` a release: the model's KV cache switched back on
(:func:`restore_use_cache`), a model card ``README.md`` (:func:`model_card`, from a plain dict that
:func:`card_info` gathers), and the upload to the Hugging Face Hub (:func:`push_output_dir`,
:func:`push_checkpoint`), as TRL's ``push_to_hub`` does but without the run's bookkeeping files."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger("simpo.release")

CARD_NAME = "README.md"

# Never uploaded: checkpoints (the hub strategy decides about those), what simpo-train keeps for
# itself in output_dir (lock, run configuration with the command line, which may hold a token,
# finished record, reference cache, staging area, runs moved aside) and the Trainer's own
# private files (``_*``, as the Trainer's push ignores them).
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".simpo-*", ".simpo-*/**", "simpo_*",
                 "superseded-*", "superseded-*/**", "_*",
                 # an adapter run pushes its adapter, as TRL does: the merged model (and the tiny
                 # model's base) beside it stay local (push output_dir/merged to its own repo)
                 "merged", "merged/**", "base", "base/**"]
# The model and tokenizer files of a checkpoint, pushed to the repo root by hub_strategy
# every_save / checkpoint / all_checkpoints (the Trainer's choice: weights, configs, tokenizer).
CHECKPOINT_MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors",
                          "model-*.safetensors", "model.safetensors.index.json",
                          "pytorch_model*.bin", "pytorch_model.bin.index.json",
                          "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                          "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                          "chat_template.jinja", "vocab.json", "merges.txt"]


# as the official repository's README gives it
SIMPO_CITATION = """@inproceedings{meng2024simpo,
   title={SimPO: Simple Preference Optimization with a Reference-Free Reward},
   author={Meng, Yu and Xia, Mengzhou and Chen, Danqi},
   booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
   year={2024}
}"""


def restore_use_cache(model) -> None:
    """Switch the KV cache back on in ``model``'s config and generation config before the final
    save (it is loaded with ``use_cache`` off for activation checkpointing; a model saved so would
    generate without a cache), as the official run_simpo.py does."""
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = True


def _hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` when it names something on the Hub (not unset, the tiny model, or a local path)."""
    if not name or name == "tiny" or os.path.exists(os.path.expanduser(name)):
        return None
    return name


def _versions(deepspeed: bool = False) -> dict:
    from importlib import metadata

    out = {}
    for dist in ("simpo-kernels", "transformers", "torch", "datasets", "tokenizers", "accelerate",
                 *(("deepspeed",) if deepspeed else ())):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# the training arguments the card lists (besides the loss's own options)
CARD_TRAINING_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                      "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                      "optim", "weight_decay", "max_grad_norm", "seed", "max_length",
                      "max_prompt_length", "bf16", "fp16")


def card_info(model_args, data_args, training_args, *, train_rows: Optional[int],
              eval_rows: Optional[int], train_split: Optional[str], eval_split: Optional[str],
              train_metrics: dict, eval_metrics: dict, world_size: int = 1,
              global_step: Optional[int] = None, plot: Optional[str] = None,
              repo_id: Optional[str] = None) -> dict:
    """Everything :func:`model_card` shows, as a plain JSON-safe dict (other code may add keys,
    e.g. a LoRA section, before the card is written). ``repo_id``: the Hub repo the run is
    pushed to (the how-to-load snippet names it; else output_dir)."""
    from .data import data_sources

    base = model_args.model_name_or_path or "tiny"
    global_batch = (int(training_args.per_device_train_batch_size)
                    * int(training_args.gradient_accumulation_steps) * int(world_size))
    training = {k: getattr(training_args, k) for k in CARD_TRAINING_KEYS
                if hasattr(training_args, k)}
    training["lr_scheduler_type"] = str(getattr(training["lr_scheduler_type"], "value",
                                                training["lr_scheduler_type"]))
    training["optim"] = str(getattr(training["optim"], "value", training["optim"]))
    training["world_size"] = int(world_size)
    training["global_batch_size"] = global_batch
    return {
        "model_name": (repo_id or training_args.hub_model_id
                       or os.path.basename(os.path.normpath(training_args.output_dir))),
        "load_from": repo_id or training_args.output_dir,
        "global_step": global_step,
        "base_model": base,
        "base_model_hub_id": _hub_id(model_args.model_name_or_path),
        "datasets": [{"name": src.name, "config": src.config, "fraction": src.fraction}
                     for src in data_sources(data_args)],
        "mixture": ("dataset_mixer" if data_args.dataset_mixer is not None else
                    "dataset_mixture" if data_args.dataset_mixture is not None else None),
        "adapter": _adapter_info(model_args),
        "train_split": train_split, "eval_split": eval_split,
        "train_rows": train_rows, "eval_rows": eval_rows,
        "eval_fraction": data_args.eval_fraction,
        "do_eval": training_args.do_eval,
        "chat_template": data_args.chat_template,
        "loss": training_args.loss,
        "loss_options": dict(training_args.loss_options),
        "training": training,
        "train_metrics": dict(train_metrics), "eval_metrics": dict(eval_metrics),
        "plot": plot,
        "versions": _versions(deepspeed=bool(training_args.deepspeed)),
    }


def _adapter_info(model_args) -> Optional[dict]:
    """The LoRA settings of an adapter run (``use_peft``), None otherwise."""
    if not getattr(model_args, "use_peft", False):
        return None
    keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
            "use_rslora", "use_dora", "load_in_4bit", "load_in_8bit")
    return {k: getattr(model_args, k) for k in keys if hasattr(model_args, k)}


def _yaml_front_matter(info: dict) -> str:
    import yaml

    meta: dict[str, Any] = {}
    if info.get("base_model_hub_id"):
        meta["base_model"] = info["base_model_hub_id"]
    hub_datasets = [d["name"] for d in info.get("datasets", []) if _hub_id(d["name"])]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    meta["library_name"] = "peft" if info.get("adapter") else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["model_name"] = info["model_name"]
    tags = ["simpo-kernels", "preference-optimization", info["loss"]]
    meta["tags"] = list(dict.fromkeys(tags + list(info.get("tags", []))))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "unset" if v is None else str(v)


def _table(rows: dict) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in rows.items()]
    return lines


def model_card(info: dict) -> str:
    """The model card (``README.md``) of a finished run from :func:`card_info`'s dict: YAML front
    matter (base_model, datasets, library_name, tags) and the base model, the data, the loss and
    its hyperparameters, the main training arguments, the final metrics, the training curves,
    the framework versions and how to load the model. Keys it does not know are ignored."""
    name = info["model_name"]
    base = info["base_model"]
    lines = [_yaml_front_matter(info), f"# {name}", ""]
    base_text = ("the embedded tiny Gemma-2-architecture model of simpo-kernels (built in code, "
                 "random initial weights)" if base == "tiny" else f"`{base}`")
    lines += [f"Trained from {base_text} with the **{info['loss']}** preference loss by "
              f"`simpo-train` (simpo-kernels).", ""]
    lines += ["## Data", ""]
    sources = info.get("datasets") or [{"name": None, "config": None, "fraction": None}]
    if info.get("mixture"):
        lines.append(f"- a mixture (`{info['mixture']}`) of:")
    for src in sources:
        name = (f"`{src['name']}`" if src.get("name")
                else "the preference data shipped with simpo-kernels")
        lines.append(("  - " if info.get("mixture") else "- source: ") + name
                     + (f" (config `{src['config']}`)" if src.get("config") else "")
                     + (f", fraction {src['fraction']:g}" if src.get("fraction") is not None
                        else ""))
    if info.get("train_split") is not None:
        lines.append(f"- train split `{info['train_split']}`: {_value(info.get('train_rows'))} "
                     f"pairs after tokenisation")
    if info.get("eval_split") is not None:
        held = (f" (held out from the train split, eval_fraction {info['eval_fraction']:g})"
                if info.get("eval_fraction") else "")
        lines.append(f"- eval split `{info['eval_split']}`{held}: "
                     f"{_value(info.get('eval_rows'))} pairs")
    elif info.get("do_eval") is False:
        lines.append("- no evaluation (do_eval false)")
    else:
        lines.append("- no eval split")
    if info.get("chat_template"):
        lines.append(f"- chat template: `{info['chat_template']}`"
                     if "{" not in info["chat_template"] else "- chat template: a custom one")
    lines += ["", "## Loss", "", f"`{info['loss']}` with:", "", *_table(info["loss_options"]), ""]
    adapter = info.get("adapter")
    if adapter:
        lines += ["## LoRA adapter", "",
                  "This folder holds a LoRA adapter (`adapter_config.json`, "
                  "`adapter_model.safetensors`) for the base model; `merged/` beside it holds the "
                  "base with the adapter merged in (`merge_and_unload`), saved by the run but not "
                  "pushed to the Hub.", "", *_table(adapter), ""]
    lines += ["## Training arguments", ""]
    if info.get("global_step") is not None:
        lines += [f"Trained for {info['global_step']} optimizer steps.", ""]
    lines += [*_table(info["training"]), ""]
    for title, key in (("Final train metrics", "train_metrics"),
                       ("Final eval metrics", "eval_metrics")):
        if info.get(key):
            lines += [f"## {title}", "", *_table(info[key]), ""]
    if info.get("plot"):
        lines += ["## Training curves", "", f"![training curves]({info['plot']})", ""]
    load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{info["load_from"]}")'
            if adapter else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{info["load_from"]}")')
    lines += ["## How to load", "", "```python", load,
              f'tokenizer = AutoTokenizer.from_pretrained("{info["load_from"]}")',
              'messages = [{"role": "user", "content": "Hello!"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
              "return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**inputs, max_new_tokens=64)",
              "print(tokenizer.decode(out[0][inputs['input_ids'].shape[1]:], "
              "skip_special_tokens=True))", "```", ""]
    if info["loss"] == "simpo":
        lines += ["## Citation", "", "```bibtex", SIMPO_CITATION, "```", ""]
    if info.get("versions"):
        lines += ["## Framework versions", ""]
        lines += [f"- {k}: {v}" for k, v in info["versions"].items()]
        lines.append("")
    return "\n".join(lines)


def write_model_card(output_dir: str, info: dict) -> str:
    """Write :func:`model_card` of ``info`` to ``output_dir/README.md``; returns its path."""
    path = os.path.join(output_dir, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(info))
    return path


def _ignored(token: Optional[str]) -> list[str]:
    # training_args.bin is the pickled arguments, hub_token included: never uploaded with one
    return ["training_args.bin"] if token else []


def push_output_dir(repo_id: str, output_dir: str, *, commit_message: str = "End of training",
                    token: Optional[str] = None, revision: Optional[str] = None):
    """Upload ``output_dir`` (model, tokenizer, card, results, plot; not the checkpoints or
    simpo-train's own files, see :data:`UPLOAD_IGNORE`, nor ``training_args.bin`` when a
    ``token`` is given: it holds it) to the Hub repo ``repo_id``, blocking.
    Returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi

    logger.info("pushing %s to the Hub repo %s", output_dir, repo_id)
    return HfApi().upload_folder(repo_id=repo_id, folder_path=output_dir,
                                 commit_message=commit_message, token=token, revision=revision,
                                 ignore_patterns=UPLOAD_IGNORE + _ignored(token))


def push_checkpoint(repo_id: str, checkpoint: str, args, step: int, epoch: Optional[float]) -> None:
    """Push a published checkpoint as the Trainer's ``hub_strategy`` asks: its model and
    tokenizer files to the repo root (every_save, checkpoint, all_checkpoints), and the whole
    checkpoint to ``last-checkpoint/`` (checkpoint) or ``checkpoint-N/`` (all_checkpoints).
    Blocking: the checkpoint must not be rotated away while it uploads."""
    from huggingface_hub import HfApi

    strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
    if strategy == "end":
        return
    what = (f"step {step}" if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
            else f"epoch {int(epoch or 0)}")
    message = f"Training in progress, {what}"
    api = HfApi()
    logger.info("pushing %s to the Hub repo %s (hub_strategy %s)", checkpoint, repo_id, strategy)
    api.upload_folder(repo_id=repo_id, folder_path=checkpoint, commit_message=message,
                      token=args.hub_token, revision=args.hub_revision,
                      allow_patterns=CHECKPOINT_MODEL_FILES)
    if strategy in ("checkpoint", "all_checkpoints"):
        path_in_repo = ("last-checkpoint" if strategy == "checkpoint"
                        else os.path.basename(os.path.normpath(checkpoint)))
        api.upload_folder(repo_id=repo_id, folder_path=checkpoint, path_in_repo=path_in_repo,
                          commit_message=message + ", checkpoint", token=args.hub_token,
                          revision=args.hub_revision, ignore_patterns=_ignored(args.hub_token))

