"""``simpo-data``: on-policy preference data (generate -> score -> binarize) on the embedded tiny
policy and reward models, on CPU. Real transformers generation and sequence classification,
real ``datasets`` loading, real subprocesses killed with SIGKILL, real ``torch.distributed`` ranks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simpo.onpolicy.binarize import binarize
from simpo.onpolicy.cli import main
from simpo.onpolicy.generate import SeededSampler, load_prompts, prompt_of
from tests.multiproc import ROOT, free_port, subprocess_env

PROMPTS = 24
# the embedded recipe, smaller: 24 prompts, 12 new tokens, batches of 4 prompts (20 rows)
COMMON = ["--max_prompts", str(PROMPTS), "--max_tokens", "12", "--generation_batch_size", "4",
          "--score_batch_size", "10"]
OFFICIAL_COLUMNS = {"prompt_id", "prompt", "all_generated_responses", "all_rm_scores", "chosen",
                    "rejected"}
SEEDS = [13, 21, 42, 79, 100]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(out: Path, *extra: str) -> int:
    return main([*COMMON, "--output_dir", str(out), *extra])


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simpo.onpolicy", *COMMON, "--output_dir", str(out), *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one torch thread, as the subprocesses (OMP_NUM_THREADS=1): the reward
    model's sums, and so the scores' last bits, depend on the thread count, and the tests compare
    files byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> Path:
    """One uninterrupted run of the whole pipeline, in this process."""
    out = tmp_path_factory.mktemp("onpolicy") / "ref"
    assert _run(out) == 0
    return out


# ----------------------------------------------------------------------------- schema

def test_every_step_writes_its_schema_and_binarize_keeps_best_and_worst(reference):
    generated = _lines(reference / "generated.jsonl")
    assert [r["index"] for r in generated] == list(range(PROMPTS))
    shipped = [json.loads(x)["prompt"] for x in
               (Path(ROOT) / "simpo" / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in generated] == list(dict.fromkeys(shipped))[:PROMPTS]
    for r in generated:
        assert len(r["all_generated_responses"]) == len(r["finish_reasons"]) == len(SEEDS)
        assert set(r["finish_reasons"]) <= {"stop", "length"}
    scored = {r["index"]: r for r in _lines(reference / "scored.jsonl")}
    rows = _lines(reference / "train.jsonl")
    report = json.loads((reference / "report.json").read_text())
    assert report["binarize"]["pairs"] == len(rows) > 0
    assert (report["binarize"]["pairs"] + report["binarize"]["dropped_identical_responses"]
            + report["binarize"]["dropped_ties"]) == PROMPTS
    by_prompt = {r["prompt"]: r for r in generated}
    for row in rows:
        assert set(row) == OFFICIAL_COLUMNS
        record = by_prompt[row["prompt"]]
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert row["all_generated_responses"] == record["all_generated_responses"]
        scores = row["all_rm_scores"]
        assert scores == scored[record["index"]]["all_rm_scores"]
        assert all(isinstance(s, float) for s in scores) and len(scores) == len(SEEDS)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        user = {"role": "user", "content": row["prompt"]}
        responses = row["all_generated_responses"]
        assert row["chosen"] == [user, {"role": "assistant", "content": responses[best]}]
        assert row["rejected"] == [user, {"role": "assistant", "content": responses[worst]}]
        assert scores[best] > scores[worst]


def test_scores_are_the_reward_models_one_sequence_at_a_time_scores(reference):
    """Batched, right-padded scoring equals the official one-sequence-per-forward scoring."""
    from simpo.onpolicy.models import load_reward_model, load_tokenizer

    generated = _lines(reference / "generated.jsonl")
    tok = load_tokenizer("tiny", trust_remote_code=False, chat_template=None,
                         prompt_texts=[r["prompt"] for r in generated], role="reward model")
    model = load_reward_model("tiny", tok, dtype="auto", trust_remote_code=False, device="cpu")
    scored = {r["index"]: r["all_rm_scores"] for r in _lines(reference / "scored.jsonl")}
    for record in generated[:6]:
        for k, response in enumerate(record["all_generated_responses"]):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": response}]
            ids = tok(tok.apply_chat_template(messages, tokenize=False),
                      add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                one = model(ids).logits.float().item()
            assert abs(one - scored[record["index"]][k]) <= 1e-5 * max(1.0, abs(one))


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampler_draws_from_the_nucleus_with_the_tempered_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_p, rows = 0.8, 0.9, 4000
    probs = torch.softmax(logits.double() / temperature, dim=0)
    before = probs.cumsum(0) - probs
    keep = before < top_p  # probs are sorted: the nucleus is a prefix
    assert 1 < int(keep.sum()) < len(logits)
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    sampler = SeededSampler([torch.Generator().manual_seed(i) for i in range(rows)], temperature,
                            top_p)
    out = sampler(None, logits.expand(rows, -1).clone())
    assert torch.isfinite(out).sum(dim=1).eq(1).all()  # one possible token per row
    chosen = out.argmax(dim=1)
    freq = torch.bincount(chosen, minlength=len(logits)).double() / rows
    assert freq[~keep].sum() == 0
    assert (freq - expected).abs().max() < 0.03, (freq, expected)
    again = SeededSampler([torch.Generator().manual_seed(i) for i in range(rows)], temperature,
                          top_p)(None, logits.expand(rows, -1).clone()).argmax(dim=1)
    assert torch.equal(chosen, again)  # the same seeds draw the same tokens
    greedy = SeededSampler([torch.Generator()] * 2, 0.0, top_p)(None, logits.expand(2, -1).clone())
    assert greedy.argmax(dim=1).tolist() == [0, 0]


def test_a_sample_depends_on_its_seed_only(reference, tmp_path):
    """Same settings: the same responses, whatever the batch size. Another last seed changes the
    last sample of (nearly) every prompt and leaves the other four as they were."""
    ref = _lines(reference / "generated.jsonl")
    assert _run(tmp_path / "again", "--steps", "generate", "--generation_batch_size", "7") == 0
    assert _lines(tmp_path / "again" / "generated.jsonl") == ref
    assert _run(tmp_path / "seed", "--steps", "generate", "--seeds", "13", "21", "42", "79",
                "101") == 0
    other = _lines(tmp_path / "seed" / "generated.jsonl")
    for a, b in zip(ref, other):
        assert a["all_generated_responses"][:4] == b["all_generated_responses"][:4]
    changed = sum(a["all_generated_responses"][4] != b["all_generated_responses"][4]
                  for a, b in zip(ref, other))
    assert changed >= PROMPTS // 2


# ----------------------------------------------------------------------------- kill -9 and resume

def _shard_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob("shard-*.jsonl"))


def _kill_when(cmd: list[str], directory: Path, at_lines: int, timeout: float = 120):
    """Start ``cmd``, SIGKILL it once ``directory``'s shards hold ``at_lines`` lines. Returns
    ``(killed, lines there after it)``; ``killed`` is False when the run ended first (a poller
    starved on a busy machine), which the caller allows."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if directory.is_dir() and _shard_lines(directory) >= at_lines:
                break
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed, _shard_lines(directory)


def test_kill9_at_random_points_loses_and_duplicates_nothing(tmp_path):
    seed = int(os.environ.get("SIMPO_KILL_SEED") or random.randrange(1 << 30))
    print(f"kill points drawn with SIMPO_KILL_SEED={seed}")
    rng = random.Random(seed)
    # batches of one prompt in both steps: a kill can land between any two prompts, and every
    # kill point leaves at least half the step's batches (and the process's exit) to go
    options = ["--generation_batch_size", "1", "--score_batch_size", "5"]
    reference = tmp_path / "uninterrupted"
    assert _run(reference, *options) == 0
    scored = len(_lines(reference / "scored.jsonl"))
    out = tmp_path / "killed"
    cmd = _cmd(out, *options)
    seen = []
    for at in sorted(rng.sample(range(1, PROMPTS // 2), 2)):
        seen.append(("generate", at, *_kill_when(cmd, out / "generate", at)))
    at = rng.randrange(1, scored // 2)
    seen.append(("score", at, *_kill_when(cmd, out / "score", at)))
    print("kills (step, at lines, killed, lines after the kill):", seen)
    assert any(killed for _, _, killed, _ in seen), seen
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("generated.jsonl", "scored.jsonl", "train.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # every index written exactly once over all shards and all runs
    assert _shard_lines(out / "generate") == PROMPTS
    assert _shard_lines(out / "score") == scored
    report = json.loads((out / "report.json").read_text())
    assert report["generate"]["duplicate_records"] == report["score"]["duplicate_records"] == 0
    # the last run resumed scoring from exactly what the killed one had written
    assert report["score"]["resumed_with"] == seen[-1][3]


def test_a_torn_last_line_is_cut_and_its_prompt_generated_again(reference, tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(reference / "generate", out / "generate")
    shard = out / "generate" / "shard-000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-3]) + lines[-3][:40])  # two records lost, one torn
    assert _run(out, "--steps", "generate") == 0
    assert (out / "generated.jsonl").read_bytes() == (reference / "generated.jsonl").read_bytes()
    assert _shard_lines(out / "generate") == PROMPTS
    assert json.loads((out / "report.json").read_text())["generate"]["resumed_with"] == PROMPTS - 3


def test_two_ranks_split_the_work_and_write_what_one_process_writes(reference, tmp_path):
    """``accelerate launch`` on 2 CPU processes (the recipe's use_cpu; gloo)."""
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                           "--num_processes", "2", "--main_process_port", str(free_port()),
                           "-m", "simpo.onpolicy", *COMMON, "--output_dir", str(out)],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("generated.jsonl", "scored.jsonl", "train.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for step in ("generate", "score"):
        shards = sorted((out / step).glob("shard-*.jsonl"))
        assert [p.name for p in shards] == ["shard-000.jsonl", "shard-001.jsonl"]
        assert all(p.stat().st_size > 0 for p in shards)
    assert _shard_lines(out / "generate") == PROMPTS


# ----------------------------------------------------------------------------- drop rules

def _record(index, responses):
    return {"index": index, "prompt_id": str(index), "prompt": f"p{index}",
            "all_generated_responses": responses}


def test_binarize_drops_identical_responses_and_ties_and_counts_them():
    generated = [_record(0, ["a", "a", "a"]), _record(1, ["a", "b", "a"]),
                 _record(2, ["a", "b", "c"]), _record(3, ["x", "y", "z"])]
    scored = {1: {"all_rm_scores": [0.5, 0.5, 0.5]},      # a tie: no preference
              2: {"all_rm_scores": [1.0, 3.0, 3.0]},      # two best: the first one wins
              3: {"all_rm_scores": [-1.0, 2.0, -1.0]}}    # two worst: the first one
    rows, report = binarize(generated, scored)
    assert report == {"prompts": 4, "pairs": 2, "dropped_identical_responses": 1,
                      "dropped_ties": 1, "pairs_with_an_empty_response": 0}
    assert [r["prompt"] for r in rows] == ["p2", "p3"]
    assert [r["chosen"][-1]["content"] for r in rows] == ["b", "y"]
    assert [r["rejected"][-1]["content"] for r in rows] == ["a", "x"]


def test_a_conversation_prompt_reaches_simpo_train_whole():
    from simpo.data import split_row

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    record = {"index": 0, "prompt_id": "c", "prompt": turns, "all_generated_responses": ["a", "b"]}
    rows, _ = binarize([record], {0: {"all_rm_scores": [0.0, 1.0]}})
    assert rows[0]["prompt"] == "And now?"
    assert rows[0]["chosen"] == turns + [{"role": "assistant", "content": "b"}]
    parts, why = split_row(rows[0])
    assert why is None and parts.prompt == turns
    assert parts.chosen[-1]["content"] == "b" and parts.rejected[-1]["content"] == "a"


def test_greedy_sampling_gives_identical_responses_that_are_dropped_unscored(tmp_path, capsys):
    out = tmp_path / "greedy"
    assert _run(out, "--temperature", "0") == 1
    err = capsys.readouterr().err
    assert f"{PROMPTS} with identical responses not scored" in err
    assert (f"simpo-data: error: binarize: no preference pair is left of {PROMPTS} prompts "
            f"({PROMPTS} with identical responses, 0 ties)") in err
    assert _lines(out / "scored.jsonl") == [] and not (out / "train.jsonl").exists()


def _save_tiny_reward_model(path: Path, prompts: list[str], *, zero_head: bool = False,
                            labels: int = 1) -> str:
    from simpo.onpolicy.models import build_tiny_reward_model, tiny_tokenizer

    tok = tiny_tokenizer(prompts)
    model = build_tiny_reward_model(tok)
    if labels != 1:
        model.config.num_labels = labels
        model.score = torch.nn.Linear(model.config.hidden_size, labels, bias=False)
    if zero_head:
        torch.nn.init.zeros_(model.score.weight)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_each_distinct_response_goes_through_the_reward_model_once(reference):
    from simpo.onpolicy.config import OnPolicyConfig
    from simpo.onpolicy.models import load_reward_model, load_tokenizer
    from simpo.onpolicy.score import RewardScorer

    records = [_record(0, ["a b", "c", "a b", "c", "d"]), _record(1, ["x", "y", "x", "x", "x"])]
    tok = load_tokenizer("tiny", trust_remote_code=False, chat_template=None,
                         prompt_texts=["p0", "p1"], role="reward model")
    model = load_reward_model("tiny", tok, dtype="auto", trust_remote_code=False, device="cpu")
    rows = []
    model.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    scored = RewardScorer(model, tok, OnPolicyConfig(score_batch_size=2), "cpu").score_records(records)
    assert sum(rows) == 5 and max(rows) <= 2  # 3 + 2 distinct responses, in batches of 2
    a, b = scored[0]["all_rm_scores"], scored[1]["all_rm_scores"]
    assert a[0] == a[2] and a[1] == a[3] and b[0] == b[2] == b[3] == b[4]


def test_ties_from_a_saved_scalar_head_are_dropped(reference, tmp_path, capsys):
    """A saved reward model (loaded by path) whose head is zero gives every response 0.0."""
    prompts = [r["prompt"] for r in _lines(reference / "generated.jsonl")]
    rm = _save_tiny_reward_model(tmp_path / "rm", prompts, zero_head=True)
    out = tmp_path / "ties"
    shutil.copytree(reference / "generate", out / "generate")
    shutil.copy(reference / "generated.jsonl", out / "generated.jsonl")
    assert _run(out, "--steps", "score", "binarize", "--reward_model", rm) == 1
    err = capsys.readouterr().err
    assert f"(0 with identical responses, {PROMPTS} ties)" in err
    assert all(set(r["all_rm_scores"]) == {0.0} for r in _lines(out / "scored.jsonl"))


def test_a_saved_policy_and_reward_model_give_the_tiny_ones_outputs(reference, tmp_path):
    from simpo.onpolicy.models import TINY_POLICY_SEED, TINY_SIZES, tiny_tokenizer
    from simpo.modeling import build_tiny_model

    prompts = [r["prompt"] for r in _lines(reference / "generated.jsonl")]
    tok = tiny_tokenizer(prompts)
    torch.manual_seed(TINY_POLICY_SEED)
    policy = build_tiny_model(tok, **TINY_SIZES)
    # sampling settings saved with a policy do not reach the samples (the official ones had none)
    policy.generation_config.repetition_penalty = 10.0
    policy.generation_config.no_repeat_ngram_size = 1
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rm = _save_tiny_reward_model(tmp_path / "rm", prompts)
    out = tmp_path / "saved"
    assert _run(out, "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", rm) == 0
    assert _lines(out / "generated.jsonl") == _lines(reference / "generated.jsonl")
    rows, expected = _lines(out / "train.jsonl"), _lines(reference / "train.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in rows] == \
        [(r["chosen"], r["rejected"]) for r in expected]
    got = torch.tensor([r["all_rm_scores"] for r in rows])
    assert torch.allclose(got, torch.tensor([r["all_rm_scores"] for r in expected]), rtol=1e-5,
                          atol=1e-6)


def test_an_armo_style_remote_code_reward_model_is_scored_by_its_score_output(reference, tmp_path,
                                                                             capsys):
    """A reward model whose code comes with it (transformers' trust_remote_code loading, as
    ArmoRM's), with a gated multi-objective ``score`` and no logits."""
    from simpo.modeling import tiny_gemma2_config
    from simpo.onpolicy.models import TINY_SIZES, tiny_tokenizer

    fixture = Path(ROOT) / "tests" / "fixtures" / "armo_style_reward" / "modeling_armo_style.py"
    spec = importlib.util.spec_from_file_location("modeling_armo_style", fixture)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = _lines(reference / "generated.jsonl")
    tok = tiny_tokenizer([r["prompt"] for r in generated])
    config = tiny_gemma2_config(len(tok), pad_token_id=tok.pad_token_id, **TINY_SIZES)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_armo_style.ArmoStyleRewardModel"}
    torch.manual_seed(7)
    model = module.ArmoStyleRewardModel(config).eval()
    rm = tmp_path / "armo"
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    shutil.copy(fixture, rm / fixture.name)
    out = tmp_path / "armo-run"
    shutil.copytree(reference / "generate", out / "generate")
    shutil.copy(reference / "generated.jsonl", out / "generated.jsonl")
    # untrusted, transformers would load a plain Gemma2ForSequenceClassification, head untrained
    assert _run(out, "--steps", "score", "binarize", "--reward_model", str(rm)) == 1
    assert ("comes with its own modelling code for AutoModelForSequenceClassification "
            "(modeling_armo_style.ArmoStyleRewardModel): set reward_trust_remote_code true"
            in capsys.readouterr().err)
    assert not list((out / "score").glob("shard-*"))
    assert _run(out, "--steps", "score", "binarize", "--reward_model", str(rm),
                "--reward_trust_remote_code", "true") == 0
    scored = {r["index"]: r["all_rm_scores"] for r in _lines(out / "scored.jsonl")}
    for record in generated[:4]:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["all_generated_responses"][0]}]
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            official = model(ids).score.float().item()
        assert abs(official - scored[record["index"]][0]) <= 1e-5 * max(1.0, abs(official))
    assert len(_lines(out / "train.jsonl")) > 0


def test_a_reward_model_with_an_untrained_head_is_refused(reference, tmp_path, capsys):
    """A causal LM's checkpoint loads as a sequence classifier with a fresh score head."""
    from simpo.modeling import build_tiny_model
    from simpo.onpolicy.models import tiny_tokenizer

    generated = _lines(reference / "generated.jsonl")
    tok = tiny_tokenizer([r["prompt"] for r in generated])
    build_tiny_model(tok, hidden_size=32).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out = tmp_path / "lm-run"
    shutil.copy(reference / "generated.jsonl", out.mkdir() or out / "generated.jsonl")
    assert _run(out, "--steps", "score", "--reward_model", str(tmp_path / "lm")) == 1
    assert "has no trained weights for score.weight" in capsys.readouterr().err


def test_a_reward_model_without_a_scalar_score_is_refused(reference, tmp_path, capsys):
    prompts = [r["prompt"] for r in _lines(reference / "generated.jsonl")]
    rm = _save_tiny_reward_model(tmp_path / "rm3", prompts, labels=3)
    out = tmp_path / "three"
    shutil.copytree(reference / "generate", out / "generate")
    shutil.copy(reference / "generated.jsonl", out / "generated.jsonl")
    assert _run(out, "--steps", "score", "--reward_model", rm) == 1
    assert "gives 3 logits per sequence and no scalar `score` output" in capsys.readouterr().err


# ----------------------------------------------------------------------------- prompts, options

def test_prompts_come_from_every_accepted_row_format():
    user = [{"role": "user", "content": "Hi there?"}]
    answer = [{"role": "assistant", "content": "Hello."}]
    other = [{"role": "assistant", "content": "Bye."}]
    assert prompt_of({"prompt": "Hi there?", "chosen": user + answer, "rejected": user + other}) \
        == ("Hi there?", None)                                        # official schema
    assert prompt_of({"prompt": "Hi there?"}) == ("Hi there?", None)    # TRL prompt-only
    assert prompt_of({"prompt": user}) == (user, None)                 # ... conversational
    assert prompt_of({"prompt": user, "chosen": answer, "rejected": other}) == (user, None)
    assert prompt_of({"chosen": user + answer, "rejected": user + other}) == (user, None)
    assert prompt_of({"prompt": "Say it:", "chosen": " yes", "rejected": " no"}) \
        == ("Say it:", None)
    assert prompt_of({"chosen": "Say it: yes", "rejected": "Say it: no"}) == ("Say it:", None)
    assert prompt_of({"prompt": user + answer})[0] is None             # ends with the answer
    assert prompt_of({"prompt": "  "})[0] is None
    assert prompt_of({"text": "x"})[0] is None


def test_prompts_of_a_file_are_deduplicated_and_unusable_rows_counted(tmp_path):
    from simpo.onpolicy.config import OnPolicyConfig

    rows = [{"prompt": "A?"}, {"prompt": "B?"}, {"prompt": "A?"}, {"prompt": " "},
            {"prompt": "C?"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, ids, counts = load_prompts(OnPolicyConfig(dataset_name=str(path)))
    assert prompts == ["A?", "B?", "C?"]
    assert ids == [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
    assert counts["rows"] == 5 and counts["duplicates"] == 1 and sum(counts["unusable"].values()) == 1
    prompts, _, _ = load_prompts(OnPolicyConfig(dataset_name=str(path), max_prompts=2))
    assert prompts == ["A?", "B?"]


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "temperature: must be >= 0, got -1.0"),
    (["--top_p", "0"], "top_p: must be in (0, 1], got 0.0"),
    (["--seeds", "13"], "seeds: must be at least two (one response per seed; a preference needs two), got [13]"),
    (["--seeds", "13", "13"], "seeds: must be distinct, got [13, 13]"),
    (["--steps", "sample"], "steps: ['sample'] is not a list of generate, score, binarize"),
    (["--backend", "vllm"], "backend vllm: vllm is not installed here"),
    (["--chat_template", "None"], "chat_template: 'None' is not a template"),
    (["--chat_template", "gemmma"], "chat_template: 'gemmma' is neither a template name"),
    (["--max_prompt", "3"], "unknown option --max_prompt"),
    (["no-such-recipe"], "recipe 'no-such-recipe' is neither a file nor a packaged"),
    (["--dataset_name", "missing/prompts.jsonl"], "data path not found: missing/prompts.jsonl"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, message):
    code = main([*argv, "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count("\n") == 1 and err.startswith("simpo-data: error: "), err
    assert message in err, err


def test_data_without_a_usable_prompt_is_one_line(tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert main(["--dataset_name", str(path), "--output_dir", str(tmp_path / "x")]) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if "simpo-data" in x]
    assert len(lines) == 1, lines  # (datasets' own progress bar may precede it)
    assert (f"simpo-data: error: no usable prompt in {path} (split train): 2 rows: no prompt column "
            f"(and no chosen/rejected to take one from)") == lines[0]


def test_a_step_before_its_input_exists_and_other_settings_are_refused(reference, tmp_path, capsys):
    assert _run(tmp_path / "empty", "--steps", "score") == 1
    assert "generated.jsonl not found: run the generate step first" in capsys.readouterr().err
    out = tmp_path / "mixed"
    shutil.copytree(reference / "generate", out / "generate")
    assert _run(out, "--steps", "generate", "--top_p", "0.9") == 1
    err = capsys.readouterr().err
    assert "holds the generate output of other settings (differing: top_p)" in err
    assert _lines(out / "generate" / "shard-000.jsonl") == _lines(reference / "generate" / "shard-000.jsonl")


def test_help_lists_the_recipes_defaults(capsys):
    assert main(["--help"]) == 0
    tiny = capsys.readouterr().out
    assert "usage: simpo-data" in tiny and "(default: 24)" in tiny
    assert main(["gemma-2-9b-it", "--help"]) == 0
    official = "".join(capsys.readouterr().out.split())  # help wraps long defaults, at hyphens too
    for default in ("(default: 4096)", "(default: [13, 21, 42, 79, 100])", "(default: 0.8)",
                    "(default: 0.95)", "(default: RLHFlow/ArmoRM-Llama3-8B-v0.1)"):
        assert "".join(default.split()) in official, default


# ----------------------------------------------------------------------------- into simpo-train

def test_simpo_train_trains_on_the_binarized_file(reference, tmp_path):
    pairs = len(_lines(reference / "train.jsonl"))
    out = tmp_path / "train"
    proc = subprocess.run([sys.executable, "-m", "simpo.train", "--dataset_name",
                           str(reference / "train.jsonl"), "--max_steps", "2", "--logging_steps",
                           "1", "--output_dir", str(out)],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_samples"] == pairs
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
