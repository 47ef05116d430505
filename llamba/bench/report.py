"""What every GPU result file carries (command, date, device, versions) and how it is written: JSON with all the
numbers, and a markdown page with the same header and the tables."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch


def provenance() -> dict:
    import triton

    return {"command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__}


def write(out: str | Path, result: dict, title: str, tables: list[str], notes: tuple[str, ...] = ()) -> str:
    """``out``.json (``result``) and ``out``.md (title, provenance, ``notes`` as bullets, then ``tables``);
    returns the markdown."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = "\n".join([f"# {title} ({result['device']})", "", f"- command: `{result['command']}`",
                    f"- date: {result['date']}; torch {result['torch']}, triton {result['triton']}",
                    *(f"- {note}" for note in notes), "", *tables, ""])
    out.with_suffix(".md").write_text(md)
    return md
