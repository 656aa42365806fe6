"""Writing a command's results: the JSON and the PNG plot beside it (bench and eval)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_results(result: dict, out: str | Path, plot) -> None:
    """Writes `result` to `out` (JSON) and plot(result, png) to the same name with .png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"wrote {out} and {png}", file=sys.stderr)
