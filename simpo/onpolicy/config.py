"""``simpo-data``'s options: one dataclass, read from a recipe (YAML) and ``--key value``
overrides by the same parser, as ``simpo-train`` reads its own."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, _check, _check_chat_template, _Parser, split_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "onpolicy"
DEFAULT_RECIPE = "tiny"
STEPS = ("generate", "score", "binarize")
BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class OnPolicyConfig:
    """The on-policy data pipeline (official ``on_policy_data_gen/`` defaults)."""

    steps: list[str] = field(
        default_factory=lambda: list(STEPS),
        metadata={"help": "Steps to run, in pipeline order: generate, score, binarize (each reads "
                          "the previous one's output in output_dir)."})
    output_dir: str = field(
        default="outputs/onpolicy", metadata={"help": "Where every step writes (resumable)."})
    # prompts
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Prompts: a hub dataset, a local JSON/JSONL/parquet file or a directory "
                          "of {split} files; rows in the official schema (prompt), TRL's "
                          "prompt-only or preference formats. Unset: the shipped data's prompts."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    dataset_split: str = field(
        default="train", metadata={"help": "The split of prompts (official: train_prefs)."})
    max_prompts: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N distinct prompts."})
    # policy and sampling
    model_name_or_path: str = field(
        default="tiny", metadata={"help": "The policy: a hub id or local model, or 'tiny' (built "
                                          "in code, nothing downloaded)."})
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "The policy's chat template: unset or 'tokenizer' = its "
                                        "own; 'gemma' or a Jinja template."})
    torch_dtype: str = field(default="auto", metadata={"help": f"Policy dtype: {', '.join(DTYPES)}."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the policy's own modelling code."})
    backend: str = field(
        default="auto", metadata={"help": "Generation engine: vllm, transformers, or auto (vllm "
                                          "when installed and a GPU is present)."})
    seeds: list[int] = field(
        default_factory=lambda: [13, 21, 42, 79, 100],
        metadata={"help": "One sample per seed for every prompt (the official five)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    max_tokens: int = field(default=4096, metadata={"help": "New tokens per response at most."})
    generation_batch_size: int = field(
        default=8, metadata={"help": "Prompts per generation batch (each with one row per seed); "
                                     "also the unit written at a time."})
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm backend: the fraction of GPU memory vLLM may take."})
    # reward model
    reward_model: str = field(
        default="tiny", metadata={"help": "An AutoModelForSequenceClassification with a scalar "
                                          "score (one label, or an ArmoRM-style `score` output), "
                                          "or 'tiny' (built in code)."})
    reward_torch_dtype: str = field(
        default="auto", metadata={"help": f"Reward model dtype: {', '.join(DTYPES)}."})
    reward_trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the reward model's own modelling code (ArmoRM "
                                         "needs it)."})
    score_batch_size: int = field(
        default=16, metadata={"help": "(prompt, response) sequences per reward-model forward."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even where a GPU is."})

    def __post_init__(self):
        if not self.steps or any(s not in STEPS for s in self.steps):
            raise ConfigError(f"steps: {self.steps} is not a list of {', '.join(STEPS)}")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"steps: {self.steps} names a step twice")
        self.steps = [s for s in STEPS if s in self.steps]  # always pipeline order
        _check(self.backend in BACKENDS, "backend", self.backend, " or ".join(BACKENDS))
        for key in ("torch_dtype", "reward_torch_dtype"):
            _check(getattr(self, key) in DTYPES, key, getattr(self, key), ", ".join(DTYPES))
        _check(len(self.seeds) >= 2, "seeds", self.seeds,
               "at least two (one response per seed; a preference needs two)")
        _check(len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "distinct")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        for key in ("max_tokens", "generation_batch_size", "score_batch_size"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        _check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", self.max_prompts,
               ">= 1 (or unset)")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "in (0, 1]")
        _check_chat_template(self.chat_template)
        for key in ("model_name_or_path", "reward_model"):
            value = getattr(self, key)
            _check(value.strip().lower() not in ("", "none", "null"), key, value,
                   "a hub id, a local model or 'tiny'")


USAGE = "simpo-data [RECIPE | --config RECIPE] [--key value ...] [--debug]"
DESCRIPTION = (
    "Make on-policy preference data as the official SimPO pipeline made the seed's: sample one "
    "response per seed for every prompt from the policy (generate), score each distinct response "
    "with a reward model (score), keep the best as chosen and the worst as rejected (binarize). "
    "RECIPE is a YAML file or a packaged recipe (tiny, gemma-2-9b-it); without one the embedded "
    "tiny recipe runs. Each step resumes where a killed run stopped. Output: "
    "OUTPUT_DIR/train.jsonl, which simpo-train reads with --dataset_name.")


def _parser() -> _Parser:
    return _Parser(OnPolicyConfig, prog="simpo-data", usage=USAGE, description=DESCRIPTION,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)


def resolve_recipe(recipe: Optional[str]) -> Path:
    """A recipe file, or the name of a packaged ``simpo-data`` recipe."""
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / (recipe if recipe.endswith((".yaml", ".yml")) else f"{recipe}.yaml")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {recipe!r} is neither a file nor a packaged simpo-data recipe "
                      f"({known})")


def _recipe_argv(path: Path) -> list[str]:
    """The recipe's ``key: value`` pairs as ``--key value`` arguments, so recipe and command line
    are read by one parser with the same types and checks."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML recipe ({' '.join(str(exc).split())})")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of key: value")
    names = {f.name for f in dataclasses.fields(OnPolicyConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{path.name}: unknown key(s) {', '.join(unknown)} (see simpo-data --help)")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return argv


def parse_args(argv: Optional[list[str]] = None) -> tuple[OnPolicyConfig, Path]:
    """``argv`` (default ``sys.argv[1:]``) -> ``(config, recipe path)``; problems are
    :class:`ConfigError` naming the key."""
    recipe, argv = split_recipe(list(sys.argv[1:] if argv is None else argv))
    path = resolve_recipe(recipe)
    parser = _parser()
    namespace, unknown = parser.parse_known_args(_recipe_argv(path) + argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(f"unknown option{'s' if len(flags) > 1 else ''} {' '.join(flags)} (the "
                          f"recipe is the first argument or --config FILE; see simpo-data --help)")
    try:
        return OnPolicyConfig(**vars(namespace)), path
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(" ".join(str(exc).split())) from exc


def help_text(argv: Optional[list[str]] = None) -> str:
    """``--help``, with the defaults of the recipe named in ``argv`` (the embedded one if none)."""
    try:
        recipe, _ = split_recipe([a for a in (argv or []) if a not in ("-h", "--help")])
        values = vars(_parser().parse_known_args(_recipe_argv(resolve_recipe(recipe)))[0])
    except ConfigError:
        values = {}
    parser = _parser()
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
    return parser.format_help()
