"""PatchCamelyon data: the data set (:mod:`.dataset`, HDF5 files and image folders), image files
(:mod:`.images`), the per-channel normaliser (:mod:`.normalizer`) and training augmentation
(:mod:`.augmentation`)."""
from .augmentation import augment_batch, stain_jitter
from .dataset import (CROP, SPLITS, PCam, PCamError, balanced_subset, data_fingerprint, image_folder, open_pcam,
                      split_paths)
from .images import IMAGE_SUFFIXES, ImageError, read_image, require_pillow
from .normalizer import Normalizer

__all__ = ["PCam", "PCamError", "SPLITS", "CROP", "split_paths", "image_folder", "open_pcam", "data_fingerprint",
           "balanced_subset", "Normalizer", "augment_batch", "stain_jitter", "read_image", "ImageError",
           "IMAGE_SUFFIXES", "require_pillow"]
