"""The ``aecompress`` command: LightningCLI with an ``export`` subcommand.

``fit`` and ``validate`` are Lightning's own. ``export`` is a method of
:class:`AETrainer`, registered through ``subcommands()``, so it takes the
same ``--config`` as ``fit`` and its flags come from its signature.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pickle
import re
import signal
import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from aecompress.checkpoints import load_weights
from aecompress.data import WeightRowsDataModule
from aecompress.errors import AECompressError
from aecompress.export import ExportFormat, export, sidecar
from aecompress.module import CompressorModule
from aecompress.streaming import export_streaming
from aecompress.timing import FitTimer

log = logging.getLogger("aecompress")


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
    ) -> None:
        """Write the compressed model as a Hugging Face checkpoint.

        Args:
            model: the compressor (from the config).
            datamodule: the weight rows and source model (from the config).
            ckpt_path: a checkpoint written by ``aecompress fit`` with this config.
            out_dir: the directory to create.
            format: ``decoded`` (plain transformers, full size) or ``compact``
                (latents + decoder + remaining weights; read with ``aecompress.load_compact``).
            overwrite: replace ``out_dir`` if it exists.
            stream: write the decoded format shard by shard from the source's safetensors
                files, one tensor in memory at a time (never the whole model). Default: when
                the rows were read lazily (``data.lazy`` on a local safetensors checkpoint).
        """
        streaming = _streams(stream, format, datamodule)
        self.strategy.barrier("aecompress-export-start")
        if self.is_global_zero:
            load_weights(model, ckpt_path)
            forms = model.stored_forms(datamodule.rows)
            if streaming:
                export_streaming(datamodule.skeleton, datamodule.tensor_files, forms, datamodule.source,
                                 datamodule.auto_class, datamodule.model_name, out_dir, overwrite)
            else:
                export(datamodule.hf_model, forms, datamodule.source, datamodule.auto_class,
                       datamodule.model_name, out_dir, format, overwrite)
            meta = sidecar(forms, datamodule.source, datamodule.auto_class, format, datamodule.model_name)
            print(f"exported {format} model to {out_dir} (achieved ratio {meta['achieved_ratio']:.3f})")
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
        """Read ``--ckpt_path`` with ``weights_only=True``, whatever torch's default or the environment say."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is False:
            raise AECompressError(
                "--weights_only false is refused: aecompress reads checkpoints as tensors and plain data only, "
                "so that a checkpoint can never run code"
            )
        config["weights_only"] = True
        if self.subcommand == "fit" and not any(isinstance(c, FitTimer) for c in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, FitTimer())  # first: checkpoint saving is not validation

    before_validate = before_fit

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


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# Boolean options that may be given bare, as in ``--overwrite``; jsonargparse wants a value.
_FLAGS = ("--overwrite", "--throughput", "--stream", "--runtime")


def _bare_flags(args: list[str]) -> list[str]:
    """Turn a bare ``--overwrite`` into ``--overwrite=true``."""
    out = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        bare = following is None or following.startswith("-")
        out.append(f"{arg}=true" if arg in _FLAGS and bare else arg)
    return out


# Commands that do not train a compressor: plain functions whose typed signature is the
# schema and whose docstring is the --help text (run through jsonargparse.CLI).
# A fixed table of our own modules; nothing here is imported by a name a user supplies.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("aecompress.benchmark", "benchmark"),
}
EXTRA_COMMANDS["evaluate"] = ("aecompress.evaluate", "evaluate_command")
EXTRA_COMMANDS["runtime-bench"] = ("aecompress.runtime_bench", "bench")
EXTRA_COMMANDS["verify"] = ("aecompress.verify", "verify")


def _run_extra(name: str, args: list[str]) -> None:
    from jsonargparse import CLI

    module, function = EXTRA_COMMANDS[name]
    fn = getattr(importlib.import_module(module), function)
    CLI(fn, args=_leading_positional(fn, args), prog=f"aecompress {name}", as_positional=False)


def _leading_positional(fn, args: list[str]) -> list[str]:
    """Let a bare first value fill the function's first required parameter.

    ``aecompress verify DIR`` is read as ``aecompress verify --directory DIR``;
    every parameter can still be given by name.
    """
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    if args and not args[0].startswith("-") and first is not None and first.default is inspect.Parameter.empty:
        return [f"--{first.name}", *args]
    return args


def _epilog() -> str:
    if not EXTRA_COMMANDS:
        return ""
    return "other commands: " + ", ".join(EXTRA_COMMANDS) + " (see aecompress COMMAND --help)"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``aecompress`` console script."""
    _configure_logging()
    # We always hand LightningCLI the (normalized) argv ourselves; its warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    args = _bare_flags(sys.argv[1:] if args is None else list(args))
    try:
        if args and args[0] in EXTRA_COMMANDS:
            _run_extra(args[0], args[1:])
            return
        AECompressCLI(
            CompressorModule,
            WeightRowsDataModule,
            trainer_class=AETrainer,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": "Compress transformer weights with autoencoders (fit, validate, export).",
                "epilog": _epilog(),
            },
            args=args,
        )
    except (AECompressError, MisconfigurationException) as err:  # ours, or Lightning's (devices, accelerator...)
        print(f"aecompress: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except pickle.UnpicklingError as err:  # from torch.load(weights_only=True) on a --ckpt_path
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
        print(f"aecompress: error: checkpoint refused: it holds more than tensors and plain data ({first})", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # Lightning stops fit at the next step; it would exit 0
        print("aecompress: stopped by SIGTERM; the last checkpoint is intact (resume with --ckpt_path last)",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
