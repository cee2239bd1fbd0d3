"""Lossless 4-bit packing (epic_ort.export.packing): weights that are exactly llama.cpp Q4_1
blocks pack and rebuild bit for bit; anything else is refused."""

from __future__ import annotations

import numpy as np
import pytest

from epic_ort.export.packing import BLOCK, pack_eight_bit, pack_four_bit
from tiny_models import q4_1_reference, q8_0_reference


@pytest.mark.parametrize("seed, shape, scale", [(0, (8, 64), 0.02), (1, (96, 576), 0.3), (2, (3, 32), 5.0),
                                                (3, (40, 1536), 1e-3)])
def test_q4_1_weights_pack_and_rebuild_exactly(seed, shape, scale):
    rng = np.random.default_rng(seed)
    weight, levels = q4_1_reference((rng.standard_normal(shape) * scale).astype(np.float32))
    packed = pack_four_bit(weight)
    assert packed is not None
    assert packed.shape == shape
    assert packed.levels.dtype == np.uint8 and packed.levels.shape == (shape[0], shape[1] // BLOCK, BLOCK // 2)
    np.testing.assert_array_equal(packed.unpack(), weight)  # bit for bit
    unpacked_levels = np.stack([packed.levels & 0x0F, packed.levels >> 4], axis=-1).reshape(shape)
    np.testing.assert_array_equal(unpacked_levels, levels)  # even input in the low nibble
    assert packed.levels.nbytes + packed.scales.nbytes + packed.offsets.nbytes < weight.nbytes * 5 / 16


def test_constant_blocks_pack():
    weight = np.full((4, 64), 0.125, np.float32)
    weight[1, 32:] = -2.0
    packed = pack_four_bit(weight)
    assert packed is not None
    np.testing.assert_array_equal(packed.unpack(), weight)


@pytest.mark.parametrize("case", ["float", "one_ulp", "nan", "inf", "float64", "width", "vector", "empty"])
def test_other_weights_are_refused(case):
    rng = np.random.default_rng(4)
    weight, _ = q4_1_reference(rng.standard_normal((16, 64)).astype(np.float32))
    if case == "float":
        weight = rng.standard_normal((16, 64)).astype(np.float32)
    elif case == "one_ulp":  # a single weight one float32 step off its level
        weight[5, 37] = np.nextafter(weight[5, 37], np.float32(np.inf))
    elif case == "nan":
        weight[0, 0] = np.nan
    elif case == "inf":
        weight[0, 0] = np.inf
    elif case == "float64":
        weight = weight.astype(np.float64)
    elif case == "width":
        weight = weight[:, :48]
    elif case == "vector":
        weight = weight[0]
    elif case == "empty":
        weight = weight[:0]
    assert pack_four_bit(weight) is None


def test_whatever_packs_rebuilds_exactly():
    """Symmetric Q4_0-style blocks, d * (q - 8): they pack when every block uses levels 0 and 15
    (then they are Q4_1 blocks too), they may not otherwise, and whenever they do, the float32
    numbers come back unchanged. 8-bit blocks never pack."""
    rng = np.random.default_rng(5)
    outcomes = {"extremes": 0, "random": 0, "eight_bit": 0}
    for trial in range(60):
        kind = ("extremes", "random", "eight_bit")[trial % 3]
        d = rng.uniform(1e-3, 0.1, size=(8, 4, 1)).astype(np.float16).astype(np.float32)
        levels = rng.integers(0, 256 if kind == "eight_bit" else 16, size=(8, 4, BLOCK))
        if kind == "extremes":
            levels[..., 3], levels[..., 17] = 0, 15
        zero = 128 if kind == "eight_bit" else 8
        weight = (d * (levels - zero).astype(np.float32)).reshape(8, 4 * BLOCK).astype(np.float32)
        packed = pack_four_bit(weight)
        if packed is not None:
            outcomes[kind] += 1
            np.testing.assert_array_equal(packed.unpack(), weight)
    assert outcomes == {"extremes": 20, "random": outcomes["random"], "eight_bit": 0}


def test_midpoint_offsets_rebuild_exactly():
    """Levels read as q - 8 (MatMulNBits without zero points) plus offsets m + 8d give the same
    float32 weights; where float32 cannot hold m + 8d exactly there are no such offsets."""
    from epic_ort.export.packing import PackedWeight

    rng = np.random.default_rng(6)
    weight, levels = q4_1_reference((rng.standard_normal((24, 96)) * 0.05).astype(np.float32))
    packed = pack_four_bit(weight)
    mid = packed.midpoint_offsets()
    assert mid is not None and mid.dtype == np.float32
    blocks = (levels.reshape(24, 3, BLOCK).astype(np.float32) - 8)
    np.testing.assert_array_equal((packed.scales[..., None] * blocks + mid[..., None]).reshape(24, 96), weight)
    far_apart = PackedWeight(packed.levels[:1, :1], np.array([[2.0 ** -24]], np.float32), np.array([[8.0]], np.float32))
    assert far_apart.midpoint_offsets() is None  # 8 + 2^-21 needs 25 significant bits


@pytest.mark.parametrize("seed, shape, scale", [(0, (8, 64), 0.02), (1, (300, 576), 0.3), (2, (3, 32), 50.0)])
def test_q8_0_weights_pack_eight_bit_exactly(seed, shape, scale):
    rng = np.random.default_rng(seed)
    weight = q8_0_reference((rng.standard_normal(shape) * scale).astype(np.float32))
    weight[0, :BLOCK] = 0.0  # an all-zero block: scale 0
    packed = pack_eight_bit(weight)
    assert packed is not None and packed.shape == shape
    assert packed.levels.dtype == np.uint8 and packed.levels.shape == (shape[0], shape[1] // BLOCK, BLOCK)
    np.testing.assert_array_equal(packed.unpack(), weight)  # bit for bit
    assert packed.scales[0, 0] == 0 and np.all(packed.levels[0, 0] == 128)
    levels = packed.levels.astype(int) - 128
    assert levels.min() >= -127 and levels.max() <= 127
    assert np.all(np.abs(levels[:, 1:]).max(axis=-1) == 127)  # each block's largest weight is level ±127


@pytest.mark.parametrize("case", ["float", "one_ulp", "q4_1", "nan", "width"])
def test_other_weights_do_not_pack_eight_bit(case):
    rng = np.random.default_rng(6)
    weight = q8_0_reference(rng.standard_normal((16, 64)).astype(np.float32))
    if case == "float":
        weight = rng.standard_normal((16, 64)).astype(np.float32)
    elif case == "one_ulp":
        weight[9, 40] = np.nextafter(weight[9, 40], np.float32(np.inf))
    elif case == "q4_1":  # offsets: not symmetric blocks
        weight, _ = q4_1_reference(rng.standard_normal((16, 64)).astype(np.float32) + 1.0)
    elif case == "nan":
        weight[3, 3] = np.nan
    elif case == "width":
        weight = weight[:, :48]
    assert pack_eight_bit(weight) is None
