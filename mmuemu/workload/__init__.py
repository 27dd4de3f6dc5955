"""Workloads: synthetic regions, and process images from ELF files and smaps captures."""

from __future__ import annotations

from mmuemu.workload.elf import load_elf
from mmuemu.workload.image import Image, ImageRegion, map_image
from mmuemu.workload.regions import populated
from mmuemu.workload.smaps import load_smaps, parse_smaps

__all__ = ["Image", "ImageRegion", "load_elf", "load_smaps", "map_image", "parse_smaps", "populated"]
