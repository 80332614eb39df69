"""`dscompress` command line: parse, call the library, print. Known errors are one line; see errors.py for codes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

# Offline by construction: nothing here may reach a model hub. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import typer
from rich.console import Console

from dscompress import __version__
from dscompress.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, DscompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console()

Debug = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]
RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file")]


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def handled(debug: bool, every_problem: bool = False):
    """Known errors -> one line + their exit code; anything else -> exit 1 (traceback with --debug).

    `every_problem` (validate) lists every recipe problem, one line each, instead of the first.
    """
    try:
        yield
    except DscompressError as exc:
        if debug:
            err.print_exception()
        lines = getattr(exc, "all_messages", None) if every_problem else None
        for line in lines or [str(exc)]:
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if debug:
            err.print_exception()
        else:
            first = (str(exc).splitlines() or [""])[0]
            err.print(
                f"[red]internal error:[/red] {type(exc).__name__}: {first} (rerun with --debug)",
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_INTERNAL) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"dscompress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """Compress Qwen, DeepSeek and Llama-family checkpoints with gated, resumable recipes."""


def _load(recipe_path: Path, with_model: bool = True):
    from dscompress.models.info import inspect_model
    from dscompress.models.sources import resolve
    from dscompress.plan import check_against_model
    from dscompress.recipe import load_recipe

    recipe, located = load_recipe(recipe_path)
    if not with_model:
        return recipe, located, None
    info = inspect_model(resolve(recipe.model.path).directory, recipe.model.trust_remote_code)
    check_against_model(recipe, located, info)
    return recipe, located, info


@app.command()
def run(
    recipe: RecipeArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="override the recipe's output_dir")] = None,
    debug: Debug = False,
) -> None:
    """Run every stage of a recipe; rerunning resumes and reuses finished stages."""
    from dscompress.runner import Runner

    with handled(debug):
        _quiet_libraries()
        parsed, located, _ = _load(recipe, with_model=False)  # the runner checks against the model itself
        report = Runner(parsed, recipe, out_dir, console=err, located=located).run()
        out.print(f"final artifact: {report['final_artifact']}")


@app.command()
def validate(recipe: RecipeArg, debug: Debug = False) -> None:
    """Check a recipe, including the checks that need the model's shapes; computes nothing."""
    with handled(debug, every_problem=True):
        _quiet_libraries()
        parsed, _, info = _load(recipe)
        out.print(f"ok: {recipe}: {len(parsed.stages)} stage(s) on {info.adapter.model_type}, {info.n_params:,} params")


@app.command()
def plan(recipe: RecipeArg, as_json: Annotated[bool, typer.Option("--json")] = False, debug: Debug = False) -> None:
    """Dry run: the stages, estimated peak memory and disk."""
    from dscompress.plan import make_plan

    with handled(debug):
        _quiet_libraries()
        parsed, _, info = _load(recipe)
        result = make_plan(parsed, info)
        if as_json:
            out.print_json(json.dumps(result))
            return
        out.print(f"{result['model']} ({result['architecture']}): {result['params']:,} params, "
                  f"{result['model_bytes'] / 1e6:.1f} MB as {parsed.model.dtype}")  # fmt: skip
        for s in result["stages"]:
            out.print(f"  {s['dir']:<20} {s['pass']:<8} deployed {_mb(s['deployed_bytes'])}   "
                      f"checkpoint {_mb(s['checkpoint_bytes'])}")  # fmt: skip
        out.print(f"peak memory ~{_mb(result['peak_memory_bytes'])}, disk ~{_mb(result['disk_bytes'])}")
        out.print(f"[dim]{result['assumptions']}[/dim]")


def _mb(n: float) -> str:
    return f"{n / 1e6:9.1f} MB"


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="checkpoint dir, .gguf, bundled:... or tiny:...")],
    baseline: Annotated[str | None, typer.Option(help="reference model for KL and top-1")] = None,
    data: Annotated[str, typer.Option(help="builtin:pydoc or a .txt/.jsonl file")] = "builtin:pydoc",
    samples: Annotated[int, typer.Option(min=1)] = 16,
    seq_len: Annotated[int, typer.Option(min=8)] = 512,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    debug: Debug = False,
) -> None:
    """Perplexity of a model on the evaluation split (and KL / top-1 against --baseline)."""
    from dscompress.evaluate import evaluate_models

    with handled(debug):
        _quiet_libraries()
        metrics = evaluate_models(model, baseline, data, samples, seq_len, batch_size, err)
        out.print_json(json.dumps(metrics))


@app.command("export")
def export_(
    stage: Annotated[Path, typer.Argument(help="a quantized stage directory, e.g. out/run/latest")],
    fmt: Annotated[str, typer.Option("--format", help="gptq | gptq_v2 | compressed-tensors")],
    out_dir: Annotated[Path, typer.Option("--out", help="where to write the packed checkpoint")],
    dtype: Annotated[
        str, typer.Option(help="dtype of the unquantized tensors: float16 | bfloat16 | float32")
    ] = "float16",
    debug: Debug = False,
) -> None:
    """Pack a quantized stage as a GPTQ (v1/v2) or compressed-tensors checkpoint; no re-quantization."""
    from dscompress.errors import DscompressError
    from dscompress.export.formats import FORMATS, export
    from dscompress.models.sources import DTYPES

    with handled(debug):
        _quiet_libraries()
        if fmt not in FORMATS or dtype not in DTYPES:
            raise DscompressError(f"--format {fmt!r} / --dtype {dtype!r}: allowed {FORMATS} / {tuple(DTYPES)}")
        out.print(f"wrote {export(stage, out_dir, fmt, DTYPES[dtype])}")


@app.command()
def models() -> None:
    """List the bundled real model and the tiny test models, and what is cached."""
    from dscompress.models.sources import BUNDLED, cache_root
    from dscompress.models.tiny import TINY_ARCHS

    root = cache_root() / "models"
    for name in BUNDLED:
        cached = "cached" if (root / name).exists() else "converted on first use"
        out.print(f"bundled:{name:<28} SmolLM2-135M-Instruct (llama), real weights, {cached}")
    for arch in TINY_ARCHS:
        out.print(f"tiny:{arch:<32} random-init test model")
    out.print(f"cache: {root}")


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editor autocompletion)."""
    from dscompress.recipe import Recipe

    sys.stdout.write(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")


if __name__ == "__main__":
    app()
