"""The feature schema: which Parquet columns feed the model, and the embedding tables they need.

Every other module asks this one for column names and table definitions, so a feature is declared
once, in configs/features/, and the model, the planner, the loader and the generator agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import FeaturesConfig, SequenceFeature, SparseFeature

if TYPE_CHECKING:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig


def table_name(feature_name: str) -> str:
    return f"t_{feature_name}"


@dataclass(frozen=True)
class FeatureSchema:
    label: str
    dense: tuple[str, ...]
    sparse: tuple[SparseFeature, ...]
    embedding_dim: int
    pooling: str
    data_type: str = "fp32"
    labels: tuple[str, ...] = ()  # multi-task: every task's label column (label is the first); () for one task
    sequence: tuple[SequenceFeature, ...] = ()

    @classmethod
    def from_config(cls, config: FeaturesConfig) -> FeatureSchema:
        return cls(
            label=config.tasks()[0],
            dense=tuple(config.dense),
            sparse=tuple(config.sparse),
            embedding_dim=config.embedding_dim,
            pooling=config.pooling,
            data_type=config.data_type,
            labels=tuple(config.tasks()) if config.labels else (),
            sequence=tuple(config.sequence),
        )

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def tasks(self) -> tuple[str, ...]:
        """The label columns, one per task: features.labels' names, or the one label."""
        return self.labels or (self.label,)

    @property
    def columns(self) -> list[str]:
        """Every column the loader reads, in a fixed order."""
        return [*self.tasks, *self.dense, *self.sparse_names, *self.sequence_names]

    def table_data_type(self, feature: SparseFeature) -> str:
        return feature.data_type or self.data_type

    def table_dim(self, feature: SparseFeature) -> int:
        return feature.embedding_dim or self.embedding_dim

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        # Imported here: the Parquet reader processes unpickle a FeatureSchema, and importing
        # torchrec there would add seconds to their start (app/data/reader_process.py).
        from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

        data_types = {"fp32": DataType.FP32, "fp16": DataType.FP16}

        pooling = PoolingType.SUM if self.pooling == "sum" else PoolingType.MEAN
        return [
            EmbeddingBagConfig(
                name=table_name(f.name),
                embedding_dim=self.table_dim(f),
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
                pooling=pooling,
                data_type=data_types[self.table_data_type(f)],
            )
            for f in self.sparse
        ]

    # ---- sequence features (features.sequence) ----

    @property
    def sequence_names(self) -> list[str]:
        return [f.name for f in self.sequence]

    def sequence_dim(self, feature: SequenceFeature) -> int:
        return feature.embedding_dim or self.embedding_dim

    @property
    def sequence_inputs(self) -> list[tuple[str, int]]:
        """The sequence KeyedJaggedTensor's keys, each with the decoded feature it is read from
        (Rows.ids[index]: the sparse features, the histories, then each history's candidates):
        per history its own key and target_key(name), the candidate's ids, looked up in the
        history's table (and mapped into it as the history's ids are: app/data/batch.py decode)."""
        count, histories = len(self.sparse), len(self.sequence)
        inputs: list[tuple[str, int]] = []
        for i, feature in enumerate(self.sequence):
            inputs += [(feature.name, count + i), (target_key(feature.name), count + histories + i)]
        return inputs

    def embedding_configs(self) -> list[EmbeddingConfig]:
        """The histories' tables (an EmbeddingCollection's): one per sequence feature, shared by the
        history and its candidate (fp32: export and checkpoints read them as they are)."""
        from torchrec.modules.embedding_configs import EmbeddingConfig

        return [
            EmbeddingConfig(
                name=table_name(f.name),
                embedding_dim=self.sequence_dim(f),
                num_embeddings=f.num_embeddings,
                feature_names=[f.name, target_key(f.name)],
                weight_init_min=-SEQUENCE_INIT,
                weight_init_max=SEQUENCE_INIT,
            )
            for f in self.sequence
        ]


# Initial weights of the histories' tables, uniform in [-SEQUENCE_INIT, SEQUENCE_INIT]: torchrec's
# default, 1/sqrt(rows), makes every vector so short that q * k and q - k tell an item that is the
# candidate from one that is not by almost nothing, and the attention unit learns slowly.
SEQUENCE_INIT = 0.5


def target_key(sequence_name: str) -> str:
    """The sequence KeyedJaggedTensor's key of a history's candidate ids."""
    return f"{sequence_name}__target"
