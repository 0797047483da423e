"""What methods are built from: the one method interface, and the parts several methods share.

``base`` is the interface every method implements (:class:`~aecompress.blocks.base.Method`) and
the helpers a compressor uses; ``grids`` the k-bit grids, rounding and packing of grouped codes;
``mixed_rows`` grouped codes whose rows may be one bit wider; ``factorize``, ``factors`` and ``lowbit``
the factorizations and their few-bit codes; ``autoencoder_nets`` the autoencoder's networks and
sizing. ``aecompress.methods`` lists the methods themselves, one module each.
"""
