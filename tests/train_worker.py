"""Worker for the multi-process training tests: ``python tests/train_worker.py OUT.json [options]``
or under ``torchrun --nproc_per_node 2``. Trains a saved tiny model with SimPOTrainer for a few
steps (logging every step) and writes the per-step losses and metrics from rank 0."""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--fsdp", default=None, metavar="FSDP_CONFIG_JSON",
                   help="train under FSDP with this fsdp_config (a JSON file)")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--per_device", type=int, default=2)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--save_steps", type=int, default=None,
                   help="save a checkpoint every N steps (default: no checkpoints)")
    p.add_argument("--loss", default="simpo", help="simpo (beta 2, gamma_beta_ratio 0.5) or dpo")
    p.add_argument("--beta", type=float, default=None, help="default: 2.0 for simpo, dpo's own")
    p.add_argument("--precompute_batch", type=int, default=None,
                   help="dpo: pairs per forward of the reference precompute pass")
    p.add_argument("--ref_in_step", action="store_true",
                   help="dpo: the reference model in the step (precompute_ref_log_probs false)")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo.config import SimPOConfig
    from simpo.data import load_raw_datasets, prepare_dataset
    from simpo.train import setup_distributed
    from simpo.trainer import SimPOTrainer

    torch.set_num_threads(1)
    if a.loss == "simpo":
        loss_options = dict(beta=2.0 if a.beta is None else a.beta, gamma_beta_ratio=0.5)
    else:
        loss_options = dict(beta=a.beta, precompute_ref_log_probs=not a.ref_in_step,
                            precompute_ref_batch_size=a.precompute_batch)
    args = SimPOConfig(
        output_dir=a.work_dir, max_steps=a.steps, per_device_train_batch_size=a.per_device,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500, report_to="none", use_cpu=True, seed=0,
        data_seed=0, deepspeed=a.deepspeed, fsdp=bool(a.fsdp), fsdp_config=a.fsdp, max_length=64,
        max_prompt_length=32, disable_tqdm=True, dataloader_num_workers=0,
        per_device_eval_batch_size=2, loss=a.loss, **loss_options)
    setup_distributed(args)  # torch.distributed + deepspeed.comm before a ZeRO-3 from_pretrained
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    raw = load_raw_datasets(None, ["train"])["train"].select(range(a.rows))
    ds = prepare_dataset(raw, tok, args)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, attn_implementation="eager")
    # the reference (dpo): the saved model again (under ZeRO-3 from_pretrained partitions it at
    # load, so the policy cannot be copied)
    reference = {}
    if args.needs_reference:
        reference["ref_model"] = lambda: AutoModelForCausalLM.from_pretrained(
            a.model_dir, attn_implementation="eager")
    trainer = SimPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                           **reference)
    trainer.train(resume_from_checkpoint=a.resume)
    head = trainer.model.get_output_embeddings().weight  # outside any forward
    local = head.to_local() if hasattr(head, "to_local") else head  # an FSDP2 DTensor: this rank's rows
    head_shapes = [None] * args.world_size
    if args.world_size > 1:
        import torch.distributed as dist

        dist.all_gather_object(head_shapes, list(local.shape))
    else:
        head_shapes = [list(local.shape)]
    eval_metrics = trainer.evaluate(eval_dataset=ds) if a.evaluate else {}
    if trainer.is_world_process_zero():
        from simpo.run_dir import checkpoint_problems

        logs = [h for h in trainer.state.log_history if "loss" in h]
        checkpoints = sorted(n for n in (os.listdir(a.work_dir) if os.path.isdir(a.work_dir) else [])
                             if n.startswith("checkpoint-"))
        with open(a.out, "w") as f:
            json.dump({"world_size": args.world_size, "logs": logs,
                       "deepspeed": trainer.is_deepspeed_enabled,
                       "ref_model": type(trainer.ref_model).__name__,
                       "ref_columns": "ref_chosen_logps" in trainer.train_dataset.column_names,
                       "fsdp": trainer.is_fsdp_enabled,
                       "lm_head_is_dtensor": type(head).__name__ == "DTensor",
                       "lm_head_shape_outside_forward": head_shapes[0],
                       "lm_head_shapes_by_rank": head_shapes,
                       "vocab_size": trainer.model.config.vocab_size,
                       "eval": eval_metrics,
                       "checkpoint_problems": {n: checkpoint_problems(os.path.join(a.work_dir, n))
                                               for n in checkpoints}}, f)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has written the results
        # DeepSpeed's CPU communication stack sometimes aborts in C++ teardown at interpreter exit
        # ("terminate called without an active exception", ~1 run in 6, after all work is done):
        # leave without running those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
