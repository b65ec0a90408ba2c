"""The `vramfit` command: run, chat, serve, inspect, pull, bench. Verbs import their work lazily.

Every failure the user can cause (missing or bad file, unknown model, prompt too long) ends in one
line on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_USAGE = 2


def _add_model(p: argparse.ArgumentParser, planned: bool = False) -> None:
    """planned: the verb plans the load (run, chat, serve): the default context is the largest that
    fits, and --mem sets the memory it may use."""
    p.add_argument(
        "model", help="GGUF path, short name (smollm2-135m, qwen2.5-coder-0.5b, ...) or hf:OWNER/REPO/FILE"
    )
    default = "the largest that fits, up to the training context" if planned else "min(train, 4096)"
    p.add_argument("-c", "--ctx", type=int, default=None, help=f"context length (default: {default})")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default=None, help="auto (default: a CUDA GPU when there is one), cpu or cuda")
    if planned:
        p.add_argument("--mem", "--vram", dest="mem", default=None, metavar="SIZE",
                       help="memory the model may use: 12GiB, 8000MiB, auto (default: the available "
                       "system memory) or cpu (no limit)")  # fmt: skip


def _add_kv(p: argparse.ArgumentParser) -> None:
    kv = "f32 f16 bf16 q8_0 q6_0 q5_0 q4_0 iq4_nl"
    p.add_argument("-ctk", "--ctk", "--cache-type-k", dest="ctk", default=None,
                   help=f"K cache type: {kv} or auto (default: the best that fits)")  # fmt: skip
    p.add_argument(
        "-ctv", "--ctv", "--cache-type-v", dest="ctv", default=None, help="V cache type (default: as K)"
    )
    p.add_argument("-khad", "--khad", action="store_true", help="Hadamard-rotate K in the cache")
    p.add_argument("-vhad", "--vhad", action="store_true", help="Hadamard-rotate V in the cache")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vramfit", description="Run GGUF language models on CPU or GPU.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("run", help="generate a completion for a prompt")
    _add_model(p, planned=True)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_kv(p)
    _add_sampling(p)

    p = sub.add_parser("chat", help="interactive chat that keeps history")
    _add_model(p, planned=True)
    p.add_argument("-s", "--system", default=None, help="system message")
    _add_kv(p)
    _add_sampling(p)
    p.set_defaults(n_predict=512)

    p = sub.add_parser("inspect", help="metadata and tensor table of a GGUF")
    p.add_argument("model")
    p.add_argument("--all-metadata", action="store_true", help="print long arrays and the chat template too")

    p = sub.add_parser("pull", help="download a model by short name or hf:OWNER/REPO/FILE")
    p.add_argument("name")

    p = sub.add_parser("bench", help="llama-bench style prompt-processing and generation speed")
    _add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, tools, metrics)")
    _add_model(p, planned=True)
    _add_kv(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=1, help="slots: requests generated at the same time")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer or x-api-key)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="CORS origin (repeatable)")
    p.add_argument(
        "--alias", action="append", default=[], metavar="NAME",
        help='another model name requests may use (repeatable); "*" takes any name, as llama-server does',
    )  # fmt: skip

    p = sub.add_parser("plan", help="memory plan: what fits in VRAM (weights, KV cache, state, workspace)")
    p.add_argument("model", help="GGUF path or short name")
    p.add_argument("--vram", default="auto", help="device memory: 16GiB, 12000MiB, auto (the GPU's), cpu")
    p.add_argument("--mem", default=None, help="plan for the CPU with this memory: 12GiB, auto (available)")
    p.add_argument("--ctx", default="max", help="context length per sequence, or max (default)")
    p.add_argument("--parallel", type=int, default=1, help="sequences held at the same time")
    p.add_argument(
        "--ctk", default="auto", help="K cache type (f32 f16 bf16 q8_0 q6_0 q5_0 q4_0 iq4_nl) or auto"
    )
    p.add_argument("--ctv", default=None, help="V cache type (default: as --ctk)")
    p.add_argument("--offload", action="store_true", help="allow weights in host memory when they do not fit")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("make-random", help="a random but valid GGUF with a real model's shapes and type mix")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("--arch", default="qwen35", choices=["llama", "qwen35"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "0.8b", "8b", "27b"])
    p.add_argument("--type", default="IQ4_KS", help="mix (IQ4_KS, Q4_K_M ...), type, or sokann-4.151")
    p.add_argument("--custom-q", default=None, help='"regex=type,..." rules; the first match wins')
    p.add_argument("--seed", type=int, default=0)

    from vramfit.quant.verbs import add_parsers  # imatrix, quantize, perplexity

    add_parsers(sub)
    return ap


def _cmd(verb: str) -> Callable[[argparse.Namespace], int]:
    from vramfit import commands

    return getattr(commands, f"cmd_{verb.replace('-', '_')}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from vramfit.gguf import GGUFError, UnknownTypeError
    from vramfit.hub import PullError
    from vramfit.model.kvcache import KVTypeError
    from vramfit.model.loader import ModelError
    from vramfit.quant import UnsupportedTypeError
    from vramfit.runtime.chat_template import ChatTemplateError
    from vramfit.runtime.engine import ContextOverflowError
    from vramfit.runtime.planner import PlanError
    from vramfit.runtime.tokenizer import TokenizerError

    return (
        GGUFError, UnknownTypeError, PullError, ModelError, UnsupportedTypeError, ChatTemplateError,
        ContextOverflowError, TokenizerError, PlanError, KVTypeError, FileNotFoundError, PermissionError,
        IsADirectoryError,
        *_quality_errors(),
    )  # fmt: skip


def _quality_errors() -> tuple[type[BaseException], ...]:
    from vramfit.convert.hf import ConvertError
    from vramfit.eval.perplexity import PerplexityError
    from vramfit.quant.imatrix import ImatrixError
    from vramfit.quant.pipeline import QuantizeError
    from vramfit.quant.recipes import RecipeError

    return ImatrixError, RecipeError, QuantizeError, PerplexityError, ConvertError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _cmd(args.verb)(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        known = isinstance(e, _user_errors())
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vramfit: error: {msg}" if known else f"vramfit: internal error: {type(e).__name__}: {msg}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE if known else 1


if __name__ == "__main__":
    sys.exit(main())
