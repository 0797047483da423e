"""A model's transformer blocks, read from its safetensors files one block at a time.

A model bigger than the machine can still be compressed if only one block is in memory at once.
:func:`find_blocks` finds the blocks without a table of families: the ``nn.ModuleList`` of modules of
one class that holds the most parameters (Llama's ``model.layers``, BERT's ``encoder.layer``).
:class:`BlockReader` works on the model's skeleton (meta device, see :mod:`aecompress.formats.lazy`):
it gives the body outside the blocks (embeddings, final norm, rotary tables) real float32 weights,
and gives one block its weights while it is worked on and takes them away after. Weights are cast
to float32 exactly as :func:`aecompress.formats.sources.load_model` loads them, so a block read here
computes what the same block of the loaded model computes.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.memory import give_back
from aecompress.formats.lazy import TensorFiles, checkpoint_keys


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and list of the model's transformer blocks: the one-class ``nn.ModuleList`` with most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None or best[0] == 0:
        raise AECompressError(f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList of "
                              "layers of one class); compress it whole, without --max_memory or --blockwise")
    return best[1], best[2]


def _owns_extra_buffers(module: nn.Module) -> bool:
    return bool(getattr(module, "_non_persistent_buffers_set", ()))


class BlockReader:
    """Real weights for the body outside the blocks, and for one block at a time, from the checkpoint's files.

    Args:
        model: the model's skeleton on the meta device (``aecompress.formats.lazy.open_lazy``).
        files: its safetensors files.
    """

    def __init__(self, model: nn.Module, files: TensorFiles):
        self.model, self.files = model, files
        self.name, self.blocks = find_blocks(model)

    def block_prefix(self, index: int) -> str:
        """The parameter-name prefix of block ``index`` (``model.layers.3.``)."""
        return f"{self.name}.{index}."

    def body(self) -> nn.Module:
        """The base model (no LM head) with every module outside the blocks given its weights."""
        base = getattr(self.model, "base_model", self.model)
        inside = {id(m) for m in self.blocks.modules()}
        names = {id(m): n for n, m in self.model.named_modules()}
        for module in base.modules():
            if id(module) not in inside:
                self._fill(names[id(module)], module, recurse=False)
        # Filling gave the embedding a new tensor: tie the head to it again, as the model ties them, so the head is
        # one tensor with the embedding (not read, not stored twice) wherever the skeleton is used afterwards.
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        return base

    def load(self, index: int) -> nn.Module:
        """Block ``index`` with its weights in float32."""
        block = self.blocks[index]
        for name, module in block.named_modules():
            self._fill(f"{self.name}.{index}" + (f".{name}" if name else ""), module, recurse=False)
        return block

    def release(self, index: int) -> None:
        """Take block ``index``'s weights away again (back to the meta device), and give the memory back."""
        self.blocks[index].to("meta")
        give_back()

    def _fill(self, name: str, module: nn.Module, recurse: bool) -> None:
        """Give one module real tensors: persistent ones read from the files, the rest made as the model makes them."""
        module.to_empty(device="cpu", recurse=recurse)
        if _owns_extra_buffers(module) and hasattr(self.model, "_init_weights"):
            self.model._init_weights(module)  # rotary tables, position ids: not stored, computed from the config
        own = dict(module.named_parameters(recurse=False))
        own.update((n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set)
        if not own:
            return
        full = {f"{name}.{n}" if name else n: t for n, t in own.items()}
        keys = checkpoint_keys(self.model, self.files, full)
        if keys is None:
            missing = next(n for n in full if checkpoint_keys(self.model, self.files, [n]) is None)
            raise AECompressError(f"{str(self.files.directory)!r} does not hold {missing!r}; block by block needs "
                                  "every weight of the body in the checkpoint")
        read = self.files.read(keys.values())
        with torch.no_grad():
            for param, tensor in full.items():
                value = read[keys[param]]
                if tuple(value.shape) != tuple(tensor.shape):
                    raise AECompressError(f"{keys[param]!r} has shape {tuple(value.shape)} in the checkpoint, "
                                          f"the model's config expects {tuple(tensor.shape)}")
                tensor.copy_(value)
