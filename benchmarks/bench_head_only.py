"""Head-only training: full forward pass through the frozen backbone every epoch vs cached features.

    uv run python benchmarks/bench_head_only.py                 # ResNet-152, 64 px, 256 images
    uv run python benchmarks/bench_head_only.py --image-size 128 --n-train 512

Prints the per-epoch time of both paths (train + validation pass), their ratio and the
one-off cost of the feature pass. No assertions: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.models import build_model, head_parameters
from helpers.core import pick_device, seed_everything
from helpers.losses import make_criterion
from helpers.train import fit_head_only


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def synthetic_loader(n: int, args: argparse.Namespace, shuffle: bool, seed: int) -> DataLoader:
    """Random normalised images with random labels: enough to time the passes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    seed_everything(0)
    model = build_model(args.arch, args.num_classes, pretrained=False, freeze="head", image_size=args.image_size)
    fast_model = copy.deepcopy(model)
    common = dict(epochs=args.epochs, criterion=make_criterion("ce"), progress=False)

    print(f"{args.arch}, {args.image_size} px, {args.n_train} train + {args.n_val} val images, "
          f"batch {args.batch_size}, {args.epochs} epochs, device {device}, {torch.get_num_threads()} threads")
    print("\n-- slow path: full forward through the frozen backbone every epoch")
    slow = fit_head_only(model.to(device), synthetic_loader(args.n_train, args, True, 1),
                         synthetic_loader(args.n_val, args, False, 2), use_feature_cache=False,
                         optimizer=torch.optim.AdamW(head_parameters(model), lr=1e-3, weight_decay=0.0), **common)
    print("\n-- fast path: one feature pass, then epochs on cached features")
    fast = fit_head_only(fast_model.to(device), synthetic_loader(args.n_train, args, True, 1),
                         synthetic_loader(args.n_val, args, False, 2), use_feature_cache=True,
                         optimizer=torch.optim.AdamW(head_parameters(fast_model), lr=1e-3, weight_decay=0.0), **common)

    # Median over epochs (the first slow epoch also pays one-off warm-up costs).
    slow_epoch = statistics.median(slow.history["seconds"])
    fast_epoch = statistics.median(fast.history["seconds"])
    feature_pass = fast.feature_seconds
    print("\n== head-only epoch time (train + validation pass), median over epochs")
    print(f"slow (frozen backbone forward each epoch): {slow_epoch:9.4f} s/epoch")
    print(f"fast (cached features):                    {fast_epoch:9.4f} s/epoch")
    print(f"speed-up per epoch:                        {slow_epoch / fast_epoch:9.1f} x")
    print(f"one-off feature pass (train + val):        {feature_pass:9.4f} s")
    print(f"total for {args.epochs} epochs: slow {slow['seconds'].sum():.2f} s, "
          f"fast {feature_pass + fast['seconds'].sum():.2f} s (feature pass included)")


if __name__ == "__main__":
    main()
