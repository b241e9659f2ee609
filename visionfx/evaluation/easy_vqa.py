"""easy-VQA to LLaVA's JSONL formats (MLLM.md §6.2), for small end-to-end VQA runs.

easy-VQA (``easy-vqa/{train,test}/questions.json`` = list of ``[question, answer, image_id]``, images
``{split}/images/<image_id>.png``, 13 answers) becomes, per split:

- ``easy_vqa_<split>_questions.jsonl``: ``{"question_id": <index in questions.json>, "image":
  "<split>/images/<id>.png", "text": <question> + suffix, "category"}``;
- ``easy_vqa_<split>_answers.jsonl``: ``{"question_id", "answer", "category"}``.

Categories follow the answer kind: ``"yes/no"``, ``"shape"`` (circle, rectangle, triangle) or ``"color"``. The image
folder to pass to ``visionfx eval vqa --images`` is the easy-VQA root (returned as ``images``). The suffix defaults to
LLaVA's short-answer instruction.

    python -m visionfx.evaluation.easy_vqa /work/shared/data/easy-vqa.tar.xz OUT_DIR [--split test]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

__all__ = ["SHAPES", "category_of", "find_root", "convert_easy_vqa", "main"]

SHAPES = ("circle", "rectangle", "triangle")
SPLITS = ("train", "test")


def category_of(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def find_root(path: str | os.PathLike) -> Path:
    """The folder holding ``{train,test}/questions.json``: ``path`` itself or its ``easy-vqa`` subfolder."""
    path = Path(path)
    for cand in (path, path / "easy-vqa"):
        if any((cand / s / "questions.json").is_file() for s in SPLITS):
            return cand
    raise FileNotFoundError(f"{path}: no easy-VQA data ({{train,test}}/questions.json) found")


def _extract(archive: Path, dest: Path, splits: tuple[str, ...]) -> Path:
    """Extract the files of ``splits`` (and the top-level text files) from the archive into ``dest``."""
    wanted = tuple(f"easy-vqa/{s}/" for s in splits)
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers()
                   if (m.isfile() and (m.name.startswith(wanted) or m.name.count("/") == 1))]
        tar.extractall(dest, members=members, filter="data")
    return find_root(dest)


def convert_easy_vqa(source: str | os.PathLike, dest: str | os.PathLike, splits=("test",),
                     suffix: str | None = None) -> dict:
    """Write LLaVA question and answer files for ``splits`` of easy-VQA into ``dest``.

    Args:
        source: the ``easy-vqa.tar.xz`` archive (its split folders are extracted into ``dest``) or an extracted
            folder (used in place).
        dest: output folder.
        splits: ``"train"`` and/or ``"test"``.
        suffix: appended to each question (default: LLaVA's short-answer instruction).

    Returns:
        ``{"images": <image root>, split: {"questions": path, "answers": path, "count": n, "images": n_images,
        "by_category": {category: n}}}``.
    """
    from visionfx.evaluation.vqa import SHORT_ANSWER

    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown easy-VQA split(s) {bad}; choose from {SPLITS}")
    suffix = SHORT_ANSWER if suffix is None else suffix
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = _extract(source, dest, splits) if source.is_file() else find_root(source)
    result: dict = {"images": str(root)}
    for split in splits:
        items = json.loads((root / split / "questions.json").read_text())
        qpath, apath = dest / f"easy_vqa_{split}_questions.jsonl", dest / f"easy_vqa_{split}_answers.jsonl"
        counts: dict[str, int] = {}
        images = set()
        with open(qpath, "w") as fq, open(apath, "w") as fa:
            for i, (question, answer, image_id) in enumerate(items):
                image = f"{split}/images/{image_id}.png"
                if not (root / image).is_file():
                    raise FileNotFoundError(f"{root / image} (question {i} of {split}) is missing")
                cat = category_of(answer)
                counts[cat] = counts.get(cat, 0) + 1
                images.add(image_id)
                fq.write(json.dumps({"question_id": i, "image": image, "text": question + suffix,
                                     "category": cat}) + "\n")
                fa.write(json.dumps({"question_id": i, "answer": answer, "category": cat}) + "\n")
        result[split] = {"questions": str(qpath), "answers": str(apath), "count": len(items),
                         "images": len(images), "by_category": dict(sorted(counts.items()))}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visionfx.evaluation.easy_vqa", description=__doc__.splitlines()[0])
    p.add_argument("source", help="easy-vqa.tar.xz or an extracted easy-VQA folder")
    p.add_argument("dest", help="output folder")
    p.add_argument("--split", action="append", choices=SPLITS, help="split(s) to convert (default test)")
    args = p.parse_args(argv)
    result = convert_easy_vqa(args.source, args.dest, splits=tuple(args.split or ("test",)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
