"""Bad command lines and configs said in one line: the problem first, then what is valid.

jsonargparse's own report prints the whole usage before the one line that matters; the
training CLI turns its errors into :class:`AECompressError` through :func:`explain`.
"""

from __future__ import annotations

import re

from aecompress.core.errors import AECompressError


def _options(parser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]


def _valid_keys(parser, key: str) -> str:
    """The options of the section an unknown ``key`` (``data.foo``) was meant for."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    names = sorted({o[2:] for o in _options(parser)
                    if o[2:].startswith(section) and o[2:].count(".") == key.count(".") and not o.endswith("+")})
    return ", ".join(n[len(section):] for n in names)


def explain(err: Exception, parser, subcommand: str | None) -> AECompressError:
    """One line for a parse error, naming valid keys where a key was unknown."""
    message = " ".join(line.strip() for line in str(err).strip().splitlines())
    unknown = re.search(r"unrecognized arguments: --([\w.]+)|does not accept option '([\w.]+)'", message)
    if unknown and parser is not None:
        key = unknown.group(1) or unknown.group(2)
        valid = _valid_keys(parser, key)
        if valid:
            section = key.rsplit(".", 1)[0] if "." in key else "top-level"
            return AECompressError(f"unknown option {key!r}; valid {section} keys: {valid}")
    choice = re.fullmatch(r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*)\]\. Got value: (.*)', message)
    if choice:
        valid = ", ".join(v.strip().strip("'\"") for v in choice.group(2).split(","))
        return AECompressError(f"{choice.group(1)} {choice.group(3)!r} is not valid; valid: {valid}")
    where = f" (aecompress {subcommand})" if subcommand else ""
    return AECompressError(f"{message}{where}")
