"""ONNX Runtime worker for bench_w8a8.py: 2048-bin entropy (KL) calibration + QDQ W8A8 on the fp32 ONNX export.

Runs in the main environment (onnxruntime is a dscompress extra) but imports nothing from dscompress.
Calibration data go through collect_data in chunks of `chunk` windows: one call with all 64 windows would hold
every intermediate tensor of every window at once (onnxruntime #10503), which does not fit in 24 GiB here.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import Timer, finish, job, peak_rss_gib, score
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType, create_calibrator
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer


class Reader(CalibrationDataReader):
    def __init__(self, rows):
        self.it = iter([{"input_ids": r[None].numpy()} for r in rows])

    def get_next(self):
        return next(self.it, None)


spec = job()
work = Path(spec["output"])
work.mkdir(parents=True, exist_ok=True)
method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax}[spec["method"]]
options = {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True} if spec["method"] == "entropy" else {}
with Timer() as t:
    cal = create_calibrator(spec["onnx"], ["MatMul"], augmented_model_path=str(work / "augmented.onnx"),
                            calibrate_method=method, use_external_data_format=True, extra_options=options)  # fmt: skip
    rows = spec["calibration"]
    for start in range(0, len(rows), spec["chunk"]):
        cal.collect_data(Reader(rows[start : start + spec["chunk"]]))
    ranges = cal.compute_data()
calib_rss = peak_rss_gib()
model = onnx.load(spec["onnx"])
last_matmul = [n.name for n in model.graph.node if n.op_type == "MatMul"][-1]  # lm_head stays float, as ours
quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QInt8, ranges, None, [last_matmul],
                         ["MatMul"], {"ActivationSymmetric": True, "WeightSymmetric": True})  # fmt: skip
quantizer.quantize_model()
quantizer.model.save_model_to_file(str(work / "qdq.onnx"), use_external_data_format=True)
session = ort.InferenceSession(str(work / "qdq.onnx"), providers=["CPUExecutionProvider"])
fields = score(lambda ids: torch.from_numpy(session.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0]), spec)
finish(spec, seconds=t.seconds, calibration_peak_rss_gib=calib_rss, **fields)
