"""Embedding throughput: ``embed_images`` over image files vs a bare ``encode_image`` loop; ``embed_texts``.

    python benchmarks/embed_throughput.py             # starter model, 112 px, 256 images, 1024 texts
    python benchmarks/embed_throughput.py --device cuda --images DIR --count 5000
    python benchmarks/embed_throughput.py --smoke
    python benchmarks/embed_throughput.py --device cuda --precision fp32 --channels-last off   # the knobs, off

Images: ``embed.embed_images`` reads, decodes and eval-transforms real image files (drawn shapes
written to a temp dir, or ``--images DIR``) through its DataLoader, for each ``--workers`` value;
the reference runs ``model.encode_image`` + normalise in batches of the same size over tensors
decoded and transformed beforehand (no I/O, no decoding in the loop): it leaves out all loading,
so the ratio shows what reading + decoding + resizing cost on top of the model. Ratio = our
seconds / bare seconds, lower is better. Target: <= 1.1. Both paths use the same ``--precision`` (``auto``: bf16 on CUDA) and
memory format (``--channels-last auto``: on CUDA); the table adds ``embed_images`` with
``batch_size="auto"`` (starts at ``AUTO_BATCH`` of the device, halves on out-of-memory).
Texts: ``embed.embed_texts`` texts/s (tokenisation included) and, for information, the ratio
to ``encode_text`` over pre-made tokens (which leaves out tokenisation; same direction:
seconds / seconds). Medians of ``--repeats`` passes after ``--warmup``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import _bench as B
import torch
import torch.nn.functional as F

from clipopt_core.data.datasets import ImageDataset, eval_transform
from clipopt_core.models.encode import autocast, embed_images, embed_texts

WORDS = ("a", "photo", "of", "red", "small", "cat", "house", "drawing", "with", "blue", "sky", "and", "two", "dogs")


def texts(count: int) -> list[str]:
    """Captions of 4-16 words, all distinct."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + i % 13)) + f" {i}" for i in range(count)]


def bare_images(bundle, uris: list[str], args):
    dataset = ImageDataset(uris, [0] * len(uris), eval_transform(bundle.image_size, bundle.mean, bundle.std,
                                                                  bundle.interpolation), cache_decoded=False)
    pixels = torch.stack([dataset[i][0] for i in range(len(uris))])  # decoded + transformed up front
    model = bundle.model.eval()
    memory_format = torch.channels_last if _channels_last(args) else torch.contiguous_format
    model.to(memory_format=memory_format)
    pixels = pixels.contiguous(memory_format=memory_format)

    @torch.inference_mode()
    def run() -> None:
        for start in range(0, len(pixels), args.batch):
            with autocast(torch.device(args.device), args.precision):
                features = model.encode_image(pixels[start:start + args.batch].to(args.device, non_blocking=True))
            F.normalize(features.float(), dim=-1).cpu()

    return run


def bare_texts(bundle, captions: list[str], args):
    tokens = [bundle.tokenize(captions[s:s + args.text_batch]) for s in range(0, len(captions), args.text_batch)]
    model = bundle.model.eval()

    @torch.inference_mode()
    def run() -> None:
        for chunk in tokens:
            with autocast(torch.device(args.device), args.precision):
                features = model.encode_text(chunk.to(args.device))
            F.normalize(features.float(), dim=-1).cpu()

    return run


def _channels_last(args) -> bool:
    return args.device.startswith("cuda") if args.channels_last == "auto" else args.channels_last == "on"


def main(argv: list[str] | None = None) -> int:
    ap = B.parser(__doc__)
    ap.add_argument("--count", type=int, default=None, help="images (default 256; smoke 32)")
    ap.add_argument("--texts", type=int, default=None, help="texts (default 1024; smoke 64)")
    ap.add_argument("--batch", type=int, default=64, help="image batch (embed_images' default)")
    ap.add_argument("--text-batch", type=int, default=256, help="text batch (embed_texts' default)")
    ap.add_argument("--workers", default=None, help="comma-separated num_workers for embed_images (default 0,1; smoke 0)")
    ap.add_argument("--images", default=None, help="image source folder or manifest (default: drawn shapes in a temp dir)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    args = B.finish_args(ap.parse_args(argv), warmup=1, repeats=3)
    args.count = args.count or (32 if args.smoke else 256)
    args.texts = args.texts or (64 if args.smoke else 1024)
    workers = [int(w) for w in (args.workers or ("0" if args.smoke else "0,1")).split(",")]
    bundle = B.load(args)
    B.header(args, image_px=bundle.image_size, images=args.count, texts=args.texts, batch=args.batch,
             text_batch=args.text_batch, workers=workers, precision=args.precision, channels_last=_channels_last(args))

    with tempfile.TemporaryDirectory() as tmp:
        uris, _ = B.source_images(args.images) if args.images else B.shapes_images(Path(tmp) / "shapes", args.count)
        uris = uris[: args.count]
        options = dict(device=args.device, precision=args.precision, channels_last=_channels_last(args))
        runs = {f"embed_images num_workers={w}": (lambda w=w: embed_images(bundle, uris, batch_size=args.batch,
                                                                           num_workers=w, **options))
                for w in workers}
        runs["embed_images batch_size=auto"] = lambda: embed_images(bundle, uris, batch_size="auto", **options)
        runs["bare encode_image (pre-decoded)"] = bare_images(bundle, uris, args)
        image_times = B.measure_interleaved(runs, warmup=args.warmup, repeats=args.repeats, device=args.device)
    captions = texts(args.texts)
    text_runs = {"embed_texts": lambda: embed_texts(bundle, captions, batch_size=args.text_batch, device=args.device,
                                                    precision=args.precision),
                 "bare encode_text (pre-tokenised)": bare_texts(bundle, captions, args)}
    text_times = B.measure_interleaved(text_runs, warmup=args.warmup, repeats=args.repeats, device=args.device)

    rows = [(name, B.median(t), B.spread(t), len(uris) / B.median(t)) for name, t in image_times.items()]
    rows += [(name, B.median(t), B.spread(t), len(captions) / B.median(t)) for name, t in text_times.items()]
    print(f"## {len(uris)} images from {args.images or 'drawn shapes'}, {len(captions)} texts")
    B.table(["pass", "median_s", "min-max_s", "items/s"], rows)
    bare = B.median(image_times["bare encode_image (pre-decoded)"])
    ratios = {f"images_vs_bare_w{w}": B.median(image_times[f"embed_images num_workers={w}"]) / bare for w in workers}
    ratios["texts_vs_bare"] = B.median(text_times["embed_texts"]) / B.median(text_times["bare encode_text (pre-tokenised)"])
    print(f"embed_texts: {len(captions) / B.median(text_times['embed_texts']):.1f} texts/s")
    print("target: images_vs_bare <= 1.1 (ours / reference seconds, lower is better)")
    B.ratio_line(**ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
