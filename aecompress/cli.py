"""The ``aecompress`` command: it only dispatches.

``fit``, ``validate`` and ``export`` go to the LightningCLI of :mod:`aecompress.training.cli`;
``evaluate``, ``benchmark``, ``verify`` and ``runtime-bench`` are plain functions whose typed
signature is the schema and whose docstring is the ``--help`` (run through jsonargparse).
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
import signal
import sys
import warnings

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from aecompress.core.errors import AECompressError

log = logging.getLogger("aecompress")


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


def _benchmark():
    from aecompress.benchmark.run import benchmark

    return benchmark


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
EXTRA_COMMANDS = {"benchmark": _benchmark, "evaluate": _evaluate, "runtime-bench": _runtime_bench, "verify": _verify}


def _run_extra(name: str, args: list[str]) -> None:
    from jsonargparse import CLI

    fn = EXTRA_COMMANDS[name]()
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
        from aecompress.training.cli import build_cli

        build_cli(args, description="Compress transformer weights with autoencoders (fit, validate, export).",
                  epilog=_epilog())
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
