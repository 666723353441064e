"""The training groups: the network (model), its optimizers and schedule (optim), checkpoints,
the loop's cadences (trainer) and logging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from app.config.data import check_location
from app.config.fields import _require, _require_choice, doc, doc_factory

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
LR_DECAYS = ("none", "linear", "cosine")
MODEL_ARCHS = ("dlrm", "dcn", "deepfm")
MULTI_TASK_ARCHS = ("shared_bottom", "mmoe")
PIPELINES = ("sparse_dist", "base")
PRECISIONS = ("fp32", "bf16", "fp16")
# Validation metrics early stopping and the best checkpoint can follow: higher is better for auc.
EARLY_STOPPING_METRICS = ("auc", "logloss", "ne")
HIGHER_IS_BETTER = ("auc",)


@dataclass
class ModelConfig:
    arch: str = doc(
        "dlrm",
        "dlrm: dot-product feature interaction (torchrec's DLRM); dcn: a low-rank DCNv2 "
        "cross network as the interaction (DLRM_DCN); deepfm: DeepFM's factorization machine "
        "beside a deep layer (app/models/deepfm.py).",
    )
    dense_arch_layer_sizes: List[int] = doc(
        [64, 16],
        "Layer sizes of the dense arch, which maps the dense "
        "features to one embedding-sized vector: the last size must "
        "equal features.embedding_dim.",
    )
    over_arch_layer_sizes: List[int] = doc(
        [64, 32, 1], "Layer sizes of the over arch on top of the interaction: at least two, ending in 1 (one logit)."
    )
    dcn_num_layers: int = doc(3, "Cross layers of the DCNv2 interaction (model.arch=dcn).")
    dcn_low_rank_dim: int = doc(32, "Rank of each cross layer's low-rank weight (model.arch=dcn).")
    deep_fm_dimension: int = doc(64, "Width of DeepFM's deep layer over the concatenated vectors (model.arch=deepfm).")
    multi_task: str = doc(
        "shared_bottom",
        "With features.labels (several tasks): shared_bottom puts one tower per "
        "task on the over arch's hidden layers (all of over_arch_layer_sizes but "
        "the final 1); mmoe mixes model.num_experts experts, each such a stack "
        "of layers, by a softmax gate per task, under each task's tower.",
    )
    tower_layer_sizes: List[int] = doc(
        [16],
        "Hidden layer sizes of each task's tower (multi-task), before its one "
        "logit; may be empty (a linear layer to the logit).",
    )
    num_experts: int = doc(4, "Experts of model.multi_task=mmoe, >= 1.")
    sequence_attention_layer_sizes: List[int] = doc(
        [32],
        "Hidden layer sizes of the DIN attention unit of each "
        "sequence feature (features.sequence): an MLP over "
        "[query, key, query - key, query * key] giving each "
        "history position its weight.",
    )

    def validate(self) -> None:
        _require_choice("model.arch", self.arch, MODEL_ARCHS)
        for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            sizes = getattr(self, key)
            _require(
                len(sizes) > 0 and all(s > 0 for s in sizes),
                f"model.{key} must be a non-empty list of positive sizes, got {list(sizes)}.",
            )
        _require(
            len(self.over_arch_layer_sizes) >= 2 and self.over_arch_layer_sizes[-1] == 1,
            "model.over_arch_layer_sizes must have at least two layers and end in 1 (one logit), "
            f"got {list(self.over_arch_layer_sizes)}.",
        )
        _require(self.dcn_num_layers > 0, f"model.dcn_num_layers must be > 0, got {self.dcn_num_layers}.")
        _require_choice("model.multi_task", self.multi_task, MULTI_TASK_ARCHS)
        _require(
            all(s > 0 for s in self.tower_layer_sizes),
            f"model.tower_layer_sizes must be positive sizes, got {list(self.tower_layer_sizes)}.",
        )
        _require(self.num_experts >= 1, f"model.num_experts must be >= 1, got {self.num_experts}.")
        _require(self.deep_fm_dimension > 0, f"model.deep_fm_dimension must be > 0, got {self.deep_fm_dimension}.")
        attention = self.sequence_attention_layer_sizes
        _require(
            len(attention) > 0 and all(s > 0 for s in attention),
            "model.sequence_attention_layer_sizes must be a non-empty list of positive sizes, got "
            f"{list(self.sequence_attention_layer_sizes)}.",
        )
        _require(self.dcn_low_rank_dim > 0, f"model.dcn_low_rank_dim must be > 0, got {self.dcn_low_rank_dim}.")


@dataclass
class OptimConfig:
    lr: float = doc(
        0.05, "Learning rate of both optimizers unless optim.sparse_lr is set, so optim.lr=... sweeps the whole model."
    )
    sparse_lr: Optional[float] = doc(None, "Learning rate of the embedding tables (null: optim.lr).")
    dense: str = doc("adagrad", f"Optimizer of the dense layers: {', '.join(DENSE_OPTIMIZERS)}.")
    sparse: str = doc(
        "rowwise_adagrad",
        f"Optimizer of the embedding tables, fused into their backward by FBGEMM: "
        f"{', '.join(SPARSE_OPTIMIZERS)} (FBGEMM's CPU kernels fuse all but adam, "
        "which needs CUDA).",
    )
    eps: float = doc(1e-8, "Epsilon of adagrad, rowwise_adagrad and adam.")
    weight_decay: float = doc(0.0, "L2 on the dense layers; the tables get none (see app/optim.py).")
    betas: List[float] = doc([0.9, 0.999], "Adam's two betas, each in [0, 1).")
    warmup_steps: int = doc(
        0,
        "The schedule (a multiplier on both learning rates) warms up linearly from 0 over "
        "this many steps, then stays constant until optim.decay_start_step.",
    )
    decay: str = doc("none", f"Decay after optim.decay_start_step: {', '.join(LR_DECAYS)}.")
    decay_start_step: int = doc(0, "Step at which the decay starts.")
    decay_steps: int = doc(0, "Steps the decay takes to reach optim.min_lr_ratio (0: until the last step).")
    min_lr_ratio: float = doc(0.0, "The multiplier the decay ends at, in [0, 1].")
    clip_grad_norm: Optional[float] = doc(
        None,
        "Clip the dense part's gradients (dense layers and replicated "
        "tables) to this total L2 norm before each step (null: no "
        "clipping). Synchronous: the norm of the gradient averaged over "
        "the ranks. Under k-step averaging (trainer.dense_average_every): "
        "sqrt(mean over ranks of each rank's squared norm), the same "
        "factor on every rank.",
    )
    sparse_clip_value: Optional[float] = doc(
        None,
        "Clamp each element of each sample's gradient of a table's "
        "pooled embedding (each position's, for sequence tables) to "
        "[-value, value] before it is summed into the rows (FBGEMM's "
        "gradient_clipping; replicated tables get the same): a row met "
        "k times in a step moves by up to k x value x lr per element "
        "under SGD. null: none.",
    )

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}.")
        _require(
            self.sparse_lr is None or self.sparse_lr > 0,
            f"optim.sparse_lr must be > 0 or null (use optim.lr), got {self.sparse_lr}.",
        )
        _require_choice("optim.dense", self.dense, DENSE_OPTIMIZERS)
        _require_choice("optim.sparse", self.sparse, SPARSE_OPTIMIZERS)
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}.")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}.",
        )
        _require_choice("optim.decay", self.decay, LR_DECAYS)
        for key in ("warmup_steps", "decay_start_step", "decay_steps"):
            _require(getattr(self, key) >= 0, f"optim.{key} must be >= 0, got {getattr(self, key)}.")
        for key in ("clip_grad_norm", "sparse_clip_value"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"optim.{key} must be > 0 or null, got {value}.")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")

    @property
    def effective_sparse_lr(self) -> float:
        return self.lr if self.sparse_lr is None else self.sparse_lr


@dataclass
class CheckpointConfig:
    every_n_steps: int = doc(
        500,
        "Save a checkpoint every this many steps, and always at the end (0: only at the "
        "end); also at every evaluation that improves the best validation metric "
        "(trainer.early_stopping.metric), which checkpoints/best then names.",
    )
    dir: Optional[str] = doc(
        None,
        "The run's checkpoints directory (null: <output_root>/<run_name>/checkpoints): "
        "a local directory or an object-store URL, e.g. s3://bucket/runs/${run_name} "
        "(credentials and endpoint from the environment, as for data URLs).",
    )
    keep_last: int = doc(
        2, "How many of the newest checkpoints are kept: older ones are deleted, except the one checkpoints/best names."
    )
    resume: bool = doc(True, "Resume from the newest intact checkpoint of this run when there is one.")
    async_save: bool = doc(
        False, "Write checkpoints in the background while training goes on (the state is copied first)."
    )
    load_from: Optional[str] = doc(
        None,
        "Start a run that has no checkpoint of its own from another run's: a run "
        "directory, its checkpoints/ directory or one step_N directory.",
    )
    load_mode: str = doc(
        "all",
        "What checkpoint.load_from takes: all continues that run's step, optimizer state, "
        "LR schedule and data position; model takes its weights only.",
    )

    def validate(self) -> None:
        _require(self.every_n_steps >= 0, f"checkpoint.every_n_steps must be >= 0, got {self.every_n_steps}.")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}.")
        _require_choice("checkpoint.load_mode", self.load_mode, ("all", "model"))
        for key in ("dir", "load_from"):
            if getattr(self, key):
                check_location(f"checkpoint.{key}", getattr(self, key))


@dataclass
class EarlyStoppingConfig:
    metric: str = doc(
        "auc",
        "The validation metric that decides which checkpoint is the best (checkpoints/best) and "
        "when to stop early: auc (higher is better), logloss or ne (lower is better).",
    )
    patience: int = doc(
        0,
        "Stop after this many evaluations in a row without an improvement of the metric by more "
        "than min_delta (0: never stop for that).",
    )
    min_delta: float = doc(
        0.0,
        "How much better than the best so far an evaluation must be to count as an "
        "improvement (for the patience and for checkpoints/best).",
    )
    target: Optional[float] = doc(
        None,
        "Stop once the validation metric reaches this value (auc >= target; "
        "logloss, ne <= target); null: never stop for that. MLPerf DLRMv2: auc "
        "0.80275.",
    )
    task: Optional[str] = doc(
        None,
        "Multi-task (features.labels): the task whose metric decides, and whose "
        "metrics are the unprefixed ones (auc, logloss, ...: the final AUC printed and "
        "returned to sweeps, the test line); null: the first task.",
    )

    def validate(self) -> None:
        _require_choice("trainer.early_stopping.metric", self.metric, EARLY_STOPPING_METRICS)
        _require(
            self.patience >= 0,
            f"trainer.early_stopping.patience must be >= 0 evaluations (0: never), got {self.patience}.",
        )
        _require(
            self.min_delta >= 0 and math.isfinite(self.min_delta),
            f"trainer.early_stopping.min_delta must be >= 0, got {self.min_delta}.",
        )
        _require(
            self.target is None or math.isfinite(self.target),
            f"trainer.early_stopping.target must be a number or null, got {self.target}.",
        )


@dataclass
class TrainerConfig:
    epochs: int = doc(2, "Passes over the training data.")
    max_steps: Optional[int] = doc(None, "Stop early after this many steps in total (null: train every epoch).")
    eval_every_n_steps: int = doc(1000, "Evaluate every this many steps, and always at the end (0: only at the end).")
    eval_max_batches: Optional[int] = doc(None, "Evaluation batches per rank (null: the whole validation split).")
    log_every_n_steps: int = doc(20, "Log the training loss, learning rates and throughput every this many steps.")
    pipeline: str = doc(
        "sparse_dist",
        "sparse_dist: torchrec's TrainPipelineSparseDist, which overlaps the next "
        "batches' copy to the device and their ids' all-to-all with the current step; "
        "base: one plain step after another.",
    )
    precision: str = doc(
        "fp32",
        "Precision of the dense arch, interaction and over arch: fp32, bf16 (autocast; "
        "fast on CPUs with AVX512-BF16 or AMX, correct but slow on other CPUs; GPUs from "
        "Ampere on) or fp16 (autocast with a "
        "dynamic loss scale; fast on GPUs). Tables, loss and metrics stay in fp32; "
        "features.data_type sets the tables' own precision. fp16: a step whose gradients "
        "overflow on any rank (dense or into the tables) changes nothing anywhere, the "
        "tables included, and halves the scale; the scale is checkpointed and resumes "
        "exactly.",
    )
    dense_average_every: int = doc(
        0,
        "0: the dense part's gradients are all-reduced every step (synchronous data "
        "parallel). k > 0: each rank steps its dense part on its own gradients, and "
        "the ranks average their dense parameters every k steps (and before every "
        "evaluation and checkpoint): k-step model averaging, 1/k of the dense "
        "all-reduces. Embedding tables stay sharded and exact.",
    )
    max_nonfinite_steps: int = doc(
        3,
        "Stop the run (exit 2, naming the step) once the training loss has been nan or "
        "inf on some rank for this many steps in a row: it diverged. Checked at every "
        "log line (trainer.log_every_n_steps) and before every checkpoint and "
        "evaluation, which are skipped while the latest step's loss is not finite; a "
        "run whose last step's loss is not finite stops the same way. Nothing "
        "non-finite is saved: the checkpoints before it are kept.",
    )
    early_stopping: EarlyStoppingConfig = doc_factory(
        EarlyStoppingConfig,
        "The best checkpoint by a validation metric, and stopping when that metric stops "
        "improving or reaches a target. Evaluations are trainer.eval_every_n_steps apart.",
    )

    def validate(self) -> None:
        self.early_stopping.validate()
        _require(self.epochs >= 1, f"trainer.epochs must be >= 1, got {self.epochs}.")
        _require(
            self.dense_average_every >= 0,
            f"trainer.dense_average_every must be >= 0 steps, got {self.dense_average_every}.",
        )
        _require(
            self.max_steps is None or self.max_steps >= 1,
            f"trainer.max_steps must be >= 1 or null, got {self.max_steps}.",
        )
        _require(
            self.eval_every_n_steps >= 0, f"trainer.eval_every_n_steps must be >= 0, got {self.eval_every_n_steps}."
        )
        _require(
            self.eval_max_batches is None or self.eval_max_batches >= 1,
            f"trainer.eval_max_batches must be >= 1 or null, got {self.eval_max_batches}.",
        )
        _require(
            self.max_nonfinite_steps >= 1,
            f"trainer.max_nonfinite_steps must be >= 1 steps, got {self.max_nonfinite_steps}.",
        )
        _require(self.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {self.log_every_n_steps}.")
        _require_choice("trainer.pipeline", self.pipeline, PIPELINES)
        _require_choice("trainer.precision", self.precision, PRECISIONS)


@dataclass
class MlflowConfig:
    """MLflow tracking, an optional sink beside metrics.jsonl and TensorBoard (rank 0 logs)."""

    tracking_uri: Optional[str] = doc(
        None,
        "MLflow tracking server (http://host:5000) or store the run is logged to; "
        "null: no MLflow. Needs the mlflow extra (pip install 'rectrain[mlflow]').",
    )
    experiment: Optional[str] = doc(None, "MLflow experiment (null: run_name, which a sweep's points share).")
    run_name: Optional[str] = doc(
        None, "MLflow run name (null: the run directory's name: run_name, or a sweep point's overrides)."
    )

    def validate(self) -> None:
        if self.tracking_uri is None:
            return
        import importlib.util

        _require(bool(self.tracking_uri), "logging.mlflow.tracking_uri must be a URI, or null for no MLflow.")
        _require(
            importlib.util.find_spec("mlflow") is not None,
            f"logging.mlflow.tracking_uri={self.tracking_uri!r}, but the mlflow package is not installed: "
            "pip install 'rectrain[mlflow]' (make setup installs it), or logging.mlflow.tracking_uri=null.",
        )


@dataclass
class LoggingConfig:
    progress_bar: bool = doc(True, "Show a progress bar on rank 0's console.")
    tensorboard: bool = doc(
        True,
        "Write the metrics as TensorBoard scalars under tb/ in the run directory (metrics.jsonl is always written).",
    )
    level: str = doc("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.")
    mlflow: MlflowConfig = doc_factory(MlflowConfig, "MLflow tracking: parameters, metrics and artifacts of the run.")

    def validate(self) -> None:
        _require_choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        self.mlflow.validate()
