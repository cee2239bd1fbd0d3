"""Progress bars on stderr (rate and ETA), silent when stderr is not a terminal unless forced."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enable: bool | None = None) -> Any:
    from tqdm.auto import tqdm

    if enable is None:
        enable = sys.stderr.isatty() or os.environ.get("EPIC_ORT_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enable, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)
