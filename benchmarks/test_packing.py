"""benchmarks.packing: the counts, FLOPs, truncation rule, batch order and packed batches on inputs
with hand-computed answers; the synthetic UltraFeedback-like lengths against their named source;
one small end-to-end run of the measurement writing its two files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import packing as K


def test_tokens_and_attention_of_one_step_by_hand():
    # pairs (5, 4) and (3, 2): chosen 5, 3 then rejected 4, 2; rows of at most 8
    lengths = [5, 3, 4, 2]
    t = K.step_tokens(lengths, 8)
    # padded: 4 x 5; first-fit decreasing: 5 | 4 | 3 -> row of 5 | 2 -> row of 4: rows (8, 6), width 8
    assert (t["real"], t["padded"], t["packed"], t["rows"], t["width"], t["one_row"]) == (14, 20, 16, 2, 8, 14)
    assert t["row_lengths"] == [8, 6]
    # min-token capacity: 7 packs (5+2, 4+3) into 2 rows of 7 = 14 (capacity 5 gives 3 x 5, 8 gives 16)
    assert (t["packed_min"], t["rows_min"]) == (14, 2)
    a = K.attention_blocks(lengths, 8)
    assert a == {"padded_eager": 4 * 25, "padded_causal": 4 * 15, "packed_eager": 2 * 64,
                 "packed_min_eager": 2 * 49, "varlen": 15 + 6 + 10 + 3}


def test_the_collators_plan_never_costs_more_than_padding():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        lengths = torch.randint(1, 40, (int(torch.randint(2, 17, (1,), generator=g)),), generator=g).tolist()
        best = K.plan_rows(lengths, 64)
        assert best.tokens <= K.padded_tokens(lengths) and best.width <= 64
        assert sorted(i for row in best.rows for i in row) == list(range(len(lengths)))
    # short alike sequences: rows of max_length cost more than padding, the chosen capacity does not
    lengths = [24, 26, 23, 25, 27, 24, 23, 23] * 2
    assert K.first_fit(lengths, 128).tokens > K.padded_tokens(lengths) >= K.plan_rows(lengths, 128).tokens


def test_decoder_flops_by_hand_and_the_gemma2_9b_shape():
    cfg = {"hidden_size": 2, "intermediate_size": 3, "num_hidden_layers": 1, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": 2}
    # q/k/v 2x(2+2+2) + o 2x2 + gate/up/down 3x2x3 = 12 + 4 + 18
    assert K.non_embedding_params(cfg) == 34
    assert K.decoder_flops(10, 7, cfg) == {"linear": 6 * 34 * 10, "attention": 12 * 2 * 7, "total": 2040 + 168}
    # Gemma-2-9B: 42 x (3584 x (4096 + 2 x 2048) + 4096 x 3584 + 3 x 3584 x 14336)
    assert K.non_embedding_params(K.GEMMA2_9B) == 8_323_596_288


def test_truncation_rule_matches_tokenize_row():
    from simpo.data import tokenize_row
    from simpo.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["a b c"])
    for p, c, r in ((10, 20, 30), (100, 50, 30), (100, 100, 10), (30, 90, 120), (64, 64, 64)):
        out = tokenize_row("a " * p, "b " * c, "c " * r, tok, max_length=128, max_prompt_length=64)
        # the tokenizer adds BOS to the prompt and EOS to each response
        want = K.truncated_lengths(p + 1, c + 1, r + 1, 128, 64)
        assert (len(out["chosen_input_ids"]), len(out["rejected_input_ids"])) == want, (p, c, r)
    assert K.truncated_parts(100, 100, 10, 128, 64) == (64, 64, 10)


def test_official_batches_follow_accelerates_seeded_sampler():
    from accelerate.data_loader import SeedableRandomSampler

    n = 37
    sampler = SeedableRandomSampler(range(n), data_seed=42)
    batches = K.official_batches(n, 2, seed=42)
    assert [i for b in batches for i in b] == list(iter(sampler))
    assert [len(b) for b in batches] == [2] * 18 + [1]  # dataloader_drop_last off: the last is short
    with pytest.raises(ValueError, match="batch"):
        K.official_batches(5, 0)


def test_epoch_summary_by_hand():
    e = K.epoch_summary([(5, 4), (3, 2)], 2, 8, cfg=K.GEMMA2_9B)
    assert e["steps"] == 1 and e["tokens_total"]["padded"] == 20 and e["tokens_total"]["packed"] == 16
    assert e["tokens_saved_packed"] == pytest.approx(0.2) and e["padding_share_padded"] == pytest.approx(0.3)
    f = e["flops_per_step_computed"]
    P = K.non_embedding_params(K.GEMMA2_9B)
    per_pair = 12 * 256 * 16 * 42
    assert f["padded, eager attention"]["total"] == 6 * P * 20 + per_pair * 100
    assert f["one row, FlashAttention-2 varlen"]["total"] == 6 * P * 14 + per_pair * 34


def test_ultrafeedback_like_lengths_match_the_named_source():
    n = 20000
    uf = K.ultrafeedback_like(n, seed=42)
    assert uf["pairs"] == K.ultrafeedback_like(n, seed=42)["pairs"]  # seeded, deterministic
    assert uf["pairs"] != K.ultrafeedback_like(n, seed=43)["pairs"]
    # the drawn (untruncated) content lengths keep the published means: within 3 standard errors
    # of a log-normal sample mean (sigma 1.0: 0.93% at n = 20000; sigma 0.8 over 2n draws: 0.47%)
    prompt, resp = uf["prompt"], torch.cat([uf["chosen"], uf["rejected"]])
    assert abs(prompt.mean() / K.UF_SOURCE["instruction_mean_tokens"] - 1) < 0.03
    assert abs(resp.mean() / K.UF_SOURCE["completion_mean_tokens"] - 1) < 0.015
    assert abs(prompt.log().std() - K.UF_SIGMA["instruction"]) < 0.02
    assert abs(resp.log().std() - K.UF_SIGMA["completion"]) < 0.02
    assert (K.UF_SOURCE["instruction_mean_tokens"], K.UF_SOURCE["completion_mean_tokens"]) == (185.1, 305.3)
    # the official truncation rule holds every sequence to max_length, and pairs differ in length
    lengths = [x for pair in uf["pairs"] for x in pair]
    assert max(lengths) <= 2048 and min(lengths) >= 1 + K.GEMMA_TEMPLATE_TOKENS["prompt"]
    assert sum(c != r for c, r in uf["pairs"]) > 0.95 * n
    assert all(p + c == a and p + r == b for (p, c, r), (a, b) in zip(uf["parts"], uf["pairs"]))
    with pytest.raises(ValueError, match="max_prompt_length"):
        K.ultrafeedback_like(10, max_length=100, max_prompt_length=100)


def test_pack_sequences_by_hand():
    ids = [[1, 2, 3], [4, 5], [6], [7, 8]]
    labels = [[-100, 2, 3], [-100, 5], [6], [-100, 8]]
    b = K.pack_sequences(ids, labels, 5, pad_token_id=0, plan=K.first_fit([3, 2, 1, 2], 5))
    # first-fit decreasing at 5: 3 (0) | 2 (1) -> row 0 | 2 (3) -> row 1 | 1 (2) -> row 1; width 5
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 6, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 1]]  # row-end padding: its own run
    assert b["sequence_ids"].tolist() == [[0, 0, 0, 1, 1], [3, 3, 2, -1, -1]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 8, 6, -100, -100]]
    assert "attention_mask" not in b and all(t.dtype == torch.long for t in b.values())
    # the collator's plan: capacity 4 gives 2 full rows (8 tokens) where 5 gives 10
    assert K.pack_sequences(ids, labels, 5, pad_token_id=0)["input_ids"].tolist() == [[1, 2, 3, 6], [4, 5, 7, 8]]
    one = K.pack_sequences(ids, labels, 5, pad_token_id=0, one_row=True)
    assert one["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]] and one["sequence_ids"].min() == 0
    with pytest.raises(ValueError, match="sequence 1"):
        K.pack_sequences(ids, [[1, 2, 3], [4], [6], [7, 8]], 5, pad_token_id=0)


def test_the_measurement_writes_its_json_and_table(tmp_path):
    assert K.main(["--out", str(tmp_path), "--cpu-steps", "1", "--repeats", "1", "--uf-pairs", "300"]) == 0
    data = json.loads((tmp_path / "packing.json").read_text())
    assert set(data["epochs"]) == {"shipped_b2", "shipped_b8", "ultrafeedback_like"}
    assert [c["data"] == "shipped" for c in data["cpu"]] == [True, True, False]
    shipped = data["epochs"]["shipped_b2"]
    assert shipped["pairs"] == 303 and shipped["steps"] == math.ceil(303 / 2)
    uf = data["epochs"]["ultrafeedback_like"]
    assert uf["tokens_per_step"]["packed"] < uf["tokens_per_step"]["padded"]
    assert 0 < uf["flops_saved_computed"]["varlen vs padded causal"] < 1
    for c in data["cpu"]:  # the same pairs give the same loss in every layout (float32)
        assert c["max_abs_loss_difference"] < 1e-4 and all(v > 0 for v in c["seconds_median"].values())
    md = (tmp_path / "packing.md").read_text()
    assert "computed" in md and "CPU, tiny model" in md and "185.1" in md and "2310.01377" in md
