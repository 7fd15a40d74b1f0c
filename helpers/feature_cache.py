"""The feature cache behind `helpers.train.fit_head_only`.

With the backbone frozen, its output for an image never changes: run it once over the data
(`extract_features`), keep the pooled features, and train the head on them for as many epochs as
you like, at almost no cost. `feature_loader_like` serves the cached features with the batch size
and sampling of the original loader. Only valid without random augmentation (`augments` tells).

Two kinds of loader are understood: the course's `helpers.loading.TensorLoader` (through its
public `ordered()`, `augments`, `batch_size`, `shuffle`, `sample_weights`, `drop_last`) and a torch
`DataLoader`. Any other iterable of `(x, y)` batches is read as it is, in its own order.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from helpers.core import amp_dtype, autocast, check_normalization, pick_device, progress_bar, to_device
from helpers.loading import TensorLoader

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]


def ordered_loader(loader: Loader) -> Loader:
    """The same data as `loader`, every image once, in a fixed order, without augmentation.

    A TensorLoader gives its `ordered()` view; a torch DataLoader is rebuilt over the same
    dataset without shuffling or sampling; any other iterable is used as it is.
    """
    if isinstance(loader, TensorLoader):
        return loader.ordered()
    if isinstance(loader, DataLoader):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, generator=torch.Generator(),
        )
    return loader


def augments(loader: Loader) -> bool:
    """Does the loader apply random augmentation? Known for a TensorLoader (`loader.augments`);
    a DataLoader's dataset transforms cannot be inspected, so they count as none."""
    return isinstance(loader, TensorLoader) and loader.augments


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Loader,
    device: str | torch.device | None = None,
    *,
    amp: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a (frozen) backbone once over `loader`: (features (N, D) float32 CPU, labels (N,) int64).

    The backbone runs in eval mode (BatchNorm uses its running statistics). The loader is
    read once in order, every image once (`ordered_loader`).
    Do not use loaders with random augmentation: the cache would freeze one random view. A
    TensorLoader must normalise as the backbone's weights need (`core.check_normalization`).
    """
    check_normalization(backbone, loader)
    device = pick_device(device)
    backbone.to(device).eval()
    dtype = amp_dtype(device, amp)
    feats, labels = [], []
    for x, y in progress_bar(ordered_loader(loader), "features", progress):
        x, y = to_device(x, y, device)
        with autocast(device, dtype):
            f = backbone(x)
        feats.append(f.float().flatten(1).cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels).long()


def feature_loader_like(loader: Loader, features: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    """A DataLoader over cached features that mimics `loader` (batch size, shuffling/sampler).

    For a torch DataLoader with a `generator` the batch order is identical to the original's; a
    TensorLoader's shuffling or weighted sampling is redrawn by torch; other iterables give
    batches of 64 in order.
    """
    dataset = TensorDataset(features, labels)
    if isinstance(loader, TensorLoader):
        weights = loader.sample_weights
        sampler = None if weights is None else WeightedRandomSampler(weights, len(dataset), replacement=True)
        return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler,
                          shuffle=sampler is None and loader.shuffle, drop_last=loader.drop_last)
    if not isinstance(loader, DataLoader):
        return DataLoader(dataset, batch_size=64)
    generator = None
    if loader.generator is not None:  # same random state -> same batch order as the slow path
        generator = torch.Generator()
        generator.set_state(loader.generator.get_state())
    sampler = loader.sampler
    if isinstance(sampler, WeightedRandomSampler):
        sampler = WeightedRandomSampler(sampler.weights, sampler.num_samples, sampler.replacement, generator=generator)
    elif isinstance(sampler, RandomSampler):
        sampler = RandomSampler(dataset, sampler.replacement, sampler.num_samples, generator=generator)
    else:
        sampler = None
    return DataLoader(
        dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, generator=generator
    )
