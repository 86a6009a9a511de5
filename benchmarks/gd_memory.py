"""Peak memory of the GD loss (forward and backward) at batch 1024, dim 512: O(B·D), not the released B×D×B.

    python benchmarks/gd_memory.py [--batch 1024] [--dim 512] [--device cpu|cuda]

The released code materialised a B×D×B tensor (2 GiB in fp32 at B = 1024, D = 512). On CUDA the peak is the
allocator's; on the CPU it is the growth of the process's peak resident set, measured in a fresh process.
"""
import argparse
import json
import resource
import subprocess
import sys

import torch


def measure(batch: int, dim: int, device: str) -> int:
    """Bytes GD's forward + backward adds at its peak, on top of its inputs."""
    from methods.base import DistillBatch
    from methods.gd import GradientDistillation

    torch.manual_seed(0)
    loss = GradientDistillation(dim, dim).to(device)
    embeddings = [torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=-1) for _ in range(4)]
    student_image, student_text = (e.requires_grad_() for e in embeddings[:2])
    scale = torch.tensor(100.0, device=device)
    inputs = DistillBatch(student_image, student_text, embeddings[2], embeddings[3], scale, scale)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss(inputs).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.batch, args.dim, args.device)))
        return
    # a fresh process, so the peak resident set is GD's and not an earlier allocation's
    result = subprocess.run([sys.executable, __file__, "--child", "--batch", str(args.batch), "--dim", str(args.dim),
                             "--device", args.device], capture_output=True, text=True, check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    b, d, fp32 = args.batch, args.dim, 4
    released = b * d * b * fp32
    print(f"GD forward + backward, B = {b}, D = {d}, fp32, {args.device}")
    print(f"peak memory added           {peak / 2**20:8.1f} MiB")
    print(f"B·D embedding (one)         {b * d * fp32 / 2**20:8.1f} MiB   peak = {peak / (b * d * fp32):5.1f}x")
    print(f"B² logits (one)             {b * b * fp32 / 2**20:8.1f} MiB   peak = {peak / (b * b * fp32):5.1f}x")
    print(f"released code's B×D×B       {released / 2**20:8.1f} MiB   peak = {peak / released:6.4f}x")


if __name__ == "__main__":
    main()
