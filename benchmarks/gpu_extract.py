"""GPU extraction throughput: images/s of `sail extract` for a dinov2-large-shaped random model (from a config).

    python benchmarks/gpu_extract.py                          # cuda: forward per dtype, then the whole pipeline
    python benchmarks/gpu_extract.py --device cpu --quick     # smoke run of the same code on CPU (tiny numbers)

`bench_extract()` is the extraction section of benchmarks/gpu.py, which imports it from here.

What is measured (sail.encoders.tiny's "dinov2-l" shape: hidden 1024, 24 layers, 16 heads, patch 14, 224 px crop):
- forward, per weights dtype (fp32, and the precision policy's dtype: bf16 on Ampere+): ImageEncoder.encode_pixels
  on (B, 3, 224, 224) uint8 batches in pinned host memory, as the DataLoader hands them over: copy to the
  device, normalise there, forward, [CLS; mean patch] pooling in fp32, fp16 features back to the host.
  B = the default batch for the model's size (sail.encoders.default_batch_size) unless --batch.
- pipeline: sail.encoders.extract.extract end to end (default workers, --preprocess fast, the policy's dtype) on
  --images JPEG photos of 500x375 (crops of grace_hopper.jpg), model load excluded; img/s and the ratio to
  the forward in the same dtype. Below 1 the decoding workers, not the GPU, set the pace. Up to 1024
  distinct photos are listed again under new ids up to --images rows (each row is decoded): with 4096 rows
  and 15 workers on an H200, each worker decoded about one 512-image batch, so the ramp-up set the figure.
Prints a table, then one JSON line.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_img_s(encoder, batch: int, steps: int) -> float:
    """Images/s of encode_pixels on pinned uint8 batches (host -> device copy, normalise, forward, pool, D2H)."""
    pixels = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    if encoder.device.type == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(2):  # warm-up: kernels chosen, allocator primed
        encoder.encode_pixels(pixels)[0].to(torch.float16).cpu()
    _sync(encoder.device)
    t = time.perf_counter()
    for _ in range(steps):
        encoder.encode_pixels(pixels)[0].to(torch.float16).cpu()  # the .cpu() syncs, as extract's does
    return batch * steps / (time.perf_counter() - t)


def bench_extract(device: str = "cuda", images: int = 16384, batch: int | None = None, steps: int = 10,
                  quick: bool = False) -> dict:
    """The extraction figures as a dict; prints its table as it goes."""
    from extract import make_photos
    from transformers.utils import logging as hf_logging

    from sail.core.precision import resolve_precision
    from sail.encoders import ImageEncoder, default_batch_size, num_params, resolve_model
    import sail.encoders.extract as ex
    from sail.encoders.tiny import make_vision_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    policy = resolve_precision("auto", dev)
    shape = "tiny" if quick else "dinov2-l"
    tmp = Path(tempfile.mkdtemp(prefix="sail-bench-gpu-extract-"))
    os.environ.setdefault("SAIL_CACHE", str(tmp / "cache"))
    result = {"benchmark": "gpu_extract", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "model": f"{shape} shape, random", "policy": policy.name}
    try:
        model_dir = make_vision_model(tmp / "model", shape=shape)
        spec = resolve_model(str(model_dir))
        dtypes = {"fp32": torch.float32}
        dtypes[policy.name] = policy.dtype
        print(f"extraction, {shape} shape ({'random' if not quick else 'smoke'}), {result['device']}, policy {policy}")
        print(f"  {'run':<28} {'batch':>6} {'img/s':>9}")
        for name, dtype in dtypes.items():
            enc = ImageEncoder(spec, dev, "concat", dtype, "fast")
            b = batch or default_batch_size(num_params(enc.model), dev)
            result["params"] = num_params(enc.model)
            result[f"forward_{name}_img_s"] = forward_img_s(enc, b, 2 if quick else steps)
            result[f"forward_{name}_batch"] = b
            print(f"  {'forward ' + name:<28} {b:>6} {result[f'forward_{name}_img_s']:>9.1f}", flush=True)
            del enc
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        n = 64 if quick else images
        # up to 1024 distinct photos, listed again under new ids up to n rows: every row is still decoded,
        # and n can be large enough for the workers' ramp-up (a batch each) not to set the figure
        files = make_photos(tmp / "photos", min(n, 1024))
        (tmp / "m.csv").write_text("id,image\n" + "".join(f"r{i:07d},{files[i % len(files)]}\n" for i in range(n)))
        timed = {"load": 0.0}
        load = ex.load_encoder

        def load_timed(*a, **k):
            t = time.perf_counter()
            try:
                return load(*a, **k)
            finally:
                timed["load"] += time.perf_counter() - t

        ex.load_encoder = load_timed
        try:
            cfg = ex.ExtractConfig(model=str(model_dir), data=str(tmp / "m.csv"), out=str(tmp / "s.h5"),
                                   device=device, batch_size=batch, progress=False)
            t = time.perf_counter()
            res = ex.extract(cfg)
            seconds = time.perf_counter() - t - timed["load"]
        finally:
            ex.load_encoder = load
        if res.skipped:
            raise RuntimeError(f"pipeline skipped images: {res.skipped}")
        result["pipeline_img_s"] = n / seconds
        result["pipeline_images"] = n
        result["workers"] = ex.default_workers()
        result["pipeline_over_forward"] = result["pipeline_img_s"] / result[f"forward_{policy.name}_img_s"]
        print(f"  {'pipeline (' + str(result['workers']) + ' workers, fast)':<28} {'auto':>6} "
              f"{result['pipeline_img_s']:>9.1f}   {result['pipeline_over_forward']:.2f} x forward {policy.name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=16384, help="JPEG photos for the pipeline run")
    p.add_argument("--batch", type=int, default=None, help="default: from the model's size")
    p.add_argument("--steps", type=int, default=10, help="timed forward batches per dtype")
    p.add_argument("--quick", action="store_true", help="tiny model, few images: a smoke run")
    args = p.parse_args(argv)
    result = bench_extract(args.device, args.images, args.batch, args.steps, args.quick)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
