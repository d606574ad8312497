"""`qcompile`: flags -> config -> pipeline -> backend. Thin on purpose; the work is in qcompiler.pipeline."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from qcompiler.errors import QCompileError

__all__ = ["main"]


def _parse_shapes(text: str | None) -> dict[str, list[int]] | None:
    if not text:
        return None
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            name = ""
        if not name or any(d <= 0 for d in shapes.get(name, [0])):
            raise QCompileError(f"--shapes expects name:1x512[,name2:...], got {item!r}")
    return shapes


def _list_recipes() -> None:
    from qcompiler.recipes import BUILTIN_RECIPES

    width = max(len(n) for n in BUILTIN_RECIPES)
    for name, recipe in BUILTIN_RECIPES.items():
        click.echo(f"{name:<{width}}  {recipe.description}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Compiled model path (.onnx).")
@click.option("--recipe", default="w8a8-smoothquant", show_default=True, help="Built-in recipe name or a YAML file.")
@click.option("--calib", type=click.Path(), help=".npz (or folder of .npz) keyed by model input name, samples on axis 0.")
@click.option("--calib-batch", default=1, show_default=True, type=click.IntRange(min=1), help="Rows per calibration run.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Calibration samples to use (default: the recipe's).")
@click.option("--calib-text", type=click.Path(), help="Text file cut into token windows for calibration.")
@click.option("--tokenizer", type=click.Path(), help="tokenizer.json, or a .gguf file that embeds one.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2), help="Tokens per text window.")
@click.option("--eval-text", type=click.Path(), help="Held-out text for perplexity (causal LMs).")
@click.option("--eval-windows", default=16, show_default=True, type=click.IntRange(min=1), help="Perplexity windows.")
@click.option("--no-eval", is_flag=True, help="Skip evaluation (agreement, perplexity, latency).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the report as .md or .json.")
@click.option("--dump-dir", type=click.Path(file_okay=False), help="Write NN_<pass>.onnx after each pass.")
@click.option("--exclude", multiple=True, help="Regex of node names to leave in float (repeatable).")
@click.option("--shapes", help="Input shapes for latency, e.g. input_ids:1x512.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads for evaluation.")
@click.option("--stats", "stats_in", type=click.Path(dir_okay=False), help="Load calibration statistics (.npz).")
@click.option("--save-stats", type=click.Path(dir_okay=False), help="Save calibration statistics (.npz).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Lowering target: ORT integer kernels, or standard Q/DQ for TensorRT.")
@click.option("--plugins", is_flag=True, help="With --backend tensorrt: lower 4-bit weight-only GEMMs (MatMulNBits), "
              "per-token W8A8 GEMMs and attention (causal and/or padding masks) to qcompiler's TensorRT plugin ops.")
@click.option("--max-seq-len", default=4096, show_default=True, type=click.IntRange(min=1),
              help="With --plugins: the longest sequence the engine is for (run-time attention masks are checked up to it).")
@click.option("--explain", is_flag=True, help="List every candidate a pass declined, with the reason.")
@click.option("--list-recipes", is_flag=True, help="List the built-in recipes and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def _command(model, output, recipe, calib, calib_batch, calib_samples, calib_text, tokenizer, seq_len, eval_text,
             eval_windows, no_eval, report, dump_dir, exclude, shapes, threads, stats_in, save_stats, backend,
             plugins, max_seq_len, explain, list_recipes, quiet, verbose):
    """Compile MODEL.onnx with a quantization recipe; writes the compiled model to -o."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if list_recipes:
        _list_recipes()
        return
    if not model:
        raise QCompileError("missing MODEL.onnx (see qcompile --help)")
    if not output:
        raise QCompileError("missing -o/--output path for the compiled model")
    from qcompiler.pipeline import DataOptions, EvalOptions, compile
    from qcompiler.report import summary_markdown, write_report

    data = DataOptions(calib=calib, calib_batch=calib_batch, calib_text=calib_text, tokenizer=tokenizer,
                       seq_len=seq_len, num_samples=calib_samples, stats=stats_in, save_stats=save_stats)
    evaluate = EvalOptions(enabled=not no_eval, eval_text=eval_text, eval_windows=eval_windows,
                           shapes=_parse_shapes(shapes), threads=threads)
    result = compile(model, output, recipe, data=data, evaluate=evaluate, exclude=exclude, dump_dir=dump_dir,
                     backend=backend, plugins=plugins, max_seq_len=max_seq_len, show_progress=not quiet and sys.stderr.isatty())
    if explain:
        for record in result.records:
            for where, why in record.result.not_fired:
                click.echo(f"{record.name}: {where}: {why}")
    if not quiet:
        click.echo(summary_markdown(result))
    if report:
        write_report(result, report)


def main(argv: list[str] | None = None) -> None:
    """Entry point: QCompileError -> one line on stderr, exit 2; anything unexpected -> exit 1."""
    try:
        _command.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        click.echo(f"qcompile: error: {err.format_message()}", err=True)
        sys.exit(2)
    except QCompileError as err:
        click.echo(f"qcompile: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("qcompile: interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # a bug of ours: still one line, the traceback only with -v
        if "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv):
            traceback.print_exc()
        click.echo(f"qcompile: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
