"""PatchCamelyon data: the data set (:mod:`.dataset`, HDF5 files and image folders), image folders written as
HDF5 (:mod:`.convert`), image files (:mod:`.images`), the per-channel normaliser (:mod:`.normalizer`) and
training augmentation (:mod:`.augmentation`)."""
from .augmentation import augment_batch, stain_jitter
from .convert import convert_to_hdf5
from .dataset import (CROP, PATCH_SHAPE, SPLITS, PCam, PCamError, balanced_subset, data_fingerprint, image_folder,
                      open_pcam, read_patch_files, split_name, split_paths)
from .images import IMAGE_SUFFIXES, ImageError, read_image, require_pillow
from .normalizer import Normalizer

__all__ = ["PCam", "PCamError", "SPLITS", "CROP", "split_paths", "image_folder", "open_pcam", "data_fingerprint",
           "balanced_subset", "Normalizer", "augment_batch", "stain_jitter", "read_image", "ImageError",
           "IMAGE_SUFFIXES", "require_pillow", "convert_to_hdf5", "read_patch_files", "split_name", "PATCH_SHAPE"]
