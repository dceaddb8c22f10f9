"""Step 1, generate: one sampled response per seed for every distinct prompt.

As the official ``on_policy_data_gen/decode.py``: each prompt becomes one user message through the
policy's chat template (a conversation given as messages is kept as it is), and sample ``k`` of
every prompt is drawn with its own random generator seeded with ``seeds[k]`` (vLLM's per-request
``seed``), after temperature and nucleus (top-p) filtering. A sample therefore depends on its
prompt and its seed only, not on which other prompts share its batch, on the number of processes
or on where a killed run stopped (up to the floating-point sums of a differently padded batch).

With transformers the rows of a batch are left-padded and decoded by ``model.generate``, whose
greedy choice is handed the one token :class:`SeededSampler` drew for each row. With vLLM the
prompt token ids go to ``LLM.generate`` with one ``SamplingParams(seed=...)`` per row.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import UserError
from .shards import canonical, sha256_text



# ----------------------------------------------------------------------------- prompts

def prompt_messages(value) -> Optional[list[dict]]:
    """A prompt as the messages the chat template gets (a text is one user message); None for
    what is not a prompt (empty text, messages ending in an assistant turn)."""
    from ..data import _is_message_list

    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if _is_message_list(value) and value[-1]["role"] != "assistant":
        return list(value)
    return None


def prompt_of(row: dict) -> tuple[Optional[object], Optional[str]]:
    """``(prompt, None)``: the prompt of a row (text, or a message list that does not end with an
    assistant message), or ``(None, why)``. Rows: the official schema (``prompt`` text), TRL's
    prompt-only rows (``prompt`` text or messages), TRL's preference rows of any format (the prompt
    of :func:`simpo.data.split_row`)."""
    from ..data import split_row

    if "chosen" in row and "rejected" in row and row.get("chosen") is not None:
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            return row["prompt"], None  # the official schema keeps the prompt text beside them
        parts, why = split_row(row)
        if parts is None:
            return None, why
        prompt = parts.prompt
    else:
        prompt = row.get("prompt")
    if prompt is None:
        return None, "no prompt column (and no chosen/rejected to take one from)"
    if prompt_messages(prompt) is None:
        return None, "the prompt is neither non-empty text nor messages ending in a user turn"
    return prompt, None


def prompt_texts(prompts: list) -> list[str]:
    return [m["content"] for p in prompts for m in prompt_messages(p)]


def prompt_id(prompt) -> str:
    """UltraFeedback's ``prompt_id`` for a text prompt (the SHA-256 of the text); for messages,
    that of their canonical JSON."""
    return sha256_text(prompt if isinstance(prompt, str) else canonical(prompt))


def load_prompts(cfg) -> tuple[list, list[str], dict]:
    """``(prompts, prompt_ids, counts)``: the distinct prompts of the configured data in first-seen
    order (the official script deduplicates them too), capped at ``max_prompts``; ``counts`` says
    how many rows were read, unusable (with why) and duplicates."""
    from ..data import load_raw_datasets

    data = load_raw_datasets(cfg.dataset_name, [cfg.dataset_split], cfg.dataset_config)
    rows = next(iter(data.values()))
    prompts, ids, seen, unusable, duplicates = [], [], set(), {}, 0
    has_id = "prompt_id" in rows.column_names
    for row in rows:
        prompt, why = prompt_of(row)
        if prompt is None:
            unusable[why] = unusable.get(why, 0) + 1
            continue
        key = canonical(prompt)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        prompts.append(prompt)
        ids.append(row["prompt_id"] if has_id and isinstance(row.get("prompt_id"), str)
                   else prompt_id(prompt))
        if cfg.max_prompts is not None and len(prompts) == cfg.max_prompts:
            break
    if not prompts:
        detail = "; ".join(f"{n} rows: {why}" for why, n in unusable.items())
        raise UserError(f"no usable prompt in {cfg.dataset_name or 'the shipped data'} "
                        f"(split {cfg.dataset_split}){': ' + detail if detail else ''}")
    counts = {"rows": len(rows), "duplicates": duplicates, "unusable": unusable}
    return prompts, ids, counts


# ----------------------------------------------------------------------------- sampling

class SeededSampler:
    """A ``LogitsProcessor`` that samples each row's next token with that row's own generator
    (temperature, then top-p: the smallest set of most likely tokens whose mass reaches ``top_p``)
    and leaves only that token possible, so ``generate``'s greedy step takes it. Temperature 0 is
    greedy decoding."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            if self.top_p < 1:
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the likelier tokens
                sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            chosen = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0]
                                  for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


def _stop_ids(model, tokenizer) -> list[int]:
    """The policy's end-of-turn tokens: its generation config's ``eos_token_id`` (Gemma-2-it:
    ``<eos>`` and ``<end_of_turn>``), the tokenizer's EOS, and ``<end_of_turn>`` where the
    vocabulary has it."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    ids.append(tokenizer.eos_token_id)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in tokenizer.get_vocab() else None
    if eot is not None:
        ids.append(eot)
    return sorted({i for i in ids if i is not None})


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """The chat template's text for ``prompt`` with the generation prompt, tokenised without
    adding special tokens again (the template writes its own BOS)."""
    text = tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _samples(texts: list[str], reasons: list[str], tokens: list[int]) -> dict:
    return {"all_generated_responses": texts, "finish_reasons": reasons, "response_tokens": tokens}


class TransformersSampler:
    """Batched generation with ``model.generate`` (see the module docstring)."""

    name = "transformers"

    def __init__(self, model, tokenizer, cfg, device):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.stop_ids = _stop_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # generate() fills what a call leaves unset from the model's generation_config: a
        # repetition_penalty, no_repeat_ngram_size, suppress_tokens ... saved with the policy would
        # reshape the logits before the sampler. The official samples saw temperature and top_p
        # only, so this (our own) model instance keeps just its special tokens.
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id)

    @torch.no_grad()
    def sample(self, prompts: list) -> list[dict]:
        """Per prompt: ``{"all_generated_responses", "finish_reasons" ("stop" or "length"),
        "response_tokens"}``, one of each per seed."""
        from transformers import GenerationConfig, LogitsProcessorList

        cfg, seeds = self.cfg, self.cfg.seeds
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        longest = max(len(i) for i in ids)
        new_tokens = cfg.max_tokens
        if self.max_positions is not None:
            if longest >= self.max_positions:
                raise UserError(f"a prompt of {longest} tokens does not fit the policy's "
                                f"{self.max_positions} positions")
            new_tokens = min(new_tokens, self.max_positions - longest)
        rows = [i for i in ids for _ in seeds]
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=self.device)
        generators = [torch.Generator(device=self.device).manual_seed(s)
                      for _ in prompts for s in seeds]
        gen_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=pad)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=gen_config,
            logits_processor=LogitsProcessorList([SeededSampler(generators, cfg.temperature,
                                                                cfg.top_p)]))
        results = []
        for p in range(len(prompts)):
            texts, reasons, tokens = [], [], []
            for k in range(len(seeds)):
                new = out[p * len(seeds) + k, longest:].tolist()
                stop = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
                reasons.append("length" if stop is None else "stop")
                new = new if stop is None else new[:stop]
                tokens.append(len(new))
                texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
            results.append(_samples(texts, reasons, tokens))
        return results


class VLLMSampler:
    """Generation with vLLM: the same prompt token ids, one ``SamplingParams(seed=s)`` per row.
    (The official script hands vLLM the template's text, whose leading ``<bos>`` vLLM's tokenizer
    then adds a second time; token ids avoid that.)"""

    name = "vllm"

    def __init__(self, cfg, tokenizer, local_process_index: int = 0, num_processes: int = 1):
        import os

        if num_processes > 1:  # one GPU per process: vLLM (and its engine process) sees only it
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[local_process_index % len(gpus)]
        from vllm import LLM

        self.cfg, self.tokenizer = cfg, tokenizer
        kwargs = {} if cfg.torch_dtype == "auto" else {"dtype": cfg.torch_dtype}
        self.llm = LLM(model=cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, **kwargs)

    def sample(self, prompts: list) -> list[dict]:
        from vllm import SamplingParams

        cfg = self.cfg
        requests, params = [], []
        for p in prompts:
            ids = prompt_token_ids(self.tokenizer, p)
            for s in cfg.seeds:
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                             max_tokens=cfg.max_tokens, seed=s))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        n = len(cfg.seeds)
        results = []
        for p in range(len(prompts)):
            rows = [outputs[p * n + k].outputs[0] for k in range(n)]
            results.append(_samples([r.text for r in rows],
                                    ["length" if r.finish_reason == "length" else "stop"
                                     for r in rows], [len(r.token_ids) for r in rows]))
        return results


def resolve_backend(cfg, device) -> str:
    """``auto``: vLLM when it is installed, the device is a GPU and the policy is not the tiny one."""
    import importlib.util

    have_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.backend == "vllm":
        if not have_vllm:
            raise UserError("backend vllm: vllm is not installed here (pip install vllm, or "
                            "--backend transformers)")
        if torch.device(device).type != "cuda" or cfg.model_name_or_path == "tiny":
            raise UserError("backend vllm needs a GPU and a saved or hub policy (use --backend "
                            "transformers here)")
        return "vllm"
    if cfg.backend == "auto" and have_vllm and torch.device(device).type == "cuda" \
            and cfg.model_name_or_path != "tiny":
        return "vllm"
    return "transformers"


def generation_manifest(cfg, prompts: list, backend: str, template: str) -> dict:
    """What the generate step computes: a resumed run must match it."""
    return {"step": "generate", "policy": cfg.model_name_or_path, "backend": backend,
            "torch_dtype": cfg.torch_dtype, "chat_template_sha256": sha256_text(template),
            "prompts": len(prompts), "prompts_sha256": sha256_text(canonical(prompts)),
            "seeds": list(cfg.seeds), "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens}
