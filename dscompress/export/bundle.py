"""`dscompress bundle STAGE --target DEVICE`: one directory (or tarball) that builds and runs on the device.

bundle/
  model.onnx (+ model.onnx.data)   the `onnx` target (standard operators, TensorRT Q/DQ rules)
  tokenizer.json, config.json, ...
  build_engine.sh                  trtexec with the profile shapes and flags for the target's TensorRT
  run.py                           numpy + TensorRT runner (bundle_runner.py); --backend ort as a stand-in
  verify.sh                        builds if needed, runs the parity check, prints PASS or FAIL
  verify_windows.npy               token windows for the check
  manifest.json                    target facts, expected perplexity and greedy tokens, tolerances, hashes
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch

from dscompress.artifact import owned_dir
from dscompress.errors import RecipeError
from dscompress.export import bundle_runner
from dscompress.export.preflight import precision_problems
from dscompress.export.stage_export import export_stage
from dscompress.export.targets import DEVICES, JETPACKS
from dscompress.export.tensorrt import Profile, _sha256
from dscompress.quant.qstate import QuantState
from dscompress.version import __version__

VERIFY_WINDOWS, VERIFY_LEN, VERIFY_TOKENS = 4, 128, 16


def make_bundle(stage: Path, target, out: Path, windows: torch.Tensor, tar: bool = False) -> Path:
    """Write the bundle for `stage` and `target` (a recipe.TargetSpec) into `out` (atomically)."""
    device = DEVICES[target.device]
    jetpack = JETPACKS.get(target.jetpack) if target.jetpack else None
    if windows.shape[1] < VERIFY_LEN or len(windows) < VERIFY_WINDOWS:
        raise RecipeError(f"the verification set needs {VERIFY_WINDOWS} windows of {VERIFY_LEN} tokens")
    with owned_dir(out, "bundle") as tmp:
        meta = export_stage(stage, "onnx", tmp, opset=target.opset)
        rows = windows[:VERIFY_WINDOWS, :VERIFY_LEN].numpy().astype(np.int64)
        np.save(tmp / "verify_windows.npy", rows)
        shutil.copy2(Path(bundle_runner.__file__), tmp / "run.py")
        profile = Profile.from_target(target)
        (tmp / "build_engine.sh").write_text(build_script(meta, profile, target))
        (tmp / "verify.sh").write_text(VERIFY_SH)
        for script in ("build_engine.sh", "verify.sh"):
            (tmp / script).chmod(0o755)
        expected = expected_values(tmp / "model.onnx", rows, meta)
        manifest = {
            "dscompress": __version__,
            "stage": str(stage),
            "export": meta,
            "target": {
                "device": device.name,
                "compute_capability": device.compute_capability,
                "jetpack": target.jetpack,
                "tensorrt": jetpack.tensorrt if jetpack else ">=10",
                "max_batch": target.max_batch,
                "max_context": target.max_context,
            },
            "profile": profile.__dict__,
            "verify": {
                "windows_file": "verify_windows.npy",
                **expected,
                "max_perplexity_diff_pct": 1.0,
                "min_matching_tokens": VERIFY_TOKENS // 2,
            },
            "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if tar:
        archive = out.with_suffix(".tar.gz")
        with tarfile.open(archive, "w:gz") as fh:
            fh.add(out, arcname=out.name)
        return archive
    return out


def expected_values(model: Path, rows: np.ndarray, meta: dict, exact_qdq: bool = True) -> dict:
    """Reference values from ONNX Runtime on this machine, which the deployed runtime must reproduce within the
    manifest's tolerance: exact Q/DQ for TensorRT engines, the default session for ONNX Runtime servers (Triton)."""
    gen = bundle_runner.Generator(bundle_runner.OrtBackend(model, meta, exact_qdq=exact_qdq), meta)
    prompt = rows[0, :16].tolist()
    tokens, _, _ = gen.greedy(prompt, VERIFY_TOKENS)
    return {
        "expected_perplexity": bundle_runner.perplexity(gen, rows),
        "prompt_ids": prompt,
        "expected_tokens": tokens,
        "reference_backend": "onnxruntime (CPU" + (")" if exact_qdq else ", default session)"),
    }


def build_script(meta: dict, profile: Profile, target) -> str:
    shapes = profile.shapes(meta)

    def flag(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for name, dims in shapes.items())

    where = target.device + (f", JetPack {target.jetpack}" if target.jetpack else "")
    return f"""#!/usr/bin/env bash
# Build model.engine on the target device itself ({where}):
# engines are specific to the GPU and the TensorRT version. Strongly typed: the Q/DQ nodes fix every precision.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "FAIL: trtexec not found (set TRTEXEC=...); run this on the device, where JetPack installs TensorRT" >&2
  exit 2
fi
"$TRTEXEC" --onnx=model.onnx --saveEngine=model.engine --stronglyTyped \\
  --minShapes={flag(0)} \\
  --optShapes={flag(1)} \\
  --maxShapes={flag(2)} \\
  --timingCacheFile=timing.cache --memPoolSize=workspace:{target.workspace_mib}M \\
  --builderOptimizationLevel={target.builder_optimization_level} --skipInference
echo "built model.engine"
"""


VERIFY_SH = """#!/usr/bin/env bash
# Rebuild the engine if needed, then check it against manifest.json: perplexity on the bundled windows and greedy
# tokens on the bundled prompt. Prints PASS or FAIL; exit 0 on PASS.
set -euo pipefail
cd "$(dirname "$0")"
[ -f model.engine ] || ./build_engine.sh
python3 run.py --verify "$@"
"""


def stage_problems(stage: Path, target) -> list[str]:
    """Why the stage cannot run on the target (its stored grid against the device's precisions)."""
    quant = QuantState.load(stage)
    if quant is None:
        return []
    bits = sorted({quant.bits_of(name) for name in quant.targets} or {quant.bits})
    found = [p for b in bits for p in precision_problems(b, quant.group_size, quant.symmetric, DEVICES[target.device],
                                                         target.opset)]  # fmt: skip
    return [f"{stage.name}: {message}" for _, message in found]
