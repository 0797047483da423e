"""aecompress: offline compression of transformer weights with autoencoders.

Train small autoencoders over stacked weight rows with Lightning, then export
the decoded model as a Hugging Face checkpoint, or a compact artifact that
:func:`load_compact` rebuilds.
"""

__version__ = "0.1.0"

from aecompress.compact import load_compact  # noqa: E402

__all__ = ["load_compact", "__version__"]
