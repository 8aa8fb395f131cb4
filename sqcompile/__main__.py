"""Command line: ``python -m sqcompile explain path/to/script.py [--options JSON] [--graphs]``.

The script defines ``build()`` returning ``(model, example_inputs)``, or module-level
``model`` and ``example_inputs``.  It is run with ``runpy`` (its ``__main__`` block does not
run), the model is explained with :func:`sqcompile.explain.explain`, and the per-op precision
report is printed (with ``--graphs``, the graphs before and after rewriting and the forward
and backward graphs too).
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sqcompile",
                                description="sqcompile: sub-8-bit integer training as a torch.compile backend.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    e = sub.add_parser("explain", help="compile a model from a script and print its per-op precision report",
                       description="Compile the model a script builds with backend='shiftquant', run one "
                                   "forward and backward step, and print the per-op precision report.")
    e.add_argument("script", help="Python file defining build() -> (model, example_inputs), "
                                  "or module-level `model` and `example_inputs`")
    e.add_argument("--options", default="{}", metavar="JSON",
                   help='backend options as a JSON object, e.g. \'{"weight_bits": 8, "overrides": {"fc": null}}\'')
    e.add_argument("--stats", action="store_true", help="collect SQNR / group occupancy (collect_stats=true)")
    e.add_argument("--graphs", action="store_true", help="also print the graphs before/after rewriting, "
                                                         "forward and backward")
    e.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    e.add_argument("--csv", metavar="PATH", help="also write the report as CSV")
    e.add_argument("--plot", metavar="PATH", help="also draw SQNR / group occupancy to a PNG (needs matplotlib)")
    return p


def load_script(path: str):
    """``(model, example_inputs_tuple)`` from a script (see the module docstring)."""
    script = Path(path)
    if not script.is_file():
        raise SystemExit(f"sqcompile explain: no such file: {path}")
    sys.path.insert(0, str(script.resolve().parent))
    try:
        namespace = runpy.run_path(str(script), run_name="__sqcompile_explain__")
    finally:
        sys.path.pop(0)
    if callable(namespace.get("build")):
        built = namespace["build"]()
        if not (isinstance(built, tuple) and len(built) == 2):
            raise SystemExit(f"sqcompile explain: build() in {path} must return (model, example_inputs)")
        model, inputs = built
    elif "model" in namespace and "example_inputs" in namespace:
        model, inputs = namespace["model"], namespace["example_inputs"]
    else:
        raise SystemExit(f"sqcompile explain: {path} defines neither build() nor `model` and `example_inputs`")
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "explain":
        parser.print_help()
        return 2
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        parser.error(f"--options is not valid JSON: {e}")
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    if args.stats:
        options["collect_stats"] = True
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib, or the package's [plot] extra)")

    from .explain import explain

    model, inputs = load_script(args.script)
    try:
        result = explain(model, *inputs, **options)
    except ValueError as e:   # a bad option, or no graph to explain: say so without a traceback
        if str(e).startswith(("sqcompile option", "unknown sqcompile option", "sqcompile options")):
            parser.error(str(e))
        if str(e).startswith("sqcompile.explain(): Dynamo captured no graph"):
            raise SystemExit(f"sqcompile explain: {e}") from None
        raise
    print(result if args.graphs else result.report)
    if args.json:
        Path(args.json).write_text(result.report.to_json())
    if args.csv:
        result.report.to_csv(args.csv)
    if args.plot:
        result.report.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
