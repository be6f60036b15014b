import importlib.util
import math
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("bigram", Path(__file__).parent.parent / "examples" / "bigram_baseline.py")
bigram = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bigram)


def test_bigram_ppl_by_hand():
    # train 0 1 0 1 0 2: after 0 come 1, 1, 2; after 1 comes 0 twice. With k = 0:
    # P(1|0) = 2/3, P(0|1) = 1, so val 0 1 0 has NLL (−log 2/3 − log 1) / 2
    train = np.array([0, 1, 0, 1, 0, 2])
    val = np.array([0, 1, 0])
    assert math.isclose(bigram.bigram_ppl(train, val, 3, 0.0), math.exp(-math.log(2 / 3) / 2))
    # add-1: P(1|0) = (2+1)/(3+3), P(0|1) = (2+1)/(2+3)
    expected = math.exp(-(math.log(3 / 6) + math.log(3 / 5)) / 2)
    assert math.isclose(bigram.bigram_ppl(train, val, 3, 1.0), expected)
