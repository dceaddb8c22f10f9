"""Helpers of the multi-process training tests (DDP, DeepSpeed ZeRO-3, FSDP2 on CPU ranks):
launch a worker or ``simpo.train`` on 1 or 2 processes and compare their per-step logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def tiny_rows_and_tokenizer(rows=None):
    """The first ``rows`` rows (None: all) of the shipped train split and the embedded word-level
    tokenizer built from their words."""
    from simpo.data import load_raw_datasets
    from simpo.modeling import build_tiny_tokenizer

    raw = load_raw_datasets(None, ["train"])["train"]
    if rows is not None:
        raw = raw.select(range(rows))
    texts = [m["content"] for c in ("chosen", "rejected") for msgs in raw[c] for m in msgs]
    return raw, build_tiny_tokenizer(texts)


def save_tiny_model(directory) -> str:
    """Save the tiny Gemma-2 (hidden 32, tied embeddings, softcap) and its tokenizer, seed 0."""
    import torch

    from simpo.modeling import build_tiny_model

    _, tok = tiny_rows_and_tokenizer()
    torch.manual_seed(0)
    build_tiny_model(tok, hidden_size=32).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def run_json(cmd: list, out, timeout: int = 400) -> dict:
    """Run ``cmd`` (rc 0 expected) and read the JSON it wrote to ``out``."""
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


def worker_options(rows: int, steps: int = 5) -> list[str]:
    return ["--rows", str(rows), "--steps", str(steps), "--lr", "1e-2", "--per_device", "2",
            "--evaluate"]


def compare_runs(single: dict, multi: dict, steps: int = 5) -> None:
    """Per-step losses and gradient norms, the official metrics, and the evaluation after
    training agree to ``TOL`` (absolute); the loss must fall by more than 0.1."""
    l1 = [h["loss"] for h in single["logs"]]
    l2 = [h["loss"] for h in multi["logs"]]
    g1 = [h["grad_norm"] for h in single["logs"]]
    g2 = [h["grad_norm"] for h in multi["logs"]]
    print("\n1-proc losses", l1, "\n2-proc losses", l2,
          "\nmax abs loss diff", max(abs(a - b) for a, b in zip(l1, l2)),
          "\nmax abs grad-norm diff", max(abs(a - b) for a, b in zip(g1, g2)),
          "\neval", single["eval"]["eval_loss"], multi["eval"]["eval_loss"])
    assert len(l1) == len(l2) == steps
    assert l1[0] - l1[-1] > 0.1, "the loss should fall at this learning rate"
    for a, b in zip(l1, l2):
        assert abs(a - b) < TOL
    for a, b in zip(g1, g2):
        assert abs(a - b) < TOL * max(1.0, abs(a))
    for name in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logits/rejected"):
        for h1, h2 in zip(single["logs"], multi["logs"]):
            assert h1[name] == pytest.approx(h2[name], abs=TOL), name
    # evaluation after training: loss and every metric averaged over the 2 processes
    e1, e2 = single["eval"], multi["eval"]
    for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
                 "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen"):
        assert e1[name] == pytest.approx(e2[name], abs=TOL), name
