"""The one vocabulary of floating dtypes a stored tensor may be kept in."""

from __future__ import annotations

from typing import Literal

import torch

FloatDtype = Literal["float32", "float16", "bfloat16"]
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
