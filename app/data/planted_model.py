"""The planted truth of the synthetic dataset: a known logistic model over the features that draws
each row's features and its label, so that each row's true click probability is known.

The first task's logit sums per-id weights, pairwise interactions of per-id latent vectors and
dense terms (with sequence features, also whether the candidate is in the history); a later task
(multi-task) happens only where the first did, with terms of its own. Ids follow a power law,
like real categorical features (a few ids are very frequent), or a uniform distribution. Nothing
is stored per id: the per-id weights and latent vectors are hashes of (seed, feature, id), so
tables of any size cost no memory. With data.synthetic.id_bits the ids are written as raw 64-bit
ids spread over 2**id_bits values instead (the same rows, the same truth).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa

from app.config import SyntheticConfig

if TYPE_CHECKING:  # app.features imports torchrec
    from app.features import FeatureSchema

LATENT_DIM = 4
# Each row's true click probability, beside the features (the loader reads only the features).
PROBABILITY_COLUMN = "click_probability"


def task_probability_column(task: str) -> str:
    """The column of a later task's true probability (multi-task; the first task's is PROBABILITY_COLUMN)."""
    return f"{task}_probability"


_UInt64s = TypeVar("_UInt64s", np.ndarray, np.uint64)  # an array of them, or one


def _splitmix64(x: _UInt64s) -> _UInt64s:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hashed_normal(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    """A standard normal per (seed, salt, id), the same every time it is asked for."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(salt))
        h1 = _splitmix64(ids.astype(np.uint64) ^ key)
        h2 = _splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _power_law_ids(
    rng: np.random.Generator, count: int, num_embeddings: int, exponent: float, scatter: tuple[int, int]
) -> np.ndarray:
    """Ids with P(k-th most frequent) ~ k^-exponent (inverse CDF of the continuous law), the
    frequency ranks scattered over the table by an affine bijection."""
    u = rng.random(count)
    n1 = num_embeddings + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = n1**u
    else:
        x = (1.0 + u * (n1 ** (1.0 - exponent) - 1.0)) ** (1.0 / (1.0 - exponent))
    ranks = np.clip(np.floor(x).astype(np.int64) - 1, 0, num_embeddings - 1)
    multiplier, offset = scatter
    return (ranks * multiplier + offset) % num_embeddings


def _scatter(seed: int, feature_index: int, num_embeddings: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, 7, feature_index])
    while True:
        multiplier = int(rng.integers(1, 2**31 - 1))
        if math.gcd(multiplier, num_embeddings) == 1:
            return multiplier % num_embeddings or 1, int(rng.integers(0, num_embeddings))


class PlantedModel:
    """Per-id weights, latent vectors for chained feature pairs, dense weights, and a bias."""

    # Scales chosen so the default schema gives a best achievable AUC near 0.8 and a CTR near 0.25.
    ID_WEIGHT = 0.45
    INTERACTION = 0.5
    DENSE_WEIGHT = 0.25

    def __init__(self, schema: FeatureSchema, cfg: SyntheticConfig) -> None:
        self.schema = schema
        self.seed = cfg.seed
        rng = np.random.default_rng([cfg.seed, 1])
        self.dense_weights = rng.normal(0.0, self.DENSE_WEIGHT, len(schema.dense))
        self.dense_log_means = rng.uniform(0.0, 3.0, len(schema.dense))
        self.bias = -1.3
        # Interactions between neighbouring features: enough structure for the interaction layer.
        count = len(schema.sparse)
        self.pairs = [(i, i + 1) for i in range(0, count - 1, 2)]
        self.scatter = [_scatter(cfg.seed, i, f.num_embeddings) for i, f in enumerate(schema.sparse)]
        self.id_bits = cfg.id_bits
        spread = np.random.default_rng([cfg.seed, 9])
        # An odd multiplier makes x -> x * multiplier + offset (mod 2**id_bits) a bijection.
        self.spread = [(int(spread.integers(0, 2**62)) | 1, int(spread.integers(0, 2**62))) for _ in schema.sparse]

    def written_ids(self, feature_index: int, ids: np.ndarray) -> np.ndarray:
        """The ids as the files hold them: table rows, or raw ids spread over [0, 2**id_bits)."""
        if not self.id_bits:
            return ids
        multiplier, offset = self.spread[feature_index]
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps: mod 2**64, then mod 2**id_bits
            raw = ids.astype(np.uint64) * np.uint64(multiplier) + np.uint64(offset)
        return (raw & np.uint64(2**self.id_bits - 1)).astype(np.int64)

    def _bag_mean(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Mean of a per-id quantity over each row's ids (rows have >= 1 id)."""
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return np.add.reduceat(values, offsets, axis=0) / lengths.reshape((-1,) + (1,) * (values.ndim - 1))

    @staticmethod
    def _first_ids(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each row's first id (rows have >= 1 id): a multi-hot target's candidate."""
        return ids[np.concatenate([[0], np.cumsum(lengths)[:-1]])]

    def _history(
        self, rng: np.random.Generator, rows: int, index: int, history, candidates: np.ndarray, cfg: SyntheticConfig
    ) -> tuple[pa.Array, np.ndarray]:
        """(the list column, whether each row's candidate is among its most recent max_length ids).
        Histories hold 0 to 2 x max_length ids, drawn as the sparse ids are; half the rows that
        have any get their candidate planted at one of their most recent max_length positions."""
        recent = history.max_length
        lengths = rng.integers(0, 2 * recent + 1, rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        total = int(offsets[-1])
        if cfg.id_distribution == "uniform":
            ids = rng.integers(0, history.num_embeddings, total)
        else:
            ids = _power_law_ids(
                rng, total, history.num_embeddings, cfg.zipf_exponent, _scatter(cfg.seed, index, history.num_embeddings)
            )
        window = np.minimum(lengths, recent)
        planted = (rng.random(rows) < 0.5) & (lengths > 0)
        back = np.floor(rng.random(rows) * window).astype(np.int64)  # 0: the most recent id
        ids[(offsets[1:] - 1 - back)[planted]] = candidates[planted]
        row = np.repeat(np.arange(rows), lengths)
        in_window = np.arange(total) >= np.repeat(offsets[1:] - window, lengths)
        matched = (ids == candidates[row]) & in_window
        hit = np.bincount(row[matched], minlength=rows) > 0
        column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids.astype(np.int64)))
        return column, hit.astype(np.float64)

    def sample(
        self, rng: np.random.Generator, rows: int, cfg: SyntheticConfig
    ) -> tuple[dict[str, pa.Array], np.ndarray]:
        columns: dict[str, pa.Array] = {}
        logit = np.full(rows, self.bias)
        # Count-like values, written as log(1 + count): the transform the Criteo converter applies.
        counts = np.floor(np.exp(rng.normal(self.dense_log_means, 1.0, (rows, len(self.schema.dense)))))
        dense = np.log1p(counts)
        logit += (dense - self.dense_log_means) @ self.dense_weights
        for j, name in enumerate(self.schema.dense):
            columns[name] = pa.array(dense[:, j].astype(np.float32))
        latent: list[np.ndarray] = []
        drawn: list[tuple[np.ndarray, np.ndarray]] = []  # each feature's (ids, lengths): histories, later tasks
        for i, feature in enumerate(self.schema.sparse):
            hot = feature.hotness
            lengths = rng.integers(1, hot + 1, rows) if hot > 1 else np.ones(rows, dtype=np.int64)
            if cfg.id_distribution == "uniform":
                ids = rng.integers(0, feature.num_embeddings, int(lengths.sum()))
            else:
                ids = _power_law_ids(
                    rng, int(lengths.sum()), feature.num_embeddings, cfg.zipf_exponent, self.scatter[i]
                )
            logit += self.ID_WEIGHT * self._bag_mean(_hashed_normal(self.seed, 2 * i, ids), lengths)
            vectors = np.stack(
                [_hashed_normal(self.seed, 1000 + LATENT_DIM * i + d, ids) for d in range(LATENT_DIM)], 1
            )
            latent.append(self._bag_mean(vectors, lengths))
            drawn.append((ids, lengths))  # the candidates of features.sequence, as table rows
            ids = self.written_ids(i, ids)
            if hot > 1:
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                columns[feature.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
            else:
                columns[feature.name] = pa.array(ids)
        for a, b in self.pairs:
            logit += self.INTERACTION * (latent[a] * latent[b]).sum(1) / math.sqrt(LATENT_DIM)
        for j, history in enumerate(self.schema.sequence):  # drawn after the rest: their rows stay the same
            candidates = self._first_ids(*drawn[self.schema.sparse_names.index(history.target)])
            column, hit = self._history(rng, rows, len(self.schema.sparse) + j, history, candidates, cfg)
            columns[history.name] = column
            logit += cfg.sequence_signal * (hit - 0.5)
        probability = 1.0 / (1.0 + np.exp(-logit))
        columns[self.schema.label] = pa.array((rng.random(rows) < probability).astype(np.int8))
        if len(self.schema.tasks) > 1:  # drawn after everything else: the first task's rows stay the same
            self.later_tasks(rng, columns, logit - self.bias, probability, drawn, dense)
        return columns, probability

    # Later tasks (a conversion after a click): P(task k) = P(first task) * sigmoid(TASK_BIAS +
    # TASK_SHARED * (first task's logit without its bias) + the task's own per-id and dense terms).
    # On features=planted: 14% of clicks convert (5.6% of rows); the conversion's best AUC is 0.92,
    # and the true click probability alone ranks conversions at 0.83 (experiment=multitask's val split).
    TASK_BIAS = -4.0
    TASK_SHARED = 0.3
    # The task's own per-id terms sum to a normal of this deviation (single-hot features), however
    # many features there are: its signal does not fade with fewer of them.
    TASK_OWN = 1.8

    def later_tasks(
        self,
        rng: np.random.Generator,
        columns: dict[str, pa.Array],
        first_logit: np.ndarray,
        first_probability: np.ndarray,
        drawn: list[tuple[np.ndarray, np.ndarray]],
        dense: np.ndarray,
    ) -> None:
        """Adds each later task's label column and its true probability ("<task>_probability") to
        `columns`: a task that can happen only where the first did, correlated with it through the
        first task's logit, with a signal of its own (per-id weights of its own)."""
        first = columns[self.schema.label].to_numpy() > 0
        for k, task in enumerate(self.schema.tasks[1:], start=1):
            own = np.zeros(len(first_logit))
            scale = self.TASK_OWN / math.sqrt(len(drawn))
            for i, (ids, lengths) in enumerate(drawn):  # hashed weights: no draw from rng
                own += scale * self._bag_mean(_hashed_normal(self.seed, 100_000 * k + 2 * i, ids), lengths)
            dense_weights = np.random.default_rng([self.seed, 11, k]).normal(0.0, self.DENSE_WEIGHT, dense.shape[1])
            own = own + (dense - self.dense_log_means) @ dense_weights
            given_first = 1.0 / (1.0 + np.exp(-(self.TASK_BIAS + self.TASK_SHARED * first_logit + own)))
            columns[task] = pa.array((first & (rng.random(len(first)) < given_first)).astype(np.int8))
            columns[task_probability_column(task)] = pa.array(first_probability * given_first)
