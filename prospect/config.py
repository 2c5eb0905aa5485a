"""Run configuration: typed sections, each option declared once with its default, bounds and help text
(`prospect options` lists them). prospect/recipe.py reads them from YAML and `section.key=value`
arguments."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from prospect.options import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    Bounds,
    describe_section,
    opt,
)


@dataclass
class ModelConfig:
    name: str = opt(
        "smollm2",
        "Policy to train: 'smollm2' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' (embedded Gemma-3-270M "
        "base, Gemma terms; no chat template), a local directory, a hub name, or a .gguf file.",
    )
    chat_template: str | None = opt(
        None,
        "Chat template for conversations (a base model has none): a Jinja file, chatml, zephyr or gemma.",
    )
    gguf_file: str | None = opt(None, "GGUF file inside `name` (a directory or hub repo) to load.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of `name`.")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the hub. Off unless you ask.")
    allow_pickle: bool = opt(
        False, "Load weights stored with pickle (pytorch_model.bin). Off: safetensors only."
    )
    lora_r: int = opt(
        0,
        "LoRA rank; 0 trains all weights. With LoRA the reference is the adapter-disabled model.",
        bounds=NON_NEGATIVE,
    )
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r).", bounds=POSITIVE)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", bounds=Bounds(0, 1, high_open=True))
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: 'all-linear' or a comma list.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    attn_implementation: str = opt(
        "auto",
        "Attention kernel: 'auto' (on CPU prospect_segments: each sequence attends within itself at its own "
        "cost, eager attention where no layout is given; transformers' default elsewhere), or any name "
        "transformers accepts (prospect_segments, eager, sdpa, flash_attention_2, ...).",
    )


@dataclass
class DataConfig:
    train: str = opt(
        "vader-movies",
        "Training data: 'vader-movies' (embedded human ratings), a .jsonl/.json/.parquet/.csv file, "
        "a `datasets` directory (save_to_disk, or the hub layout), or a hub dataset name. Several sources, "
        "comma separated, are mixed; 'a.jsonl:3, b.jsonl:1' gives them shares of the mixture as TRL's "
        "dataset mixtures do (the first rows of each, no source repeated).",
    )
    train_split: str = opt("train", "Split of `train` to use (for datasets with splits).")
    subset: str | None = opt(
        None, "Config (subset) of a hub dataset or a folder in the hub layout: load_dataset(path, subset)."
    )
    eval: str | None = opt(
        None,
        "Held-out data for evaluation; defaults to `train` with `eval_split`. Data without splits given "
        "here is used whole.",
    )
    eval_split: str = opt(
        "test",
        "Split used for held-out evaluation; 'held-out': the share of `train_split` chosen by a hash of the "
        "prompt (data.held_out_percent), never trained on. Data with no splits (one file, a dataset saved "
        "without splits) evaluated on itself always uses that share.",
    )
    eval_subset: str | None = opt(
        None, "Config (subset) of `eval`; evaluation on `train` uses `subset` unless this is given."
    )
    held_out_percent: float = opt(
        10.0,
        "Percent of the prompts set aside for evaluation, by a hash of the prompt, when the held-out share "
        "is used (see eval_split).",
        bounds=Bounds(0, 100, low_open=True, high_open=True),
    )
    format: str = opt(
        "auto",
        "Row format: 'unpaired' {prompt, completion, label}, 'paired' {prompt, chosen, rejected}, "
        "'rated' {prompt, completion, rating}, 'ranked' {prompt, ranking: [best, ..., worst]}, "
        "'completions' {prompt, completion}, 'text' {text}, 'messages' {messages}, or 'auto' to detect "
        "from the fields. docs/formats.md lists them all.",
        ("auto", "unpaired", "paired", "rated", "ranked", "completions", "text", "messages"),
    )
    assistant_only_loss: bool = opt(
        True,
        "SFT on {messages}: the loss covers the assistant messages only (TRL's assistant_only_loss); "
        "false: every token of the conversation.",
    )
    rating_min: float | None = opt(
        None, "Rated rows: the lowest valid rating (a rating below it is an error)."
    )
    rating_max: float | None = opt(None, "Rated rows: the highest valid rating.")
    ratings_for_unpaired: str = opt(
        "labels",
        "Rated rows for unpaired losses (KTO): 'labels' by the thresholds below, or 'pairs' formed as for "
        "pairwise losses (pair_min_gap, max_pairs_per_prompt), then split by unpaired_from_pairs.",
        ("labels", "pairs"),
    )
    desirable_above: float = opt(0.5, "Rated rows: a rating above this is desirable (for unpaired losses).")
    undesirable_below: float = opt(
        -0.5, "Rated rows: a rating below this is undesirable; in between is left out."
    )
    pair_min_gap: float = opt(
        1.0,
        "Rated rows: pair two completions of the same prompt when ratings differ this much.",
        bounds=NON_NEGATIVE,
    )
    max_pairs_per_prompt: int = opt(
        0, "Rated rows: at most this many pairs per prompt, drawn at random (0: all).", bounds=NON_NEGATIVE
    )
    unpaired_from_pairs: str = opt(
        "both",
        "Pairs for unpaired losses: 'both' sides, 'one' side at random (one completion per prompt), "
        "'chosen' or 'rejected' only.",
        ("both", "one", "chosen", "rejected"),
    )
    desirable_fraction: float = opt(
        1.0, "Keep this fraction of desirable examples (the KTO paper's imbalance test).", bounds=SHARE
    )
    undesirable_fraction: float = opt(1.0, "Keep this fraction of undesirable examples.", bounds=SHARE)
    min_agreement: float = opt(
        0.0,
        "Drop examples and pairs whose raters agree with their label less than this: the share of raters, "
        "where the data tells it (raw ratings in a 'ratings' list, votes_chosen/votes_rejected, or an "
        "'agreement' field); 0 keeps all.",
        bounds=FRACTION,
    )
    max_per_rater: int = opt(
        0,
        "Train on at most this many rows of each rater (rows name theirs in a 'rater' field), so that a few "
        "prolific raters cannot dominate; a rater's rows are kept by a hash of their content. 0 keeps all.",
        bounds=NON_NEGATIVE,
    )
    max_length: int = opt(256, "Maximum tokens of prompt + completion.", bounds=Bounds(2))
    max_prompt_length: int = opt(
        128, "Prompts longer than this keep their last tokens, when truncating.", bounds=AT_LEAST_ONE
    )
    truncation: bool = opt(True, "Truncate long examples; when false, a too-long example is an error.")
    limit: int = opt(0, "Use at most this many training rows of each source (0: all).", bounds=NON_NEGATIVE)


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/prospect", "Run directory: checkpoints, metrics.jsonl and the final model.")
    overwrite: bool = opt(
        False, "Delete an existing run directory first. Without it, an existing one is an error."
    )
    resume: bool = opt(False, "Continue the run in `output_dir` from its last complete checkpoint.")
    learning_rate: float = opt(5e-6, "Peak AdamW learning rate.", bounds=POSITIVE)
    lr_scheduler: str = opt("linear", "Decay after warmup.", ("constant", "linear", "cosine"))
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up linearly from 0.", bounds=FRACTION)
    weight_decay: float = opt(0.0, "AdamW weight decay.", bounds=NON_NEGATIVE)
    batch_size: int = opt(8, "Examples per device per microbatch (for pairs: pairs).", bounds=AT_LEAST_ONE)
    grad_accum: int = opt(1, "Microbatches accumulated per optimizer step.", bounds=AT_LEAST_ONE)
    max_steps: int = opt(
        0, "Optimizer steps to run; 0 means `epochs` passes over the data.", bounds=NON_NEGATIVE
    )
    epochs: float = opt(1.0, "Passes over the training data when `max_steps` is 0.", bounds=POSITIVE)
    max_grad_norm: float = opt(
        1.0, "Clip the global gradient norm to this value (0: no clipping).", bounds=NON_NEGATIVE
    )
    precision: str = opt(
        "auto",
        "Compute precision: 'bf16' autocasts the transformer (log-softmax stays fp32), 'fp32' does not, "
        "'auto' picks bf16 where the hardware has fast bf16 matmuls.",
        ("auto", "bf16", "fp32"),
    )
    seed: int = opt(42, "Seed for data order, initialisation and sampling.", bounds=NON_NEGATIVE)
    deterministic: bool = opt(True, "Ask torch for deterministic algorithms.")
    threads: int = opt(0, "CPU threads for torch (0: leave torch's default).", bounds=NON_NEGATIVE)
    save_every: int = opt(
        0, "Write a resumable checkpoint every N steps (0: only at the end).", bounds=NON_NEGATIVE
    )
    keep_last: int = opt(
        2, "Checkpoints to keep; older ones are pruned after a newer one is complete.", bounds=NON_NEGATIVE
    )
    log_every: int = opt(
        10, "Print a metrics line every N steps (every step goes to metrics.jsonl).", bounds=AT_LEAST_ONE
    )
    report_to: str = opt("none", "Trackers accelerate supports, comma separated (tensorboard, wandb, ...).")
    push_to_hub: str | None = opt(
        None,
        "Hub repo (owner/name) to push final/ to at the end of the run, private if new; as `prospect push`.",
    )
    reference: str = opt(
        "auto",
        "Reference model: 'copy' (frozen copy of the initial policy), 'adapter' (LoRA disabled, needs lora_r > 0), "
        "or 'auto' (adapter with LoRA, copy otherwise).",
        ("auto", "copy", "adapter"),
    )
    reference_cache: bool = opt(
        False,
        "Compute every reference log-prob the run needs once, before training, and keep them on disk "
        "(safetensors, keyed by sequence content); later runs on the same model, tokenizer, truncation, "
        "precision and attention reuse them. bf16 with train.padding_free keys each value by the microbatch "
        "it is trained in, since a packed row's rounding depends on its layout.",
    )
    reference_model: str | None = opt(
        None,
        "Load the reference from this model instead of copying the initial policy (e.g. the base model when "
        "training continues from a later checkpoint).",
    )
    reference_refresh_every: int = opt(
        0, "TR-DPO: copy the policy into the reference every N steps (0: never).", bounds=NON_NEGATIVE
    )
    reference_refresh_alpha: float = opt(
        1.0, "TR-DPO soft update: ref <- alpha * policy + (1 - alpha) * ref.", bounds=SHARE
    )
    padding_free: bool = opt(
        False, "Pack each microbatch into rows with per-sequence positions: no compute on padding."
    )
    share_prompts: bool = opt(
        True,
        "With padding_free and prospect_segments attention: sequences with the same prompt (chosen and "
        "rejected, ranked completions) compute it once.",
    )
    on_nonfinite: str = opt(
        "stop",
        "A NaN or Inf loss or gradient: 'stop' with the offending examples named (the last checkpoint "
        "stays intact), or 'skip' the step without updating.",
        ("stop", "skip"),
    )
    max_skips_in_a_row: int = opt(
        3,
        "With on_nonfinite=skip: stop when this many updates in a row were skipped (0: no limit).",
        bounds=NON_NEGATIVE,
    )
    max_skips: int = opt(
        10,
        "With on_nonfinite=skip: stop when this many updates were skipped in all (0: no limit).",
        bounds=NON_NEGATIVE,
    )
    disable_dropout: bool = opt(True, "Turn off dropout so policy and reference log-probs are comparable.")
    logprob_chunk: int = opt(
        0,
        "Completion tokens per chunk of the fp32 output projection; 0 sizes chunks to 2^25 logits "
        "(128 MB), so memory does not grow with the vocabulary.",
        bounds=NON_NEGATIVE,
    )


BEST_METRICS: tuple[str, ...] = ("none", "eval_loss", "judge_mean", "positive_fraction")  # eval.best_metric
BEST_METRICS += ("pair_accuracy", "pearson_r", "sign_accuracy")  # of reward models


@dataclass
class EvalConfig:
    num_prompts: int = opt(
        0,
        "Held-out prompts to sample from before and after training (reward models: held-out rows); 0: none.",
        bounds=NON_NEGATIVE,
    )
    judge: str = opt(
        "none",
        "Score held-out generations with 'vader' (VADER lexicon sentiment), 'reward' (online.reward_model or "
        "online.reward_function, e.g. an exact-match verifier), or 'none'.",
        ("none", "vader", "reward"),
    )
    max_new_tokens: int = opt(48, "Tokens generated per prompt.", bounds=AT_LEAST_ONE)
    temperature: float = opt(
        1.0,
        "Sampling temperature; 1.0 samples the policy itself, so the KL estimate is unbiased.",
        bounds=NON_NEGATIVE,
    )
    top_p: float = opt(1.0, "Nucleus sampling threshold.", bounds=SHARE)
    sampler: str = opt(
        "prospect",
        "Decoder of the held-out samples: 'prospect' or 'hf' (transformers generate).",
        ("prospect", "hf"),
    )
    batch_size: int = opt(32, "Prompts per generation batch.", bounds=AT_LEAST_ONE)
    show: int = opt(3, "Example generations to print before and after.", bounds=NON_NEGATIVE)
    before: bool = opt(True, "Also evaluate before training (online rounds skip it after the first round).")
    every: int = opt(
        0,
        "Evaluate every N steps and at the last (0: before and after only): the held-out loss on loss_rows "
        "rows, and the sampled evaluation if num_prompts > 0; results in evals.jsonl and the trackers.",
        bounds=NON_NEGATIVE,
    )
    loss_rows: int = opt(256, "Held-out rows for that held-out loss (0: none).", bounds=NON_NEGATIVE)
    best_metric: str = opt(
        "none", "With `every`: keep the model best by this in best/ (eval_loss: lowest).", BEST_METRICS
    )
    early_stopping_patience: int = opt(
        0, "Stop after this many evaluations without a better best_metric (0: never).", bounds=NON_NEGATIVE
    )


@dataclass
class OnlineConfig:
    reward_model: str | None = opt(
        None, "Reward model that scores samples: a directory (a reward run's final/) or hub name."
    )
    reward_function: str | None = opt(
        None, "Python reward instead of a model: 'module:function' called as f(prompt, completion) -> float."
    )
    preference: str | None = opt(
        None,
        "Nash-MD's preference source P(y > y' | x), by judge name: pairwise:PATH (a preference model), "
        "reward:PATH (Bradley-Terry on a reward model), verifier:MODULE:FUNCTION, exact-match, vader, llm:PATH "
        "(both orders; http judges take loop.judge_url/judge_model/judge_key_env as http:URL).",
    )
    samples_per_prompt: int = opt(1, "Completions sampled per prompt in each rollout.", bounds=AT_LEAST_ONE)
    max_new_tokens: int = opt(48, "Tokens generated per completion.", bounds=AT_LEAST_ONE)
    temperature: float = opt(
        1.0, "Sampling temperature of rollouts (1.0 samples the policy itself).", bounds=NON_NEGATIVE
    )
    top_p: float = opt(1.0, "Nucleus sampling threshold of rollouts.", bounds=SHARE)
    top_k: int = opt(0, "Top-k cut of rollouts (0: none).", bounds=NON_NEGATIVE)
    batch_size: int = opt(
        32, "Completions generated at once in rollouts, best-of-N and online rounds.", bounds=AT_LEAST_ONE
    )
    sampler: str = opt(
        "prospect",
        "Sampling backend: 'prospect' (a lean decoding loop: each prompt prefilled once for its samples, "
        "stopped rows leave the batch), 'hf' (transformers generate) or 'vllm' (GPU, if installed).",
        ("prospect", "hf", "vllm"),
    )
    keep: str = opt(
        "best",
        "Best-of-N: keep the best sample of each prompt, or every sample scoring above keep_threshold.",
        ("best", "threshold"),
    )
    keep_threshold: float = opt(0.0, "Best-of-N with keep=threshold: the score a sample must exceed.")
    prompts: int = opt(
        0, "Best-of-N and online rounds: prompts sampled (0: every training prompt).", bounds=NON_NEGATIVE
    )


@dataclass
class LoopConfig:
    kind: str = opt(
        "iterative",
        "'iterative': rounds of sample, label, train (online KTO/DPO); 'rest': Grow then Improve steps at rising "
        "thresholds; 'rest_em': filter by correctness, fine-tune the base model each round; 'constitutional': "
        "critique and revise against a constitution, fine-tune on the revisions.",
        ("iterative", "rest", "rest_em", "constitutional"),
    )
    rounds: int = opt(2, "Rounds (ReST: Grow steps; ReST-EM: EM iterations).", bounds=AT_LEAST_ONE)
    threshold: str = opt(
        "fixed",
        "Binary labels: desirable above a 'fixed' value, or above the 'mean' or 'median' "
        "score of the prompt's samples.",
        ("fixed", "mean", "median"),
    )
    threshold_value: float = opt(0.5, "The fixed threshold (binary labels), or ReST-EM's correctness cut.")
    undesirable_ratio: float = opt(
        0.0,
        "Binary labels: keep at most this many undesirable rows per desirable one (0 keeps all), those whose "
        "prompt also has a desirable sample first. Rare successes are otherwise swamped by failures.",
        bounds=NON_NEGATIVE,
    )
    pair_selection: str = opt(
        "best_worst",
        "Pairs: 'best_worst', a 'random' pair, or a random pair at least pair_min_gap apart ('min_gap').",
        ("best_worst", "random", "min_gap"),
    )
    pair_min_gap: float = opt(
        0.0, "Smallest score gap of a pair with pair_selection=min_gap.", bounds=NON_NEGATIVE
    )
    improve_thresholds: str = opt(
        "0.5,0.7,0.9", "ReST: the rising reward thresholds of the Improve steps, comma separated."
    )
    reference: str = opt(
        "previous",
        "Iterative rounds: the reference is the 'previous' round's policy or the 'base'.",
        ("previous", "base"),
    )
    judge: str = opt(
        "none",
        "AI labeller instead of a reward: 'self' (the policy judges), a model path or hub name, "
        "or 'http' (an OpenAI-compatible endpoint).",
    )
    judge_mode: str = opt(
        "compare",
        "The judge 'compare's two samples (both orders, averaged) or 'rate's each one.",
        ("compare", "rate"),
    )
    judge_cot: bool = opt(False, "Let the judge reason before its verdict.")
    judge_url: str | None = opt(
        None, "HTTP judge: base URL of the OpenAI-compatible API (e.g. https://host/v1)."
    )
    judge_model: str | None = opt(None, "HTTP judge: the model name to ask for.")
    judge_allow_http: bool = opt(
        False,
        "HTTP judge: allow a plain http:// URL to another machine (the API key then travels unencrypted).",
    )
    judge_key_env: str | None = opt(
        None,
        "HTTP judge: the environment variable holding the API key, named explicitly (e.g. OPENAI_API_KEY); "
        "its value is sent only to loop.judge_url's origin and never logged.",
    )
    constitution: str | None = opt(None, "Constitutional AI: a text file of principles, one per line.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "online": OnlineConfig,
    "loop": LoopConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "kto"})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    source: str = "<defaults>"

    @property
    def loss_name(self) -> str:
        return str(self.loss["name"])

    def flat(self) -> dict[str, Any]:
        """{"section.option": value}, as trackers take a run's config."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["loss"] = dict(self.loss)
        return out


def describe_options(only: typing.Collection[str] = ()) -> str:
    """Each option (of the sections `only`, else all) with its default and help, for `prospect options` (the
    loss's own options are listed by the CLI)."""
    lines = []
    for section, cls in SECTIONS.items():
        if only and section not in only:
            continue
        lines.append(f"{section}:")
        lines.extend(describe_section(section, cls))
    return "\n".join(lines)
