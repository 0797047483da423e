"""aecompress: offline compression of transformer weights with autoencoders.

Train small autoencoders over stacked weight rows with Lightning, then export
the decoded model as a Hugging Face checkpoint, or a compact artifact that
:func:`load_compact` rebuilds.

The package is layered; imports point left only (checked by import-linter):
``core <- methods <- formats <- {runtime, data} <- evaluation <- training <- benchmark <- cli``.
"""

from aecompress.core.version import __version__

__all__ = ["load_compact", "__version__"]


def load_compact(directory, materialize: bool = True, cache: bool | int = False, kernel: str = "int4"):
    """Rebuild the transformers model from a compact export (see :mod:`aecompress.formats.compact`).

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        materialize: ``True`` decodes every compressed weight to full size once;
            ``False`` returns the run-time form (see :mod:`aecompress.runtime`).
        cache: run-time form only: keep decoded weights between calls.
        kernel: run-time form only: ``int4`` multiplies generation steps of codes up to 4 bits through
            torch's fused kernel (bfloat16); ``float32`` keeps every step exact.
    """
    if materialize:
        from aecompress.formats.compact import load_compact as load

        return load(directory, cache=cache)
    from aecompress.runtime.load import load_runtime

    return load_runtime(directory, cache=cache, kernel=kernel)
