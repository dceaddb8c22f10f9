"""Forward of the fused Triton kernels from hidden states, vs the float64 reference.

On CPU these run in the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``).
Shapes are deliberately not multiples of any block size (interpreter blocks: 16 tokens, 32 vocab,
16 hidden; GPU blocks 64-128); tolerances are in :data:`tests.triton_helpers.TOL`.
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss
from tests.triton_helpers import (DEVICE, FORWARD_KEYS, TOL, check, make_batch, poison_uninitialized,
                                  reference_with_grads)

kernels = pytest.importorskip("simpo_kernels.kernels")

# (name, B, T, H, V, prefix, softcap, bias, logit scale)
CASES = [
    ("tiny_V_lt_block", 1, 2, 17, 13, 0, None, False, 2.0),
    ("softcap30_bias", 2, 9, 17, 150, 3, 30.0, True, 40.0),
    ("softcap5", 1, 11, 40, 77, 0, 5.0, False, 8.0),
    ("long_prefix", 2, 13, 33, 45, 10, None, True, 3.0),
    ("softcap30_wideH", 1, 6, 50, 97, 2, 30.0, False, 20.0),
]
DTYPES = [torch.float32, torch.float16]
OPTIONS = dict(beta=2.5, gamma_beta_ratio=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(case, dtype):
    name, B, T, H, V, prefix, softcap, bias, scale = case
    hidden, weight, b, labels = make_batch(B, T, H, V, dtype, prefix=prefix, bias=bias, scale=scale)
    with poison_uninitialized():
        out = simpo_loss(hidden, weight, labels, bias=b, softcap=softcap, backend="triton", schedule="fused", **OPTIONS)
    ref, _ = reference_with_grads(hidden, weight, b, labels, softcap=softcap, options=OPTIONS)
    tol = TOL[dtype]["fwd"]
    for key in FORWARD_KEYS:
        check(f"fwd/{name}/{dtype}", key, getattr(out, key), ref[key], tol)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_forward_sft_and_hinge(sft_weight):
    hidden, weight, b, labels = make_batch(2, 8, 19, 70, torch.float32, prefix=2, seed=3, scale=4.0)
    opts = dict(beta=1.5, gamma_beta_ratio=0.1, loss_type="hinge")
    opts["sft_weight"] = sft_weight
    out = simpo_loss(hidden, weight, labels, softcap=30.0, backend="triton", schedule="fused", **opts)
    ref, _ = reference_with_grads(hidden, weight, None, labels, softcap=30.0, options=opts)
    check(f"fwd/hinge_sft{sft_weight}", "loss", out.loss, ref["loss"], 1e-5)
    check(f"fwd/hinge_sft{sft_weight}", "chosen_logits_mean", out.chosen_logits_mean,
          ref["chosen_logits_mean"], 1e-5)
    if sft_weight:
        check(f"fwd/hinge_sft{sft_weight}", "sft_loss", out.sft_loss, ref["sft_loss"], 1e-5)


@pytest.mark.parametrize("blocks", [dict(block_n=16, block_v=16, block_h=16, v_splits=1),
                                    dict(block_n=32, block_v=16, block_h=32, v_splits=7),
                                    dict(block_n=16, block_v=64, block_h=16, v_splits=2),
                                    # raster groups: 3 token blocks (45 tokens / 16), groups of 2 leave a
                                    # partial last group; group_n 1 and 5 bracket it; v_splits 0 is automatic
                                    dict(block_n=16, block_v=16, block_h=16, v_splits=3, group_n=2),
                                    dict(block_n=16, block_v=16, block_h=16, v_splits=5, group_n=1),
                                    dict(block_n=16, block_v=16, block_h=16, v_splits=0, group_n=5),
                                    dict(block_n=16, block_v=32, block_h=16, v_splits=0, group_n=2,
                                         ctas_per_sm=3)],
                         ids=["one_split", "many_splits", "wide_vtile", "group2_partial", "group1",
                              "group5_auto", "group2_auto_ctas3"])
def test_token_logprobs_block_configs(blocks):
    """Direct kernel call: per-token logps and logit sums across block shapes and split counts."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 45, 23, 111
    hidden = torch.randn(N, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) / 2).to(DEVICE)
    bias = torch.randn(V, generator=g).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[::4] = -1
    logps, sums = kernels.token_logprobs(hidden, weight, bias, targets, softcap=5.0, ignore_index=-1,
                                         **blocks)
    z = 5.0 * torch.tanh((hidden.double() @ weight.double().T + bias.double()) / 5.0)
    ref = torch.where(targets >= 0, z.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    check("fwd/blocks", "token_logps", logps, ref, 1e-5)
    check("fwd/blocks", "logit_sums", sums, z.sum(-1), 1e-5)
    assert logps.dtype == sums.dtype == torch.float32
    assert not sums.requires_grad
    assert (logps[targets < 0] == 0).all()


def test_auto_splits_fill_the_resident_programs():
    """The split count covers every vocabulary tile, fills one raster group's resident programs, and
    wastes no more of the last wave than the least split count that fills them."""
    from simpo_kernels.kernels.lse_forward import auto_splits, plan_splits

    def waste(V, bv, n_blocks, splits, resident):
        s, per = plan_splits(V, bv, splits)
        waves = -(-n_blocks * s // resident)
        return 1 - n_blocks * (-(-V // bv)) / (waves * resident * per)

    for V, bv, n_blocks, group, resident in [(256000, 128, 64, 16, 132), (256000, 128, 16, 16, 132),
                                             (128256, 128, 256, 16, 132), (1000, 32, 3, 2, 4), (97, 32, 5, 8, 264)]:
        splits = auto_splits(V, bv, n_blocks, group, resident)
        s, per = plan_splits(V, bv, splits)
        n_tiles = -(-V // bv)
        assert (s - 1) * per < n_tiles <= s * per  # every split non-empty, every tile covered
        least = -(-resident // min(group, n_blocks))
        assert s >= min(least, n_tiles)
        assert waste(V, bv, n_blocks, splits, resident) <= waste(V, bv, n_blocks, least, resident) + 1e-12
    # the Gemma-2-9B head on 132 SMs: whole waves
    s, _ = plan_splits(256000, 128, auto_splits(256000, 128, 64, 16, 132))
    assert (64 * s) % 132 == 0


def test_float64_is_rejected_with_a_pointer():
    hidden, weight, _, labels = make_batch(1, 3, 17, 20, torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        simpo_loss(hidden, weight, labels, backend="triton")


def test_unknown_option_is_rejected():
    hidden = torch.randn(4, 17, device=DEVICE)
    weight = torch.randn(20, 17, device=DEVICE)
    with pytest.raises(TypeError, match="unknown triton backend option"):
        kernels.token_logprobs(hidden, weight, None, torch.zeros(4, dtype=torch.long, device=DEVICE),
                               softcap=None, ignore_index=-100, blocks=3)
    with pytest.raises(ValueError, match="power of two"):
        kernels.token_logprobs(hidden, weight, None, torch.zeros(4, dtype=torch.long, device=DEVICE),
                               softcap=None, ignore_index=-100, block_v=24)
