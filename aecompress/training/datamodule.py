"""Weight rows as a training set: the LightningDataModule.

The data module loads the model once, selects the weight groups and keeps
their rows. Everything the LightningModule must know to size itself (rows,
width, stored budget per group) is computed in ``__init__`` so LightningCLI
can link it into the model before either is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import aecompress.methods as methods
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, extract_rows
from aecompress.core.selection import Mode, select_groups
from aecompress.data.calibration import Calibration
from aecompress.data.specs import parse_spec
from aecompress.evaluation import allocation
from aecompress.formats.lazy import checkpoint_keys, open_lazy, read_rows
from aecompress.formats.sources import ModelClass, load_model

log = logging.getLogger(__name__)

_PRELOADED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("aecompress_preloaded", default=None)


@contextlib.contextmanager
def preloaded(name: str, model, source: str, auto_class: str) -> Iterator[None]:
    """Let data modules created inside this block reuse an already loaded model.

    The benchmark loads the model once and trains several compressors on it;
    a data module asked for ``name`` inside the block takes this model instead
    of loading the checkpoint again.
    """
    token = _PRELOADED.set((name, model, source, auto_class))
    try:
        yield
    finally:
        _PRELOADED.reset(token)


def requested_budget(ratio: float | None, bits_per_weight: float | None) -> Budget:
    """The per-group budget a config asks for, in bits per weight or as a ratio (default ratio 10)."""
    if ratio is not None and bits_per_weight is not None:
        raise AECompressError(f"give data.ratio ({ratio}) or data.bits_per_weight ({bits_per_weight}), not both")
    if bits_per_weight is not None:
        return Budget.of_bits(bits_per_weight, "data.bits_per_weight")
    return Budget.of_ratio(10.0 if ratio is None else ratio, "data.ratio")


def budget_options(target: Budget) -> dict[str, float | None]:
    """The ``data.*`` options that ask for exactly ``target``: bits where a float holds them exactly, else a ratio."""
    bits = float(target.bits)
    if Budget.of_bits(bits) == target:
        return {"bits_per_weight": bits, "ratio": None}
    return {"ratio": target.ratio, "bits_per_weight": None}


class RowsDataset(Dataset):
    """Rows of one group: (index, row, norm, weight, member) per item.

    ``member`` is the index of the matrix (layer) the row came from, so a
    data-aware loss can measure each row with its own layer's statistics.
    """

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor, members: torch.Tensor):
        self.rows = rows
        self.norms = rows.norm(dim=1)
        self.weights = weights
        self.members = members

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int):
        return i, self.rows[i], self.norms[i], self.weights[i], self.members[i]


def member_index(group: WeightGroup, model) -> torch.Tensor:
    """For each stacked row, the index of the member matrix it came from."""
    params = dict(model.named_parameters())
    counts = [m.view(params[m.param]).shape[0] for m in group.members]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


class WeightRowsDataModule(L.LightningDataModule):
    """Serves the rows of selected weight matrices of a transformers model.

    Args:
        model: a local directory, a hub id, or a packaged name (``minilm-l6``, ``smollm2-135m``).
        modules: module types from the architecture's preset (``key``, ``k_proj``,
            ``attention``, ``mlp``...) or fnmatch patterns over parameter names.
        mode: ``concatenated`` stacks one module type across all layers so one
            decoder serves them; ``separated`` compresses each matrix on its own.
        include: keep only parameters whose names match one of these patterns.
        exclude: drop parameters whose names match any of these patterns.
        ratio: target compression ratio of every group (original float32 bytes / stored bytes);
            default 10 unless ``bits_per_weight`` is given.
        bits_per_weight: the target as stored bits per selected weight instead (``ratio = 32 / bits``),
            counted by the same accountant; give one of the two.
        allocation: ``uniform`` gives every group the target; ``measured`` shares the same total
            bytes by each group's sensitivity per byte on the calibration text (measured with the
            whitened factorization an autoencoder starts from). The plan is printed before anything
            trains and recorded in the checkpoint and the export.
        batch_size: rows per training batch, per group; 0 trains on all rows at once.
        val_batch_size: rows per validation batch.
        num_workers: DataLoader workers.
        row_weights: optional safetensors file mapping parameter names to 1-D
            per-row weights (e.g. Fisher information) that scale each row's loss.
        model_class: which head to load; ``auto`` follows ``config.architectures``.
        trust_remote_code: allow model code from the checkpoint. Off unless you pass it.
        calibration: text for data-aware training (input covariances of each layer):
            a split name such as ``calibration`` or ``wiki:all[-8192:]``, or a local path.
            Needed by ``model.loss: whitened`` and ``model.init: whitened_svd``.
        calibration_window: tokens per calibration window.
        calibration_tokens: at most this many calibration tokens are used.
        calibration_batch_size: windows per training batch when training on calibration text.
        train_on: ``rows`` or ``calibration`` windows; linked from ``model.loss``
            (``output`` trains on calibration text), so it is never set by hand.
        lazy: read only the selected groups' tensors from a local safetensors checkpoint
            (single file or sharded), on a skeleton of the model that holds no weights.
            The full model is loaded only if something needs it (calibration, the
            ``output`` loss, model-level validation, a compact export).
    """

    def __init__(
        self,
        model: str = "minilm-l6",
        modules: list[str] = ["key"],  # noqa: B006 - jsonargparse reads list defaults from the signature
        mode: Mode = "concatenated",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        ratio: float | None = None,
        bits_per_weight: float | None = None,
        allocation: Literal["uniform", "measured"] = "uniform",
        batch_size: int = 16,
        val_batch_size: int = 4096,
        num_workers: int = 0,
        row_weights: str | None = None,
        model_class: ModelClass = "auto",
        trust_remote_code: bool = False,
        calibration: str | None = None,
        calibration_window: int = 512,
        calibration_tokens: int = 8192,
        calibration_batch_size: int = 1,
        train_on: Literal["rows", "calibration"] = "rows",
        lazy: bool = True,
    ):
        super().__init__()
        target = requested_budget(ratio, bits_per_weight)
        if batch_size < 0 or val_batch_size < 1:
            raise AECompressError(
                f"data.batch_size must be >= 0 (0: all rows) and val_batch_size >= 1, got {batch_size} and {val_batch_size}"
            )
        self.model_name = model
        self.budget = target
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self._load_args = (model, model_class, trust_remote_code)
        self._hf_model = None
        # Lazy: the skeleton (meta device) and the checkpoint's files; else both None.
        self.skeleton, self.tensor_files = None, None
        loaded = _PRELOADED.get()
        if loaded is not None and loaded[0] == model:
            _, self._hf_model, self.source, self.auto_class = loaded
        elif lazy and (opened := open_lazy(model, model_class, trust_remote_code)) is not None:
            self.skeleton, self.tensor_files, self.source, self.auto_class = opened
        else:
            self._hf_model, self.source, self.auto_class = load_model(model, model_class, trust_remote_code)
        structure = self.skeleton if self.skeleton is not None else self._hf_model
        self.groups: list[WeightGroup] = select_groups(structure, modules, mode, include, exclude)
        if self.skeleton is not None and not self._lazy_covers():
            self.skeleton, self.tensor_files, structure = None, None, self.hf_model
        self.rows = {g.name: self._extract(g) for g in self.groups}
        self.members = {g.name: member_index(g, structure) for g in self.groups}
        if calibration is not None and parse_spec(calibration).is_test:
            raise AECompressError(
                f"data.calibration {calibration!r} is a test split; calibrate on other text "
                "(e.g. calibration or wiki:calibration) and keep test for reporting"
            )
        self.calibration_spec = calibration
        self._calibration: Calibration | None = None
        self.calibration_window = calibration_window
        self.calibration_tokens = calibration_tokens
        self.calibration_batch_size = calibration_batch_size
        self.train_on = train_on
        self._check_finite()
        self.weights = self._row_weights(row_weights)
        budgets = self._allocate(allocation, target)
        self.group_specs = [{**g.to_dict(), "bits": budgets[g.name].text, "target_bits": target.text} for g in self.groups]
        for g in self.groups:
            log.info("group %s: %d rows x %d (%d matrices)", g.name, g.rows, g.width, len(g.members))

    def _allocate(self, kind: str, target: Budget) -> dict[str, Budget]:
        """Each group's budget: the target, or a measured plan's (see :mod:`aecompress.evaluation.allocation`)."""
        if kind == "uniform" or len(self.groups) < 2:
            return {g.name: target for g in self.groups}
        if kind != "measured":
            raise AECompressError(f"data.allocation {kind!r} is not valid; valid: uniform, measured")
        calibration = self.calibration()
        stats = calibration.stats(self.groups, "covariance")

        proxy, options = methods.ALLOCATION_PROXY

        def start(group: WeightGroup, at: Budget):
            return methods.compress(proxy, group, self.rows[group.name], at, stats[group.name], **options)

        damage = allocation.damage_on(self.hf_model, calibration.tokenizer, self.calibration_spec)
        chosen = allocation.plan(self.hf_model, self.groups, self.rows, start, damage, target)
        print(chosen.table(self.groups), flush=True)
        return chosen.budgets()

    @property
    def hf_model(self):
        """The full model, loaded on first use when the rows were read lazily."""
        if self._hf_model is None:
            log.info("loading the full model %s (lazy loading covers the rows only)", self.source)
            self._hf_model, _, _ = load_model(*self._load_args)
        return self._hf_model

    def _lazy_covers(self) -> bool:
        params = [m.param for g in self.groups for m in g.members]
        if checkpoint_keys(self.skeleton, self.tensor_files, params) is not None:
            return True
        log.warning("%s stores some selected weights under other names; loading the full model", self.source)
        return False

    def _extract(self, group: WeightGroup) -> torch.Tensor:
        if self.skeleton is not None:
            return read_rows(self.skeleton, self.tensor_files, group)
        return extract_rows(self.hf_model, group)

    def _check_finite(self) -> None:
        for name, rows in self.rows.items():
            bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()
            if len(bad):
                raise AECompressError(
                    f"group {name!r} has {len(bad)} rows with NaN or inf in the source weights "
                    f"(first row index {int(bad[0])}); fix the checkpoint before compressing"
                )

    def _row_weights(self, path: str | None) -> dict[str, torch.Tensor]:
        if path is None:
            return {g.name: torch.ones(g.rows) for g in self.groups}
        try:
            table = load_file(path)
        except Exception as err:
            raise AECompressError(f"cannot read row weights {path!r}: {err}") from err
        weights = {}
        for g in self.groups:
            missing = [m.param for m in g.members if m.param not in table]
            if missing:
                raise AECompressError(f"row weights {path!r} have no entry for {missing[0]!r}")
            w = torch.cat([table[m.param].float().flatten() for m in g.members])
            if w.numel() != g.rows or not torch.isfinite(w).all() or (w < 0).any():
                raise AECompressError(
                    f"row weights for group {g.name!r} must be {g.rows} finite non-negative numbers"
                )
            weights[g.name] = w
        return weights

    def calibration(self) -> Calibration:
        """The calibration text's windows and statistics, made once for this run."""
        if self._calibration is None:
            if self.calibration_spec is None:
                raise AECompressError("this recipe needs calibration text: set data.calibration (e.g. calibration)")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.source)
            self._calibration = Calibration(self.hf_model, tokenizer, self.calibration_spec, self.calibration_tokens,
                                            self.calibration_window, cache_key=self.source)
        return self._calibration

    def calibration_covariances(self) -> dict[str, torch.Tensor]:
        """Per group, the stacked input covariances of its members [members, width, width]."""
        stats = self.calibration().stats(self.groups, "covariance")
        return {g.name: torch.stack(stats[g.name].covariances) for g in self.groups}

    def calibration_token_count(self) -> int:
        """How many calibration tokens the statistics are computed over."""
        return self.calibration_windows().numel()

    def calibration_windows(self) -> torch.Tensor:
        """Calibration text as token windows [n, calibration_window], tokenized once."""
        return self.calibration().windows()

    def dataset(self, name: str) -> RowsDataset:
        """The rows of one group as a dataset."""
        return RowsDataset(self.rows[name], self.weights[name], self.members[name])

    def train_dataloader(self) -> CombinedLoader | DataLoader:
        """One loader per group, cycled together so every step trains every group.

        When training on the model's outputs (``model.loss: output``), batches are
        calibration token windows instead.
        """
        if self.train_on == "calibration":
            windows = TensorDataset(self.calibration_windows())
            return DataLoader(windows, batch_size=self.calibration_batch_size, sampler=self._shuffled(windows))
        loaders = {
            g.name: DataLoader(
                self.dataset(g.name),
                batch_size=self.batch_size or g.rows,
                sampler=self._shuffled(self.dataset(g.name)),
                num_workers=self.num_workers,
            )
            for g in self.groups
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        """All rows of every group, in group order (dataloader index = group index).

        Under DDP each rank validates its own rows, each row exactly once, and the
        metrics' sums are reduced across ranks: the values equal a single process's.
        """
        world, rank = self._world()
        return [
            DataLoader(self.dataset(g.name), batch_size=self.val_batch_size, num_workers=self.num_workers,
                       sampler=RowShard(self.dataset(g.name), world, rank))
            for g in self.groups
        ]

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _shuffled(self, dataset: Dataset) -> DistributedSampler:
        """This rank's share of the rows, reshuffled each epoch from the run's seed and the epoch alone.

        Lightning calls ``set_epoch``, so a resumed run sees the same order as an
        uninterrupted one; under DDP each rank draws a disjoint share.
        """
        world, rank = self._world()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class RowShard(DistributedSampler):
    """Rank r of w takes rows r, r + w, r + 2w, ... in order: every row once, no padding."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
