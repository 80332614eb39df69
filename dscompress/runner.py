"""The pipeline: baseline, then each stage reads the last passing artifact, writes its own, and is gated.

    out/
      0-baseline/      the source checkpoint (reflinks, links to read-only files, or copies: never written through)
                       + baseline_logprobs.safetensors + manifest.json
      1-rtn/           stock-loadable checkpoint + quantization.{json,safetensors} + manifest.json
      latest -> 1-rtn  the last passing artifact
      report.json, report.md, junit.xml, .lock

A stage directory appears only when complete (atomic rename). A stage whose key (pass config, data, metrics,
seed, dtype and the input artifact's hash) matches its manifest is reused, so a killed run resumes where it
stopped and ends with byte-identical artifacts.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from safetensors.torch import save_file

from dscompress.artifact import (
    MANIFEST,
    OWN_FILES,
    RunLock,
    artifact_hash,
    claim_output,
    dir_size,
    discard_resume,
    point_latest,
    resume_dir,
    reusable,
    versions,
)
from dscompress.atomic import (
    atomic_dir,
    atomic_write_json,
    clone_source,
    link_or_copy,
    read_json,
    remove_stale_temporaries,
    sha256_json,
    tree_hashes,
)
from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BaselineRef, compute_baseline, evaluate
from dscompress.context import EvalSpec, StageContext, make_progress, spinner, tracked
from dscompress.errors import GateFailed, RecipeError
from dscompress.export.formats import export as export_packed
from dscompress.export.stage_export import export_stage, parity
from dscompress.gates import check_gate
from dscompress.models.adapters import adapter_for
from dscompress.models.info import inspect_model
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve
from dscompress.models.stream import load_streamed, place, stream_of
from dscompress.plan import check_against_model
from dscompress.quant.actquant import attach, attach_saved, detach
from dscompress.quant.qstate import QUANT_JSON, QUANT_TENSORS, QuantState, deployed_bytes
from dscompress.recipe import Recipe, Stage, compatibility_notes
from dscompress.registry import spec_for
from dscompress.report import print_table, write_reports
from dscompress.yamlpaths import LocatedYaml


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' but no CUDA device is visible. Fix: use device: auto or cpu")
    return torch.device(name)


@dataclass
class StageRecord:
    index: int
    dir: str
    pass_key: str
    status: str = "pending"  # passed | failed | skipped (gate failed, on_fail: skip)
    reused: bool = False
    metrics: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    size_bytes: int = 0  # disk use of the stage folder
    deployed_bytes: int = 0  # what a runtime loads (quant.qstate.deployed_bytes)
    onnx: dict = field(default_factory=dict)  # target -> ONNX Runtime metrics and what was quantized
    parity: list = field(default_factory=list)  # verdicts of the exported model against the torch stage

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Runner:
    def __init__(
        self, recipe: Recipe, recipe_path: Path, out: Path | None = None, console: Console | None = None,
        located: LocatedYaml | None = None,
    ):  # fmt: skip
        self.recipe = recipe
        self.located = located
        self.recipe_path = recipe_path
        self.out = Path(out or recipe.output_dir)
        self.console = console or Console(stderr=True)
        self.device = pick_device(recipe.device)
        self.records: list[StageRecord] = []
        self.notes: list[str] = []  # compatibility notes, once the model's shapes are known (_prepare)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        source = self._prepare()  # every bad-input check, before anything is written
        claim_output(self.out, "run")
        with RunLock(self.out):
            remove_stale_temporaries(self.out)
            report = self._base_report()
            try:
                self._run_locked(source, report)
                report["result"] = "passed"
            except GateFailed as exc:
                report["result"], report["message"] = "gate failed", str(exc)
                raise
            except KeyboardInterrupt:
                report["result"], report["message"] = "interrupted", "interrupted (Ctrl-C); rerun to resume"
                raise
            except BaseException as exc:
                report["result"], report["message"] = "error", f"{type(exc).__name__}: {exc}"[:500]
                raise
            finally:
                report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                report["stages"] = [r.as_dict() for r in self.records]
                write_reports(self.out, report)
                if any(r.metrics for r in self.records):  # a failure before any result is its one error line
                    print_table(self.console, report)
        return report

    def _prepare(self) -> Path:
        """Resolve the model, check the recipe against its shapes, and cut the data windows stages need."""
        model = self.recipe.model
        with self.console.status(f"resolving {model.path} (a GGUF or packed checkpoint converts once)"):
            source = resolve(model.path, on_step=self._step, keep_fp8=model.stream).directory
        info = inspect_model(source, model.trust_remote_code)
        check_against_model(self.recipe, self.located, info)
        self.notes = compatibility_notes(self.recipe, info.has_experts)
        for note in self.notes:
            self.console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
        self.corpus = Corpus(self.recipe.data, load_tokenizer(source))
        needed = {"eval"}.union(*(spec_for(s.pass_config).needs for s in self.recipe.stages))
        for split in sorted(needed):
            self.corpus.windows(split)
        return source

    def _step(self, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')} {escape(message)}[/dim]", highlight=False)

    def _base_report(self) -> dict:
        spec = self.recipe.data
        return {
            "recipe": str(self.recipe_path), "model": self.recipe.model.path, "device": str(self.device),
            "seed": self.recipe.seed, "data_source": spec.source, "eval_windows": spec.eval.samples,
            "eval_seq_len": spec.eval.seq_len, "result": "incomplete", "final_artifact": None,
            "versions": versions(), "stages": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "notes": self.notes,
        }  # fmt: skip

    def _run_locked(self, source: Path, report: dict) -> None:
        base_dir = self.base_dir = self._baseline(source)
        baseline = self.records[0].metrics
        self.ref = BaselineRef(base_dir)
        current, previous = base_dir, baseline
        report["final_artifact"] = str(base_dir)
        point_latest(self.out, base_dir.name)
        for index, stage in enumerate(self.recipe.stages, start=1):
            record = self._stage(index, stage, current)
            record.verdicts = [v.as_dict() for v in check_gate(stage.gate, record.metrics, baseline, previous)] \
                if stage.gate else []  # fmt: skip
            record.verdicts += record.parity
            if all(v["passed"] for v in record.verdicts):
                record.status = "passed"
                current, previous = self.out / record.dir, record.metrics
                report["final_artifact"] = str(current)
                point_latest(self.out, record.dir)
                continue
            failed = "; ".join(v["detail"] for v in record.verdicts if not v["passed"])
            if stage.gate and stage.gate.on_fail == "skip":
                record.status = "skipped"
                self.console.print(f"[yellow]gate failed, stage skipped[/yellow] {record.dir}: {escape(failed)}")
                continue
            record.status = "failed"
            raise GateFailed(
                f"stage {record.dir} failed its gate: {failed}; kept {current.name} as {self.out / 'latest'}"
            )

    # ---- stages ----------------------------------------------------------------------------------
    def _key(self, stage_payload: dict, input_hash: str) -> str:
        r = self.recipe
        return sha256_json({
            "stage": stage_payload, "input": input_hash, "data": r.data.model_dump(mode="json"),
            "seed": r.seed, "dtype": r.model.dtype,
        })  # fmt: skip

    def _baseline(self, source: Path) -> Path:
        final = self.out / "0-baseline"
        input_hash = sha256_json(tree_hashes(source))
        key = self._key({"pass": "baseline", "model": self.recipe.model.model_dump(mode="json")}, input_hash)
        record = StageRecord(0, final.name, "baseline")
        self.records.append(record)
        if manifest := reusable(final, key):
            record.status = "passed"
            return self._restore(record, manifest, final)
        started = time.perf_counter()
        with atomic_dir(final) as tmp, make_progress(self.console) as progress:
            for f in sorted(source.iterdir()):  # never a link that a write to the stage could follow back
                if f.is_file() and not f.name.startswith("."):
                    clone_source(f, tmp / f.name)
            with spinner(progress, "loading the baseline"):
                model = place(self._load(source), self.device)
            track = partial(tracked, progress)
            record.metrics = compute_baseline(
                model, self.corpus.windows("eval"), self.recipe.data.batch_size, self.device, tmp, track
            )
            record.timings = {"total_s": time.perf_counter() - started}
            record.status = "passed"
            record.deployed_bytes = deployed_bytes(model, None)
            self._write_manifest(tmp, record, key, input_hash, {"source": str(source)})
        del model
        gc.collect()
        record.size_bytes = dir_size(final)
        return final

    def _stage(self, index: int, stage: Stage, input_dir: Path) -> StageRecord:
        spec = spec_for(stage.pass_config)
        final = self.out / f"{index}-{stage.label}"
        input_hash = read_json(input_dir / MANIFEST)["artifact_hash"]
        key = self._key({
            "pass": spec.key, "config": stage.pass_config.model_dump(mode="json"), "save_formats": stage.save_formats,
            "onnx": stage.onnx.model_dump(mode="json") if stage.onnx else None,
        }, input_hash)  # fmt: skip
        record = StageRecord(index, final.name, spec.key)
        self.records.append(record)
        if manifest := reusable(final, key):
            self._restore(record, manifest, final)
            discard_resume(self.out, final.name)
            return record
        self.console.print(f"[bold]stage {final.name}[/bold]: {spec.summary}")
        resume = resume_dir(self.out, final.name, key)
        with atomic_dir(final) as tmp, make_progress(self.console) as progress:
            t0 = time.perf_counter()
            with spinner(progress, f"loading {input_dir.name}"):
                model = self._load(input_dir)
                attach_saved(model, input_dir)  # a W8A8 input keeps its activation quantization
            ctx = StageContext(
                adapter=adapter_for(model.config), device=self.device, seed=self.recipe.seed + index,
                console=self.console, progress=progress,
                calibration=lambda: self.corpus.windows("calibration"), resume_dir=resume, gate=stage.gate,
                train=lambda: self.corpus.windows("train"), evaluate=self._eval_spec(stage),
                stage_dir=self._stage_dir, input_dir=input_dir, quant=QuantState.load(input_dir),
                dtype=self.recipe.model.dtype, output_dir=tmp,
            )  # fmt: skip
            torch.manual_seed(ctx.seed)
            t1 = time.perf_counter()
            result = spec.apply(model, stage.pass_config, ctx)
            if result.quant_invalidated or (result.quant is not None and not result.quant.activations):
                detach(result.model)  # new weight-only metadata replaces the input's W8A8
            elif result.quant is not None and result.quant.block_activations:
                attach(result.model, result.quant)  # activations: int8, evaluated as MatMulNBits computes them
            t2 = time.perf_counter()
            model = place(result.model, self.device).eval()
            record.metrics = evaluate(
                model, self.corpus.windows("eval"), self.ref, self.recipe.data.batch_size, self.device,
                partial(tracked, progress),
            )  # fmt: skip
            t3 = time.perf_counter()
            record.deployed_bytes = deployed_bytes(model, result.quant if result.quant is not None else
                                                   (None if result.quant_invalidated else ctx.quant))  # fmt: skip
            self._save_artifact(place(model, "cpu"), result, input_dir, tmp)
            for fmt in stage.save_formats:
                export_packed(tmp, tmp / "packed" / fmt, fmt)
            if stage.onnx:
                record.onnx, record.parity = self._export_onnx(stage, tmp, record.metrics, progress)
            record.summary = result.summary
            record.timings = {
                "load_s": t1 - t0, "pass_s": t2 - t1, "eval_s": t3 - t2,
                "save_s": time.perf_counter() - t3, "total_s": time.perf_counter() - t0,
            }  # fmt: skip
            self._write_manifest(
                tmp,
                record,
                key,
                input_hash,
                {"input": str(input_dir), "config": stage.pass_config.model_dump(mode="json")},
            )
        discard_resume(self.out, final.name)
        del model, result
        gc.collect()
        record.size_bytes = dir_size(final)
        return record

    def _eval_spec(self, stage: Stage) -> EvalSpec:
        """The pipeline's evaluation and this stage's gate, for passes that check it while they work."""
        passed = [r for r in self.records[:-1] if r.status == "passed"]
        gate = stage.gate.model_dump(mode="json") if stage.gate else None
        return EvalSpec(self.corpus.windows("eval"), self.base_dir, self.recipe.data.batch_size, gate,
                        self.records[0].metrics, passed[-1].metrics)  # fmt: skip

    def _stage_dir(self, name: str) -> Path:
        """'baseline', an earlier passing stage's name, or a checkpoint path -> its directory."""
        if name == "baseline":
            return self.base_dir
        for record in reversed(self.records[1:-1]):  # the last record is the running stage
            if self.recipe.stages[record.index - 1].label == name and record.status == "passed":
                return self.out / record.dir
        if "/" in name or name.endswith(".gguf"):
            return resolve(name).directory
        raise RecipeError(f"teacher {name!r}: no earlier stage of that name passed its gate in this run")

    def _export_onnx(self, stage: Stage, tmp: Path, metrics: dict, progress) -> tuple[dict, list]:
        """Each ONNX target of the stage, exported and measured through ONNX Runtime; parity verdicts."""
        results, verdicts = {}, []
        for target in stage.onnx.targets:
            with spinner(progress, f"exporting {target} and running it in ONNX Runtime"):
                meta = export_stage(tmp, target, tmp / "onnx" / target, stage.onnx.fp16,
                                    accuracy_level=stage.onnx.accuracy_level)  # fmt: skip
                ort_metrics, found = parity(
                    tmp, tmp / "onnx" / target, self.corpus.windows("eval"), self.ref, metrics, stage.onnx.parity,
                    self.recipe.data.batch_size,
                )  # fmt: skip
            results[target] = {"metrics": ort_metrics, "quantization": meta["quantization"],
                               "tensorrt_rules": meta["tensorrt_rules"]}  # fmt: skip
            verdicts += [v.as_dict() for v in found]
        return results, verdicts

    def _load(self, directory: Path):
        m = self.recipe.model
        return (load_streamed if m.stream else load_model)(directory, m.dtype, m.trust_remote_code)

    def _save_artifact(self, model, result, input_dir: Path, tmp: Path) -> None:
        if (stream := stream_of(model)) is not None:
            stream.save(model, tmp)  # the pass wrote every layer already
        else:
            model.save_pretrained(tmp)
        for f in sorted(input_dir.iterdir()):
            own = f.name in OWN_FILES or f.name in result.files or f.name.startswith("model")
            if f.is_file() and not own:
                link_or_copy(f, tmp / f.name)
        for name, tensors in result.files.items():
            save_file(tensors, str(tmp / name))
        if result.quant is not None:
            result.quant.save(tmp)
        elif (input_dir / QUANT_JSON).exists() and not result.quant_invalidated:
            for name in (QUANT_JSON, QUANT_TENSORS):
                link_or_copy(input_dir / name, tmp / name)

    def _write_manifest(self, tmp: Path, record: StageRecord, key: str, input_hash: str, extra: dict) -> None:
        atomic_write_json(tmp / MANIFEST, {
            "stage": record.dir, "pass": record.pass_key, "key": key, "input_artifact_hash": input_hash,
            "artifact_hash": artifact_hash(tmp), "metrics": record.metrics, "summary": record.summary,
            "timings": record.timings, "seed": self.recipe.seed, "versions": versions(), "onnx": record.onnx,
            "parity": record.parity, "deployed_bytes": record.deployed_bytes, **extra,
        })  # fmt: skip

    def _restore(self, record: StageRecord, manifest: dict, directory: Path) -> Path:
        record.reused = True
        record.metrics, record.summary = manifest["metrics"], manifest.get("summary", {})
        record.onnx, record.parity = manifest.get("onnx", {}), manifest.get("parity", [])
        record.timings = manifest.get("timings", {})
        record.size_bytes = dir_size(directory)
        record.deployed_bytes = manifest.get("deployed_bytes", 0)
        self.console.print(f"[dim]stage {directory.name}: unchanged, reused[/dim]")
        return directory
