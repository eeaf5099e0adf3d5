"""Loader throughput: images/s from a 512-px prepared cache to 224-px training tensors.

    python -m bench.data                          # builds a 512-px synthcxr cache if none is given
    python -m bench.data --cache CACHE --batch 256 --workers 2

Each loader turns the same index batches into normalised, augmented training tensors on the
device: memory (decoded once beforehand; the decode is reported separately), torch (PIL in
threads on the CPU, torchvision's JPEG decoder on a GPU), DALI (its CPU backend, or "mixed" GPU
decoding). The target on an H200 is >= 5,000 img/s, twice the training step's rate.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import bench_parser, environment, profile, report
from fastmsd.data import dali
from fastmsd.data.cache import Cache
from fastmsd.data.loader import BatchStream, MemoryImages, StreamImages

NOT_MEASURED = "not measured"


def ensure_cache(path: Path) -> Path:
    if Cache.is_cache(path):
        return path
    from fastmsd.data.prepare import prepare
    from fastmsd.data.synthcxr import generate

    raw = generate(path.with_name(path.name + "-raw"), n_train=600, n_per_class=20, n_dicom=0)
    prepare("synthcxr", raw, path, size=512)
    return path


def throughput(loader, stream: BatchStream, batches: int, device: torch.device) -> float:
    """img/s over ``batches`` batches after one warm-up batch, the next one prefetched."""
    def run(n: int) -> None:
        for step in range(n):
            x = loader.batch(stream.next(), step, prefetch=stream.peek())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del x

    run(1)
    start = time.perf_counter()
    run(batches)
    return batches * stream.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache", default="data/bench-cache-512", help="a prepared cache (512 px)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="training resolution")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    args = parser.parse_args()
    device = torch.device(args.device)
    cache = Cache(ensure_cache(Path(args.cache)))
    idx = cache.indices("train")
    paths = cache.image_paths(idx)
    common = (paths, args.size, 3, device, 0)

    def stream() -> BatchStream:
        return BatchStream(len(paths), args.batch, seed=0)

    rows = []
    start = time.perf_counter()
    memory = MemoryImages(*common)
    decode_rate = len(paths) / (time.perf_counter() - start)
    rows.append(["memory (decoded once)", f"{throughput(memory, stream(), args.batches, device):.0f}",
                 f"one-off decode of the split: {decode_rate:.0f} img/s"])
    loaders = [("torch", StreamImages(*common, workers=args.workers),
                "torchvision GPU decode" if device.type == "cuda" else f"PIL, {args.workers} threads")]
    if dali.available():
        how = "mixed (GPU) decode" if device.type == "cuda" else f"CPU backend, {args.workers} threads"
        pipeline = dali.DaliImages(*common, batch_size=args.batch, num_threads=args.workers)
        loaders.append(("DALI", pipeline, how))
    else:
        rows.append(["DALI", NOT_MEASURED, "nvidia-dali not installed"])
    for name, loader, how in loaders:
        rows.append([name, f"{throughput(loader, stream(), args.batches, device):.0f}", how])
        if args.profile:
            profile(lambda loader=loader: loader.batch(stream().next(), 0), args.profile, f"data-{name}",
                    device)
    notes = [f"{len(paths)} training images of {cache.root} ({cache.info['params']['size']} px JPEG) -> "
             f"{args.size} px, batches of {args.batch}, {args.batches} timed after one warm-up; "
             "augmentation included, output on the device"]
    report("loader throughput", ["loader", "img/s", "how"], rows, environment(device), notes,
           None if args.no_append else args.results)


if __name__ == "__main__":
    main()
