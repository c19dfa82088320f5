"""Matplotlib without a display: the Agg backend is chosen here, once, before pyplot is imported.

Figure modules of both pipelines take ``plt`` from here; figures are saved with
``urbanlens.core.files.save_figure`` (atomic, closes the figure).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
