"""bench/serve_load.py in a very small form: it starts `vramfit serve` on 127.0.0.1, fills its three
tables, sees a cache hit, and stops the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"


def rows(text: str, heading: str) -> list[list[str]]:
    """The data rows of the markdown table under the `## heading...` section."""
    section = text.split("## " + heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_serve_load_bench_small():
    small = "--requests 2 --levels 1,2 --max-tokens 4 --cache-reps 1 --paragraphs 2 --turns 2 --ctx 512"
    argv = [sys.executable, str(SCRIPT), *small.split(), "--parallel", "2"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "machine threads:" in text and "smollm2-135m" in text
    load = rows(text, "Load")
    assert [r[0] for r in load] == ["1", "2"]
    assert all(r[1] == "2" and r[-1] == "0" and float(r[3]) > 0 for r in load)  # all answered, tokens out
    (cache,) = rows(text, "Time to first token")
    hit_prompt, hit_cached = int(cache[4]), int(cache[5])
    assert int(cache[2]) < hit_cached < hit_prompt  # the hit reuses the miss's prompt
    turns = rows(text, "2-turn conversation")
    assert len(turns) == 2 and int(turns[1][2]) >= int(turns[0][1])
    assert "reused at least the previous turn's whole prompt: yes" in text
