"""Datasets as in-memory tensors: bundled digits, CIFAR-10/100 from local files, synthetic."""

from vizpipe.data.base import ImageDataset, batches
from vizpipe.data.cifar import cifar10, cifar100, load_cifar_batch
from vizpipe.data.digits import digits
from vizpipe.data.synthetic import synthetic

__all__ = ["ImageDataset", "batches", "cifar10", "cifar100", "digits", "load_cifar_batch", "synthetic"]
