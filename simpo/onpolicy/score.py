"""Step 2, score: a reward for every distinct response of every prompt.

As the official ``reward_model_annotate.py``: the conversation ``[user prompt, assistant response]``
goes through the reward model's chat template, and the reward is the model's ``score`` output
(ArmoRM's) or its one logit (a scalar head). Unlike it, sequences go through the model in batches
(right-padded, sorted by length so a batch pads little), and each distinct (prompt, response) is
scored once: a response repeated under two seeds gets the same score, so identical texts never
look like a preference. Prompts whose responses are all identical are not scored (binarize drops
them, as the official post-processing does before scoring).
"""

from __future__ import annotations

import torch

from ..config import UserError
from .generate import prompt_messages
from .models import reward_scores


def distinct(responses: list[str]) -> list[str]:
    """The distinct responses in first-seen order."""
    return list(dict.fromkeys(responses))


def scorable(record: dict) -> bool:
    return len(distinct(record["all_generated_responses"])) >= 2


class RewardScorer:
    def __init__(self, model, tokenizer, cfg, device):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def token_ids(self, prompt, response: str) -> list[int]:
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise UserError(f"a (prompt, response) of {len(ids)} tokens does not fit the reward "
                            f"model's {self.max_positions} positions")
        return ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """One reward per token-id sequence, in batches of ``score_batch_size`` by length."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = [0.0] * len(sequences)
        pad = self.tokenizer.pad_token_id
        size = self.cfg.score_batch_size
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.tensor([sequences[i] + [pad] * (width - len(sequences[i])) for i in rows],
                               device=self.device)
            mask = torch.tensor([[1] * len(sequences[i]) + [0] * (width - len(sequences[i]))
                                 for i in rows], device=self.device)
            scores = reward_scores(self.model(input_ids=ids, attention_mask=mask), len(rows),
                                   self.cfg.reward_model)
            for i, s in zip(rows, scores.tolist()):
                out[i] = s
        return out

    def score_records(self, records: list[dict]) -> list[dict]:
        """``{"index", "all_rm_scores"}`` for each generated record."""
        sequences, owners = [], []
        for r, record in enumerate(records):
            for text in distinct(record["all_generated_responses"]):
                sequences.append(self.token_ids(record["prompt"], text))
                owners.append((r, text))
        scores = self.score_ids(sequences)
        by_text: list[dict] = [{} for _ in records]
        for (r, text), s in zip(owners, scores):
            by_text[r][text] = s
        return [{"index": record["index"],
                 "all_rm_scores": [by_text[r][t] for t in record["all_generated_responses"]]}
                for r, record in enumerate(records)]


def score_manifest(cfg, generated_sha256: str, template: str) -> dict:
    from .shards import sha256_text

    return {"step": "score", "generated_sha256": generated_sha256,
            "reward_model": cfg.reward_model, "torch_dtype": cfg.reward_torch_dtype,
            "chat_template_sha256": sha256_text(template)}
