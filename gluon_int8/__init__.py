"""gluon-int8: post-training INT8 quantization for MXNet Gluon networks on oneDNN CPUs.

    qnet = gluon_int8.quantize_net(net, calib_data, mode='entropy')
    qnet(x)                      # INT8 inference, a drop-in for net(x)
    qnet.export('model/cq_net')  # cq_net-symbol.json + cq_net-0000.params (+ -quantization.json)
    qnet = gluon_int8.load('model/cq_net')
    qnet.export('model/cq_net', format='onnx')   # cq_net.onnx: QDQ for ONNX Runtime / OpenVINO
    block = gluon_int8.load_onnx('model/cq_net.onnx', runtime='openvino')  # block(x) as qnet(x)
    qnet.report(data).table()    # per-layer SQNR/cosine of INT8 vs FP32
    result = gluon_int8.tune(net, calib_data, eval_fn, max_drop=0.005)  # accuracy-aware
"""
from .api import quantize_net, MODES, QUANTIZED_DTYPES
from .block import QuantizedBlock, load
from .report import LayerRow, Report
from .runtimes import RuntimeBlock, load_onnx
from .collectors import Collector, HistogramCollector, LayerStats, MinMaxCollector
from .table import CalibrationTable
from .thresholds import THRESHOLDS
from .tune import TuneResult, tune

__version__ = '0.1.0'

__all__ = ['quantize_net', 'load', 'QuantizedBlock', 'Collector', 'HistogramCollector',
           'MinMaxCollector', 'LayerStats', 'CalibrationTable', 'THRESHOLDS', 'MODES',
           'QUANTIZED_DTYPES', 'Report', 'LayerRow', 'tune', 'TuneResult', 'load_onnx',
           'RuntimeBlock']
