"""The ``aecompress`` command: it only dispatches.

``fit``, ``validate`` and ``export`` go to the LightningCLI of :mod:`aecompress.training.cli`;
``compress``, ``evaluate``, ``benchmark``, ``verify`` and ``runtime-bench`` are plain functions whose typed
signature is the schema and whose docstring is the ``--help`` (run through jsonargparse).
Normal runs are quiet (warnings and our own results only); ``-v`` brings back every log.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
import signal
import sys
import warnings

from aecompress.core.errors import AECompressError
from aecompress.core.version import __version__

log = logging.getLogger("aecompress")

COMMANDS = {
    "fit": "train a compressor from a config (LightningCLI)",
    "validate": "measure a checkpoint on the validation loop (LightningCLI)",
    "export": "write a fitted checkpoint as a Hugging Face model (decoded) or a compact artifact",
    "evaluate": "measure a model or an export on text, optionally against another",
    "compress": "a whole model by a closed-form method (no training), written as an export",
    "benchmark": "every method at the same stored bytes, side by side",
    "verify": "check a compact export's checksums and shapes, and its ratio",
    "runtime-bench": "memory and speed of a compact export run decoded just in time",
}
LIGHTNING_COMMANDS = ("fit", "validate", "export")
VERBOSE = ("-v", "--verbose")
# Libraries whose informational logs (accelerator lines, tips, summaries) only -v shows.
CHATTY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers", "datasets")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so repeated in-process runs (tests) never write to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(LeafSpec|treespec).*")
        warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # our config.yaml
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


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


def _benchmark():
    from aecompress.benchmark.run import benchmark

    return benchmark


def _compress():
    from aecompress.compress.command import compress

    return compress


def _evaluate():
    from aecompress.evaluation.command import evaluate_command

    return evaluate_command


def _runtime_bench():
    from aecompress.runtime.bench import bench

    return bench


def _verify():
    from aecompress.formats.verify import verify

    return verify


# Commands that do not train a compressor: plain functions whose typed signature is the
# schema and whose docstring is the --help text (run through jsonargparse.CLI), each
# imported only when it runs, so that start-up stays quick.
EXTRA_COMMANDS = {"benchmark": _benchmark, "compress": _compress, "evaluate": _evaluate,
                  "runtime-bench": _runtime_bench, "verify": _verify}


def _run_extra(name: str, args: list[str]) -> None:
    from jsonargparse import CLI, ArgumentError

    from aecompress.training.arguments import explain

    fn = EXTRA_COMMANDS[name]()
    try:
        CLI(fn, args=_leading_positional(fn, args), prog=f"aecompress {name}", as_positional=False, exit_on_error=False)
    except ArgumentError as err:
        raise explain(err, None, name) from None


def _leading_positional(fn, args: list[str]) -> list[str]:
    """Let a bare first value fill the function's first required parameter.

    ``aecompress verify DIR`` is read as ``aecompress verify --directory DIR``;
    every parameter can still be given by name.
    """
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    if args and not args[0].startswith("-") and first is not None and first.default is inspect.Parameter.empty:
        return [f"--{first.name}", *args]
    return args


def overview() -> str:
    """The top-level help: every command, one line each."""
    width = max(map(len, COMMANDS))
    lines = [f"aecompress {__version__}: compress transformer weights offline, export Hugging Face checkpoints.", "",
             "usage: aecompress COMMAND [options]   (aecompress COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "options:", "  --version      print the version", "  -v, --verbose  show every log (Lightning, transformers)"]
    return "\n".join(lines)


def _export_help() -> str:
    """``export --help`` with export's own options, not the trainer's hundreds."""
    from jsonargparse import ArgumentParser

    from aecompress.training.cli import AETrainer

    doc = inspect.getdoc(AETrainer.export) or ""
    parser = ArgumentParser(prog="aecompress export", description=doc.splitlines()[0] if doc else None)
    parser.add_argument("-c", "--config", help="the fit config the checkpoint was trained with (YAML; may repeat)")
    parser.add_method_arguments(AETrainer, "export", skip={"model", "datamodule"})
    return parser.format_help() + (
        "\nAny --data.* or --model.* option of the fit config may be given too; it must match the checkpoint "
        "(see aecompress fit --help).\n"
    )


def _ours(err: BaseException) -> AECompressError | None:
    """Our own error, if one is the exception or anywhere in its cause chain (jsonargparse wraps them)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, AECompressError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_AFTER_SIGTERM = {
    "fit": "the last checkpoint is intact (resume with --ckpt_path last)",
    "benchmark": "finished rows are kept in results.csv; rerun the same command to go on",
    "compress": "nothing was written to --out_dir; rerun the command to start again",
}
"""What a stopped command left, and what to do next: advice that fits the command that was stopped."""


def _fail(message: str, code: int = 2) -> None:
    print(f"aecompress: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _dispatch(args: list[str]) -> None:
    if not args:
        print(overview(), file=sys.stderr)
        _fail(f"no command given; valid: {', '.join(COMMANDS)}")
    if args[0] in ("-h", "--help"):
        print(overview())
        return
    if args[0] == "--version":
        print(f"aecompress {__version__}")
        return
    if args[0] not in COMMANDS:
        _fail(f"unknown command {args[0]!r}; valid: {', '.join(COMMANDS)}")
    if args[0] == "export" and any(a in ("-h", "--help") for a in args[1:]):
        print(_export_help())
        return
    if args[0] in EXTRA_COMMANDS:
        _run_extra(args[0], args[1:])
        return
    from aecompress.training.cli import build_cli

    build_cli(args, description="Compress transformer weights with autoencoders (fit, validate, export).",
              epilog="other commands: " + ", ".join(EXTRA_COMMANDS) + " (see aecompress COMMAND --help)")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``aecompress`` console script."""
    args = list(sys.argv[1:] if args is None else args)
    verbose = any(a in VERBOSE for a in args)
    # Imported first: Lightning sets its loggers' levels when it is imported, and we set them after.
    from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

    _configure_logging(verbose)
    # We always hand LightningCLI the (normalized) argv ourselves; its warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    args = _bare_flags([a for a in args if a not in VERBOSE])

    try:
        _dispatch(args)
    except SIGTERMException:  # Lightning stops a fit (or compress's tune) at the next step; it would exit 0
        print(f"aecompress: stopped by SIGTERM; {_AFTER_SIGTERM.get(args[0], 'rerun the command')}",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except MisconfigurationException as err:  # Lightning's own (devices, accelerator...)
        _fail(str(err))
    except pickle.UnpicklingError as err:  # from torch.load(weights_only=True) on a --ckpt_path
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
        _fail(f"checkpoint refused: it holds more than tensors and plain data ({first})")
    except Exception as err:  # noqa: BLE001 - ours, however deep a library wrapped it, is one line
        ours = _ours(err)
        if ours is None:
            raise
        _fail(str(ours))


if __name__ == "__main__":
    main()
