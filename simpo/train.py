"""``simpo-train [RECIPE] [--key value ...]`` (also ``python -m simpo.train``, ``torchrun -m
simpo.train``, ``accelerate launch -m simpo.train``).

Without a recipe it runs the embedded default (``recipes/tiny.yaml``): a tiny Gemma-2-architecture
model and word-level tokenizer built in code, trained on the preference data shipped with the
package, on CPU in under a minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

from .config import RunStopped, UserError, check_padding_value, error_text

logger = logging.getLogger("simpo.train")


def _dtype(name):
    import torch

    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_tokenizer(model_args, data_args, raw_datasets,
                   command_line_keys: frozenset = frozenset()):
    """The run's tokenizer, with the chat template the run uses: the one ``chat_template`` names,
    else the tokenizer's own (unset or ``tokenizer``; the embedded tiny tokenizer carries
    Gemma-2's). A recipe's template never replaces a user model's silently: one log line says
    which template is used and where that choice came from (``command_line_keys``: the options
    the command line set, ``SimPOConfig.command_line_keys``)."""
    from transformers import AutoTokenizer

    from .config import TOKENIZER_TEMPLATE
    from .data import data_texts, needs_chat_template
    from .modeling import CHAT_TEMPLATES, build_tiny_tokenizer

    name = data_args.chat_template
    template_from = "the command line" if "chat_template" in command_line_keys else "the recipe"
    template = None if name in (None, TOKENIZER_TEMPLATE) else CHAT_TEMPLATES.get(name, name)
    if is_tiny(model_args) and model_args.tokenizer_name_or_path is None:
        texts = data_texts(raw_datasets.values())
        tokenizer = build_tiny_tokenizer(texts, **({"chat_template": template} if template else {}))
        own = "the embedded tiny tokenizer's own, Gemma-2's"
    else:
        path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                                      trust_remote_code=model_args.trust_remote_code)
        except OSError as exc:  # not found / no access / not a tokenizer directory
            raise UserError(f"tokenizer {path!r} cannot be loaded: {error_text(exc)}") from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        own = f"the tokenizer's own, from {path}"
        if template is None and tokenizer.chat_template is None:
            own = f"none: {path} has none, and text rows need none"
        if template is not None:
            tokenizer.chat_template = template
        if tokenizer.chat_template is None and needs_chat_template(raw_datasets.values()):
            raise UserError(f"tokenizer {path!r} has no chat template: set chat_template (e.g. "
                            f"'gemma')")
    if template is not None:
        what = name if name in CHAT_TEMPLATES else "the Jinja template given"
        logger.info("chat template: %s (chat_template from %s)", what, template_from)
    else:
        why = "chat_template unset" if name is None else f"chat_template {name} from {template_from}"
        logger.info("chat template: %s (%s)", own, why)
    return tokenizer


def is_tiny(model_args) -> bool:
    return model_args.model_name_or_path in (None, "tiny")


def choose_cpu_threads(model_args, training_args) -> None:
    """The embedded tiny model on CPU runs on one torch thread unless ``OMP_NUM_THREADS`` (or
    ``MKL_NUM_THREADS``) says otherwise, and the log says which. Its matrices (hidden 96) are too
    small for intra-op parallelism to pay, and on a busy machine torch's threads mostly wait for
    each other: 100 steps of the default recipe on a shared 2-core machine took 14-34 s on one
    thread and 174 s on two."""
    import torch

    if not is_tiny(model_args) or not (training_args.use_cpu or not torch.cuda.is_available()):
        return
    explicit = [name for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(name)]
    if explicit:
        logger.info("torch threads: %d (from %s)", torch.get_num_threads(), explicit[0])
        return
    torch.set_num_threads(1)
    logger.info("torch threads: 1 (the embedded tiny model gains nothing from more; set "
                "OMP_NUM_THREADS to choose)")


def load_model(model_args, training_args, tokenizer, adapters: bool = True,
               quantized: bool = True):
    """The policy as configured: with LoRA adapters when ``use_peft`` (and ``adapters``), loaded
    quantised when ``load_in_4bit`` / ``load_in_8bit`` (and ``quantized``). Without adapters it
    is the base model: the reference of an adapter run (quantised like the policy), or, without
    quantisation, what the final adapter is merged into."""
    model = _load_base_model(model_args, training_args, tokenizer, quantized)
    if model_args.use_peft and adapters:
        from .lora import wrap_model

        model = wrap_model(model, model_args, training_args)
    return model


def _load_base_model(model_args, training_args, tokenizer, quantized: bool = True):
    from transformers import AutoModelForCausalLM

    from .lora import quantization_kwargs
    from .modeling import build_tiny_model

    dtype = _dtype(model_args.torch_dtype)
    if is_tiny(model_args):
        return build_tiny_model(tokenizer, torch_dtype=dtype if dtype != "auto" else None,
                                hidden_size=model_args.tiny_hidden_size,
                                num_layers=model_args.tiny_num_layers)
    if training_args.fsdp_plugin_args is not None:
        # What accelerate launch's FSDP config sets, and the Accelerator sets later anyway: set
        # before from_pretrained, it honours cpu_ram_efficient_loading (one process per node reads
        # the weights) under `torchrun ... --fsdp` too.
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code,
                  use_cache=not training_args.trainer_checkpointing)
    if dtype is not None:
        kwargs["dtype"] = dtype  # transformers 5 (pyproject's floor: 5.17) calls it `dtype`, not `torch_dtype`
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quantized:
        kwargs.update(quantization_kwargs(model_args))
    try:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as exc:  # not found / no access / missing weights
        raise UserError(f"model {model_args.model_name_or_path!r} cannot be loaded: "
                        f"{error_text(exc)}") from exc


def load_reference_model(model_args, training_args, tokenizer, quantized: bool = True):
    """The reference model of a loss with one (dpo, rdpo), loaded like the policy: from
    ``ref_model_name_or_path``, or the initial policy again (the embedded tiny model is rebuilt
    from the run's seed: the same weights, and the RNG stream of the run is left untouched).
    Never with adapters: the reference of a LoRA run is its base model (adapters off), as TRL's.
    Also the base model a LoRA run's adapter is merged into (``quantized=False``)."""
    import dataclasses

    import torch

    if model_args.ref_model_name_or_path:
        ref_args = dataclasses.replace(model_args,
                                       model_name_or_path=model_args.ref_model_name_or_path)
        return load_model(ref_args, training_args, tokenizer, adapters=False, quantized=quantized)
    if is_tiny(model_args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training_args.seed)  # as set_seed did before the policy was built
            return load_model(model_args, training_args, tokenizer, adapters=False,
                              quantized=quantized)
    return load_model(model_args, training_args, tokenizer, adapters=False, quantized=quantized)


def reference_key(model_args, training_args, tokenizer) -> dict:
    """What the precomputed reference log-probs depend on besides the token ids: the reference
    model (the tiny model's seed, sizes and vocabulary; a saved model's weight files, see
    :func:`simpo.reference.weight_files_fingerprint`), its load dtype, the run's precision and the
    attention implementation. A change of any of them recomputes the cached columns."""
    import hashlib
    import json

    from .reference import weight_files_fingerprint

    source = model_args.ref_model_name_or_path or model_args.model_name_or_path
    if not model_args.ref_model_name_or_path and is_tiny(model_args):
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        reference = {"tiny": {"seed": training_args.seed, "hidden": model_args.tiny_hidden_size,
                              "layers": model_args.tiny_num_layers,
                              "vocab": hashlib.sha256(vocab.encode()).hexdigest()}}
    else:
        reference = weight_files_fingerprint(source, model_args.model_revision)
    return {"reference": reference, "torch_dtype": model_args.torch_dtype,
            "bf16": bool(training_args.bf16), "fp16": bool(training_args.fp16),
            "attn_implementation": model_args.attn_implementation}


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


def save_final_model(trainer, model_args, training_args, tokenizer) -> None:
    """The final model and tokenizer in ``output_dir`` (a LoRA run: the adapter, plus the merged
    model in ``output_dir/merged/``; see :func:`simpo.lora.save_final_model`). Collective."""
    import dataclasses

    from .lora import save_final_model as save

    def load_base():  # the base of an adapter run, unquantised: the initial policy
        return load_reference_model(
            dataclasses.replace(model_args, ref_model_name_or_path=None), training_args,
            tokenizer, quantized=False)

    save(trainer, model_args, training_args, tokenizer, load_base=load_base)


def _claim_output_dir(model_args, data_args, training_args, recipe_path) -> tuple:
    """Take ``output_dir`` for this run and decide where it starts: on global rank 0 only (the one
    process that touches the filesystem here), whose outcome, the checkpoint to resume from or
    the error, every other rank receives, so that all fail or proceed together. Returns
    ``(lock or None, checkpoint or None)``."""
    import torch.distributed as dist

    from .run_dir import NothingToTrain, acquire_run_lock, resolve_start, run_config

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    lock = failure = None
    outcome = {}
    if not distributed or dist.get_rank() == 0:
        try:
            lock = acquire_run_lock(training_args.output_dir)
            if training_args.do_train:
                config = run_config(model_args, data_args, training_args, recipe_path)
                outcome["checkpoint"] = resolve_start(
                    training_args.output_dir, config, existing_run=training_args.existing_run,
                    resume_from_checkpoint=training_args.resume_from_checkpoint,
                    max_steps=training_args.max_steps)
            else:
                # evaluation only: the lock (no run writes beside it), but no run configuration
                # and no resume decision: a previous run there is neither moved nor a reason to
                # refuse, and a later training run finds no trace of this one
                outcome["checkpoint"] = None
        except NothingToTrain as exc:  # not an error: every rank stops, exit status 0
            lock.release()
            lock = None
            outcome = {"nothing": str(exc)}
        except BaseException as exc:
            if lock is not None:
                lock.release()
            failure = exc
            outcome = {"error": str(exc), "exit_code": getattr(exc, "exit_code", None)}
    if distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if failure is not None:
        raise failure
    if "nothing" in outcome:
        raise NothingToTrain(outcome["nothing"])
    if "error" in outcome:
        if outcome["exit_code"] is None:
            raise RuntimeError(f"global rank 0 failed while preparing output_dir: {outcome['error']}")
        error = UserError(outcome["error"])
        error.exit_code = outcome["exit_code"]
        raise error
    return lock, outcome["checkpoint"]


def _train_and_save(model_args, data_args, training_args, checkpoint, stop) -> dict:
    """Load the data and the model, train (from ``checkpoint`` if given), save and evaluate.
    ``stop`` (a :class:`~simpo.trainer.StopRequest`): training ends early, with a checkpoint, when
    it records a signal, and then nothing else is written (:class:`~simpo.config.RunStopped`).
    With ``do_train`` false it evaluates only (:func:`_evaluate_only`)."""
    from accelerate import PartialState
    from transformers import IntervalStrategy, set_seed

    from .data import check_optimizer_steps, load_splits, prepare_dataset
    from .trainer import SimPOTrainer, StopOnSignal

    train = training_args.do_train
    set_seed(training_args.seed)
    loaded = load_splits(data_args)
    raw = {loaded.train_name: loaded.train}  # all of them build the tiny model's vocabulary
    if loaded.eval is not None:
        raw[loaded.eval_name] = loaded.eval
    use_eval = loaded.eval is not None and training_args.do_eval is not False
    if loaded.eval is not None and not use_eval:
        logger.info("do_eval false: the eval split %r is not used", loaded.eval_name)
    if loaded.eval is None and not train:
        raise UserError("do_train false evaluates only, but the data has no eval split: name one "
                        "in --dataset_splits, or hold train rows out with --eval_fraction")
    if loaded.eval is None and training_args.do_eval and "do_eval" in training_args.command_line_keys:
        raise UserError("--do_eval true asks for evaluation but the data has no eval split: set "
                        "--eval_fraction to hold some train rows out, or name an eval split in "
                        "--dataset_splits")
    if loaded.eval is None and training_args.eval_strategy != "no":
        if "eval_strategy" in training_args.command_line_keys:
            raise UserError(f"--eval_strategy {training_args.eval_strategy.value} asks for evaluation "
                            f"but the data has no eval split: set --eval_fraction to hold some "
                            f"train rows out, or name an eval split in --dataset_splits")
        # the recipe's evaluation schedule, for data that has nothing to evaluate on
        logger.info("no eval split: evaluation off (eval_strategy %s -> no)",
                    training_args.eval_strategy.value)
        training_args.eval_strategy = IntervalStrategy.NO

    tokenizer = load_tokenizer(model_args, data_args, raw, training_args.command_line_keys)
    check_padding_value(training_args, tokenizer)  # an id the model has, before it is loaded
    names = ([loaded.train_name] if train else []) + ([loaded.eval_name] if use_eval else [])
    with PartialState().local_main_process_first():
        processed = {
            name: prepare_dataset(raw[name], tokenizer, training_args,
                                  auto_insert_empty_system_msg=data_args.auto_insert_empty_system_msg,
                                  num_proc=data_args.preprocessing_num_workers, split_name=name)
            for name in names}
    train_ds = processed.get(loaded.train_name) if train else None
    eval_ds = processed[loaded.eval_name] if use_eval else None
    if training_args.log_completions and eval_ds is None:
        raise UserError("log_completions: completions are logged at each evaluation, and this "
                        "run has no eval split")
    if train:
        check_optimizer_steps(len(train_ds), training_args, loaded.train_name,
                              None if eval_ds is None else len(eval_ds), loaded.eval_name)

    set_seed(training_args.seed)
    model = load_model(model_args, training_args, tokenizer)
    reference = {}
    if training_args.needs_reference:
        reference = dict(
            ref_model=lambda: load_reference_model(model_args, training_args, tokenizer),
            # eval-only: computed, never cached in output_dir (a training run's cache stays)
            reference_key=reference_key(model_args, training_args, tokenizer) if train else None)
    trainer = SimPOTrainer(model=model, args=training_args, train_dataset=train_ds,
                           eval_dataset=eval_ds, processing_class=tokenizer, **reference)
    if training_args.log_completions:
        from .plotting import LogCompletions

        trainer.add_callback(LogCompletions(trainer, eval_ds, training_args.log_completions_prompts,
                                            training_args.log_completions_max_new_tokens).callback)
    if not train:
        return _evaluate_only(trainer, training_args, eval_ds)
    trainer.add_callback(StopOnSignal(stop))

    start = time.time()
    stop.raise_if_dropped()  # a signal while loading whose stop the interpreter dropped
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stop.raise_if_stopped()  # stopped early: no final model or results, as a finished run has
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return _save_release(model_args, data_args, training_args, trainer, loaded, metrics, train_ds,
                         eval_ds, start)


def _save_release(model_args, data_args, training_args, trainer, loaded, train_metrics, train_ds,
                  eval_ds, start) -> dict:
    """After training: the final model (KV cache back on), tokenizer, final evaluation, plot,
    model card, the push to the Hub (push_to_hub) and, last, the finished record."""
    from . import release
    from .plotting import plot_training_curves

    release.restore_use_cache(trainer.accelerator.unwrap_model(trainer.model))
    save_final_model(trainer, model_args, training_args, trainer.processing_class)

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
    plot = None
    if training_args.plot and trainer.is_world_process_zero():
        plot = plot_training_curves(trainer.state.log_history,
                                    os.path.join(training_args.output_dir, "training_curves.png"),
                                    title=f"{training_args.loss.upper()} training"
                                    if training_args.loss != "simpo" else "SimPO training")
        if plot is not None:
            logger.info("wrote %s", plot)
    if trainer.is_world_process_zero():
        info = release.card_info(
            model_args, data_args, training_args, train_rows=len(train_ds),
            eval_rows=None if eval_ds is None else len(eval_ds), train_split=loaded.train_name,
            eval_split=None if eval_ds is None else loaded.eval_name,
            train_metrics=train_metrics, eval_metrics=eval_metrics,
            world_size=training_args.world_size, global_step=trainer.state.global_step,
            plot=None if plot is None else plot.name,
            repo_id=trainer.hub_model_id if training_args.push_to_hub else None)
        logger.info("wrote %s", release.write_model_card(training_args.output_dir, info))
    push_failure = None
    if training_args.push_to_hub:
        try:
            trainer.push_to_hub(commit_message="End of training")
        except Exception as exc:  # network, token, permissions: the run itself is complete
            push_failure = (f"the run finished (its outputs are in {training_args.output_dir}) but "
                            f"the push to the Hub repo {trainer.hub_model_id} failed: "
                            f"{error_text(exc)}; upload it with `hf upload {trainer.hub_model_id} "
                            f"{training_args.output_dir}`")
        if training_args.world_size > 1:  # only process 0 uploads: every process learns how it went
            from accelerate.utils import broadcast_object_list

            box = [push_failure]
            broadcast_object_list(box, from_process=0)
            push_failure = box[0]
    if trainer.is_world_process_zero():
        acc = eval_metrics.get("eval_rewards/accuracies")
        summary = f"done in {time.time() - start:.0f}s; model, tokenizer and trainer_state.json in " \
                  f"{training_args.output_dir}"
        if acc is not None:
            summary += (f"; eval reward accuracy {acc:.3f}, margin "
                        f"{eval_metrics.get('eval_rewards/margins', float('nan')):.3f}")
        print(summary, flush=True)
        from .run_dir import write_final_record

        write_final_record(training_args.output_dir, trainer.state)  # last: the run is finished
    if push_failure is not None:
        raise UserError(push_failure)
    return eval_metrics


def _evaluate_only(trainer, training_args, eval_ds) -> dict:
    """``do_train`` false: evaluate the loaded model on the eval split and write
    ``eval_results.json`` (replacing one already there); nothing else is written: no checkpoint,
    model, state, plot or run record, so output_dir's training run, if any, is left as it is."""
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_ds)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics, combined=False)  # all_results.json marks a trained run
    if trainer.is_world_process_zero():
        print(f"evaluated only (do_train false): {len(eval_ds)} pairs; eval reward accuracy "
              f"{metrics.get('eval_rewards/accuracies', float('nan')):.3f}, margin "
              f"{metrics.get('eval_rewards/margins', float('nan')):.3f}; eval_results.json in "
              f"{training_args.output_dir}", flush=True)
    return metrics


def run(model_args, data_args, training_args, recipe_path=None) -> dict:
    """Train (and evaluate) as configured; returns the final eval metrics (empty without eval).

    Before any data or model is loaded, the run takes ``output_dir`` (its lock; the directory is
    created and proven writable) and decides where training starts: from the last complete
    checkpoint of a previous run with the same settings, from step 0 (``existing_run fresh`` moves
    the previous run aside), or not at all (a busy or unwritable output_dir, or a previous run
    with other settings, is a :class:`~simpo.config.UserError`). The lock is released at the end.

    SIGTERM and SIGINT stop the run cleanly (:class:`~simpo.trainer.StopRequest`): during training
    after the current optimizer step, with a checkpoint; before or after it at once. Either way
    :class:`~simpo.config.RunStopped` is raised, with the lock released.
    """
    from .trainer import StopRequest

    stop = StopRequest()
    with _signals_to(stop):
        return _run(model_args, data_args, training_args, recipe_path, stop)


def _run(model_args, data_args, training_args, recipe_path, stop) -> dict:
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    # our own messages at INFO on the main process (and as configured elsewhere)
    logging.getLogger("simpo").setLevel(min(log_level, logging.INFO) if training_args.should_log
                                        else log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("recipe %s -> output_dir %s", recipe_path, training_args.output_dir)
    choose_cpu_threads(model_args, training_args)

    from .run_dir import NothingToTrain

    setup_distributed(training_args)  # the process group carries rank 0's decision to the others
    lock = None
    try:
        with stop.held():  # a signal while the lock is taken acts once it can be released
            try:
                lock, checkpoint = _claim_output_dir(model_args, data_args, training_args,
                                                     recipe_path)
            except NothingToTrain as exc:  # a finished run: not an error, outputs untouched
                if training_args.process_index == 0:
                    _say(f"simpo-train: {exc}", sys.stdout)
                _close_process_group()
                return {}
        stop.last_checkpoint = checkpoint
        metrics = _train_and_save(model_args, data_args, training_args, checkpoint, stop)
    except RunStopped as stopped:
        if stopped.agreed:  # every process stopped after the same step: close in order
            _close_process_group()
        raise
    finally:
        if lock is not None:
            lock.release()
    _close_process_group()
    return metrics


@contextlib.contextmanager
def _signals_to(stop) -> Iterator[None]:
    """SIGTERM and SIGINT go to ``stop.handle`` while the block runs; the previous handlers come
    back after it. Only from the main thread (the only one Python lets set handlers), and a
    signal the caller ignores (``nohup``, a background job's SIGINT) stays ignored.

    A stop the handler raised inside a weakref callback or finaliser is dropped by the
    interpreter, which prints it as "Exception ignored in ..." with a traceback; it is raised
    again before training (``stop.raise_if_dropped``), so that report is left out: the run still
    ends on its one stop line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:
            previous[signum] = handler
            signal.signal(signum, stop.handle)
    report_unraisable = sys.unraisablehook

    def unraisable_hook(unraisable) -> None:
        if not stop.is_dropped_stop(unraisable):
            report_unraisable(unraisable)

    sys.unraisablehook = unraisable_hook
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if sys.unraisablehook is unraisable_hook:  # unless someone replaced it meanwhile
            sys.unraisablehook = report_unraisable


def _close_process_group() -> None:
    """Every rank done: tear the process group down now, in order, rather than in interpreter-exit
    destructors, where DeepSpeed's CPU (gloo) stack can abort ("terminate called without an active
    exception") after all the outputs were written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _say(line: str, stream=None) -> None:
    """Write ``line`` and its newline in one write: every rank of a multi-process run prints its
    own line to the same pipe, and ``print`` writes the text and the newline separately, so two
    ranks stopping together printed ``...againsimpo-train: error: ...`` on one line."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


def main(argv: Optional[list[str]] = None) -> int:
    """The ``simpo-train`` command. A user error (configuration, data, paths, a busy output_dir)
    prints one line ``simpo-train: error: ...`` and returns its exit status (2 for configuration
    errors, 1 otherwise); ``--debug`` or ``SIMPO_DEBUG=1`` re-raises it with its traceback."""
    from .config import UserError, env_flag, help_text, parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    debug = env_flag("SIMPO_DEBUG")
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
        _say(f"simpo-train: error: {exc}")
        return exc.exit_code
    except RunStopped as exc:
        _say(f"simpo-train: {exc}")
        return exc.exit_code
    except OSError as exc:  # results and state (JSON) written after training, without room
        from .run_dir import NO_ROOM_ERRNOS

        if debug or exc.errno not in NO_ROOM_ERRNOS:
            raise
        _say(f"simpo-train: error: cannot write {exc.filename or 'the outputs'}: {exc.strerror}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is in place (parsing)
        if debug:
            raise
        _say("simpo-train: stopped by SIGINT before training started; nothing was trained")
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
