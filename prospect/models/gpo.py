"""GPO's preference module (Zhao, Dang & Grover, "Group Preference Optimization: Few-Shot Alignment of Large
Language Models", ICLR 2024), what it reads, and the reward source it becomes.

GPO keeps the LLM frozen and puts a small transformer beside it. A group's preference data is a set of points
(x, y): x is the LLM's embedding of a prompt and a completion, y the group's preference for that completion,
here a distribution over the levels of a rating scale (one rater: all mass on the rating given; several
raters: their histogram). The transformer reads m context points of one group, each one token [x, y], then
target tokens [x, 0], and predicts each target's y. Context tokens attend to each other; a target attends to
the context and to itself, never to another target, so its prediction depends on the context alone and any
number of targets can be scored at once. There are no positional encodings: the context's order does not
matter. Meta-trained over many groups (online/gpo.py), it adapts to a new group in-context, from that group's
few labelled examples, with no gradient step.

The authors' code (jamqd/Group-Preference-Optimization, models/tnp.py and models/gpo.py) was read for the
facts; nothing is copied. Where this differs from it:
* their target rows see the context only (their own token is masked too, and reaches the output through the
  residual stream); here a target also sees itself, which keeps m = 0 defined (a prior prediction);
* their points are the answer options of a survey question, each option's y the share of the group choosing
  it, the per-option outputs softmaxed within the question and fitted by a Gaussian likelihood; here a point
  is a (prompt, completion), its y a distribution over rating levels, predicted by a softmax head and fitted
  by cross-entropy, the likelihood of the ratings observed;
* they use 6 layers of width 128 (feed-forward 128) after a 4-layer MLP; here 4 pre-norm layers of width 128
  (feed-forward 256) after a 2-layer MLP, and x is standardised by statistics of the training embeddings,
  kept with the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prospect.assets import cache_dir
from prospect.config import ModelConfig
from prospect.data.batching import pad, sequence_key
from prospect.data.formats import Text, align_kinds, check_text, number
from prospect.data.row import Row
from prospect.data.sources import read_rows
from prospect.data.tokenize import Encoded, Encoder
from prospect.errors import UserError, field_error
from prospect.io import atomic_path, read_json, write_json
from prospect.models.attention import model_inputs
from prospect.models.loading import load_model
from prospect.models.reference import tokenizer_fingerprint, weights_fingerprint
from prospect.models.scoring import split_head

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "model.safetensors", "config.json"
Embed = Callable[[Sequence[Text], Sequence[Text]], torch.Tensor]  # (prompts, completions) -> [N, D]


@dataclass
class EmbedderSpec:
    """How the x of a GPO module were made, so that its reward source embeds completions the same way."""

    model: str  # model.name as given (smollm2, a directory, a hub name)
    fingerprint: str  # of the weights and tokenizer: the reward source refuses another model
    bf16: bool
    max_tokens: int


@dataclass
class GPOConfig:
    """The module's shape, the rating scale it predicts over, and the embedder its inputs came from."""

    embedding_dim: int
    levels: list[float]  # the rating scale, ascending
    width: int = 128
    layers: int = 4
    heads: int = 4
    feedforward: int = 256
    dropout: float = 0.0  # in the transformer layers, during meta-training only
    max_context: int = 64  # the most context points meta-training showed it
    embedder: EmbedderSpec | None = None

    def check(self, where: str) -> None:
        if len(self.levels) < 2 or any(b <= a for a, b in zip(self.levels, self.levels[1:])):
            raise UserError(
                f"{where}: field 'levels': expected at least 2 ascending numbers, got {self.levels}"
            )
        if min(self.embedding_dim, self.width, self.layers, self.heads, self.feedforward) < 1:
            raise UserError(f"{where}: expected positive sizes, got {dataclasses.asdict(self)}")
        if self.width % self.heads:
            raise UserError(
                f"{where}: field 'width': expected a multiple of heads ({self.heads}), got {self.width}"
            )


def attention_mask(num_context: int, num_target: int, device: torch.device | None = None) -> torch.Tensor:
    """[L, L] booleans, True where attention is blocked (L = context + targets, the context first). Every token
    sees the context; a target also sees itself and no other target; the context sees no target."""
    size = num_context + num_target
    blocked = torch.ones(size, size, dtype=torch.bool, device=device)
    blocked[:, :num_context] = False
    targets = torch.arange(num_context, size, device=device)
    blocked[targets, targets] = False
    return blocked


class GPOModule(nn.Module):
    """The in-context preference predictor: (context x, context y, target x) -> logits over the levels."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor
    levels: torch.Tensor

    def __init__(self, config: GPOConfig):
        super().__init__()
        self.config = config
        dim, levels, width = config.embedding_dim, len(config.levels), config.width
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        self.register_buffer("levels", torch.tensor(config.levels, dtype=torch.float32))
        self.point = nn.Sequential(nn.Linear(dim + levels, width), nn.GELU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(
            width,
            config.heads,
            config.feedforward,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, levels)
        )

    def standardise_with(self, embeddings: torch.Tensor) -> None:
        """Take x's per-dimension mean and scale from (training) embeddings [N, D]."""
        self.feature_mean.copy_(embeddings.float().mean(0))
        if len(embeddings) > 1:
            self.feature_scale.copy_(embeddings.float().std(0).clamp_min(1e-6))

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.feature_mean) / self.feature_scale

    def forward(
        self, context_x: torch.Tensor, context_y: torch.Tensor, target_x: torch.Tensor
    ) -> torch.Tensor:
        """context_x [B, m, D], context_y [B, m, K] (distributions), target_x [B, n, D] -> logits [B, n, K]."""
        m, n = context_x.shape[1], target_x.shape[1]
        x = self.standardised(torch.cat([context_x, target_x], 1))
        y = torch.cat([context_y.float(), context_y.new_zeros(len(target_x), n, len(self.config.levels))], 1)
        tokens = self.point(torch.cat([x, y.to(x.dtype)], -1))
        hidden = self.encoder(tokens, mask=attention_mask(m, n, x.device))
        return self.head(hidden[:, m:])

    def predict(
        self, context_x: torch.Tensor, context_y: torch.Tensor, target_x: torch.Tensor
    ) -> torch.Tensor:
        """The predicted distribution over the levels of each target, [B, n, K]."""
        return self.forward(context_x, context_y, target_x).softmax(-1)


def preference_loss(logits: torch.Tensor, target_y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted distributions against the observed ones (soft labels), per target."""
    return -(target_y * F.log_softmax(logits, -1)).sum(-1).mean()


def expected_rating(distribution: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The mean rating of distributions [..., K] over the levels [K]: a scalar reward."""
    return distribution @ levels.to(distribution)


def save_gpo(module: GPOModule, directory: Path) -> None:
    """The weights (safetensors) and the config (JSON) in `directory`, each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(directory / CONFIG, dataclasses.asdict(module.config))


def load_gpo(directory: str | Path) -> GPOModule:
    """A module saved by save_gpo; a missing or malformed file is a one-line error naming it."""
    path = Path(directory).expanduser()
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(
            f"{path}: no GPO module ({CONFIG} and {WEIGHTS}); train one with `prospect gpo train`"
        )
    config = read_config(path / CONFIG)
    module = GPOModule(config)
    try:
        module.load_state_dict(load_file(str(path / WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{path / WEIGHTS}: does not match {CONFIG} ({str(exc).splitlines()[0]})") from None
    return module.eval()


def read_config(path: Path) -> GPOConfig:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        embedder = raw.pop("embedder", None)
        config = GPOConfig(**raw, embedder=EmbedderSpec(**embedder) if embedder else None)
        config.levels = [float(v) for v in config.levels]
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a GPO config ({exc})") from None
    config.check(str(path))
    return config


@dataclass
class RatedCompletion:
    """One labelled example of a group: a prompt, a completion, and the group's rating distribution."""

    prompt: Text
    completion: Text
    ratings: list[float]  # as given: one, or one per rater
    distribution: list[float]  # their shares at each level of the scale
    location: str

    def row(self) -> dict[str, Any]:
        """The example as a row rated_completion reads back."""
        rated = {"rating": self.ratings[0]} if len(self.ratings) == 1 else {"ratings": self.ratings}
        return {"prompt": self.prompt, "completion": self.completion, **rated}


def row_ratings(row: Row) -> list[float]:
    """A row's ratings: its 'rating' (one rater, or the group's one answer) or its 'ratings' (several raters)."""
    if ("rating" in row.values) == ("ratings" in row.values):
        raise UserError(
            f"{row.location}: expected exactly one of fields 'rating' (a number) and 'ratings' (a list)"
        )
    if "rating" in row.values:
        return [number(row, "rating", row.values["rating"])]
    values = row.values["ratings"]
    if not isinstance(values, list) or not values:
        raise field_error(row.location, "ratings", "a non-empty list of numbers", values)
    return [number(row, f"ratings[{i}]", v) for i, v in enumerate(values)]


def histogram(ratings: list[float], levels: list[float], location: str) -> list[float]:
    """The share of `ratings` at each level; a rating off the scale is a one-line error."""
    counts = [0.0] * len(levels)
    for value in ratings:
        index = next((i for i, level in enumerate(levels) if math.isclose(value, level, abs_tol=1e-6)), None)
        if index is None:
            shown = ", ".join(f"{v:g}" for v in levels)
            raise field_error(location, "rating", f"one of the levels {shown}", value)
        counts[index] += 1.0
    return [c / len(ratings) for c in counts]


def rated_completion(row: Row, levels: list[float]) -> RatedCompletion:
    """A {prompt, completion, rating | ratings} row as a labelled example on the scale `levels`."""
    for name in ("prompt", "completion"):
        if name not in row.values:
            raise field_error(row.location, name, "a prompt and a completion (text or messages)", "nothing")
    prompt, completion = align_kinds(
        check_text(row, "prompt", row.values["prompt"]),
        check_text(row, "completion", row.values["completion"], completion=True),
    )
    ratings = row_ratings(row)
    return RatedCompletion(
        prompt, completion, ratings, histogram(ratings, levels, row.location), row.location
    )


class EmbeddingCache:
    """Vectors by 16-byte key, in one safetensors file (keys [N, 16] uint8, vectors [N, D] fp32)."""

    def __init__(self, path: Path | None):
        self.path, self.table = path, {}
        if path is not None and path.is_file():
            tensors = load_file(str(path))
            self.table = {bytes(k): v for k, v in zip(tensors["keys"].numpy(), tensors["vectors"])}

    def save(self) -> None:
        if self.path is None or not self.table:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.table)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 16),
            "vectors": torch.stack([self.table[k] for k in keys]).contiguous(),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp))


class CompletionEmbedder:
    """GPO's x: the frozen LLM's last hidden state averaged over the completion's tokens (its end-of-turn token
    included). Under causal attention each of those states has read the prompt, so the average embeds the
    completion as an answer to its prompt; the chat template's fixed tokens do not dilute it. Encoded as
    training encodes (the tokenizer's chat template; the prompt's end and the completion's start kept within
    `max_tokens`), run longest first in batches, bf16 autocast when asked. Vectors are kept by a hash of the
    token ids in a safetensors file named by the weights', tokenizer's and settings' fingerprint, so a text
    is embedded once per model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        bf16: bool,
        max_tokens: int = 256,
        batch_size: int = 32,
        cache: bool = True,
    ):
        self.model, self.tokenizer, self.bf16, self.batch_size = model, tokenizer, bf16, batch_size
        self.encoder = Encoder(tokenizer, max_tokens, max_tokens // 2)
        self.max_tokens = max_tokens
        digest = hashlib.blake2b(digest_size=8)
        digest.update(f"{weights_fingerprint(model)}{tokenizer_fingerprint(tokenizer)}".encode())
        self.fingerprint = digest.hexdigest()
        name = f"{self.fingerprint}-{'bf16' if bf16 else 'fp32'}-{max_tokens}-completion-mean.safetensors"
        # Without a cache (a reward source scoring fresh samples) nothing is kept between calls.
        self.cache = EmbeddingCache(cache_dir() / "embeddings" / name) if cache else None
        self.computed = 0  # texts this process ran through the model

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        encoded = [self.encoder.encode(*align_kinds(p, c), None, "") for p, c in zip(prompts, completions)]
        keys = [sequence_key(e.prompt_ids, e.completion_ids) for e in encoded]
        known = self.cache.table if self.cache is not None else {}
        missing = list({k: e for k, e in zip(keys, encoded) if k not in known}.items())
        missing.sort(key=lambda item: -len(item[1].prompt_ids) - len(item[1].completion_ids))
        fresh: dict[bytes, torch.Tensor] = {}
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            fresh.update(zip([k for k, _ in chunk], self.pooled([e for _, e in chunk])))
        self.computed += len(missing)
        if fresh and self.cache is not None:
            self.cache.table.update(fresh)
            self.cache.save()
        if not keys:
            return torch.zeros(0, self.dim)
        return torch.stack([fresh[k] if k in fresh else known[k] for k in keys])

    @torch.no_grad()
    def pooled(self, batch: list[Encoded]) -> torch.Tensor:
        """[len(batch), D] fp32 on the CPU: each completion's mean last hidden state."""
        seqs = pad(
            [e.prompt_ids for e in batch], [e.completion_ids for e in batch], self.tokenizer.pad_token_id
        )
        seqs = seqs.to(self.device)
        inputs, context = model_inputs(self.model, *seqs.model_inputs())
        trunk, _ = split_head(self.model)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with autocast, context:
            if trunk is not None:
                states = trunk(**inputs).last_hidden_state
            else:  # no separable trunk: the model's own last hidden states
                states = self.model(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = seqs.completion_mask.unsqueeze(-1).float()
        return ((states.float() * mask).sum(1) / mask.sum(1)).cpu()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def spec(self, model_name: str) -> EmbedderSpec:
        return EmbedderSpec(model_name, self.fingerprint, self.bf16, self.max_tokens)


def load_embedder(
    model_name: str,
    bf16: bool | None = None,
    max_tokens: int = 256,
    batch_size: int = 32,
    cache: bool = True,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
) -> CompletionEmbedder:
    """The frozen LLM `model_name` (as model.name) as an embedder, on `device` (default: the GPU when there is
    one). `bf16=None` decides as train.precision=auto does; `cache=False` keeps no vector on disk."""
    from prospect.models.precision import use_bf16

    model, tokenizer = load_model(ModelConfig(name=model_name, trust_remote_code=trust_remote_code))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.requires_grad_(False)
    model.to(device)  # type: ignore[arg-type]  # transformers' `to` takes a device
    model.eval()
    bf16 = use_bf16("auto", device) if bf16 is None else bf16
    return CompletionEmbedder(model, tokenizer, bf16, max_tokens, batch_size, cache)


class GPOReward:
    """A reward source: GPO's predicted rating of each completion for one group, the group given in-context by
    its labelled examples. `__call__(prompts, completions, fields=None) -> list[float]`, the expected rating
    under the predicted distribution, on the group's own scale (the `levels` the module was trained on)."""

    def __init__(self, module: GPOModule, embed: Embed, context: list[RatedCompletion]):
        if not context:
            raise UserError("GPO reward: the context holds no labelled examples; expected at least one")
        self.module, self.embed = module.eval(), embed
        if len(context) > module.config.max_context:
            log.warning(
                "GPO context: %d examples, more than the %d meta-training showed the module",
                len(context),
                module.config.max_context,
            )
        self.context_x = embed([c.prompt for c in context], [c.completion for c in context])
        self.context_y = torch.tensor([c.distribution for c in context], dtype=torch.float32)

    @classmethod
    def check(cls, spec: str) -> tuple[GPOModule, list[RatedCompletion]]:
        """The module and context of `gpo:RUN:CONTEXT`, read and checked without loading the LLM (cheap: for
        option checks before anything slow runs)."""
        run, context_file = parse_spec(spec)
        module = load_gpo(run)
        if module.config.embedder is None:
            raise UserError(f"{run}/{CONFIG}: names no embedder; retrain it with `prospect gpo train`")
        return module, read_context(context_file, module.config.levels)

    @classmethod
    def from_spec(
        cls, spec: str, device: torch.device | None = None, trust_remote_code: bool = False
    ) -> GPOReward:
        """`gpo:RUN:CONTEXT`: the module saved in RUN (a `prospect gpo train` directory), the LLM it was trained
        on as its embedder (the same weights, checked by fingerprint, and precision; on `device`), and the
        group's {prompt, completion, rating | ratings} rows in CONTEXT (.jsonl, .json, .csv or .parquet). The
        module itself runs on the CPU."""
        module, context = cls.check(spec)
        embedding = module.config.embedder
        assert embedding is not None  # check() refuses a module without one
        # The group's few examples are embedded once here; fresh samples are never written to the cache.
        embedder = load_embedder(
            embedding.model,
            embedding.bf16,
            embedding.max_tokens,
            cache=False,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        if embedder.fingerprint != embedding.fingerprint:
            raise UserError(
                f"{spec}: trained on embeddings of another {embedding.model!r} (fingerprint "
                f"{embedding.fingerprint}, now {embedder.fingerprint}); its predictions would not mean anything"
            )
        return cls(module, embedder, context)

    @torch.no_grad()
    def distributions(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        """The predicted rating distribution of each completion, [N, K]."""
        target_x = self.embed(prompts, completions)
        return self.module.predict(self.context_x[None], self.context_y[None], target_x[None])[0]

    def __call__(
        self, prompts: Sequence[Text], completions: Sequence[Text], fields: list[dict] | None = None
    ) -> list[float]:
        return expected_rating(self.distributions(prompts, completions), self.module.levels).tolist()


def parse_spec(spec: str) -> tuple[str, str]:
    """`gpo:RUN:CONTEXT` (or `RUN:CONTEXT`) -> (RUN, CONTEXT); the last colon splits them."""
    run, _, context_file = spec.removeprefix("gpo:").rpartition(":")
    if not run or not context_file:
        raise UserError(f"{spec!r}: expected gpo:RUN_DIR:CONTEXT_FILE (a GPO run and the group's examples)")
    return run, context_file


def read_context(path: str, levels: list[float]) -> list[RatedCompletion]:
    """A group's labelled examples from a file, each row checked (file, line, field)."""
    if not Path(path).expanduser().is_file():
        raise UserError(
            f"{path}: no such file; expected the group's labelled examples (.jsonl, .json, .csv, .parquet)"
        )
    return [rated_completion(row, levels) for row in read_rows(path)]
