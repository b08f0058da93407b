"""Constants of the NF4 format (DESIGN.md "NF4 format"); the C++ twin is csrc/include/nf4lora."""
import torch

# The 16 NF4 code values (index = 4-bit code); code 7 is exactly 0.0.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# float32 midpoints, computed in float32 as bitsandbytes does
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

NESTED_BLOCKSIZE = 256


def dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """The 8-bit dynamic code (256 float32 values, sorted), as bitsandbytes' create_dynamic_map
    builds it: for each exponent i, the midpoints of linspace(0.1, 1) scaled by 10^(i-6), both signs
    when signed, plus 0 and 1. The same float32 torch arithmetic, so the same bits (tested)."""
    values = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits) + (0 if signed else 2 ** (i + non_sign_bits - max_exponent_bits))
        bounds = torch.linspace(0.1, 1, n_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2 ** total_bits
    return torch.tensor(sorted(values), dtype=torch.float32)


# bitsandbytes' nested_quant_map for double-quantized absmax
DYNAMIC_SIGNED = dynamic_map(signed=True)
