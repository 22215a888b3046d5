"""``python -m star_core.convert IN OUT --dtype fp16|bf16``: a STAR checkpoint as a checked, half-size .safetensors."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import check_star_keys, load_state_dict_file
from .model import config_from_state_dict

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """
    Loads a STAR checkpoint safely, checks its keys (dropping the VEnhancer-only extras), casts every floating tensor
    to ``dtype`` and writes a ``.safetensors`` file with metadata (source name, dtype, inferred config).

    Parameters:
        src (`str` or `Path`): input checkpoint (.pt/.pth/.ckpt/.safetensors).
        dst (`str` or `Path`): output path; must end in ``.safetensors`` and differ from ``src``.
        dtype (`torch.dtype`): float16, bfloat16 or float32.

    Returns:
        `dict[str, str]`: the metadata written.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must end in .safetensors")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output {dst} is the input file; choose another path")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    sd = load_state_dict_file(src)
    config = config_from_state_dict(sd)
    sd = check_star_keys(sd, config)
    for key in list(sd):
        tensor = sd[key]
        sd[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    metadata = {"format": "pt", "model": "STAR I2VGen-XL (UNet + VideoControlNet + LIEM)", "source": src.name,
                "dtype": str(dtype).removeprefix("torch."), "star_config": json.dumps(dataclasses.asdict(config))}
    tmp = dst.with_name(dst.name + ".partial")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, dst)  # a half-written file never carries the final name
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m star_core.convert", description=__doc__)
    parser.add_argument("src", type=Path, help="STAR checkpoint (light_deg.pt, heavy_deg.pt, ...)")
    parser.add_argument("dst", type=Path, help="output .safetensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="storage dtype (default fp16)")
    args = parser.parse_args(argv)
    try:
        metadata = convert_checkpoint(args.src, args.dst, DTYPES[args.dtype])
    except (ValueError, FileNotFoundError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({metadata['dtype']}, {args.dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
