"""Step 3, binarize: the preference pairs, in the official schema.

As the official ``reward_model_annotate.py`` (and ``post_process.py`` before it): the response
with the highest reward is ``chosen`` and the one with the lowest ``rejected`` (the first of
equals, as ``numpy.argmax`` / ``argmin``), each as ``[user prompt, assistant response]``
messages, next to ``prompt``, ``prompt_id``, ``all_generated_responses`` and ``all_rm_scores``.
A prompt given as a conversation keeps it whole in ``chosen`` / ``rejected`` (which is where
``simpo-train`` reads the prompt of these rows); ``prompt`` is then the text of its last turn, so
the column stays text as in the official data.
Dropped, counted and reported: prompts whose responses are all identical (the official rule), and
ties, where every distinct response has the same reward and so no preference is left (the
official script would have kept a pair of two equal responses).
"""

from __future__ import annotations

from .generate import prompt_messages
from .score import scorable


def pair(record: dict, scores: list[float]) -> dict:
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    responses = record["all_generated_responses"]
    messages = prompt_messages(record["prompt"])
    prompt = record["prompt"] if isinstance(record["prompt"], str) else messages[-1]["content"]
    return {"prompt_id": record["prompt_id"], "prompt": prompt,
            "all_generated_responses": responses, "all_rm_scores": scores,
            "chosen": messages + [{"role": "assistant", "content": responses[best]}],
            "rejected": messages + [{"role": "assistant", "content": responses[worst]}]}


def binarize(generated: list[dict], scored: dict[int, dict]) -> tuple[list[dict], dict]:
    """``(rows, report)``: the pairs in prompt order, and the counts of what was kept and dropped."""
    rows, identical, ties, empty = [], 0, 0, 0
    for record in generated:
        if not scorable(record):
            identical += 1
            continue
        scores = scored[record["index"]]["all_rm_scores"]
        if max(scores) == min(scores):
            ties += 1
            continue
        row = pair(record, scores)
        empty += not (row["chosen"][-1]["content"].strip() and row["rejected"][-1]["content"].strip())
        rows.append(row)
    report = {"prompts": len(generated), "pairs": len(rows),
              "dropped_identical_responses": identical, "dropped_ties": ties,
              "pairs_with_an_empty_response": empty}
    return rows, report
