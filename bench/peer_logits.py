"""Files we write run in llama.cpp: tiny random GGUFs (`make-random`), logits from both engines.

For each architecture and weight type, writes a tiny random model with vramfit, evaluates the same 14
tokens in vramfit and in llama-cpp-python (its own interpreter: --peer-python), and prints the largest
logit difference per file against the logits' scale, and whether the argmax agrees at every position.

Run:  .venv/bin/python bench/peer_logits.py --peer-python /path/to/python
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

IDS = [5, 17, 99, 200, 3, 44, 120, 7, 9, 300, 301, 302, 15, 16]
CASES = [("llama", "f32"), ("llama", "q8_0"), ("llama", "q4_1"), ("qwen35", "f32"), ("qwen35", "q8_0")]

PEER = textwrap.dedent(
    """
    import numpy as np, sys
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False)
    ids = [int(i) for i in sys.argv[3].split(",")]
    llm.eval(ids)
    np.save(sys.argv[2], np.array(llm.scores[: len(ids)]))
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=sys.executable)
    a = ap.parse_args()
    import vramfit
    from vramfit.model.random_model import random_model_spec, write_random_model

    print("| arch | weights | max abs logit difference | max abs logit | argmax agrees |")
    print("| --- | --- | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as d:
        for arch, mix in CASES:
            path, ref_file = Path(d) / f"{arch}-{mix}.gguf", Path(d) / "ref.npy"
            write_random_model(random_model_spec(arch, "tiny", mix), path)
            ids = ",".join(map(str, IDS))
            run = subprocess.run(
                [a.peer_python, "-c", PEER, str(path), str(ref_file), ids], capture_output=True
            )
            if run.returncode:
                print(
                    f"| {arch} | {mix} | peer failed: {run.stderr.decode().strip().splitlines()[-1:]} | | |"
                )
                continue
            ref = np.load(ref_file)
            ours = vramfit.load(path, n_ctx=64).logits(IDS)
            agree = bool((ours.argmax(1) == ref.argmax(1)).all())
            print(f"| {arch} | {mix} | {np.abs(ours - ref).max():.2e} | {np.abs(ref).max():.3f} | {agree} |")


if __name__ == "__main__":
    main()
