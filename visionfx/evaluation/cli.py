"""``visionfx eval imagenet`` and ``visionfx eval vqa``: the :data:`COMMAND` entry for :mod:`visionfx.cli`.

Method options: ``--set KEY=VALUE`` (repeatable, values read as YAML scalars/lists: ``--set agent_num=49``,
``--set score_layers=[1,2]``) for any method; ``eval vqa`` also takes each option of the registered ``visual_tokens``
methods as its own flag (``--keep 0.1``, ``--reduction 0.75``, ...), discovered from the method configs, so a new
method's options appear without changes here. A ``keep`` of ``144`` is a count, ``0.1`` a fraction (YAML typing).

Several GPUs: run under ``accelerate launch``; with one process ``--device`` picks the device (``auto``: CUDA if
present).
"""

from __future__ import annotations

import argparse
import sys

from visionfx.cli import Command

__all__ = ["COMMAND"]

_OPT = "_vfx_opt_"


def _key_value(text: str):
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _method_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("visionfx method")
    g.add_argument("--method", default=None, help=f"patch the model with this visionfx method ({what})")
    g.add_argument("--config", metavar="YAML", default=None, help="a method recipe (YAML with a 'method' key)")
    g.add_argument("--set", metavar="KEY=VALUE", type=_key_value, action="append", default=[],
                   help="a method option (repeatable), e.g. --set agent_num=49")


def _visual_token_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option of the registered visual-token methods (union over methods; names that clash with this
    command's own flags stay reachable through --set)."""
    from dataclasses import fields

    from visionfx.config import MethodConfig
    from visionfx.registry import method_specs

    base = {f.name for f in fields(MethodConfig)}
    owners: dict[str, list[str]] = {}
    for spec in method_specs():
        if spec.site == "visual_tokens":
            for f in fields(spec.config_cls):
                if f.name not in base:
                    owners.setdefault(f.name, []).append(spec.name)
    g = p.add_argument_group("visual-token method options (read as YAML values; also --set KEY=VALUE)")
    for name, methods in owners.items():
        try:
            g.add_argument("--" + name.replace("_", "-"), dest=_OPT + name, type=_yaml_value, metavar="VALUE",
                           default=argparse.SUPPRESS, help=f"option of {', '.join(methods)}")
        except argparse.ArgumentError:
            continue


def _options(args: argparse.Namespace) -> dict:
    options = {k[len(_OPT):]: v for k, v in vars(args).items() if k.startswith(_OPT)}
    options.update(dict(args.set))
    return options


def _accelerator(device: str):
    import torch
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu")
    return acc, acc.device if device == "auto" or acc.num_processes > 1 else torch.device(device)


# --- visionfx eval imagenet ----------------------------------------------------------------------------------------


def _imagenet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    w.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="local weights (.pth/.safetensors), loaded by timm (pretrained_cfg_overlay=dict(file=...))")
    _method_arguments(p, "attention or norm site")
    p.add_argument("--patched", metavar="DIR", default=None,
                   help="a visionfx.save_pretrained directory, loaded with visionfx.load_pretrained")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageNet-style validation folder: DIR/<wnid>/<image>")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="full class list (synset_words.txt or one wnid per line); default: found next to --data")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward per process (default 64)")
    p.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes (default 4)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--csv", metavar="PATH", default=None, help="append a results row (timm validate.py columns)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the full results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_imagenet(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch
    from timm.data import resolve_data_config

    from visionfx.evaluation import imagenet as ev

    try:
        acc, device = _accelerator(args.device)
        model = ev.create_timm_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                     img_size=args.img_size)
        info = ev.apply_method(model, args.method, args.config, _options(args), args.patched)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    if not (args.pretrained or args.checkpoint) and acc.is_main_process:
        print("note: neither --pretrained nor --checkpoint: the model has random weights", file=sys.stderr)
    data_config = resolve_data_config(args={"img_size": args.img_size, "crop_pct": args.crop_pct}, model=model)
    try:
        result = ev.evaluate_imagenet(
            model, args.data, classes=args.classes, data_config=data_config, batch_size=args.batch_size,
            device=device, amp=args.amp, amp_dtype=getattr(torch, args.amp_dtype), limit=args.limit,
            num_workers=args.workers, progress=not args.no_progress, accelerator=acc, model_name=args.model)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    result["method"] = info["method"] if info else None
    result["method_config"] = info["config"] if info else None
    result["weights"] = "pretrained" if args.pretrained else (args.checkpoint or "random")
    if acc.is_main_process:
        print(ev.format_summary(result))
        if args.csv:
            print(f"appended a row to {ev.write_csv(args.csv, ev.results_row(result))}")
        if args.json:
            print(f"wrote {ev.write_json(args.json, result)}")
    return 0


# --- visionfx eval vqa ---------------------------------------------------------------------------------------------


def _vqa_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None, help="a Hugging Face LLaVA directory")
    _method_arguments(p, "visual_tokens site, e.g. fastervlm")
    _visual_token_flags(p)
    p.add_argument("--questions", metavar="JSONL", default=None, help="LLaVA question file")
    p.add_argument("--images", metavar="DIR", default=None, help="folder the questions' image paths are relative to")
    p.add_argument("--answers", metavar="JSONL", default=None, help="ground truth, to score the predictions")
    p.add_argument("--out", metavar="JSONL", default=None,
                   help="predictions (LLaVA answer format); appended as produced, answered ids skipped on restart")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call per process (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="default 16 (short answers; POPE uses 128)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--prompt", default="auto",
                   help="auto (chat template, else vicuna_v1), vicuna_v1, or a template with {question} and {image}")
    p.add_argument("--metric", default="auto", help="auto, vqav2, exact, pope, or several comma-separated")
    p.add_argument("--limit", type=int, default=None, help="the first N questions only")
    p.add_argument("--model-id", default=None, help="model_id written in each answer (default: the folder name)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the scores as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--convert-easy-vqa", nargs=2, metavar=("SOURCE", "DEST"), default=None,
                   help="only convert easy-VQA (archive or folder) to LLaVA JSONL files in DEST, then exit")
    p.add_argument("--split", action="append", choices=("train", "test"), default=None,
                   help="easy-VQA split(s) to convert (default test)")


def _run_vqa(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json
    from pathlib import Path

    from visionfx.evaluation import vqa
    from visionfx.evaluation.imagenet import apply_method

    if args.convert_easy_vqa:
        from visionfx.evaluation.easy_vqa import convert_easy_vqa

        try:
            result = convert_easy_vqa(*args.convert_easy_vqa, splits=tuple(args.split or ("test",)))
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        print(json.dumps(result, indent=2))
        return 0
    missing = [f"--{k}" for k in ("model", "questions", "images", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        acc, device = _accelerator(args.device)
        questions = vqa.read_questions(args.questions)[:args.limit]
        answers = vqa.read_answers(args.answers) if args.answers else None
        model, processor = vqa.load_llava(args.model, device, args.dtype)
        info = apply_method(model, args.method, args.config, _options(args))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    stats = vqa.generate_answers(
        model, processor, questions, args.images, args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, prompt_template=args.prompt,
        model_id=args.model_id or Path(args.model).name, method_info=info, accelerator=acc,
        progress=not args.no_progress)
    if not acc.is_main_process:
        return 0
    print(f"{stats['questions']} questions: {stats['skipped']} already answered in {args.out}, "
          f"{stats['questions'] - stats['skipped']} generated")
    if answers is not None:
        scores = vqa.score_predictions(vqa.read_jsonl(args.out), answers, questions, args.metric)
        scores["method"] = info
        print(vqa.format_scores(scores))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
            print(f"wrote {args.json}")
    return 0


# --- visionfx eval -------------------------------------------------------------------------------------------------

_TASKS = (
    ("imagenet", "top-1/top-5 of a timm model (patched or not) on an ImageNet-style validation folder",
     _imagenet_arguments, _run_imagenet),
    ("vqa", "LLaVA VQA: batched greedy answers (resumable) and VQAv2 / exact-match / POPE scores",
     _vqa_arguments, _run_vqa),
)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", metavar="TASK")
    for name, help_, add, run in _TASKS:
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(_eval_run=run, _eval_parser=sp)


def _run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "eval_task", None) is None:
        parser.print_help()
        return 2
    return args._eval_run(args, args._eval_parser)


COMMAND = Command("eval", "accuracy of patched models: ImageNet top-1/top-5, LLaVA VQA benchmarks",
                  _eval_arguments, _run_eval)
