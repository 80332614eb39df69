"""`dscompress` command line: parse, call the library, print. Known errors are one line; see errors.py for codes."""

from __future__ import annotations

import contextlib
import enum
import errno
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
from rich.markup import escape

from dscompress.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, DscompressError
from dscompress.version import __version__

EXIT_CODES = (
    "Exit codes: 0 success; 1 internal error (a bug: rerun with --debug); 2 bad input or the machine's state "
    "(no space, no permission); 3 a gate failed (on_fail: stop); 4 the output directory is locked by another run; "
    "130 interrupted (rerun to resume)."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, epilog=EXIT_CODES)
# Choices spelled here so that --help needs no torch import; tests/test_runner.py checks them against the library.
EXPORT_FORMATS = ("onnx", "onnx-ort", "ort-genai", "gptq", "gptq_v2", "compressed-tensors")
DTYPE_CHOICES = ("float16", "bfloat16", "float32")
DEVICE_TARGETS = ("orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nx-8gb", "orin-nano-8gb", "x86-gpu")
BUNDLE_TARGETS = (*DEVICE_TARGETS, "triton")  # triton: a model repository, not a device (no recipe `target:`)
JETPACKS = ("6.2", "7.2")
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum, which typer lists as the option's choices in --help and checks before the command runs."""
    return enum.Enum(name, {v: v for v in values}, type=str)


ExportFormat = _choices("ExportFormat", EXPORT_FORMATS)
Dtype = _choices("Dtype", DTYPE_CHOICES)
BundleTarget = _choices("BundleTarget", BUNDLE_TARGETS)
JetPack = _choices("JetPack", JETPACKS)
# ":llama" in tiny:llama is a name, not an emoji code. Piped (a CI log, a file), rich would hard-wrap at 80
# columns; a wide virtual width keeps each line whole (tables still size to their content).
err = Console(stderr=True, emoji=False, width=None if sys.stderr.isatty() else 200)
out = Console(emoji=False, width=None if sys.stdout.isatty() else 200)

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
            err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)  # text, not markup
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise_internal(exc, debug)
        if debug:
            err.print_exception()
        where = f"{exc.filename}: " if exc.filename else ""
        err.print(f"[red]error:[/red] {escape(where)}{exc.strerror}. Fix: {ENVIRONMENT_ERRNOS[exc.errno]}",
                  highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception as exc:
        raise_internal(exc, debug)


# OS failures that are the machine's state, not a bug: one line and exit 2, nothing half-written (every write is
# a temporary renamed on success), and the fix.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free disk space (or point --out / DSCOMPRESS_CACHE elsewhere), then rerun to resume",
    errno.EDQUOT: "free space within your disk quota, then rerun to resume",
    errno.EACCES: "choose a location you may write to (or fix its permissions)",
    errno.EPERM: "choose a location you may write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENAMETOOLONG: "use a shorter path",
}


def raise_internal(exc: Exception, debug: bool):
    """Anything unexpected is a bug: one line and exit 1, the traceback with --debug."""
    if debug:
        err.print_exception()
    else:
        first = (str(exc).splitlines() or [""])[0]
        err.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(first)} (rerun with --debug)",
                  soft_wrap=True)  # fmt: skip
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
    """Parse the recipe (torch-free: a recipe error is reported before torch is imported), then check it
    against the model's shapes."""
    from dscompress.recipe import load_recipe

    recipe, located = load_recipe(recipe_path)
    if not with_model:
        return recipe, located, None
    from dscompress.models.info import inspect_model
    from dscompress.models.load import load_tokenizer
    from dscompress.models.sources import resolve
    from dscompress.plan import check_against_model

    _quiet_libraries()
    directory = resolve(recipe.model.path, keep_fp8=recipe.model.stream).directory
    info = inspect_model(directory, recipe.model.trust_remote_code)
    check_against_model(recipe, located, info)
    load_tokenizer(directory)  # every run cuts its windows with it
    return recipe, located, info


@app.command(epilog=EXIT_CODES)
def run(
    recipe: RecipeArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="override the recipe's output_dir")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress, step lines or result table: errors and the result only")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also the libraries' own warnings and progress bars (transformers)")
    ] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Run every stage of a recipe; rerunning resumes and reuses finished stages. Without a terminal (CI logs)
    progress is printed as timestamped lines: one per layer or stage step, at least every 30 s, with an ETA."""
    from dscompress.compress import cluster
    from dscompress.runner import Runner

    if cluster.launched() and cluster.join() != 0:  # a follower rank under torchrun (compress/cluster.py)
        with handled(debug):
            cluster.serve()
        return
    with handled(debug), _cluster_lead():
        if not verbose:
            _quiet_libraries()
        parsed, located, _ = _load(recipe, with_model=False)  # the runner checks against the model itself
        console = Console(stderr=True, quiet=True, emoji=False) if quiet else err
        report = Runner(parsed, recipe, out_dir, console=console, located=located).run()
        if as_json:
            out.print_json(json.dumps(report, default=str))
        else:
            out.print(f"final artifact: {report['final_artifact']}")


@contextlib.contextmanager
def _cluster_lead():
    """Rank 0 under torchrun: tell the other ranks to stop when the run ends, unless they are stuck in a failed job."""
    from dscompress.compress import cluster

    if not cluster.launched():
        yield
        return
    try:
        yield
    except BaseException as exc:
        cluster.leave(cluster.clean_exit(exc))
        raise
    cluster.leave(True)


@app.command(epilog=EXIT_CODES)
def validate(recipe: RecipeArg, as_json: Json = False, debug: Debug = False) -> None:
    """Check a recipe, including the checks that need the model's shapes; computes nothing."""
    from dscompress.recipe import compatibility_notes

    with handled(debug, every_problem=True):
        parsed, _, info = _load(recipe)
        notes = compatibility_notes(parsed, info.has_experts)
        if as_json:
            out.print_json(json.dumps({"ok": True, "recipe": str(recipe), "stages": len(parsed.stages),
                                       "architecture": info.adapter.model_type, "params": info.n_params,
                                       "notes": notes}))  # fmt: skip
            return
        for note in notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
        out.print(f"ok: {recipe}: {len(parsed.stages)} stage(s) on {info.adapter.model_type}, {info.n_params:,} params")


@app.command(epilog=EXIT_CODES)
def plan(recipe: RecipeArg, as_json: Annotated[bool, typer.Option("--json")] = False, debug: Debug = False) -> None:
    """Dry run: the stages, estimated peak memory and disk."""
    from dscompress.plan import make_plan

    with handled(debug):
        parsed, _, info = _load(recipe)
        result = make_plan(parsed, info)
        if as_json:
            out.print_json(json.dumps(result))
            return
        out.print(f"{result['model']} ({result['architecture']}): {result['params']:,} params, "
                  f"{result['model_bytes'] / 1e6:.1f} MB as {parsed.model.dtype}")  # fmt: skip
        for s in result["stages"]:
            out.print(f"  {s['dir']:<20} {s['pass']:<8} {s['params']:>14,} params   "
                      f"deployed {_mb(s['deployed_bytes'])}   checkpoint {_mb(s['checkpoint_bytes'])}")  # fmt: skip
            if peak := s.get("accelerator_peak"):
                experts = (f" + {100 * peak['expert_budget_share']:.0f}% of the free memory for expert Hessians"
                           if peak["expert_budget_share"] else "")  # fmt: skip
                out.print(f"  [dim]gptq accelerator peak per device ~{_mb(peak['peak_bytes'])}{experts}[/dim]")
            if "train_memory_bytes" in s:
                out.print(f"  [dim]training memory per device ~{_mb(s['train_memory_bytes'])}[/dim]")
            if "advice" in s:
                out.print(f"  [dim]{s['removed_pct']:.1f}% fewer parameters. {s['advice']}[/dim]")
        out.print(f"peak memory ~{_mb(result['peak_memory_bytes'])}, disk ~{_mb(result['disk_bytes'])}")
        out.print(f"[dim]{result['assumptions']}[/dim]")
        if roof := result["roofline"]:
            out.print(f"{roof['device']}: decode <= {roof['decode_tokens_per_s']:.1f} tokens/s "
                      f"({_mb(roof['bytes_per_token'])} per token at {roof['bandwidth_gbs']} GB/s)")  # fmt: skip
            out.print(f"[dim]{roof['assumptions']}[/dim]")


def _mb(n: float) -> str:
    return f"{n / 1e6:9.1f} MB"


@app.command("eval", epilog=EXIT_CODES)
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


@app.command("export", epilog=EXIT_CODES)
def export_(
    stage: Annotated[Path, typer.Argument(help="a stage directory, e.g. out/run/latest")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="export format")],
    out_dir: Annotated[Path, typer.Option("--out", help="where to write the export")],
    dtype: Annotated[Dtype, typer.Option(help="packed formats: dtype of the unquantized tensors")] = Dtype.float16,
    fp16: Annotated[bool, typer.Option("--fp16", help="onnx-ort, ort-genai: float16 weights and compute")] = False,
    accuracy_level: Annotated[
        int | None,
        typer.Option(
            min=0, max=4, help="onnx-ort, ort-genai: MatMulNBits accuracy_level (4: int8 activations; default 0)"
        ),
    ] = None,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Export a stage from its stored grid (never re-quantized): ONNX with KV cache, or a packed checkpoint."""
    from dscompress.artifact import check_output, owned_dir
    from dscompress.export.formats import export
    from dscompress.export.onnx_quant import TARGETS
    from dscompress.models.load import DTYPES
    from dscompress.models.sources import check_checkpoint_dir

    with handled(debug):
        check_output(out_dir, "export")  # before any work: never into a folder of someone else's files
        check_checkpoint_dir(stage)
        _quiet_libraries()
        if fmt.value in TARGETS:
            from dscompress.export.stage_export import export_stage

            with owned_dir(out_dir, "export") as tmp:
                meta = export_stage(stage, fmt.value, tmp, fp16, accuracy_level=accuracy_level)
            result = {"format": fmt.value, "out": str(out_dir), "file": str(out_dir / "model.onnx"), "export": meta}
        else:
            result = {"format": fmt.value, "out": str(export(stage, out_dir, fmt.value, DTYPES[dtype.value]))}
        if as_json:
            out.print_json(json.dumps(result, default=str))
        else:
            out.print(f"wrote {result.get('file', result['out'])}")


@app.command(epilog=EXIT_CODES)
def generate(
    model: Annotated[Path, typer.Option("--model", help="an export, a stage directory, bundled:<name> or tiny:<arch>")],
    prompt: Annotated[str, typer.Option(help="the prompt text")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    debug: Debug = False,
) -> None:
    """Greedy generation with the KV cache: ONNX Runtime for an ONNX directory, torch for a checkpoint."""
    from dscompress.export.benchmark import generate as run_generate

    with handled(debug):
        _quiet_libraries()
        result = run_generate(model, prompt, max_new_tokens)
        out.print(result["text"], highlight=False)
        err.print(f"prefill {result['prefill_s'] * 1000:.1f} ms, decode {result['decode_ms_per_token']:.2f} ms/token")


@app.command("bench", epilog=EXIT_CODES)
def bench_(
    models_: Annotated[
        list[Path], typer.Argument(metavar="MODEL...", help="ONNX directories and/or stage directories")
    ],
    prompt_len: Annotated[int, typer.Option(min=1)] = 128,
    new_tokens: Annotated[int, typer.Option(min=2)] = 64,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    debug: Debug = False,
) -> None:
    """Prefill and decode latency, tokens/s, peak memory and size of each model, each in its own process."""
    from dscompress.export.benchmark import bench

    with handled(debug):
        rows = bench(models_, prompt_len, new_tokens, repeats)
        if as_json:
            out.print_json(json.dumps(rows))
            return
        for r in rows:
            out.print(
                f"{r['model']:<50} {r['runtime']:<12} prefill {r['prefill_s'] * 1000:8.1f} ms  "
                f"decode {r['decode_ms_per_token']:7.2f} ms/token ({r['decode_tokens_per_s']:6.1f} tok/s)  "
                f"peak {r['peak_rss_bytes'] / 2**20:7.0f} MiB  size {r['model_bytes'] / 1e6:8.1f} MB"
            )


@app.command(epilog=EXIT_CODES)
def bundle(
    stage: Annotated[Path, typer.Argument(help="a stage directory, e.g. out/run/latest")],
    target: Annotated[BundleTarget, typer.Option(help="the deployment device, or triton (a model repository)")],
    out_dir: Annotated[Path, typer.Option("--out", help="the bundle directory")],
    jetpack: Annotated[JetPack | None, typer.Option(help="Jetson targets")] = None,
    max_context: Annotated[int, typer.Option(min=16)] = 2048,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="TensorRT profile's (default 1); triton's max_batch_size (default 8)")
    ] = None,  # fmt: skip
    instances: Annotated[int, typer.Option(min=1, help="triton: model instances")] = 1,
    instance_kind: Annotated[str, typer.Option(help="triton: cpu or gpu instances")] = "cpu",
    tar: Annotated[bool, typer.Option("--tar", help="also write <out>.tar.gz")] = False,
    debug: Debug = False,
) -> None:
    """A deploy bundle: the ONNX model, tokenizer, build_engine.sh, run.py, verify.sh and manifest; with --target
    triton, a Triton Inference Server model repository (onnxruntime backend) and a greedy client."""
    from pydantic import ValidationError

    from dscompress.artifact import check_output
    from dscompress.calibrate.data import Corpus
    from dscompress.calibrate.spec import DataSpec, SplitSpec
    from dscompress.errors import RecipeError
    from dscompress.export.bundle import VERIFY_LEN, VERIFY_WINDOWS, make_bundle, stage_problems
    from dscompress.models.load import load_tokenizer
    from dscompress.models.sources import check_checkpoint_dir
    from dscompress.recipe import TargetSpec

    with handled(debug):
        check_output(out_dir, "bundle")  # before any work: never into a folder of someone else's files
        check_checkpoint_dir(stage)
        _quiet_libraries()
        if target.value == "triton":
            _triton_bundle(stage, out_dir, max_batch or 8, instances, instance_kind)
            return
        try:
            spec = TargetSpec(device=target.value, jetpack=jetpack.value if jetpack else None, max_context=max_context,
                              max_batch=max_batch or 1,
                              opt_context=min(512, max_context))  # fmt: skip
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RecipeError(f"--{'-'.join(map(str, first['loc'])) or 'target'}: {first['msg']}") from None
        if problems := stage_problems(stage, spec):
            raise RecipeError(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        data = DataSpec(eval=SplitSpec(samples=VERIFY_WINDOWS, seq_len=VERIFY_LEN))
        windows = Corpus(data, load_tokenizer(stage)).windows("eval")
        out.print(f"wrote {make_bundle(stage, spec, out_dir, windows, tar)}")


def _triton_bundle(stage: Path, out_dir: Path, max_batch: int, instances: int, kind: str) -> None:
    from dscompress.calibrate.data import Corpus
    from dscompress.calibrate.spec import DataSpec, SplitSpec
    from dscompress.errors import RecipeError
    from dscompress.export.triton import KINDS, VERIFY_LEN, VERIFY_WINDOWS, make_triton_repository
    from dscompress.models.load import load_tokenizer

    if kind not in KINDS:
        raise RecipeError(f"--instance-kind: {kind!r}; allowed: {', '.join(KINDS)}")
    data = DataSpec(eval=SplitSpec(samples=VERIFY_WINDOWS, seq_len=VERIFY_LEN))
    windows = Corpus(data, load_tokenizer(stage)).windows("eval")
    out.print(f"wrote {make_triton_repository(stage, out_dir, windows, max_batch, instances, kind)}")


@app.command(epilog=EXIT_CODES)
def models(as_json: Json = False) -> None:
    """List the bundled real models and the tiny test models, and what is cached."""
    from dscompress.models.bundled import BUNDLED
    from dscompress.models.sources import cache_root
    from dscompress.models.tiny import TINY_ARCHS

    root = cache_root() / "models"
    rows = [{"name": f"bundled:{name}", "title": m.title, "architecture": m.architecture, "real_weights": True,
             "cached": (root / name).exists()} for name, m in BUNDLED.items()]  # fmt: skip
    rows += [{"name": f"tiny:{a}", "title": "random-init test model", "architecture": a, "real_weights": False,
              "cached": (root / f"tiny-{a}").exists()} for a in TINY_ARCHS]  # fmt: skip
    if as_json:
        out.print_json(json.dumps({"models": rows, "cache": str(root)}))
        return
    for r in rows:
        if r["real_weights"]:
            cached = "cached" if r["cached"] else "converted on first use"
            out.print(f"{r['name']:<37} {r['title']} ({r['architecture']}), real weights, {cached}", soft_wrap=True)
        else:
            out.print(f"{r['name']:<37} random-init test model")
    out.print(f"cache: {root}")


@app.command(epilog=EXIT_CODES)
def schema() -> None:
    """Print the recipe JSON Schema (draft 2020-12; also shipped as schema/recipe.schema.json for editors)."""
    from dscompress.recipe import recipe_schema

    sys.stdout.write(json.dumps(recipe_schema(), indent=2) + "\n")


if __name__ == "__main__":
    app()
