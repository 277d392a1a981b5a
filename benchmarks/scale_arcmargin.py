"""ArcMargin step cost against the class count: the lean fused step against the former dense one.

    python benchmarks/scale_arcmargin.py                       # C = 10^3, 10^4, 10^5; B = 64 and 256; D = 512
    python benchmarks/scale_arcmargin.py --classes 1000000 --batches 64 --forms new   # 10^6 (~10 GiB peak)

One optimizer step = forward + backward + ``torch.optim.AdamW.step`` over the proxies [C, D] and a
leaf feature batch [B, D] (the tower's output; the tower's own cost does not depend on C). ``new`` is
:class:`clipopt_core.train.losses.ArcMarginLoss` (one [B, C] buffer, margin on the B target entries);
``old`` is the formulation it replaced, kept here as the reference (cosine, a dense one-hot mask,
the margin computed on all B·C entries, ``F.cross_entropy``), on the same proxies. ``new-bf16`` adds
``proxy_dtype="bf16"``. Every (form, B, C) runs in its own process (``benchmarks/_scale.py``): the
seconds are the median of ``--repeats`` steps after one untimed step, the MiB its peak RSS (proxies,
their gradient and AdamW moments included: 16·C·D bytes). The table gives the fitted time exponent
b per row; the RATIO line gives old/new seconds per (B, C), measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._scale import Measurement, child_result, print_growth, run_child  # noqa: E402
from clipopt_core.train.losses import ArcMarginLoss, arc_margin_logits, cosine_fp32  # noqa: E402

DIM = 512


def old_arc_margin(embeddings: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor, scale: float,
                   margin: float) -> torch.Tensor:
    """The ArcMarginLoss.forward before the lean step: several dense [B, C] tensors."""
    cosine = cosine_fp32(embeddings, proxies)
    target = F.one_hot(labels, num_classes=cosine.shape[1]).bool()
    return F.cross_entropy(scale * arc_margin_logits(cosine, target, margin), labels)


def child(form: str, classes: int, batch: int, repeats: int) -> None:
    """Time ``repeats`` optimizer steps of one form at one (B, C); print the SCALE line."""
    torch.manual_seed(0)
    loss = ArcMarginLoss(DIM, classes, proxy_dtype="bf16" if form == "new-bf16" else "fp32")
    features = torch.randn(batch, DIM, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    optimizer = torch.optim.AdamW([features, loss.proxies], lr=1e-4, weight_decay=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if form == "old":
            value = old_arc_margin(features, loss.proxies, labels, loss.scale, loss.margin)
        else:
            value = loss(features, labels)
        value.backward()
        optimizer.step()

    step()  # untimed: allocations, AdamW state
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    child_result(statistics.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--forms", nargs="+", default=["old", "new"], choices=["old", "new", "new-bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--n", type=int)
    parser.add_argument("--batch", type=int)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.batch, args.repeats)
        return
    print(f"# scale_arcmargin: D={DIM} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} repeats={args.repeats}", flush=True)
    rows: dict[str, list[Measurement]] = {}
    for batch in args.batches:
        for form in args.forms:
            rows[f"{form} B={batch}"] = [run_child(__file__, form, n, ["--batch", str(batch), "--repeats",
                                                                       str(args.repeats)]) for n in args.classes]
    print_growth(args.classes, rows)
    if "old" in args.forms and "new" in args.forms:
        ratios = [f"old/new B={batch} C={old.n}: {old.seconds / new.seconds:.2f}x time, "
                  f"{old.peak_rss_mib / new.peak_rss_mib:.2f}x peak RSS"
                  for batch in args.batches
                  for old, new in zip(rows[f"old B={batch}"], rows[f"new B={batch}"])]
        print("RATIO " + "; ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
