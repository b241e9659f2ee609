"""VQA evaluation of Hugging Face LLaVA models, patched or not: LLaVA's JSONL formats, resumable batched greedy
generation, several processes, and the metrics of MLLM.md §6.

Files (MLLM.md §6.2):
- questions, one object per line: ``{"question_id", "image": <path relative to the image folder>, "text":
  <question + prompt suffix>, "category"?}``;
- predictions, as LLaVA's ``model_vqa_loader.py`` writes them: ``{"question_id", "prompt": <the question text>,
  "text": <decoded answer, stripped>, "answer_id", "model_id", "metadata": {}}``; a patched model adds
  ``metadata["visionfx"] = {"method", "config", "tokens"}`` where ``tokens`` is the number of visual tokens the
  language model received for this question (so pruning is visible per answer);
- ground truth (``--answers``), one object per line: ``{"question_id", "answers": [10 human answers]}`` (VQAv2 /
  TextVQA; items may be strings or ``{"answer": ...}``), or ``{"question_id", "answer" | "label": str}`` (GQA, POPE,
  easy-VQA), with an optional ``"category"``.

Generation is greedy (``do_sample=False, num_beams=1``), batched with left padding (``padding_side="left"``).
Predictions are appended to the output file (and flushed) as each batch finishes; a restart skips every question id
already there. A last line cut short by a crash is dropped and regenerated.

Several processes (``accelerate launch``): after reading which ids are done (and a barrier), the remaining questions
are dealt round-robin; process r appends to ``<out>.part<r>of<n>``. Process 0 then merges the output file and every
part file into the output file in question-file order (first answer per id kept) and deletes the parts. A single
process appends to the output file itself.

Choices the docs leave open:
- Prompt: ``"auto"`` uses the processor's chat template when it has one (llava-hf checkpoints do), otherwise LLaVA's
  ``vicuna_v1`` conversation; a custom template is a string with ``{question}`` (and optionally ``{image}``, the
  processor's image token, prepended with a newline when absent).
- Metric ``"auto"``: VQAv2 soft accuracy when the ground truth holds answer lists, otherwise GQA-style exact match,
  plus LLaVA-style POPE metrics over the items whose label is yes/no (POPE files, easy-VQA's yes/no questions).
- ``dtype="auto"``: float16 on CUDA (LLaVA's evaluation precision), float32 on CPU.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from visionfx.evaluation import vqa_metrics as vm

__all__ = [
    "VICUNA_V1",
    "SHORT_ANSWER",
    "read_jsonl",
    "read_questions",
    "read_answers",
    "qid_key",
    "build_prompt",
    "load_llava",
    "resolve_dtype",
    "done_ids",
    "generate_answers",
    "merge_predictions",
    "score_predictions",
    "format_scores",
]

VICUNA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions. USER: {image}\n{question} ASSISTANT:")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return out


def qid_key(qid: Any) -> str:
    """A hashable, type-exact key for a question id (``1`` and ``"1"`` stay distinct)."""
    return json.dumps(qid)


def read_questions(path: str | os.PathLike) -> list[dict]:
    """LLaVA question JSONL; checks the keys and that ids are unique."""
    questions = read_jsonl(path)
    seen = set()
    for n, q in enumerate(questions, 1):
        missing = [k for k in ("question_id", "image", "text") if k not in q]
        if missing:
            raise ValueError(f"{path}: question {n} lacks {missing} (LLaVA format: question_id, image, text)")
        key = qid_key(q["question_id"])
        if key in seen:
            raise ValueError(f"{path}: question id {q['question_id']!r} appears twice")
        seen.add(key)
    return questions


def read_answers(path: str | os.PathLike) -> dict[str, dict]:
    """Ground truth by :func:`qid_key`: ``{"answers": [str] | None, "answer": str | None, "category": str | None}``."""
    out = {}
    for n, row in enumerate(read_jsonl(path), 1):
        if "question_id" not in row:
            raise ValueError(f"{path}: line {n} lacks question_id")
        answers = row.get("answers")
        if answers is not None:
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        answer = row.get("answer", row.get("label"))
        if answers is None and answer is None:
            raise ValueError(f"{path}: line {n} has neither 'answers' nor 'answer'/'label'")
        out[qid_key(row["question_id"])] = {"answers": answers, "answer": answer, "category": row.get("category")}
    return out


def _short_uuid() -> str:
    """A random 22-character id in shortuuid's alphabet (the form of LLaVA's ``answer_id``)."""
    n, chars = uuid.uuid4().int, []
    for _ in range(22):  # 57**22 > 2**128
        n, r = divmod(n, len(_ALPHABET))
        chars.append(_ALPHABET[r])
    return "".join(reversed(chars))


def build_prompt(processor, question: str, template: str = "auto") -> str:
    """The model prompt for one question: the processor's chat template, ``vicuna_v1`` or a custom template."""
    image = getattr(processor, "image_token", None) or "<image>"
    if template == "auto":
        if getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True)
        template = VICUNA_V1
    elif template == "vicuna_v1":
        template = VICUNA_V1
    if "{question}" not in template:
        raise ValueError(f"a prompt template needs '{{question}}': {template!r}")
    if "{image}" not in template:
        template = "{image}\n" + template
    return template.replace("{image}", image).replace("{question}", question)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_llava(model_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype="auto"):
    """``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``, in eval mode on
    ``device``, with the tokenizer set to left padding."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = torch.device(device)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=resolve_dtype(dtype, device))
    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return model.to(device).eval(), processor


# --- output files, resume, merge ---------------------------------------------------------------------------------


def _part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*"))


def _read_predictions(path: Path, repair: bool) -> list[dict]:
    """Predictions of one output file. A final line without its newline (a crash mid-write) is dropped; with
    ``repair`` the file is cut back to its last complete line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data))
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: corrupt prediction line; fix or delete it to resume") from None
    return rows


def done_ids(out: str | os.PathLike, repair: bool = False) -> set[str]:
    """Keys (:func:`qid_key`) of the questions answered in ``out`` and its part files."""
    out = Path(out)
    return {qid_key(r["question_id"]) for p in [out, *_part_files(out)] for r in _read_predictions(p, repair)}


def merge_predictions(out: str | os.PathLike, questions: Sequence[dict] | None = None) -> list[dict]:
    """Merge ``out`` and its part files into ``out`` (question-file order, first answer per id), delete the parts,
    and return the predictions."""
    out = Path(out)
    parts = _part_files(out)
    rows, seen = [], set()
    for p in [out, *parts]:
        for r in _read_predictions(p, repair=False):
            key = qid_key(r["question_id"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    if questions is not None:
        order = {qid_key(q["question_id"]): i for i, q in enumerate(questions)}
        rows.sort(key=lambda r: order.get(qid_key(r["question_id"]), len(order)))
    tmp = out.with_name(out.name + ".merging")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    for p in parts:
        p.unlink()
    return rows


# --- generation ----------------------------------------------------------------------------------------------------


class _SingleProcess:
    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


@contextmanager
def _llm_input_lengths(model) -> Iterator[list]:
    """Records the per-row length of the first sequence the language model receives (the prefill), after any
    visual-token method has shrunk it."""
    from visionfx.patches.llava import LlavaParts

    try:
        lm = LlavaParts.of(model).language_model
    except (TypeError, AttributeError):
        yield []
        return
    seen: list = []

    def hook(module, args, kwargs):
        if not seen:
            mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
            if torch.is_tensor(mask) and mask.dim() == 2:
                seen.append(mask.sum(-1).tolist())
            elif torch.is_tensor(embeds):
                seen.append([embeds.shape[1]] * embeds.shape[0])

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_answers(
    model,
    processor,
    questions: Sequence[dict],
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_template: str = "auto",
    model_id: str = "llava",
    method_info: dict | None = None,
    accelerator=None,
    progress: bool = True,
) -> dict[str, int]:
    """Answer ``questions`` greedily and append LLaVA answer lines to ``out``, skipping ids already answered.

    Returns ``{"questions", "skipped", "generated"}`` (``generated`` counts this process's answers). Every process
    returns after process 0 has merged the part files.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    acc = accelerator or _SingleProcess()
    out, images_dir = Path(out), Path(images_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out, repair=acc.is_main_process)
    acc.wait_for_everyone()  # everyone has read the same done set before anyone writes
    todo = [q for q in questions if qid_key(q["question_id"]) not in done]
    world, rank = acc.num_processes, acc.process_index
    mine = todo[rank::world]
    target = out if world == 1 else out.with_name(f"{out.name}.part{rank}of{world}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    image_token_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    pad_id = processor.tokenizer.pad_token_id
    bar = tqdm(total=len(todo), desc="vqa", unit="q", disable=not progress or not acc.is_main_process)
    with open(target, "a") as f:
        for batch in _batches(mine, batch_size):
            images = []
            for q in batch:
                with Image.open(images_dir / q["image"]) as img:
                    images.append(img.convert("RGB"))
            prompts = [build_prompt(processor, q["text"], prompt_template) for q in batch]
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
            prompt_len = inputs["input_ids"].shape[1]
            with torch.inference_mode(), _llm_input_lengths(model) as lengths:
                seq = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad_id, use_cache=True)
            texts = processor.batch_decode(seq[:, prompt_len:], skip_special_tokens=True)
            real = inputs["attention_mask"].sum(-1)
            image_tokens = (inputs["input_ids"] == image_token_id).sum(-1)
            for b, (q, text) in enumerate(zip(batch, texts)):
                row = {"question_id": q["question_id"], "prompt": q["text"], "text": text.strip(),
                       "answer_id": _short_uuid(), "model_id": model_id, "metadata": {}}
                if method_info is not None:
                    tokens = int(lengths[0][b] - (real[b] - image_tokens[b])) if lengths else None
                    row["metadata"]["visionfx"] = {**method_info, "tokens": tokens}
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch) * world)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process and (world > 1 or _part_files(out)):
        merge_predictions(out, questions)
    acc.wait_for_everyone()
    return {"questions": len(questions), "skipped": len(questions) - len(todo), "generated": len(mine)}


# --- scoring -------------------------------------------------------------------------------------------------------


def _is_yes_no(answer: str | None) -> bool:
    return answer is not None and answer.strip().lower() in ("yes", "no")


def score_predictions(predictions: Iterable[dict], answers: dict[str, dict],
                      questions: Sequence[dict] | None = None, metric: str = "auto") -> dict[str, Any]:
    """Score LLaVA prediction lines against ground truth from :func:`read_answers`.

    ``metric``: ``"auto"``, ``"vqav2"``, ``"exact"``, ``"pope"``, or several joined by commas. Scores are in percent
    (POPE ratios as fractions, like LLaVA's script). Categories come from the question file, else the ground truth.
    Returns ``{"count", "missing", "unscored", <metric>: {...}}``; each metric has ``score`` and ``by_category``.
    """
    preds = {qid_key(p["question_id"]): p["text"] for p in predictions}
    qcat = {qid_key(q["question_id"]): q.get("category") for q in questions or ()}
    keys = [k for k in (qcat or answers) if k in answers and k in preds]
    cats = {k: qcat.get(k) or answers[k]["category"] or "all" for k in keys}
    if metric == "auto":
        has_lists = any(answers[k]["answers"] for k in keys)
        metrics = ["vqav2"] if has_lists else ["exact"] + (["pope"] if any(_is_yes_no(answers[k]["answer"])
                                                                          for k in keys) else [])
    else:
        metrics = [m.strip() for m in metric.split(",") if m.strip()]
    out: dict[str, Any] = {"count": len(keys), "missing": sum(k not in preds for k in (qcat or answers)
                                                               if k in answers),
                           "unscored": sum(k not in answers for k in preds)}
    for m in metrics:
        if m == "vqav2":
            items = {k: vm.vqa_accuracy(preds[k], answers[k]["answers"]) for k in keys if answers[k]["answers"]}
            out[m] = _by_category(items, cats)
        elif m == "exact":
            items = {k: vm.exact_match(preds[k], _single(answers[k])) for k in keys}
            out[m] = _by_category(items, cats)
        elif m == "pope":
            out[m] = _pope(preds, answers, [k for k in keys if _is_yes_no(_single(answers[k]))], cats)
        else:
            raise ValueError(f"unknown metric {m!r}; choose auto, vqav2, exact or pope")
    return out


def _single(gt: dict) -> str:
    if gt["answer"] is not None:
        return gt["answer"]
    # Only lists: the most frequent human answer stands in for a single label.
    return max(set(gt["answers"]), key=gt["answers"].count)


def _by_category(items: dict[str, float], cats: dict[str, str]) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for k, v in items.items():
        groups.setdefault(cats[k], []).append(v)
    return {"score": 100.0 * vm.mean(items.values()), "count": len(items),
            "by_category": {c: {"score": 100.0 * vm.mean(v), "count": len(v)} for c, v in sorted(groups.items())}}


def _pope(preds: dict, answers: dict, keys: list[str], cats: dict[str, str]) -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(cats[k], []).append(k)
    by_cat = {c: vm.pope_metrics([preds[k] for k in ks], [_single(answers[k]).strip().lower() for k in ks])
              for c, ks in sorted(groups.items())}
    pooled = vm.pope_metrics([preds[k] for k in keys], [_single(answers[k]).strip().lower() for k in keys])
    lmms = vm.pope_metrics_lmms([preds[k] for k in keys], [_single(answers[k]) for k in keys])
    return {"score": 100.0 * vm.mean(m["f1"] for m in by_cat.values()), "count": len(keys),
            "by_category": by_cat, "pooled": pooled, "lmms_eval_pooled": lmms}


def format_scores(scores: dict[str, Any]) -> str:
    """A table of the scores for the screen."""
    from visionfx.utils import format_table

    rows = []
    for m in ("vqav2", "exact", "pope"):
        if m not in scores:
            continue
        s = scores[m]
        label = {"vqav2": "VQAv2 accuracy", "exact": "exact match", "pope": "POPE F1 (LLaVA, mean of categories)"}[m]
        rows.append([label, "all", s["count"], f"{s['score']:.2f}"])
        for c, v in s["by_category"].items():
            value = f"{100 * v['f1']:.2f}  acc {100 * v['accuracy']:.2f}  yes {v['yes_ratio']:.3f}" if m == "pope" \
                else f"{v['score']:.2f}"
            rows.append(["", c, v["count"], value])
        if m == "pope":
            lm = s["lmms_eval_pooled"]
            rows.append(["POPE F1 (lmms-eval, pooled)", "all", lm["count"], f"{100 * lm['f1']:.2f}"])
    table = format_table(["metric", "category", "n", "score"], rows)
    return f"{table}\n{scores['count']} scored, {scores['missing']} without prediction, " \
           f"{scores['unscored']} predictions without ground truth"
