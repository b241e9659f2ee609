"""The ``visionfx`` command line: ``visionfx list`` and ``visionfx bench``.

Each subcommand is a :class:`Command`: a name, a help line, a function that adds its arguments to an
``argparse`` parser, and a function that runs it from the parsed arguments and returns the exit status. Adding a
subcommand is adding one entry to :data:`COMMANDS` (its functions may live in their own module). The work itself lives
in importable modules (:mod:`visionfx.bench`, :mod:`visionfx.registry`); this module only parses arguments and prints.

Exit status: 0 on success, 1 when something failed while running (e.g. a method module that does not import, for
``list --strict``), 2 for bad arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "Command", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


# --- visionfx list -----------------------------------------------------------------------------------------------


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="add each method's one-line summary")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a method or adapter module fails to import")


def _run_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visionfx.registry import import_errors, list_adapters, method_specs
    from visionfx.utils import format_table

    specs, adapters = method_specs(), list_adapters()
    header = ["method", "site", *[a.name for a in adapters], "needs on a pretrained model", "paper"]
    rows = [[s.name, s.site, *["yes" if s.site in a.sites else "-" for a in adapters], s.regime, s.paper or "-"]
            for s in specs]
    if args.verbose:
        header.append("summary")
        for row, s in zip(rows, specs):
            row.append(s.summary)
    print(f"methods ({len(specs)}) x model families ({len(adapters)}): 'yes' where the family provides the site")
    print(format_table(header, rows))
    print()
    print(f"model families ({len(adapters)})")
    print(format_table(["adapter", "sites", "models"], [[a.name, ", ".join(a.sites), a.family] for a in adapters]))
    errors = import_errors()
    if errors:
        print()
        print(f"modules that failed to import ({len(errors)}); their methods are unavailable:")
        for module, error in errors.items():
            print(f"  {module}: {error}")
    return 1 if errors and args.strict else 0


# --- visionfx bench ----------------------------------------------------------------------------------------------


def _csv(kind: Callable, what: str):
    def parse(text: str):
        try:
            items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated list, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        return items

    return parse


def _threads(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads: expected an integer or 'auto', got {text!r}") from None


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from visionfx.bench import DEFAULTS, DTYPES

    d = DEFAULTS
    p.add_argument("--model", default=d["model"], help=f"timm ViT name, built with random weights (default {d['model']})")
    p.add_argument("--methods", type=_csv(str, "--methods"), default=None,
                   help="comma-separated method names or YAML recipes (default: every attention method)")
    p.add_argument("--sizes", type=_csv(int, "--sizes"), default=list(d["sizes"]),
                   help=f"comma-separated square image sizes (default {','.join(map(str, d['sizes']))})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"images per forward (default {d['batch_size']})")
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N (default auto: CUDA if present)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=f"default {d['dtype']}")
    p.add_argument("--warmup", type=int, default=d["warmup"], help=f"untimed forwards per row (default {d['warmup']})")
    p.add_argument("--repeat", type=int, default=d["repeat"],
                   help=f"timed forwards per row; the median is reported (default {d['repeat']})")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="CPU threads, or auto (default): PyTorch's choice, fewer when other processes keep CPUs busy")
    p.add_argument("--compile", action="store_true", help="benchmark torch.compile(model)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="PATH", default=None, help="also write environment and rows as JSON")
    p.add_argument("--kernels", action="store_true", help="run the kernel micro-benchmark instead of whole models")


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visionfx import bench

    if args.kernels:
        return _run_kernel_bench(args)
    settings = {
        "model": args.model, "methods": args.methods, "sizes": args.sizes, "batch_size": args.batch_size,
        "device": args.device, "dtype": args.dtype or bench.DEFAULTS["dtype"], "warmup": args.warmup,
        "repeat": args.repeat, "compile": args.compile, "memory": not args.no_memory, "threads": args.threads,
    }
    try:
        env = bench.environment(args.device)
        rows = bench.run_bench(**settings, progress=not args.no_progress)
    except bench.BenchError as e:
        parser.error(str(e))
    threads = rows[0]["threads"]
    load = env["load_average_1_5_15min"]
    print(f"{args.model}, batch {args.batch_size}, {settings['dtype']} on {env['device_name']} ({env['device']}, "
          f"{threads} thread{'s' if threads != 1 else ''}{f', load {load[0]:.1f}' if load else ''})"
          f"{', compiled' if args.compile else ''}; median of {args.repeat} after {args.warmup} warm-up")
    if load and env["device"] == "cpu" and load[0] > (env["cpu_affinity"] or env["cpu_count"] or 1) - 0.5:
        print(f"note: the CPU was busy before the run (load {load[0]:.1f} on {env['cpu_affinity'] or env['cpu_count']} "
              "CPUs): other processes slow every row and make timings noisier than on an idle machine")
    print(bench.format_rows(rows))
    if args.json:
        methods = [r["method"] for r in rows if r["size"] == rows[0]["size"]][1:]
        path = bench.write_json(args.json, rows, {**settings, "methods": methods, "device": env["device"]}, env)
        print(f"\nwrote {path}")
    return 1 if all(r["error"] is not None for r in rows) else 0


def _kernel_bench_function():
    """The kernel micro-benchmark: ``visionfx.bench.kernel_bench`` or ``visionfx.bench_kernels.kernel_bench``."""
    from visionfx import bench

    fn = getattr(bench, "kernel_bench", None)
    if fn is None:
        try:
            from visionfx.bench_kernels import kernel_bench as fn
        except ImportError:
            return None
    return fn


def _run_kernel_bench(args: argparse.Namespace) -> int:
    fn = _kernel_bench_function()
    if fn is None:
        print("visionfx bench --kernels: the kernel micro-benchmark is not available in this installation "
              "(no visionfx.bench.kernel_bench or visionfx.bench_kernels); run 'visionfx bench' without --kernels "
              "for whole models.", file=sys.stderr)
        return 2
    # pass what the user chose and the micro-benchmark accepts; it keeps its own defaults for the rest
    offered = {"device": args.device, "json_path": args.json, "progress": not args.no_progress}
    if args.dtype is not None:
        offered["dtype"] = args.dtype
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        result = fn(**{k: v for k, v in offered.items() if takes_all or k in params})
    except ValueError as e:
        print(f"visionfx bench --kernels: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


#: the subcommands, in help order: a :class:`Command`, or ``"module:attribute"`` of one defined in its own module
#: (imported when the parser is built, so those modules may import :class:`Command` from here)
COMMANDS: tuple[Command | str, ...] = (
    Command("list", "methods x model families, what each needs, and modules that failed to import",
            _list_arguments, _run_list),
    Command("bench", "speed and memory of a model patched with each method vs. the original",
            _bench_arguments, _run_bench),
    "visionfx.evaluation.cli:COMMAND",
    "visionfx.recovery.cli:COMMAND",
    "visionfx.recovery.cli:TRAIN_COMMAND",
)


def _resolve(cmd: Command | str) -> Command:
    if isinstance(cmd, Command):
        return cmd
    import importlib

    module, _, attr = cmd.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    from visionfx import __version__

    parser = argparse.ArgumentParser(
        prog="visionfx", description="Patch vision and multimodal models with efficient token mixers.")
    parser.add_argument("--version", action="version", version=f"visionfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in map(_resolve, COMMANDS):
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Bad arguments raise ``SystemExit(2)`` with a message on stderr, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args._command.run(args, args._parser)


if __name__ == "__main__":
    sys.exit(main())
