"""What a ``compress`` export's card says about how it was made, and the command that makes it again.

The card of a compressed model must let a reader judge and repeat it: the method and the options it
ran with (the defaults filled in, since defaults change between versions), whether and how the
stored scales were tuned, on which calibration text, and one command with every choice spelled out.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from aecompress.compress.block_tuning import BLOCK_TUNE
from aecompress.compress.choices import MethodChoice
from aecompress.core.stored import StoredForm
from aecompress.formats.sources import public_name


def tune_record(choice: MethodChoice, forms: list[StoredForm], model_tune: dict | None = None) -> dict | None:
    """The tune as run: its settings and, from the forms' meta, its objective before and after and whether it was kept.

    Block by block, each block's tune is summed up (how many were kept) and a whole-model tune after the blocks
    (``model_tune``) is recorded under ``model``; a whole-model tune alone is recorded as on the whole-model path.
    """
    blocks = {f.group.members[0].layer: f.meta[BLOCK_TUNE] for f in forms if BLOCK_TUNE in f.meta}
    whole = _whole_record(model_tune or choice.tune, forms) if model_tune or (choice.tune and not blocks) else None
    if not blocks:
        return whole
    record = {"steps": choice.tune["steps"], "lr": choice.tune.get("lr", 1e-3), "blocks": len(blocks),
              "blocks_kept": sum(bool(b["kept"]) for b in blocks.values())}
    return {**record, "model": whole} if whole else record


def _whole_record(settings: dict, forms: list[StoredForm]) -> dict:
    outcome = next((f.meta["tune"] for f in forms if "tune" in f.meta), {})
    return {**settings, **{k: outcome[k] for k in ("kept", "objective_before", "objective_after") if k in outcome}}


def _flag(value) -> str:
    """A value as the command line takes it (jsonargparse reads YAML: ``null``, ``true``, ``[all]``, ``{...}``)."""
    if isinstance(value, dict | list | bool) or value is None:
        return shlex.quote(json.dumps(value))
    return shlex.quote(str(value))


def public_spec(spec: str) -> str:
    """A text spec with a local file named by its name only (``/home/me/t.txt:all`` -> ``t.txt:all``), as models are."""
    head, sep, tail = spec.partition(":")
    return public_name(head) + sep + tail


def command(settings: dict) -> str:
    """``aecompress compress`` with every setting explicit, the model and text by their public names, the output by
    its name: no path of this machine."""
    shown = {**settings, "model": public_name(settings["model"]), "out_dir": Path(settings["out_dir"]).name,
             "calibration": public_spec(settings["calibration"])}
    return "aecompress compress " + " ".join(f"--{key} {_flag(value)}" for key, value in shown.items())


def card_info(settings: dict, choice: MethodChoice, defaults: bool, tokens: int, forms: list[StoredForm],
              model_tune: dict | None = None) -> dict:
    """What :mod:`aecompress.formats.card` writes under "How it was made" for a ``compress`` export.

    Args:
        settings: every argument of the command as run (defaults filled in), in its order.
        choice: the method, its options and allocation, and the tune asked for.
        defaults: whether the options are the method's defaults (none were given).
        tokens: the calibration tokens actually used (the text may hold fewer than asked).
        forms: the stored forms written (their meta holds the tune's outcome).
        model_tune: the settings of a whole-model tune after block by block, if one ran.
    """
    made = {"method": choice.method, "options": choice.options, "defaults": defaults, "bits": settings["bits"],
            "allocation": choice.allocation, "modules": settings["modules"], "calibration": public_spec(settings["calibration"]),
            "calibration_tokens": tokens, "calibration_window": settings["calibration_window"],
            "tune": tune_record(choice, forms, model_tune)}
    return {"made": made, "commands": [command(settings)]}
