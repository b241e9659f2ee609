"""Command-line entries ``visionfx distill`` and ``visionfx train`` (registered in :data:`visionfx.cli.COMMANDS`).

``visionfx distill --model <timm name> [--checkpoint FILE] --method M [--config YAML] --data <archive or folder>``
patches the model and recovers its accuracy (:func:`visionfx.recovery.distill`); ``--checkpoint`` may be a reference
checkpoint from ``visionfx train`` (then ``--model`` is not needed and the normalisation comes from it) or a plain
state dict (``.pt``/``.pth``/``.safetensors``). ``visionfx train cifar10 --data cifar10.tar.xz`` trains the reference
ViT (:mod:`visionfx.recovery.train`); ``visionfx train easy-vqa --data easy-vqa.tar.xz --output DIR`` trains the tiny
LLaVA (:mod:`visionfx.recovery.easy_vqa_llava`) and saves it as a Hugging Face model directory. Recipe fields can be set with ``--set key=value`` (values read as YAML).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from visionfx.cli import Command

__all__ = ["COMMAND", "TRAIN_COMMAND", "main_distill", "main_train"]


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(KEY, VALUE parsed as YAML)``, an argparse type for recipe overrides."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="an archive (<root>/<split>/<class>/<image>, e.g. cifar10.tar.xz) "
                   "or a folder <split>/<class>/<image>")
    p.add_argument("--cache-dir", default=None, help="where an archive is decoded once to a uint8 tensor cache "
                   "(default: beside the archive)")
    p.add_argument("--image-size", type=int, default=None, help="square image side (folders; archives keep theirs)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="keep N images per class and split (archives; "
                   "smoke runs)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default=None, help="held-out split (default: test, else val)")


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe field (repeatable), e.g. --set stage2_lr=2e-4")
    p.add_argument("--max-steps", type=int, default=None, help="cap the optimiser steps (of each stage)")
    p.add_argument("--batch-size", type=int, default=None, help="images per device and micro-batch")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training forwards")
    p.add_argument("--cpu", action="store_true", default=None, help="run on the CPU even with an accelerator")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load_data(args):
    import contextlib
    import os

    from visionfx.recovery.data import load_image_data

    first = contextlib.nullcontext()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch: one process decodes the archive
        from accelerate import PartialState

        first = PartialState().main_process_first()
    with first:
        return load_image_data(args.data, cache_dir=args.cache_dir, train_split=args.train_split,
                               eval_split=args.eval_split, image_size=args.image_size, limit_per_class=args.limit,
                               progress=not args.no_progress)


# --- visionfx distill ----------------------------------------------------------------------------------------------


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="timm model name, built with random weights (then --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="reference checkpoint (visionfx train) or a state dict file")
    p.add_argument("--num-classes", type=int, default=None, help="classes of --model (default: the data's)")
    p.add_argument("--img-size", type=int, default=None, help="input size of --model (default: the data's)")
    p.add_argument("--method", required=True, help="method name or YAML recipe (see 'visionfx list')")
    p.add_argument("--config", default=None, help="distill recipe YAML (e.g. configs/distill-cifar10.yaml)")
    _data_arguments(p)
    p.add_argument("--output", default=None, help="output folder: log, checkpoints, final model "
                   "(default: ./distill-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--stage1-steps", type=int, default=None)
    p.add_argument("--stage2-steps", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on qkv/proj during stage 1 (0: off)")
    _engine_arguments(p)


def _build_model(args, data):
    import timm
    import torch

    from visionfx.recovery.train import REFERENCE_FORMAT, load_reference

    ckpt = None
    if args.checkpoint:
        path = Path(args.checkpoint)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ckpt, dict) and ckpt.get("format") == REFERENCE_FORMAT:
            model, info = load_reference(ckpt)
            return model, info.get("mean"), info.get("std")
    if not args.model:
        raise ValueError("--model is required unless --checkpoint is a reference checkpoint from 'visionfx train'")
    kwargs = {"num_classes": args.num_classes or data.num_classes}
    kwargs["img_size"] = args.img_size or data.train.image_size[0]
    model = timm.create_model(args.model, pretrained=False, **{k: v for k, v in kwargs.items() if v is not None})
    if ckpt is not None:
        state = ckpt
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        model.load_state_dict(state)
    return model.eval(), None, None


def _run_distill(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visionfx.recovery.config import DistillConfig
    from visionfx.recovery.distill import distill
    from visionfx.utils import format_table

    try:
        data = _load_data(args)
        model, mean, std = _build_model(args, data)
        overrides = dict(args.overrides)
        for key, value in (("stage1_steps", args.stage1_steps), ("stage2_steps", args.stage2_steps),
                           ("lora_rank", args.lora_rank), ("mixed_precision", args.mixed_precision),
                           ("compile", args.compile), ("cpu", args.cpu), ("seed", args.seed)):
            if value is not None:
                overrides[key] = value
        if args.batch_size is not None:
            overrides.update(stage1_batch_size=args.batch_size, stage2_batch_size=args.batch_size)
        cfg = DistillConfig.load(args.config, **overrides) if args.config else DistillConfig.from_dict(overrides)
        if args.max_steps is not None:
            cfg = cfg.replace(stage1_steps=min(cfg.stage1_steps, args.max_steps),
                              stage2_steps=min(cfg.stage2_steps, args.max_steps))
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.error(str(e))
    method_name = Path(args.method).stem if args.method.endswith((".yaml", ".yml")) else args.method
    output = Path(args.output or f"distill-{method_name}")
    result = distill(model, args.method, data, config=cfg, output_dir=output, resume=args.resume, mean=mean, std=std,
                     progress=not args.no_progress)
    stages = result.log["stages"]
    rows = [[name, stages.get(name, {}).get("steps", "-"), f"{stages.get(name, {}).get('gpu_seconds', 0.0):.1f}",
             _pct(result.top1.get(tag))]
            for name, tag in (("patched", "start"), ("stage1", "stage1"), ("stage2", "stage2"), ("final", "final"))]
    rows[0][1] = rows[0][2] = rows[-1][1] = rows[-1][2] = "-"
    print(format_table(["after", "steps", "GPU s", "top-1"], rows))
    print(f"\nwrote {output / 'final'} and {output / 'distill_log.json'}")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


# --- visionfx train ------------------------------------------------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=list(TRAIN_OUTPUTS), help="the reference recipe to run: cifar10 (a small "
                   "ViT) or easy-vqa (a tiny LLaVA; --data easy-vqa.tar.xz, --limit N keeps N questions per split)")
    p.add_argument("--config", default=None, help="recipe YAML (default: the recipe's dataclass defaults; "
                   "configs/train-cifar10.yaml and configs/train-easy-vqa.yaml are the same recipes written out)")
    _data_arguments(p)
    p.add_argument("--output", default=None, help="output folder (default: reference-cifar10 with reference.pt and "
                   "train_log.json; easy-vqa-llava with the Hugging Face model and processor)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit training into this many seconds (the step count shrinks after a timed calibration)")
    _engine_arguments(p)


TRAIN_OUTPUTS = {"cifar10": "reference-cifar10", "easy-vqa": "easy-vqa-llava"}
# data options of the image-folder recipe that the easy-VQA recipe does not read (their defaults)
_CIFAR_ONLY = {"cache_dir": None, "image_size": None, "train_split": "train", "eval_split": None, "compile": None}


def _train_config(args):
    from visionfx.recovery.train import TrainConfig

    if args.dataset == "easy-vqa":
        return _easy_vqa_config(args)
    overrides = dict(args.overrides)
    for key, value in (("epochs", args.epochs), ("time_budget", args.time_budget), ("max_steps", args.max_steps),
                       ("batch_size", args.batch_size), ("mixed_precision", args.mixed_precision),
                       ("compile", args.compile), ("cpu", args.cpu), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    return TrainConfig.load(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)


def _easy_vqa_config(args):
    from visionfx.recovery.easy_vqa_llava import TrainVQAConfig

    unused = [f"--{k.replace('_', '-')}" for k, v in _CIFAR_ONLY.items() if getattr(args, k) != v]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used by the easy-vqa recipe")
    overrides = dict(args.overrides)
    for key, value in (("epochs", args.epochs), ("time_budget", args.time_budget), ("max_steps", args.max_steps),
                       ("batch_size", args.batch_size), ("mixed_precision", args.mixed_precision),
                       ("cpu", args.cpu), ("seed", args.seed), ("limit", args.limit)):
        if value is not None:
            overrides[key] = value
    return TrainVQAConfig.load(args.config, **overrides) if args.config else TrainVQAConfig.from_dict(overrides)


def _run_train_easy_vqa(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visionfx.recovery.easy_vqa_llava import train_easy_vqa

    output = Path(args.output or TRAIN_OUTPUTS["easy-vqa"])
    try:
        cfg = _train_config(args)
        if not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.error(str(e))
    out = train_easy_vqa(cfg, args.data, output, progress=not args.no_progress)
    print(json.dumps({k: out[k] for k in ("accuracy", "by_category", "steps", "examples", "seconds", "gpu_seconds",
                                          "device")}, indent=1))
    print(f"wrote {output} (load with visionfx.evaluation.vqa.load_llava or 'visionfx eval vqa --model {output}')")
    return 0


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visionfx.recovery.train import train_reference

    if args.dataset == "easy-vqa":
        return _run_train_easy_vqa(args, parser)
    args.output = args.output or TRAIN_OUTPUTS["cifar10"]
    try:
        cfg = _train_config(args)
        data = _load_data(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.error(str(e))
    out = train_reference(cfg, data, args.output, progress=not args.no_progress)
    print(json.dumps({k: out[k] for k in ("top1", "steps", "images", "seconds", "gpu_seconds", "device")}, indent=1))
    print(f"wrote {Path(args.output) / 'reference.pt'}")
    return 0


COMMAND = Command("distill", "patch a model and recover its accuracy: attention transfer, then distillation",
                  _distill_arguments, _run_distill)
TRAIN_COMMAND = Command("train", "train a reference model from scratch (cifar10: a small ViT; easy-vqa: a tiny "
                        "LLaVA; hosts of the fidelity tables)",
                        _train_arguments, _run_train)


def _main(command: Command, argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"visionfx {command.name}", description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    return command.run(args, parser)


def main_distill(argv=None) -> int:
    """``visionfx distill`` as a standalone entry point (until it is listed in ``visionfx.cli.COMMANDS``)."""
    return _main(COMMAND, argv)


def main_train(argv=None) -> int:
    """``visionfx train`` as a standalone entry point."""
    return _main(TRAIN_COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main_distill())
