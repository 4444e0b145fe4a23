"""PEFT without a needless hub lookup and two warnings that say nothing wrong (`quiet_peft`)."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager


@contextmanager
def quiet_peft():
    """PEFT without a needless hub lookup and two warnings that say nothing wrong.

    When it saves an adapter (every checkpoint too), PEFT would look up the base model's config on the hub,
    by the hub id the adapter names (`sdpo.lm.models.SMOLLM2_HUB_ID`), to see whether the vocabulary grew: sdpo never
    changes it, and runs offline. Inside the block PEFT sees hub offline mode, so it skips the lookup, and
    the warning it then gives is silenced, with the deprecation it triggers in transformers by reading
    ``is_gradient_checkpointing``.
    """
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # PEFT reads it at each save
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary was not modified")
            yield
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
