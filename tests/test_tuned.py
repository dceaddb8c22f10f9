"""Measured launch choices (``simpo_kernels/tuned``) and ``kernel_options``: the launchers follow a
committed table for their GPU (nearest shape, the caller's options last), refuse a bad one with
its path named, and every selectable variant (atomic semantics included) computes the same loss
and gradients: float32 against the float64 reference to 1e-5 relative (measured ~1e-7)."""

from __future__ import annotations

import json

import pytest
import torch

from simpo_kernels import simpo_loss
from simpo_kernels.kernels.launch import INTERPRETER_CONFIG, make_config
from simpo_kernels.tuned import ENV_DIR, check_table, schedule_order, slug, table_path, tuned_options
from tests.reference import reference_simpo, rel_err
from tests.triton_helpers import make_batch, reference_with_grads

CPU = torch.device("cpu")


def entry(schedule="fused", tokens=64, hidden=40, vocab=300, dtype="float32", **options):
    return {"schedule": schedule, "dtype": dtype, "tokens": tokens, "hidden": hidden, "vocab": vocab,
            "options": options}


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A ``$SIMPO_TUNED_DIR`` and a writer of the CPU 'device' table in it."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path))

    def write(table, name="cpu"):
        table_path(name).write_text(json.dumps(table))

    return write


def test_slug_and_path():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert table_path("NVIDIA H200", "/x").name == "nvidia-h200.json"


def test_make_config_follows_the_nearest_entry_and_caller_options_win(tuned_dir):
    tuned_dir({"configs": [entry(tokens=64, block_v=64, atomic_sem="acq_rel"),
                           entry(tokens=4096, block_v=128),
                           entry(schedule="pairs", logits_block_v=128),
                           entry(dtype="float16", block_v=16)]})
    cfg = make_config(CPU, torch.float32, {}, schedule="fused", shape=(100, 40, 300))
    assert (cfg.block_v, cfg.atomic_sem) == (64, "acq_rel")
    assert make_config(CPU, torch.float32, {}, schedule="fused", shape=(3000, 40, 300)).block_v == 128
    assert make_config(CPU, torch.float32, {"block_v": 16}, schedule="fused", shape=(100, 40, 300)).block_v == 16
    assert make_config(CPU, torch.float16, {}, schedule="fused", shape=(100, 40, 300)).block_v == 16
    assert make_config(CPU, torch.float32, {}, schedule="pairs", shape=(9, 40, 300)).logits_block_v == 128
    assert make_config(CPU, torch.float32, {}, schedule="vocab", shape=(9, 40, 300)) == INTERPRETER_CONFIG
    assert make_config(CPU, torch.float32, {}) == INTERPRETER_CONFIG  # no schedule/shape: no table
    assert tuned_options("other GPU", "fused", "float32", 64, 40, 300) == {}


def test_schedule_order_from_the_table(tuned_dir):
    tuned_dir({"schedule_order": ["fused", "vocab", "pairs"], "configs": []})
    assert schedule_order("cpu") == ("fused", "vocab", "pairs")
    assert schedule_order("NVIDIA H100 80GB HBM3") is None


@pytest.mark.parametrize("table, match", [
    ({"schedule_order": ["tokens"]}, "schedule_order"),
    ({"schedule_order": ["fused", "fused"]}, "schedule_order"),
    ({"configs": [entry(schedule="tokens")]}, "unknown schedule"),
    ({"configs": [dict(entry(), options=[3])]}, "options must be an object"),
    ({"configs": [entry(tokens=0)]}, "tokens must be a positive int"),
    ([1, 2], "JSON object"),
])
def test_bad_tables_are_refused(table, match):
    with pytest.raises(ValueError, match=match):
        check_table(table, "t.json")


@pytest.mark.parametrize("options, match", [
    ({"block_v": 48}, "block_v must be a power of two"),
    ({"blocks": 3}, r"unknown KernelConfig fields \['blocks'\]"),
])
def test_a_bad_entry_in_a_table_names_the_file(tuned_dir, options, match):
    tuned_dir({"configs": [entry(**options)]})
    with pytest.raises(ValueError, match=r"cpu\.json: entry for 'fused': " + match):
        make_config(CPU, torch.float32, {}, schedule="fused", shape=(64, 40, 300))


def inputs(seed=0):
    """``[4, 9, 40]`` hidden, ``[300, 40]`` weight (logits ~3), labels with 3-position prompts."""
    hidden, weight, _, labels = make_batch(2, 9, 40, 300, torch.float32, prefix=3, scale=3.0, seed=seed)
    return hidden, weight, labels


@pytest.mark.parametrize("schedule, options", [
    ("fused", {"atomic_sem": "acq_rel"}),
    ("fused", {"group_n": 1, "bwd_group_n": 1, "v_splits": 1}),
    ("fused", {"block_n": 32, "block_v": 16, "bwd_block_n": 32, "bwd_block_v": 16}),
    ("pairs", {"logits_block_v": 16, "logits_num_warps": 2}),
    ("vocab", {"logits_block_v": 256}),
])
def test_kernel_options_select_variants_of_the_same_function(schedule, options):
    hidden, weight, labels = inputs()
    opts = dict(beta=2.5, gamma_beta_ratio=0.3)
    ref, (dh_ref, dw_ref, _) = reference_with_grads(hidden, weight, None, labels, softcap=5.0, options=opts)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = simpo_loss(h, w, labels, backend="triton", schedule=schedule, kernel_options=dict(options),
                     softcap=5.0, **opts)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    assert rel_err(out.loss, ref["loss"]) < 1e-5
    assert rel_err(dh, dh_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5


def test_a_tuned_table_is_used_by_simpo_loss(tuned_dir, monkeypatch):
    """The table reaches the launch: a table entry that names an invalid value makes the call fail
    (so the table was read), and a valid one leaves the result exact."""
    hidden, weight, labels = inputs(1)
    tuned_dir({"configs": [entry(tokens=24, logits_block_v=48, schedule="vocab")]})
    with pytest.raises(ValueError, match="logits_block_v must be a power of two"):
        simpo_loss(hidden, weight, labels, backend="triton", schedule="vocab")
    tuned_dir({"configs": [entry(tokens=24, logits_block_v=16, schedule="vocab")]})
    got = simpo_loss(hidden, weight, labels, backend="triton", schedule="vocab").loss
    ref = reference_simpo(hidden.double(), weight.double(), labels)["loss"]
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(backend="triton", kernel_options=[("block_n", 32)]), TypeError, "kernel_options must be a dict"),
    (dict(backend="triton", kernel_options={"blockn": 32}), TypeError, "unknown triton backend option"),
    (dict(backend="triton", kernel_options={"atomic_sem": "seq_cst"}), ValueError, "atomic_sem must be one of"),
    (dict(backend="torch", kernel_options={"block_n": 32}), ValueError, "kernel_options is an option of backend='triton'"),
    (dict(backend="eager", kernel_options={"block_n": 32}), ValueError, "kernel_options is an option of backend='triton'"),
])
def test_kernel_options_errors(kwargs, exc, match):
    hidden, weight, labels = inputs(2)
    with pytest.raises(exc, match=match):
        simpo_loss(hidden, weight, labels, **kwargs)
