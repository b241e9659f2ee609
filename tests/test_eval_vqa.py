"""``visionfx eval vqa`` end to end on a tiny random LLaVA saved to disk with a word-level tokenizer and a small CLIP
image processor (nothing downloaded), on real easy-VQA questions converted from the shared archive.

Random weights: the tests check the file formats, that batched left-padded answers equal one-question-at-a-time
generation done here by hand, resume, sharding and merging, the FasterVLM plumbing (visual token counts; keep-all
equals unpatched), and the metric plumbing; not accuracy.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
import torch

from tiny_llava import BOS, EOS, IMAGE_TOKEN, NUM_PATCHES, PAD, build_llava
from visionfx.evaluation.cli import COMMAND
from visionfx.evaluation.easy_vqa import convert_easy_vqa
from visionfx.evaluation.vqa import (generate_answers, load_llava, read_answers, read_jsonl, read_questions,
                                     score_predictions)

ARCHIVE = Path("/work/shared/data/easy-vqa.tar.xz")
N_QUESTIONS = 6
TEMPLATE_TEXT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{q} ASSISTANT:")
WEIGHT_SCALE = 8.0
LLAVA_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}



@pytest.fixture(scope="session")
def easy_vqa(tmp_path_factory) -> dict:
    if not ARCHIVE.is_file():
        pytest.skip(f"{ARCHIVE} not available")
    return convert_easy_vqa(ARCHIVE, tmp_path_factory.mktemp("easy_vqa"), splits=("test",))


@pytest.fixture(scope="session")
def subset(easy_vqa, tmp_path_factory) -> dict:
    """The first questions of the test split, as question and answer files."""
    d = tmp_path_factory.mktemp("subset")
    q = Path(easy_vqa["test"]["questions"]).read_text().splitlines()[:N_QUESTIONS]
    a = Path(easy_vqa["test"]["answers"]).read_text().splitlines()[:N_QUESTIONS]
    (d / "q.jsonl").write_text("\n".join(q) + "\n")
    (d / "a.jsonl").write_text("\n".join(a) + "\n")
    return {"questions": d / "q.jsonl", "answers": d / "a.jsonl", "images": Path(easy_vqa["images"])}


@pytest.fixture(scope="session")
def llava_dir(subset, tmp_path_factory) -> Path:
    """A tiny LLaVA (tests/tiny_llava.py) plus a processor: word-level tokenizer over the prompts' words, CLIP image
    processor at 32 px, ``LlavaProcessor`` expanding ``<image>`` into 16 placeholders; no chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    texts = [TEMPLATE_TEXT.format(q=q["text"]) for q in read_questions(subset["questions"])]
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "[UNK]": 3}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text.lower()):
            vocab.setdefault(word, len(vocab))
    assert len(vocab) < IMAGE_TOKEN
    vocab.update({f"w{i}": i for i in range(len(vocab), IMAGE_TOKEN)})
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]", additional_special_tokens=["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model = build_llava(seed=0)
    with torch.no_grad():  # larger weights, so that answers depend on the image and the question
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(WEIGHT_SCALE)
    d = tmp_path_factory.mktemp("models") / "tiny-llava"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def reference(llava_dir, subset) -> list[str]:
    """Answers generated here one question at a time (no padding), from the prompt written out above."""
    from PIL import Image

    model, processor = load_llava(llava_dir, "cpu")
    out = []
    for q in read_questions(subset["questions"]):
        with Image.open(subset["images"] / q["image"]) as img:
            inputs = processor(images=[img.convert("RGB")], text=[TEMPLATE_TEXT.format(q=q["text"])],
                               return_tensors="pt")
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == NUM_PATCHES
        assert int((inputs["input_ids"] == 3).sum()) == 0  # every prompt word is in the vocabulary
        with torch.no_grad():
            seq = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=PAD)
        out.append(processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                   .strip())
    return out


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="visionfx eval")
    COMMAND.add_arguments(parser)
    args = parser.parse_args(argv)
    return COMMAND.run(args, parser)


def vqa_args(llava_dir, subset, out: Path, *extra: str) -> list[str]:
    return ["vqa", "--model", str(llava_dir), "--questions", str(subset["questions"]), "--images",
            str(subset["images"]), "--out", str(out), "--device", "cpu", "--batch-size", "4",
            "--max-new-tokens", "4", "--no-progress", *extra]


# --- easy-VQA converter --------------------------------------------------------------------------------------------


def test_easy_vqa_conversion_counts(easy_vqa, tmp_path):
    test = easy_vqa["test"]
    # the dataset's README: 9673 test questions on 1000 images, 7136 of them yes/no
    assert test["count"] == 9673 and test["images"] == 1000 and test["by_category"]["yes/no"] == 7136
    assert sum(test["by_category"].values()) == 9673
    questions, answers = read_questions(test["questions"]), read_jsonl(test["answers"])
    assert len(questions) == len(answers) == 9673
    raw = json.loads((Path(easy_vqa["images"]) / "test" / "questions.json").read_text())
    for i in (0, 5000, 9672):
        text, answer, image_id = raw[i]
        assert questions[i]["question_id"] == answers[i]["question_id"] == i
        assert questions[i]["image"] == f"test/images/{image_id}.png"
        assert questions[i]["text"] == text + "\nAnswer the question using a single word or phrase."
        assert answers[i]["answer"] == answer
    assert {a["category"] for a in answers} == {"yes/no", "color", "shape"}
    # the CLI entry on the extracted folder (used in place, nothing extracted again)
    assert run_cli(["vqa", "--convert-easy-vqa", easy_vqa["images"], str(tmp_path), "--split", "test"]) == 0
    assert (tmp_path / "easy_vqa_test_questions.jsonl").read_text() == Path(test["questions"]).read_text()


# --- generation ----------------------------------------------------------------------------------------------------


def test_end_to_end_format_batching_and_scores(llava_dir, subset, reference, tmp_path):
    out, scores = tmp_path / "pred.jsonl", tmp_path / "scores.json"
    assert run_cli(vqa_args(llava_dir, subset, out, "--answers", str(subset["answers"]),
                            "--json", str(scores))) == 0
    rows = read_jsonl(out)
    questions = read_questions(subset["questions"])
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert all(set(r) == LLAVA_KEYS and r["metadata"] == {} and r["model_id"] == "tiny-llava" for r in rows)
    assert [r["prompt"] for r in rows] == [q["text"] for q in questions]
    assert len({r["answer_id"] for r in rows}) == N_QUESTIONS and all(len(r["answer_id"]) == 22 for r in rows)
    # batches of 4, left padded, give the answers of one-at-a-time generation
    assert [r["text"] for r in rows] == reference
    assert len(set(reference)) >= 3, reference  # the answers differ, so a padding mistake would show

    s = json.loads(scores.read_text())
    cats = [q["category"] for q in questions]
    assert s["count"] == N_QUESTIONS and s["missing"] == 0 and "vqav2" not in s
    assert {c: v["count"] for c, v in s["exact"]["by_category"].items()} == {c: cats.count(c) for c in set(cats)}
    assert s["pope"]["count"] == cats.count("yes/no") > 0
    truth = read_answers(subset["answers"])
    hits = sum(r["text"].rstrip(".").lower() == truth[json.dumps(r["question_id"])]["answer"] for r in rows)
    assert s["exact"]["score"] == pytest.approx(100 * hits / N_QUESTIONS)


def test_metric_plumbing_with_correct_answers(subset):
    truth = read_jsonl(subset["answers"])
    preds = [{"question_id": a["question_id"], "text": a["answer"].capitalize() + "."} for a in truth]
    s = score_predictions(preds, read_answers(subset["answers"]), read_questions(subset["questions"]))
    assert s["exact"]["score"] == 100.0 and s["pope"]["pooled"]["accuracy"] == 1.0


def test_resume_skips_answered_questions_and_repairs_a_cut_line(llava_dir, subset, reference, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert run_cli(vqa_args(llava_dir, subset, out, "--limit", "3")) == 0
    first = out.read_text()
    assert len(first.splitlines()) == 3
    with open(out, "a") as f:
        f.write('{"question_id": 3, "prompt": "wha')  # a crash in the middle of a line
    model, processor = load_llava(llava_dir, "cpu")
    stats = generate_answers(model, processor, read_questions(subset["questions"]), subset["images"], out,
                             batch_size=2, max_new_tokens=4, progress=False)
    assert stats == {"questions": N_QUESTIONS, "skipped": 3, "generated": 3}
    text = out.read_text()
    assert text.startswith(first)  # answered lines untouched (same answer ids)
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == list(range(N_QUESTIONS))
    assert [r["text"] for r in rows] == reference
    again = generate_answers(model, processor, read_questions(subset["questions"]), subset["images"], out,
                             progress=False)
    assert again["generated"] == 0 and out.read_text() == text


class ThreadAccelerator:
    """The parts of ``accelerate.Accelerator`` the VQA loop uses, for ranks run as threads."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=300)


def test_two_shards_are_merged_in_question_order(llava_dir, subset, reference, tmp_path):
    out = tmp_path / "pred.jsonl"
    questions = read_questions(subset["questions"])
    # one question already answered: both ranks must skip it
    done = {"question_id": 1, "prompt": questions[1]["text"], "text": reference[1], "answer_id": "x",
            "model_id": "m", "metadata": {}}
    out.write_text(json.dumps(done) + "\n")
    barrier, results, errors = threading.Barrier(2), {}, []
    models = [load_llava(llava_dir, "cpu") for _ in range(2)]

    def rank(r: int) -> None:
        try:
            results[r] = generate_answers(*models[r], questions, subset["images"], out, batch_size=2,
                                          max_new_tokens=4, accelerator=ThreadAccelerator(r, 2, barrier),
                                          progress=False)
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0]["generated"] + results[1]["generated"] == N_QUESTIONS - 1
    assert results[0]["generated"] == 3 and results[1]["generated"] == 2
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == list(range(N_QUESTIONS))
    assert rows[1]["answer_id"] == "x"
    assert [r["text"] for r in rows] == reference
    assert not list(tmp_path.glob("pred.jsonl.part*"))


# --- visual-token methods ------------------------------------------------------------------------------------------


def test_fastervlm_through_the_cli(llava_dir, subset, reference, tmp_path):
    pruned, full = tmp_path / "pruned.jsonl", tmp_path / "full.jsonl"
    assert run_cli(vqa_args(llava_dir, subset, pruned, "--method", "fastervlm", "--keep", "4")) == 0
    rows = read_jsonl(pruned)
    assert len(rows) == N_QUESTIONS
    for r in rows:
        meta = r["metadata"]["visionfx"]
        assert meta["method"] == "fastervlm" and meta["config"]["keep"] == 4 and meta["tokens"] == 4
    # keep everything (a fraction of 1.0): the same answers as the unpatched model, 16 tokens each
    assert run_cli(vqa_args(llava_dir, subset, full, "--method", "fastervlm", "--keep", "1.0")) == 0
    rows = read_jsonl(full)
    assert [r["text"] for r in rows] == reference
    assert all(r["metadata"]["visionfx"]["tokens"] == NUM_PATCHES for r in rows)
    with pytest.raises(SystemExit):
        run_cli(vqa_args(llava_dir, subset, tmp_path / "x.jsonl", "--method", "fastervlm", "--first-score-layer",
                         "1"))


def test_dispatch_through_the_visionfx_command_line(easy_vqa, tmp_path, capsys):
    from visionfx import cli

    assert cli.main(["eval"]) == 2
    assert "imagenet" in capsys.readouterr().out
    assert cli.main(["eval", "vqa", "--convert-easy-vqa", easy_vqa["images"], str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["test"]["count"] == 9673
    assert (tmp_path / "easy_vqa_test_answers.jsonl").is_file()
    with pytest.raises(SystemExit):
        cli.main(["eval", "vqa", "--questions", "q.jsonl"])  # --model, --images and --out are missing
