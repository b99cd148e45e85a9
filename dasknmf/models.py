"""``dasknmf.load``: a saved model as the estimator that saved it (``NMF`` or
``MiniBatchNMF``)."""

from __future__ import annotations

from dasknmf import io
from dasknmf.estimator import load_model
from dasknmf.streaming import load_minibatch_model


def load(path, *, storage_options=None):
    """A fitted estimator from a group written by ``NMF.save`` or ``MiniBatchNMF.save`` (a
    local path or a URL); ``transform`` works without refitting. ``W_``, if saved, is a lazy
    Dask array reading the stored W."""
    attributes, H, W = io.load_model(path, storage_options=storage_options)
    if attributes.get("estimator") == "MiniBatchNMF":
        return load_minibatch_model(path, attributes, H, W, storage_options)
    return load_model(path, storage_options=storage_options)
