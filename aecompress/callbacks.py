"""The callback's old class path, ``aecompress.callbacks.ModelQualityCallback``, for saved run configs.

It lives in :mod:`aecompress.training.callbacks`; configs written before the layered
redesign name it here.
"""

from aecompress.training.callbacks import ModelQualityCallback

__all__ = ["ModelQualityCallback"]
