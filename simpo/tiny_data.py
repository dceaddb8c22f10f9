"""The small preference dataset shipped with the package (``simpo/data/{train,test}.jsonl``).

Rows follow the schema of ``princeton-nlp/gemma2-ultrafeedback-armorm``: ``prompt`` (string) and
``chosen`` / ``rejected`` as ``[user message, assistant message]`` lists. Every row asks a simple
question (addition of numbers up to 6, successor of a number, a capital city, an antonym); the chosen
answer is correct and the rejected one gives a wrong value in the same sentence frame, so the
preference can only be learned from the question, not from the style of the answer.

The test split uses question phrasings and wrong answers that never occur in training, on facts
that do occur there: reward accuracy on it measures whether the learned preference carries over
to new wording and new distractors.

Regenerate (deterministic): ``python -m simpo.tiny_data``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 1234

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Canada": "Ottawa", "Chile": "Santiago", "Poland": "Warsaw", "Cuba": "Havana",
    "Ireland": "Dublin", "Austria": "Vienna",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "old": "young", "open": "closed", "early": "late", "hard": "soft", "rich": "poor",
    "wet": "dry", "full": "empty", "loud": "quiet", "strong": "weak", "high": "low",
}

# (train phrasings, test phrasings) per task; {x}/{y} are filled from the fact.
PHRASES = {
    "add": (["What is {x} plus {y}?", "Compute {x} + {y}.", "Add {x} and {y}."],
            ["Tell me the sum of {x} and {y}."]),
    "next": (["What number comes after {x}?", "Which number follows {x}?",
              "What is {x} plus one?"],
             ["Count one up from {x}. What do you get?"]),
    "capital": (["What is the capital of {x}?", "Name the capital city of {x}.",
                 "Where is the government of {x} seated?"],
                ["Which city is the capital of {x}?"]),
    "opposite": (["What is the opposite of {x}?", "Give the antonym of {x}.",
                  "Which word is opposite in meaning to {x}?"],
                 ["Tell me a word that means the opposite of {x}."]),
}
ANSWER = {
    "add": "{x} plus {y} is {a}.",
    "next": "The number after {x} is {a}.",
    "capital": "The capital of {x} is {a}.",
    "opposite": "The opposite of {x} is {a}.",
}


def _facts():
    """Every (task, x, y, answer, distractor pool) fact of the dataset."""
    facts = []
    for x in range(7):
        for y in range(7):
            facts.append(("add", x, y, x + y, [v for v in range(13) if v != x + y]))
    for x in range(20):
        facts.append(("next", x, None, x + 1, [v for v in range(21) if v != x + 1]))
    for country, city in CAPITALS.items():
        facts.append(("capital", country, None, city, [c for c in CAPITALS.values() if c != city]))
    for word, opp in OPPOSITES.items():
        facts.append(("opposite", word, None, opp, [o for o in OPPOSITES.values() if o != opp]))
    return facts


def _row(task, phrase, x, y, answer, wrong):
    question = phrase.format(x=x, y=y)
    good = ANSWER[task].format(x=x, y=y, a=answer)
    bad = ANSWER[task].format(x=x, y=y, a=wrong)
    user = {"role": "user", "content": question}
    return {
        "prompt": question,
        "chosen": [user, {"role": "assistant", "content": good}],
        "rejected": [user, {"role": "assistant", "content": bad}],
    }


def build(seed: int = SEED, train_per_fact: int = 3, test_facts: int = 64):
    """(train_rows, test_rows): ``train_per_fact`` training rows per fact, each with a training
    phrasing and a wrong answer; ``test_facts`` facts get one test row with a held-out phrasing
    and a wrong answer used for that fact in no training row."""
    rng = random.Random(seed)
    train, test = [], []
    facts = _facts()
    for task, x, y, answer, pool in facts:
        phrases = rng.sample(PHRASES[task][0], train_per_fact)
        wrongs = rng.sample(pool, train_per_fact + 1)
        for phrase, wrong in zip(phrases, wrongs):
            train.append(_row(task, phrase, x, y, answer, wrong))
    for task, x, y, answer, pool in rng.sample(facts, test_facts):
        used = {r["rejected"][1]["content"] for r in train}
        wrong = rng.choice([w for w in pool if ANSWER[task].format(x=x, y=y, a=w) not in used])
        test.append(_row(task, rng.choice(PHRASES[task][1]), x, y, answer, wrong))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write(directory: Path = DATA_DIR) -> None:
    train, test = build()
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(directory / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {DATA_DIR}/train.jsonl and test.jsonl")
