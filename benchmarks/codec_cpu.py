"""What the memory plan's "VQ codec on the CPU" costs: one tile's VQ encode (the LQ input) and decode (the
restored codes) with the released VQ-8's architecture (random weights: the time depends on the shapes only),
on this machine's CPU, for the tile sides PURE-tiny (128) and PURE-7B (512) use: the price of the 0.28 GB of
weights and ~1.35 GB of working memory the plan frees on the GPU, set against a tile's decode loop there (34 s
measured on an H200, estimated at minutes on an 8 GB card: docs/gpu.md).

    python benchmarks/codec_cpu.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import report


def main() -> None:
    import torch

    from pure_lite.torch_backend.vq import VQConfig, VQModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the fastest is reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    vq = VQModel(VQConfig()).eval()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "sides": {}}
    for side in (128, 512):
        codes = torch.randint(0, vq.config.codebook_size, (1, side // 8, side // 8))
        decode, encode = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pixels = vq.decode(codes)
            decode.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                vq.encode(pixels)
            encode.append(time.perf_counter() - start)
        results["sides"][side] = {"decode_s": min(decode), "encode_s": min(encode)}
        print(side, results["sides"][side], flush=True)
    lines = ["| tile | VQ decode s | VQ encode s | both |", "| --- | --- | --- | --- |"]
    for side, r in results["sides"].items():
        lines.append(f"| {side}² | {r['decode_s']:.2f} | {r['encode_s']:.2f} | {r['decode_s'] + r['encode_s']:.2f} |")
    table = "\n".join(lines) + f"\n\nCPU, {results['threads']} threads, torch {results['torch']}, released VQ-8 shapes, float32"
    report.write("codec_cpu", results, table)


if __name__ == "__main__":
    main()
