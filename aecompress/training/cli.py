"""The training commands: LightningCLI for ``fit`` and ``validate``, with an ``export`` subcommand.

``fit`` and ``validate`` are Lightning's own. ``export`` is a method of :class:`AETrainer`,
registered through ``subcommands()``, so it takes the same ``--config`` as ``fit`` and its
flags come from its signature. :func:`build_cli` is the one way the CLI is built, for the
``aecompress`` command and for benchmark recipes alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.files import read_json
from aecompress.formats import sidecar
from aecompress.formats.export import check_dtype, export, refuse_own_source
from aecompress.formats.sidecar import ExportFormat
from aecompress.formats.streaming import export_streaming
from aecompress.training.arguments import explain
from aecompress.training.checkpoints import SafeLoading, load_weights
from aecompress.training.datamodule import WeightRowsDataModule
from aecompress.training.module import CompressorModule
from aecompress.training.report import card_info
from aecompress.training.rundir import RunConfig
from aecompress.training.timing import FitTimer

log = logging.getLogger(__name__)


class AETrainer(L.Trainer):
    """Lightning's Trainer plus the export step."""

    def export(
        self,
        model: CompressorModule,
        datamodule: WeightRowsDataModule,
        ckpt_path: str,
        out_dir: str,
        format: ExportFormat = "decoded",  # noqa: A002 - the flag users type is --format
        overwrite: bool = False,
        stream: bool | None = None,
        dtype: FloatDtype = "float32",
    ) -> None:
        """Write the compressed model as a Hugging Face checkpoint.

        Args:
            model: the compressor (from the config).
            datamodule: the weight rows and source model (from the config).
            ckpt_path: a checkpoint written by ``aecompress fit`` with this config.
            out_dir: the directory to create.
            format: ``decoded`` (plain transformers, full size), ``compact``
                (latents + decoder + remaining weights; read with ``aecompress.load_compact``) or
                ``compressed-tensors`` (integer codes only: ``quantize``, ``compensated`` without ``fill``).
            overwrite: replace ``out_dir`` if it exists.
            stream: write the decoded format shard by shard from the source's safetensors
                files, one tensor in memory at a time (never the whole model). Default: when
                the rows were read lazily (``data.lazy`` on a local safetensors checkpoint).
            dtype: the decoded format's floating weights: ``float32`` (the decoded values exactly), ``float16``
                or ``bfloat16`` (half the size; ``config.json`` records it).
        """
        streaming = _streams(stream, format, datamodule)
        refuse_own_source(datamodule.source, out_dir)
        check_dtype(dtype, format)
        self.strategy.barrier("aecompress-export-start")
        if self.is_global_zero:
            load_weights(model, ckpt_path)
            forms = model.stored_forms(datamodule.rows)
            info = card_info(ckpt_path, out_dir, format, getattr(self, "config_paths", []))
            if streaming:
                export_streaming(datamodule.skeleton, datamodule.tensor_files, forms, datamodule.source,
                                 datamodule.auto_class, datamodule.model_name, out_dir, overwrite, card_info=info,
                                 dtype=dtype)
            else:
                export(datamodule.hf_model, forms, datamodule.source, datamodule.auto_class,
                       datamodule.model_name, out_dir, format, overwrite, card_info=info, dtype=dtype)
            meta = read_json(Path(out_dir) / sidecar.SIDECAR)
            whole = meta["whole_model"]
            print(f"exported {format} model to {out_dir}: {meta['bits_per_weight']:.3f} bits per weight in the "
                  f"compressed groups (ratio {meta['achieved_ratio']:.3f}), {whole['bits_per_weight']:.3f} for the "
                  f"whole model (ratio {whole['ratio']:.3f})")
        self.strategy.barrier("aecompress-export")


def _streams(stream: bool | None, fmt: str, datamodule: WeightRowsDataModule) -> bool:
    """Whether ``export`` streams: asked for, or by default whenever the rows were read lazily."""
    lazy = datamodule.tensor_files is not None
    if stream and fmt != "decoded":
        raise AECompressError(f"--stream writes the decoded format only, not {fmt!r}; drop --stream or use --format decoded")
    if stream and not lazy:
        raise AECompressError(
            f"--stream needs the rows read lazily from a local safetensors checkpoint; {datamodule.source!r} "
            "was loaded whole (is data.lazy false, or the model a hub id?)"
        )
    if stream is None:
        return lazy and fmt == "decoded"
    return stream


def _train_on(loss: str) -> str:
    """The model-level ``output`` loss trains on calibration text; every other loss on weight rows."""
    return "calibration" if loss == "output" else "rows"


class AECompressCLI(LightningCLI):
    """Links the data module's group specs into the compressor and reports the best checkpoint."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's training subcommands plus ``export``."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "export": {"model", "datamodule"},
        }

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does; a bad option or value becomes one line naming what is valid."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommand = args[0] if args and args[0] in self.subcommands() else None
            subparsers = getattr(self, "_subcommand_parsers", {})
            raise explain(err, subparsers.get(subcommand, parser), subcommand) from None

    def add_arguments_to_parser(self, parser) -> None:
        """Group sizes and budgets are known only once the model is loaded."""
        parser.link_arguments("data.group_specs", "model.groups", apply_on="instantiate")
        parser.link_arguments("model.loss", "data.train_on", compute_fn=_train_on, apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        """A checkpoint never configures the run: settings come from ``--config`` and flags only.

        LightningCLI would parse a checkpoint's ``hyper_parameters`` into the model's
        config, where a ``class_path`` names code to import and instantiate. aecompress
        checkpoints carry none, and one handed to us must not choose code.
        """

    def before_fit(self) -> None:
        """Read ``--ckpt_path`` with ``weights_only=True``, whatever torch's default or the environment say,
        through :func:`~aecompress.training.checkpoints.read`, as ``export`` does."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is False:
            raise AECompressError(
                "--weights_only false is refused: aecompress reads checkpoints as tensors and plain data only, "
                "so that a checkpoint can never run code"
            )
        config["weights_only"] = True
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, SafeLoading):
            strategy.checkpoint_io = SafeLoading(strategy.checkpoint_io)
        if self.subcommand == "fit" and not any(isinstance(c, FitTimer) for c in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, FitTimer())  # first: checkpoint saving is not validation

    before_validate = before_fit

    def before_export(self) -> None:
        """Hand export the config files it was given, for the model card's commands."""
        self.trainer.config_paths = [str(p) for p in (self.config[self.subcommand].get("config") or [])]

    def after_fit(self) -> None:
        """Print where the fit's time went, and where the best checkpoint is, for ``aecompress export --ckpt_path``."""
        for timer in (c for c in self.trainer.callbacks if isinstance(c, FitTimer)):
            _print_rank_zero(timer.summary())
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.best_model_path:
            _print_rank_zero(f"best checkpoint: {callback.best_model_path} ({callback.monitor}={callback.best_model_score})")


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message, flush=True)


def build_cli(args: list[str], run: bool = True, description: str = "", epilog: str = "") -> AECompressCLI:
    """The LightningCLI over our module, data module and trainer, with the settings every caller shares.

    Args:
        args: the command line after ``aecompress`` (``fit --config ...``), or, with ``run=False``,
            the config arguments alone.
        run: run the subcommand (the ``aecompress`` command); ``False`` only instantiates (benchmark recipes).
        description: the ``--help`` description.
        epilog: the ``--help`` epilog.
    """
    quiet = {"exit_on_error": False}
    parser_kwargs = {"description": description, "epilog": epilog, **quiet} if run else dict(quiet)
    if run:
        parser_kwargs.update({name: dict(quiet) for name in AECompressCLI.subcommands()})
    return AECompressCLI(
        CompressorModule,
        WeightRowsDataModule,
        trainer_class=AETrainer,
        auto_configure_optimizers=False,
        save_config_callback=RunConfig,
        parser_kwargs=parser_kwargs,
        run=run,
        args=args,
    )
