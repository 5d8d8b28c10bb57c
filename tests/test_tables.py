"""Calibration tables bound to their network, checked values, tiny activations and the
calib_table argument (issue 14, cases 4-8)."""
import mxnet as mx
import pytest

import gluon_int8
from gluon_int8.collectors import HistogramCollector
from conftest import PoolBlock, make_net


@pytest.fixture
def net_and_data():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    return net, mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))



@pytest.mark.parametrize('num_bins', [1000, 8001])
def test_num_bins_must_be_a_power_of_two(net_and_data, num_bins):
    """1000 or MXNet's 8001 crashed mid-calibration with numpy's reshape error."""
    net, _ = net_and_data
    batches = [mx.nd.random.uniform(-1, 1, shape=(4, 3, 16, 16)) * s for s in (1, 3, 10, 30)]
    with pytest.raises(ValueError, match=r'num_bins: got %d; expected a power of two >= 256'
                                         % num_bins):
        gluon_int8.quantize_net(net, batches, num_bins=num_bins)
    with pytest.raises(ValueError, match=r'num_bins: got %d; expected a power of two >= 256'
                                         % num_bins):
        HistogramCollector(num_bins=num_bins)
