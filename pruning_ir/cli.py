"""The ``pruning-ir`` command: inspect a model's dependency groups, prune it data-free, run the demo.

    pruning-ir inspect MODULE:FACTORY --input-shape 1,3,224,224
    pruning-ir prune MODULE:FACTORY --input-shape 1,3,224,224 --criterion magnitude --selector uniform
                     --ratio 0.5 [--round-to 8] --out DIR
    pruning-ir demo [--quick] [--out demo-output]

``MODULE`` is an importable module (``torchvision_like.models``) or a ``.py`` file; ``FACTORY``
is a callable in it (a function or a class) that builds the model with no arguments. A bad
spec prints one line and exits with 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .criteria import MagnitudeCriterion, RandomCriterion
from .errors import PruningIRError
from .ir import PruningIR
from .latency import bind, macs, parameter_count
from .saving import save_pruned
from .selectors import ChannelConstraint, GlobalScoreLabelSelector, KnapsackLabelSelector, UniformLabelSelector
from .checks import check_share
from .text_tables import format_count, group_channels, markdown_table

__all__ = ["main", "CommandLineError", "load_factory", "parse_input_shape"]

USAGE_ERROR = 2
CRITERIA: dict[str, Callable[..., Any]] = {
    "magnitude": lambda ir, seed: MagnitudeCriterion(ir),
    "magnitude-bn": lambda ir, seed: MagnitudeCriterion(ir, fold_batchnorm=True),
    "random": lambda ir, seed: RandomCriterion(ir, seed=seed),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "long": torch.long, "int64": torch.long, "int32": torch.int32}


class CommandLineError(Exception):
    """A bad spec or argument: printed as one line, exit code 2."""


# -- reading the spec ---------------------------------------------------------------------
def _import_module(name: str) -> Any:
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise CommandLineError(f"no such file: {name}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # classes defined there must be findable by name (pickling, saving)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise CommandLineError(f"running {name} failed: {type(error).__name__}: {error}") from error
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder are importable
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise CommandLineError(f"cannot import module {name!r}: {error}") from error
    except Exception as error:
        raise CommandLineError(f"importing {name!r} failed: {type(error).__name__}: {error}") from error


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``MODULE:FACTORY``."""
    module_name, colon, attribute_path = spec.partition(":")
    if not colon or not module_name or not attribute_path:
        raise CommandLineError(f"expected MODULE:FACTORY (e.g. my_models:resnet18), got {spec!r}")
    target = _import_module(module_name)
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise CommandLineError(f"{module_name!r} has no attribute {attribute_path!r}")
        target = getattr(target, attribute)
    if not callable(target):
        raise CommandLineError(f"{spec!r} is not callable (it is a {type(target).__name__}); name a function or "
                               "class that builds the model")
    return target


def build_model(spec: str) -> nn.Module:
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:
        raise CommandLineError(f"calling {spec}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise CommandLineError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise CommandLineError(f"--input-shape {text!r}: expected positive integers separated by commas, "
                               "e.g. 1,3,224,224")
    return shape


def example_inputs(shapes: Sequence[str], dtype: str, device: str) -> tuple[torch.Tensor, ...]:
    """Random example inputs: normal floats, or 0/1 integers (valid token ids for any vocabulary)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for text in shapes:
        shape = parse_input_shape(text)
        if DTYPES[dtype].is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(DTYPES[dtype])
        else:
            tensor = torch.randint(0, 2, shape, generator=generator, dtype=DTYPES[dtype])
        inputs.append(tensor.to(device))
    return tuple(inputs)


def _traced_ir(args: argparse.Namespace) -> tuple[PruningIR, tuple]:
    model = build_model(args.model).to(args.device).eval()
    inputs = example_inputs(args.input_shape, args.input_dtype, args.device)
    return PruningIR(model).infer_labels(*inputs), inputs


# -- commands -----------------------------------------------------------------------------
def inspect_command(args: argparse.Namespace) -> None:
    ir, _ = _traced_ir(args)
    print(ir.describe())


def _selector(args: argparse.Namespace, model: nn.Module, inputs: tuple):
    if args.round_to < 0:
        raise CommandLineError(f"--round-to takes a number of channels (0: no rounding), got {args.round_to}")
    if args.ratio is not None and args.target_macs is not None:
        raise CommandLineError("give one budget: --ratio (a share of labels removed) or --macs (a fraction of the "
                               "MACs kept), as pruning_ir.prune() takes one")
    constraint = ChannelConstraint(step=args.round_to) if args.round_to else None
    selector = args.selector or ("knapsack" if args.target_macs is not None else "uniform")
    if selector == "knapsack":
        if args.target_macs is None:
            raise CommandLineError("--selector knapsack needs --macs F (the fraction of the MACs kept, in (0, 1))")
        try:
            check_share("--macs (the fraction of the original MACs kept)", args.target_macs, "(0, 1)")
        except ValueError as error:
            raise CommandLineError(str(error)) from None
        return KnapsackLabelSelector(args.target_macs * macs(model, *inputs), bind(macs, *inputs),
                                     constraint=constraint, verbose=not args.quiet)
    if args.ratio is None:
        raise CommandLineError(f"--selector {selector} needs --ratio R (the share of labels removed)")
    if args.target_macs is not None:
        raise CommandLineError("--macs (a MACs budget) goes with --selector knapsack; uniform and global take --ratio")
    selector_type = UniformLabelSelector if selector == "uniform" else GlobalScoreLabelSelector
    try:
        return selector_type(args.ratio, constraint=constraint)
    except (TypeError, ValueError) as error:
        raise CommandLineError(f"--ratio {args.ratio}: {error}") from error


def _output_folder(path: str) -> None:
    """Create ``--out`` before any work, so a path that cannot be written is reported at once."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CommandLineError(f"--out {path!r} cannot be a folder: {error.strerror or error}") from None
    if not os.access(path, os.W_OK):
        raise CommandLineError(f"--out {path!r} is not writable")


def prune_command(args: argparse.Namespace) -> None:
    _output_folder(args.out)
    ir, inputs = _traced_ir(args)
    model = ir.model
    selector = _selector(args, model, inputs)
    CRITERIA[args.criterion](ir, args.seed).apply()
    labels = selector.select(ir)
    pruned = ir.prune(labels=labels).model.eval()
    with torch.no_grad():
        output_ok = _same_structure(model(*inputs), pruned(*inputs))
    before = {"parameters": parameter_count(model), "macs": macs(model, *inputs)}
    after = {"parameters": parameter_count(pruned), "macs": macs(pruned, *inputs)}
    save_pruned(pruned, os.path.join(args.out, "pruned-model"))
    table = markdown_table(("", "before", "after", "after / before"), [
        (name, format_count(before[key]), format_count(after[key]), f"{after[key] / before[key]:.3f}")
        for name, key in (("parameters", "parameters"), ("MACs", "macs"))])
    report = [f"# pruning-ir prune {args.model}", "",
              f"Criterion `{args.criterion}`, selector `{type(selector).__name__}` "
              f"({f'{args.ratio} of the labels removed' if args.ratio is not None else f'{args.target_macs} of the MACs kept'})"
              f"{f', widths in multiples of {args.round_to}' if args.round_to else ''}; "
              f"inputs {', '.join(args.input_shape)} ({args.input_dtype}). {len(labels)} labels removed.", "",
              table, "", "## Channels per dependency group", "",
              markdown_table(("group", "modules", "channels before", "channels after"), group_channels(ir, labels)),
              "", "Load it with `pruning_ir.load_pruned(FACTORY(), 'pruned-model')`."]
    with open(os.path.join(args.out, "report.md"), "w") as file:
        file.write("\n".join(report) + "\n")
    with open(os.path.join(args.out, "report.json"), "w") as file:
        json.dump({"model": args.model, "removed_labels": len(labels), "before": before, "after": after,
                   "outputs_keep_their_shapes": output_ok}, file, indent=1)
    print(table)
    print(f"{len(labels)} labels removed; wrote {os.path.join(args.out, 'pruned-model')} and report.md")
    if not output_ok:
        raise PruningIRError("the pruned model's outputs changed shape; please report this model")


def _same_structure(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        getattr(x, "shape", None) == getattr(y, "shape", None) for x, y in zip(leaves_a, leaves_b))


def demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo  # here, not at the top: the demo needs scikit-learn and matplotlib
    run_demo(args.out, quick=args.quick or None, verbose=not args.quiet)


# -- parsing ------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODULE:FACTORY", help="module (or .py file) and a callable building the model")
    parser.add_argument("--input-shape", action="append", required=True, metavar="N,C,H,W",
                        help="shape of an example input; repeat for a model with several inputs")
    parser.add_argument("--input-dtype", default="float32", choices=sorted(DTYPES),
                        help="integer inputs are filled with 0 and 1 (token ids valid in any vocabulary)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pruning-ir", description="Structured channel pruning for PyTorch models.")
    root.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = root.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="list the dependency groups and why channels are unprunable")
    _model_arguments(inspect)
    inspect.set_defaults(run=inspect_command)
    prune = commands.add_parser("prune", help="prune data-free and save the model in the safe format")
    _model_arguments(prune)
    prune.add_argument("--criterion", choices=sorted(CRITERIA), default="magnitude")
    prune.add_argument("--selector", choices=("uniform", "global", "knapsack"), default=None,
                       help="default: knapsack with --macs, uniform with --ratio")
    # the same words as pruning_ir.prune(): ratio= is a share removed, macs= a fraction kept
    prune.add_argument("--ratio", type=float, help="share of labels removed from every group (uniform, global), "
                       "as pruning_ir.prune(ratio=)")
    prune.add_argument("--macs", "--target-macs", dest="target_macs", type=float,
                       help="fraction of the original MACs kept (knapsack), as pruning_ir.prune(macs=)")
    prune.add_argument("--round-to", type=int, default=0, metavar="N", help="keep widths in multiples of N (0: any)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, metavar="DIR")
    prune.add_argument("--quiet", action="store_true", help="no progress output")
    prune.set_defaults(run=prune_command)
    demo = commands.add_parser("demo", help="train, calibrate, prune and report on scikit-learn's digits")
    demo.add_argument("--quick", action="store_true", help="less training (a smoke test)")
    demo.add_argument("--out", default="demo-output", metavar="DIR")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=demo_command)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
            raise CommandLineError(f"--device {args.device}: CUDA is not available on this machine")
        args.run(args)
    except (CommandLineError, PruningIRError, ValueError) as error:
        if args.debug:
            raise
        print(f"pruning-ir: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
